"""Run episodes with an LM policy (unconstrained sampling at temperature ``T``) and label them exactly.

:func:`run_episodes` is the environment loop shared by GRPO's rollout function and evaluation: per turn it samples a
reply token by token from ``softmax(z / T)`` until the end-of-turn token (at most the longest valid reply's length),
steps the environment, and appends the observation's tokens. :func:`sample_episodes` turns episodes into
:class:`~progadv_trl.data.Trajectory` objects labelled with the exact ``A*`` of the reference's KL-regularised optimum.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Sequence

import torch

from ..data import Trajectory
from .codec import ChatCodec
from .decoding import IncrementalBatch
from .exact import ExactSolver


@dataclass
class Episode:
    """One episode: the replies (valid index or ``None``), their texts, the states after each, and the token view TRL
    trains on: ``completion_ids`` (replies and the observations between them), ``env_mask`` (1 = sampled by the
    policy, 0 = observation) and the sampling log-probs (0 at observation tokens)."""

    task: object
    replies: list = field(default_factory=list)
    texts: list = field(default_factory=list)
    states: list = field(default_factory=list)
    prompt_ids: list = field(default_factory=list)
    completion_ids: list = field(default_factory=list)
    env_mask: list = field(default_factory=list)
    logprobs: list = field(default_factory=list)

    @property
    def reward(self) -> float:
        """1 if the last state is a success (the reward of every built-in task), else 0."""
        return 1.0 if self.states and self.states[-1].success else 0.0

    @property
    def done(self) -> bool:
        return bool(self.states) and self.states[-1].done


@torch.no_grad()
def run_episodes(model, codec: ChatCodec, tasks: Sequence, *, temperature: float = 1.0,
                 generator: torch.Generator | None = None, rng: random.Random | None = None,
                 batch_size: int = 256) -> list[Episode]:
    """One episode per task entry (repeat a task for a group), sampled with ``model`` at ``temperature``; ``rng``
    draws the environment's randomness (start states where the task has several, transitions)."""
    rng = rng or random.Random(0)
    was_training = model.training
    model.eval()
    try:
        out = []
        for i in range(0, len(tasks), batch_size):
            out += _run_batch(model, codec, tasks[i: i + batch_size], temperature, generator, rng)
        return out
    finally:
        model.train(was_training)


def _run_batch(model, codec, tasks, temperature, generator, rng) -> list[Episode]:
    env = codec.env
    eps = [Episode(t, prompt_ids=list(codec.prompt_ids(t))) for t in tasks]
    state = [env.reset(t, rng) for t in tasks]
    reply: list[list[int]] = [[] for _ in tasks]
    pending = [list(e.prompt_ids) for e in eps]
    batch = IncrementalBatch(model, len(eps), codec.tokenizer.pad_token_id or 0)
    while any(pending):
        logits, lengths = batch.feed(pending)
        last = logits[torch.arange(len(eps)), (lengths - 1).clamp(min=0)] / temperature
        logp = torch.log_softmax(last, -1)
        tokens = torch.multinomial(logp.exp(), 1, generator=generator).squeeze(1).tolist()
        pending = [[] for _ in eps]
        for b, e in enumerate(eps):
            if e.done or not lengths[b]:
                continue
            tok = tokens[b]
            reply[b].append(tok)
            e.completion_ids.append(tok)
            e.env_mask.append(1)
            e.logprobs.append(float(logp[b, tok]))
            if tok != codec.eos_id and len(reply[b]) < codec.max_reply_tokens:
                pending[b] = [tok]
                continue
            index = codec.reply_index(reply[b])
            text = env.replies[index] if index is not None else codec.tokenizer.decode(
                reply[b], skip_special_tokens=True)
            nxt = env.step(e.task, state[b], index, rng)
            e.replies.append(index)
            e.texts.append(text)
            e.states.append(nxt)
            state[b], reply[b] = nxt, []
            if not nxt.done:
                obs = list(codec.observation_ids(env.observation(e.task, env.observe(nxt)), False))
                e.completion_ids += obs
                e.env_mask += [0] * len(obs)
                e.logprobs += [0.0] * len(obs)
                pending[b] = [tok] + obs
    return eps


def to_trajectory(env, episode: Episode, solver: ExactSolver | None = None, *, margin: float = 0.1,
                  **fields) -> Trajectory:
    """The episode as a :class:`~progadv_trl.data.Trajectory`; ``metadata`` holds the task, the replies and the
    environment's facts (``env.episode_metadata``: positions, or the hidden fault and the outcomes); with a solver
    also the exact per-step values (see :meth:`~progadv_trl.envs.exact.ExactSolution.annotate`) and
    ``mistake_step`` the message index of the decisive error (assistant turn ``t`` is message ``2 + 2t``)."""
    facts = env.episode_metadata(episode.task, episode.states)
    meta: dict = {"task": facts.pop("task"), "replies": list(episode.replies), **facts}
    mistake = None
    if solver is not None:
        sol = solver(episode.task)
        values = sol.annotate(episode.replies, episode.states, margin=margin)
        turn = values.pop("mistake_turn")
        mistake = None if turn is None else 2 + 2 * turn
        meta.update(values, beta=sol.beta, success_reference=sol.success_reference,
                    success_soft=sol.success_soft, success_optimal=sol.success_optimal)
    return env.to_trajectory(episode.task, episode.texts, episode.states, mistake_step=mistake, metadata=meta,
                             **fields)


def sample_episodes(model, tokenizer, env, n: int, temperature: float = 1.0, seed: int = 0, *,
                    reference=None, beta: float = 0.04, solver: ExactSolver | None = None, group_size: int = 8,
                    tasks: Sequence | None = None, margin: float = 0.1) -> list[Trajectory]:
    """``n`` episodes of ``model`` in groups of ``group_size`` per task (tasks cycled in a seeded order).

    The exact labels come from ``solver``, or from the DP with ``reference``'s oracle at ``temperature`` and
    ``beta`` (the reference the policy was KL-regularised toward, at the trainer's temperature).
    """
    from .oracle import LMReplyOracle

    codec = ChatCodec(tokenizer, env)
    if solver is None and reference is not None:
        solver = ExactSolver(env, LMReplyOracle(reference, codec, temperature), beta)
    pool = list(tasks or env.tasks())
    random.Random(seed).shuffle(pool)
    n_groups = -(-n // group_size)
    group_tasks = [pool[g % len(pool)] for g in range(n_groups)]
    flat = [t for t in group_tasks for _ in range(group_size)][:n]
    episodes = run_episodes(model, codec, flat, temperature=temperature,
                            generator=torch.Generator().manual_seed(seed), rng=random.Random(seed))
    return [to_trajectory(env, e, solver, margin=margin, id=f"{seed}-{i}", group=f"{seed}-g{i // group_size}")
            for i, e in enumerate(episodes)]
