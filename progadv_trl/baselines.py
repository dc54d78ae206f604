"""Per-trajectory confidence baselines from per-token statistics of the policy.

The caller passes the statistic over the ACTION tokens only, in order. Every score is oriented so that higher means
more confident, i.e. more likely to succeed, with the original papers' signs:

* ``self_certainty``: mean over tokens of ``KL(U || p)`` (Kang et al. 2025).
* ``deepconf_*``: token confidence ``C_t = -(1/k) sum_{j<=k} log p_t^{(j)}`` over the top-k log-probs, then mean,
  tail, bottom-10% and lowest sliding-window means (Fu et al. 2025, DeepConf).
* ``policy_logprob`` / ``reference_logprob``: mean token log-prob; ``neg_entropy``: ``-mean(entropy)``.
* ``random``: a deterministic per-id uniform draw.

Note: the progress-advantage paper authors' code scores DeepConf confidence as the un-negated mean of the top-20
log-probs and maximises it, which is higher for LESS confident (flatter) distributions. We do not copy that sign.

Empty token tensors give NaN scores.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence

import torch
from torch import Tensor

from progadv_trl.advantage import token_aggregate

BASELINES = (
    "self_certainty",
    "deepconf_mean",
    "deepconf_tail",
    "deepconf_bottom10",
    "deepconf_lowest",
    "policy_logprob",
    "reference_logprob",
    "neg_entropy",
    "random",
)


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


def deepconf_scores(confidence: Tensor, window: int = 2048, tail: int = 2048) -> dict[str, float]:
    """DeepConf trajectory confidences from ``[T]`` token confidences ``C_t``.

    With ``w = min(window, T)`` and window means ``G_i = (1/w) sum_{t=i}^{i+w-1} C_t`` for ``i = 0 .. T-w``:

    * ``deepconf_mean = mean_t C_t``
    * ``deepconf_tail = mean of the last min(tail, T) C_t``
    * ``deepconf_bottom10 = mean of the ceil(0.1 * (T-w+1)) lowest G_i``
    * ``deepconf_lowest = min_i G_i``

    All NaN when ``T == 0``.
    """
    if window < 1 or tail < 1:
        raise ValueError(f"window and tail must be >= 1, got {window} and {tail}")
    c = _flat64(confidence)
    n = c.numel()
    keys = ("deepconf_mean", "deepconf_tail", "deepconf_bottom10", "deepconf_lowest")
    if n == 0:
        return {k: math.nan for k in keys}
    w = min(window, n)
    csum = torch.cat([c.new_zeros(1), torch.cumsum(c, dim=0)])
    groups = (csum[w:] - csum[:-w]) / w  # [T - w + 1]
    k = -(-groups.numel() // 10)
    return {
        "deepconf_mean": float(c.mean()),
        "deepconf_tail": float(c[-min(tail, n):].mean()),
        "deepconf_bottom10": float(torch.sort(groups).values[:k].mean()),
        "deepconf_lowest": float(groups.min()),
    }


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
