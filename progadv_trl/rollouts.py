"""Fresh held-out rollouts: the current policy completes held-out prompts, the trainer's reward functions label them.

Single-turn: each prompt (a string or a list of chat messages) gets ``n`` sampled completions with the trainer's
sampling settings (temperature, top-p, top-k, min-p, max completion length), and the weighted sum of the trainer's
reward functions is the reward. Extra dataset columns are passed to the reward functions, as TRL does.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from .data import Message, Trajectory
from .models import unwrap


def _prompt_messages(prompt) -> list[dict]:
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    return [dict(m) for m in prompt]


@torch.no_grad()
def sample_rollouts(trainer, policy, rows: Sequence[dict[str, Any]], n: int, *, seed: int = 0,
                    tag: str = "heldout") -> list[Trajectory]:
    """``n`` completions per row (``row["prompt"]`` plus any other columns), rewarded by ``trainer.reward_funcs``."""
    args = trainer.args
    tok = trainer.processing_class
    model = unwrap(policy)
    gen = {"do_sample": True, "temperature": args.temperature, "max_new_tokens": args.max_completion_length,
           "num_return_sequences": n, "pad_token_id": tok.pad_token_id or tok.eos_token_id}
    for key in ("top_p", "top_k", "min_p"):
        if getattr(args, key, None) is not None:
            gen[key] = getattr(args, key)
    device = next(model.parameters()).device
    out: list[Trajectory] = []
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        for i, row in enumerate(rows):
            out += _complete(trainer, model, tok, gen, row, i, n, tag, device)
    return out


def _complete(trainer, model, tok, gen, row, i, n, tag, device) -> list[Trajectory]:
    chat = _prompt_messages(row["prompt"])
    ids = tok.apply_chat_template(chat, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    input_ids = ids["input_ids"].to(device)
    seqs = model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), **gen)
    completion_ids = [s[input_ids.shape[1]:].tolist() for s in seqs]
    texts = [tok.decode(c, skip_special_tokens=True) for c in completion_ids]
    completions = ([[{"role": "assistant", "content": t}] for t in texts] if not isinstance(row["prompt"], str)
                   else texts)
    extra = {k: [v] * n for k, v in row.items() if k not in ("prompt", "completion")}
    rewards = torch.zeros(n)
    for func, weight in zip(trainer.reward_funcs, trainer.reward_weights.tolist()):
        if isinstance(func, torch.nn.Module):
            raise ValueError("held-out prompts need callable reward functions; reward models are not supported "
                             "for progadv's held-out rollouts yet (pass fixed labelled rollouts as heldout)")
        vals = func(prompts=[row["prompt"]] * n, completions=completions, completion_ids=completion_ids,
                    trainer_state=trainer.state, **extra)
        rewards += weight * torch.tensor([float("nan") if v is None else float(v) for v in vals])
    msgs = [Message(m["role"], m["content"]) for m in chat]
    return [Trajectory(msgs + [Message("assistant", text)], id=f"{tag}-{i}-{k}", group=f"{tag}-{i}",
                       reward=reward) for k, (text, reward) in enumerate(zip(texts, rewards.tolist()))]
