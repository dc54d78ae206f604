"""A reference LM with value-irrelevant preferences: a tiny model fine-tuned on imperfect demonstrations.

Each built-in task has its demonstrator (:mod:`~progadv_trl.envs.tasks`; the repair task's:
:class:`~progadv_trl.envs.repair.RepairDemonstrator`). The number-line demonstrator picks an action with
``P(a | s) ∝ exp(skill * [a moves toward the goal] + bias * [a == bias_action])`` (state-independent bias, often
wrong), then a paraphrase of it with the reply list's frequencies (70% / 20% / 8% / 2%
by default). The reference learns those preferences by next-token training on the reply tokens (end-of-turn
included) of demonstration episodes; observations are context. It is saved like a pretrained checkpoint (model and
byte-level BPE tokenizer with Qwen3's chat template) and loaded back with ``AutoModelForCausalLM`` / ``AutoTokenizer``.
"""

from __future__ import annotations

import json
import math
import os
import random
from pathlib import Path

import numpy as np
import torch

from .codec import ChatCodec
from .number_line import ACTIONS, NumberLineEnv, State, Task


class NoisyDemonstrator:
    """``P(reply | state)`` of the demonstrations (see the module docstring)."""

    def __init__(self, env: NumberLineEnv, skill: float = 1.0, bias: float = 0.7, bias_action: str = "left"):
        self.env, self.skill, self.bias, self.bias_action = env, skill, bias, ACTIONS.index(bias_action)

    def describe(self) -> dict:
        return {"skill": self.skill, "bias": self.bias, "bias_action": ACTIONS[self.bias_action]}

    def action_probs(self, task: Task, state: State) -> np.ndarray:
        toward = 1 if task.goal > state.pos else 0
        logits = np.array([self.skill * (a == toward) + self.bias * (a == self.bias_action)
                           for a in range(len(ACTIONS))], dtype=float)
        p = np.exp(logits - logits.max())
        return p / p.sum()

    def reply_probs(self, task: Task, state: State) -> np.ndarray:
        pa = self.action_probs(task, state)
        freq = np.array(self.env.reply_frequency)
        act = np.array(self.env.reply_action)
        totals = np.array([freq[act == a].sum() for a in range(len(ACTIONS))])
        return pa[act] * freq / totals[act]

    def episode(self, task: Task, rng: random.Random) -> tuple[list[int], list[State]]:
        state, replies, states = self.env.initial_state(task), [], []
        while not state.done:
            y = rng.choices(range(len(self.env.replies)), weights=self.reply_probs(task, state))[0]
            state = self.env.step(task, state, y, rng)
            replies.append(y)
            states.append(state)
        return replies, states


def episode_ids(codec: ChatCodec, task, replies, states) -> tuple[list[int], list[int]]:
    """``(input_ids, labels_mask)`` of an episode: 1 on reply tokens (end-of-turn included), 0 on context."""
    ids, mask = list(codec.prompt_ids(task)), [0] * len(codec.prompt_ids(task))
    for t, (y, s) in enumerate(zip(replies, states)):
        ids += codec.reply_ids[y]
        mask += [1] * len(codec.reply_ids[y])
        if t < len(replies) - 1:
            obs = codec.observation_ids(codec.env.observation(task, codec.env.observe(s)), False)
            ids += obs
            mask += [0] * len(obs)
    return ids, mask


def sft(model, sequences: list[tuple[list[int], list[int]]], *, steps: int, batch_size: int = 32, lr: float = 3e-3,
        seed: int = 0, pad_id: int = 0, progress: bool = False) -> list[float]:
    """Plain next-token training on the masked tokens; returns the loss per step (``progress``: a progress bar)."""
    from tqdm.auto import tqdm

    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / steps)))
    model.train()
    losses = []
    for _ in tqdm(range(steps), desc="reference SFT", disable=not progress, mininterval=2.0):
        rows = [sequences[i] for i in torch.randint(len(sequences), (batch_size,), generator=gen).tolist()]
        width = max(len(ids) for ids, _ in rows)
        ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
        attn = torch.zeros_like(ids)
        target = torch.zeros_like(ids, dtype=torch.bool)
        for r, (x, m) in enumerate(rows):
            ids[r, : len(x)], attn[r, : len(x)], target[r, : len(x)] = torch.tensor(x), 1, torch.tensor(m).bool()
        logp = torch.log_softmax(model(input_ids=ids, attention_mask=attn).logits[:, :-1].float(), -1)
        nll = -logp.gather(-1, ids[:, 1:, None]).squeeze(-1)[target[:, 1:]].mean()
        opt.zero_grad()
        nll.backward()
        opt.step()
        sched.step()
        losses.append(nll.item())
    model.eval()
    return losses


def train_reference(output_dir: str | os.PathLike, env=None, *, n_demos: int = 3000,
                    steps: int = 300, batch_size: int = 32, lr: float = 3e-3, hidden_size: int = 64,
                    num_layers: int = 2, vocab_size: int = 768, skill: float | None = None,
                    bias: float | None = None, demonstrator: dict | None = None, init_std: float = 0.1,
                    seed: int = 0, progress: bool = False) -> Path:
    """Build a tokenizer and a tiny Qwen2, train it on demonstrations, save both to ``output_dir``
    (``progress``: show a progress bar over the SFT steps).

    ``env`` is any built-in task's environment (default: the number line); its demonstrator
    (:func:`~progadv_trl.envs.tasks.spec_for_env`) gets ``skill`` and ``bias`` when given (else its own defaults:
    1.0 and 0.7 for the number line) and the other arguments in ``demonstrator``.

    ``init_std`` is the weights' initial standard deviation (``initializer_range``). With transformers' default 0.02
    the 64-wide model sat on a plateau for 900 SFT steps (lr 3e-3 and 1e-2): it learned the replies' marginal
    frequencies and gave the same reply distribution in every state. With 0.1 it reads the state within 300 steps
    and its ``P(right | s)`` is within 0.03 of the demonstrator's at the start states after 900.
    """
    from transformers import AutoTokenizer

    from ..tiny import build_model, build_tokenizer, default_corpus
    from .tasks import spec_for_env

    env = env or NumberLineEnv()
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    build_tokenizer(out, vocab_size=vocab_size, corpus=default_corpus() + env.corpus() * 4)
    tokenizer = AutoTokenizer.from_pretrained(str(out))  # the class every later user will get
    model = build_model(tokenizer, hidden_size=hidden_size, num_layers=num_layers, seed=seed,
                        initializer_range=init_std)
    codec = ChatCodec(tokenizer, env)
    demo_kwargs = {**({} if skill is None else {"skill": skill}), **({} if bias is None else {"bias": bias}),
                   **(demonstrator or {})}
    demo, rng, tasks = spec_for_env(env).demonstrator(env, **demo_kwargs), random.Random(seed), env.tasks()
    data = [episode_ids(codec, task, *demo.episode(task, rng)) for task in (rng.choice(tasks) for _ in range(n_demos))]
    losses = sft(model, data, steps=steps, batch_size=batch_size, lr=lr, seed=seed,
                 pad_id=tokenizer.pad_token_id or 0, progress=progress)
    model.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
    info = {**demo.describe(), "n_demos": n_demos, "steps": steps, "init_std": init_std,
            "final_loss": float(np.mean(losses[-20:])), "env": env.config()}
    (out / "demonstrations.json").write_text(json.dumps(info, indent=2), encoding="utf-8")
    return out
