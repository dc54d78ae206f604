"""Selection from scores: the best trajectory of each group (best-of-N) and the decisive error step (attribution)."""

from __future__ import annotations

import math
from collections.abc import Hashable, Sequence

import numpy as np
import torch
from torch import Tensor

ATTRIBUTION_METHODS = ("running_sum", "step", "threshold")


def select_best_of_n(scores: Sequence[float], groups: Sequence[Hashable]) -> dict[Hashable, int]:
    """Index (into ``scores``) of the highest score in each group.

    Ties go to the first occurrence; NaN scores never win unless all of a group's scores are NaN, then its first
    index wins. Groups appear in the order of their first occurrence.
    """
    if len(scores) != len(groups):
        raise ValueError(f"scores ({len(scores)}) and groups ({len(groups)}) differ in length")
    best: dict[Hashable, int] = {}
    for i, (s, g) in enumerate(zip(scores, groups)):
        s = float(s)
        if g not in best:
            best[g] = i
            continue
        b = float(scores[best[g]])
        if not math.isnan(s) and (math.isnan(b) or s > b):
            best[g] = i
    return best


def _as_numpy(step_values: Tensor | Sequence[float]) -> np.ndarray:
    if isinstance(step_values, Tensor):
        step_values = step_values.detach().cpu().to(torch.float64).numpy()
    return np.asarray(step_values, dtype=np.float64).reshape(-1)


def _running_sum(v: np.ndarray) -> np.ndarray:
    """Running sum with NaN steps (e.g. baseline steps with no tokens) contributing 0."""
    return np.cumsum(np.nan_to_num(v, nan=0.0))


def _nan_argmin(v: np.ndarray) -> int:
    """First argmin ignoring NaN; 0 when all are NaN."""
    if np.isnan(v).all():
        return 0
    return int(np.argmin(np.where(np.isnan(v), np.inf, v)))


def predict_mistake(
    step_values: Tensor | Sequence[float], method: str = "running_sum", threshold: float | None = None
) -> int:
    """Predict the decisive error step (0-based position among the ``S`` steps) from ``[S]`` step values.

    * ``running_sum``: ``argmin_s q_s`` with ``q_s = sum_{j<=s} v_j`` (first on ties).
    * ``step``: ``argmin_s v_s`` (first on ties; NaN steps are never picked unless all are NaN).
    * ``threshold``: the earliest ``s`` with ``q_s < threshold``; if none, ``argmin_s q_s``.

    NaN step values count as 0 in running sums. Raises ``ValueError`` for ``S == 0``.
    """
    if method not in ATTRIBUTION_METHODS:
        raise ValueError(f"unknown attribution method {method!r}; valid: {', '.join(ATTRIBUTION_METHODS)}")
    v = _as_numpy(step_values)
    if v.size == 0:
        raise ValueError("cannot attribute a mistake in a trajectory with no steps")
    if method == "step":
        return _nan_argmin(v)
    q = _running_sum(v)
    if method == "threshold":
        if threshold is None:
            raise ValueError("method='threshold' needs a threshold (see fit_attribution_threshold)")
        below = np.flatnonzero(q < threshold)
        if below.size:
            return int(below[0])
    return int(np.argmin(q))


def _threshold_predictions(q: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """``predict_mistake(method="threshold")`` for one running sum ``q`` [S] and many thresholds [C], ``[C]``.

    The first ``s`` with ``q_s < thr`` is the first ``s`` with ``prefix_min(q)_s < thr``; ``-prefix_min`` is
    non-decreasing, so a right-sided ``searchsorted`` finds it.
    """
    neg_prefix_min = -np.minimum.accumulate(q)
    first = np.searchsorted(neg_prefix_min, -thresholds, side="right")
    return np.where(first < q.size, first, int(np.argmin(q)))


def fit_attribution_threshold(
    step_values_list: Sequence[Tensor | Sequence[float]], mistake_steps: Sequence[int]
) -> float:
    """Choose the threshold for ``predict_mistake(method="threshold")`` on labelled held-out trajectories.

    Candidates: with ``u`` the sorted distinct running-sum values of all trajectories, the midpoints of consecutive
    values of ``[u_0 - 1, u_0, ..., u_max, u_max + 1]`` (one per distinct behaviour of the rule ``q_s < thr``).
    Picks the candidate with the highest exact-step accuracy, ties to the smallest mean ``|pred - actual|``, then to
    the first (smallest) candidate. Trajectories with no steps are skipped.
    """
    if len(step_values_list) != len(mistake_steps):
        raise ValueError(
            f"step_values_list ({len(step_values_list)}) and mistake_steps ({len(mistake_steps)}) differ in length"
        )
    qs, actual = [], []
    for v, m in zip(step_values_list, mistake_steps):
        v = _as_numpy(v)
        if v.size:
            qs.append(_running_sum(v))
            actual.append(int(m))
    if not qs:
        raise ValueError("no labelled trajectory with at least one step to fit a threshold on")
    u = np.unique(np.concatenate(qs))
    u = u[np.isfinite(u)]
    if u.size == 0:
        raise ValueError("no finite running-sum value to fit a threshold on")
    ext = np.concatenate([[u[0] - 1.0], u, [u[-1] + 1.0]])
    candidates = (ext[:-1] + ext[1:]) / 2.0
    preds = np.stack([_threshold_predictions(q, candidates) for q in qs])  # [N, C]
    target = np.asarray(actual)[:, None]
    hits = (preds == target).sum(axis=0)  # integer counts: exact ties
    abs_err = np.abs(preds - target).sum(axis=0)
    best = np.lexsort((np.arange(candidates.size), abs_err, -hits))[0]
    return float(candidates[best])
