"""The confidence baselines reported beside progress advantage: their formulas and their registry.

Each baseline reads one per-token statistic of the policy (or the reference) over the ACTION tokens, in order, and
is oriented so that higher means more confident, i.e. more likely to succeed, with the original papers' signs:

* ``self_certainty``: mean over tokens of ``KL(U || p)`` (Kang et al. 2025).
* ``deepconf_*``: token confidence ``C_t = -(1/k) sum_{j<=k} log p_t^{(j)}`` over the top-k log-probs, then mean,
  tail, bottom-10% and lowest sliding-window means (Fu et al. 2025, DeepConf).
* ``policy_logprob`` / ``reference_logprob``: mean token log-prob; ``neg_entropy``: ``-mean(entropy)``.
* ``random``: a deterministic per-id uniform draw.

Note: the progress-advantage paper authors' code scores DeepConf confidence as the un-negated mean of the top-20
log-probs and maximises it, which is higher for LESS confident (flatter) distributions. We do not copy that sign.

Empty token tensors give NaN scores. :data:`REGISTRY` is the one place that says, per baseline, which statistic it
needs and how it scores a trajectory and its steps: the scorer, results, CLI and monitor all read it. Adding a
baseline is one :class:`Baseline` entry here (and its test).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from progadv_trl.advantage import token_aggregate

def _flat64(values: Tensor) -> Tensor:
    return torch.as_tensor(values).detach().reshape(-1).to(torch.float64)


def mean_score(values: Tensor) -> float:
    """Mean of ``[T]`` token values (``policy_logprob``, ``reference_logprob``); NaN when ``T == 0``.

    ``neg_entropy`` is ``-mean_score(entropy)``.
    """
    v = _flat64(values)
    return float(v.mean()) if v.numel() else math.nan


def self_certainty_score(self_certainty: Tensor) -> float:
    """Self-certainty: ``mean_t KL(U || p_t)`` over ``[T]`` per-token values; NaN when ``T == 0``."""
    return mean_score(self_certainty)


def _window_means(confidence: Tensor, window: int) -> Tensor:
    """``[T - w + 1]`` sliding-window means ``G_i`` of ``[T]`` values, ``w = min(window, T)``."""
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    c = _flat64(confidence)
    w = min(window, c.numel())
    csum = torch.cat([c.new_zeros(1), torch.cumsum(c, dim=0)])
    return (csum[w:] - csum[:-w]) / w


def deepconf_mean(confidence: Tensor) -> float:
    """``mean_t C_t`` over ``[T]`` token confidences; NaN when ``T == 0``."""
    return mean_score(confidence)


def deepconf_tail(confidence: Tensor, tail: int = 2048) -> float:
    """Mean of the last ``min(tail, T)`` token confidences; NaN when ``T == 0``."""
    if tail < 1:
        raise ValueError(f"tail must be >= 1, got {tail}")
    c = _flat64(confidence)
    return float(c[-min(tail, c.numel()):].mean()) if c.numel() else math.nan


def deepconf_bottom10(confidence: Tensor, window: int = 2048) -> float:
    """Mean of the ``ceil(0.1 * (T - w + 1))`` lowest window means ``G_i``; NaN when ``T == 0``."""
    if _flat64(confidence).numel() == 0:
        return math.nan
    groups = _window_means(confidence, window)
    k = -(-groups.numel() // 10)  # ceil
    return float(torch.sort(groups).values[:k].mean())


def deepconf_lowest(confidence: Tensor, window: int = 2048) -> float:
    """``min_i G_i``, the lowest window mean; NaN when ``T == 0``."""
    return float(_window_means(confidence, window).min()) if _flat64(confidence).numel() else math.nan


def deepconf_scores(confidence: Tensor, window: int = 2048, tail: int = 2048) -> dict[str, float]:
    """The four DeepConf trajectory confidences from ``[T]`` token confidences ``C_t``.

    With ``w = min(window, T)`` and window means ``G_i = (1/w) sum_{t=i}^{i+w-1} C_t`` for ``i = 0 .. T-w``:
    ``deepconf_mean = mean_t C_t``, ``deepconf_tail`` = mean of the last ``min(tail, T)`` ``C_t``,
    ``deepconf_bottom10`` = mean of the ``ceil(0.1 * (T-w+1))`` lowest ``G_i``, ``deepconf_lowest = min_i G_i``.
    All NaN when ``T == 0``.
    """
    if window < 1 or tail < 1:
        raise ValueError(f"window and tail must be >= 1, got {window} and {tail}")
    return {"deepconf_mean": deepconf_mean(confidence), "deepconf_tail": deepconf_tail(confidence, tail),
            "deepconf_bottom10": deepconf_bottom10(confidence, window),
            "deepconf_lowest": deepconf_lowest(confidence, window)}


def random_scores(ids: Sequence[str], seed: int = 0) -> list[float]:
    """Uniform ``[0, 1)`` scores, one per id, from ``sha256(f"{seed}:{id}")``: same id and seed give the same score,
    independently of order and batch."""
    out = []
    for i in ids:
        digest = hashlib.sha256(f"{seed}:{i}".encode()).digest()
        out.append((int.from_bytes(digest[:8], "big") >> 11) / float(1 << 53))
    return out


def step_baseline_values(values: Tensor, step_index: Tensor, n_steps: int) -> Tensor:
    """Per-step token mean of a token statistic, ``[S]``: ``out[s] = mean{values[t] : step_index[t] == s}``.

    Context positions (``step_index == -1``) are ignored. A step with no tokens gives NaN (not 0.0 as in
    :func:`progadv_trl.advantage.token_aggregate`), so that an ``argmin`` attribution never picks it on a statistic
    whose scale does not include 0. Attributing with a baseline: the predicted error step is the argmin.
    """
    step_index = torch.as_tensor(step_index)
    out = token_aggregate(values, step_index, n_steps, "mean")
    count = torch.bincount(step_index[step_index >= 0].to(torch.long), minlength=n_steps)
    return torch.where(count > 0, out, torch.full_like(out, math.nan))


# ----------------------------------------------------------------------------------------------------- registry
def _mean_steps(sign: float):
    def steps(values: Tensor, message_index: Tensor, actions: Sequence[int], trajectory_id: str) -> list[float]:
        return (sign * step_baseline_values(values, message_index, len(actions))).tolist()
    return steps


@dataclass(frozen=True)
class Baseline:
    """One baseline: what it reads and how it scores.

    Attributes:
        name: its key in outputs, tables and metric names.
        statistic: the per-token statistic it reads: ``"logprob"``, ``"entropy"``, ``"self_certainty"``,
            ``"topk_confidence"`` (the policy's) or ``"ref_logprob"`` (the reference's, on its own tokens);
            ``None`` for none.
        trajectory: ``(values [T] over the action tokens, config, trajectory id) -> score`` (higher = more likely
            to succeed).
        steps: ``(values [L], message ordinal per token [L] (-1 = context), action messages, trajectory id) ->
            [S]`` per-action-message values for attribution (higher = better step; the predicted error is their
            argmin). Default: the step's token mean of the statistic.
        description: one line for help texts.
    """

    name: str
    statistic: str | None
    trajectory: Callable[[Tensor, Any, str], float]
    steps: Callable[[Tensor, Tensor, Sequence[int], str], list[float]] = _mean_steps(1.0)
    description: str = ""


def _random_trajectory(values: Tensor, config: Any, trajectory_id: str) -> float:
    return random_scores([trajectory_id], seed=config.seed)[0]


def _random_steps(values: Tensor, message_index: Tensor, actions: Sequence[int], trajectory_id: str) -> list[float]:
    return random_scores([f"{trajectory_id}/{m}" for m in actions], seed=0)


REGISTRY: dict[str, Baseline] = {b.name: b for b in (
    Baseline("self_certainty", "self_certainty", lambda v, cfg, i: mean_score(v),
             description="mean KL(uniform || p) over the action tokens"),
    Baseline("deepconf_mean", "topk_confidence", lambda v, cfg, i: deepconf_mean(v),
             description="mean top-k token confidence"),
    Baseline("deepconf_tail", "topk_confidence", lambda v, cfg, i: deepconf_tail(v, cfg.deepconf_tail),
             description="mean confidence of the last deepconf_tail tokens"),
    Baseline("deepconf_bottom10", "topk_confidence", lambda v, cfg, i: deepconf_bottom10(v, cfg.deepconf_window),
             description="mean of the lowest 10% window confidences"),
    Baseline("deepconf_lowest", "topk_confidence", lambda v, cfg, i: deepconf_lowest(v, cfg.deepconf_window),
             description="lowest window confidence"),
    Baseline("policy_logprob", "logprob", lambda v, cfg, i: mean_score(v),
             description="mean token log-prob under the policy"),
    Baseline("reference_logprob", "ref_logprob", lambda v, cfg, i: mean_score(v),
             description="mean token log-prob under the reference"),
    Baseline("neg_entropy", "entropy", lambda v, cfg, i: -mean_score(v), _mean_steps(-1.0),
             description="minus the mean token entropy"),
    Baseline("random", None, _random_trajectory, _random_steps, description="a uniform draw per trajectory id"),
)}
BASELINES = tuple(REGISTRY)


def policy_statistics(baselines: Sequence[str]) -> tuple[str, ...]:
    """The policy's token statistics that ``baselines`` need, beside its log-prob (always computed)."""
    stats = (REGISTRY[b].statistic for b in baselines)
    return tuple(dict.fromkeys(["logprob", *(s for s in stats if s not in (None, "ref_logprob"))]))
