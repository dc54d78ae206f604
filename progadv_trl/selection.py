"""Selection from scores: the best trajectory of each group (best-of-N) and the decisive error step (attribution)."""

from __future__ import annotations

import math
from collections.abc import Hashable, Sequence

import numpy as np
import torch
from torch import Tensor

ATTRIBUTION_METHODS = ("running_sum", "step", "threshold", "change_point", "first_below")
#: Rules that blame the earliest step whose rule value is below a threshold (fitted on held-out data); the others
#: blame the step with the lowest rule value.
THRESHOLD_METHODS = ("threshold", "first_below")
# chosen on validation splits of the number-line demo among the rules that need no fitted threshold (docs/results.md)
DEFAULT_ATTRIBUTION = "change_point"


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


def _check_method(method: str) -> None:
    if method not in ATTRIBUTION_METHODS:
        raise ValueError(f"unknown attribution method {method!r}; valid: {', '.join(ATTRIBUTION_METHODS)}")


def rule_values(step_values: Tensor | Sequence[float], method: str) -> np.ndarray:
    """What attribution rule ``method`` compares, ``[S]`` (lower = more to blame), from ``[S]`` step values ``v``.

    With the running sum ``q_s = sum_{j<=s} v_j`` (NaN steps add 0) and ``q_{-1} = 0``:

    * ``running_sum`` and ``threshold``: ``q_s``;
    * ``step`` and ``first_below``: ``v_s`` (NaN as ``+inf``: never blamed unless every step is NaN);
    * ``change_point``: ``-d_s`` with ``d_s = q_{s-1} - min_{j>=s} q_j``, the largest drop of the running sum
      that starts at step ``s`` (the running sum just before ``s`` minus its lowest point from ``s`` on). When
      every step is positive, ``d_s = -v_s`` and the rule is the ``step`` rule. NaN steps get ``+inf`` (a drop
      starting at a step with no value is blamed on the next step with one).

    Raises ``ValueError`` for an unknown method or ``S == 0``.
    """
    _check_method(method)
    v = _as_numpy(step_values)
    if v.size == 0:
        raise ValueError("cannot attribute a mistake in a trajectory with no steps")
    if method in ("step", "first_below"):
        return np.where(np.isnan(v), np.inf, v)
    q = _running_sum(v)
    if method == "change_point":
        lowest_after = np.minimum.accumulate(q[::-1])[::-1]
        before = np.concatenate([[0.0], q[:-1]])
        r = lowest_after - before
        return np.where(np.isnan(v) & ~np.isnan(v).all(), np.inf, r)
    return q


def predict_mistake(
    step_values: Tensor | Sequence[float], method: str = "running_sum", threshold: float | None = None
) -> int:
    """Predict the decisive error step (0-based position among the ``S`` steps) from ``[S]`` step values.

    With ``r = rule_values(step_values, method)`` (see :func:`rule_values`):

    * ``running_sum``: ``argmin_s q_s`` with ``q_s = sum_{j<=s} v_j``: where the running sum bottoms out;
    * ``step``: ``argmin_s v_s``: the single worst step;
    * ``change_point``: ``argmax_s (q_{s-1} - min_{j>=s} q_j)``: where the running sum's largest drop begins;
    * ``threshold``: the earliest ``s`` with ``q_s < threshold``; if none, ``argmin_s q_s``;
    * ``first_below``: the earliest ``s`` with ``v_s < threshold``; if none, ``argmin_s v_s``.

    Ties go to the first step. ``threshold`` and ``first_below`` need ``threshold`` (see
    :func:`fit_attribution_threshold`). Raises ``ValueError`` for ``S == 0``.
    """
    _check_method(method)
    if method in THRESHOLD_METHODS and threshold is None:
        raise ValueError(f"method={method!r} needs a threshold (see fit_attribution_threshold)")
    r = rule_values(step_values, method)
    if method in THRESHOLD_METHODS:
        below = np.flatnonzero(r < threshold)
        if below.size:
            return int(below[0])
    return int(np.argmin(r))


def mistake_margin(
    step_values: Tensor | Sequence[float], method: str = "running_sum", threshold: float | None = None
) -> float:
    """How clearly :func:`predict_mistake` singles out its step (higher = clearer), in the units of the rule values
    ``r`` (:func:`rule_values`).

    * ``running_sum``, ``step``, ``change_point``: the second-lowest ``r`` minus the lowest (``inf`` for a single
      step; 0 on a tie);
    * ``threshold``, ``first_below``: how far the threshold can move before the blamed step ``s`` changes,
      ``min(threshold - r_s, min_{j<s} r_j - threshold)`` (the second term ``inf`` for ``s = 0``); when no step
      fell below the threshold (the lowest was blamed), ``threshold - min r <= 0``.
    """
    pred = predict_mistake(step_values, method, threshold)
    r = rule_values(step_values, method)
    if method in THRESHOLD_METHODS:
        if not r[pred] < threshold:
            return float(threshold - r.min())
        earlier = float(r[:pred].min()) - threshold if pred else math.inf
        return float(min(threshold - r[pred], earlier))
    if r.size == 1:
        return math.inf
    lowest, second = np.partition(r, 1)[:2]
    return float(second - lowest)


def _threshold_predictions(r: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """``predict_mistake`` of a threshold rule for one rule-value array ``r`` [S] and many thresholds [C], ``[C]``.

    The first ``s`` with ``r_s < thr`` is the first ``s`` with ``prefix_min(r)_s < thr``; ``-prefix_min`` is
    non-decreasing, so a right-sided ``searchsorted`` finds it.
    """
    neg_prefix_min = -np.minimum.accumulate(r)
    first = np.searchsorted(neg_prefix_min, -thresholds, side="right")
    return np.where(first < r.size, first, int(np.argmin(r)))


def fit_attribution_threshold(
    step_values_list: Sequence[Tensor | Sequence[float]], mistake_steps: Sequence[int], method: str = "threshold"
) -> float:
    """Choose the threshold of ``predict_mistake(method=...)`` (``"threshold"`` or ``"first_below"``) on labelled
    held-out trajectories.

    Candidates: with ``u`` the sorted distinct finite rule values (:func:`rule_values`: running sums for
    ``threshold``, step values for ``first_below``) of all trajectories, the midpoints of consecutive values of
    ``[u_0 - 1, u_0, ..., u_max, u_max + 1]`` (one per distinct behaviour of the rule ``r_s < thr``).
    Picks the candidate with the highest exact-step accuracy, ties to the smallest mean ``|pred - actual|``, then to
    the first (smallest) candidate. Trajectories with no steps are skipped.
    """
    if method not in THRESHOLD_METHODS:
        raise ValueError(f"method {method!r} has no threshold; threshold methods: {', '.join(THRESHOLD_METHODS)}")
    if len(step_values_list) != len(mistake_steps):
        raise ValueError(
            f"step_values_list ({len(step_values_list)}) and mistake_steps ({len(mistake_steps)}) differ in length"
        )
    rs, actual = [], []
    for v, m in zip(step_values_list, mistake_steps):
        v = _as_numpy(v)
        if v.size:
            rs.append(rule_values(v, method))
            actual.append(int(m))
    if not rs:
        raise ValueError("no labelled trajectory with at least one step to fit a threshold on")
    u = np.unique(np.concatenate(rs))
    u = u[np.isfinite(u)]
    if u.size == 0:
        raise ValueError("no finite rule value to fit a threshold on")
    ext = np.concatenate([[u[0] - 1.0], u, [u[-1] + 1.0]])
    candidates = (ext[:-1] + ext[1:]) / 2.0
    preds = np.stack([_threshold_predictions(r, candidates) for r in rs])  # [N, C]
    target = np.asarray(actual)[:, None]
    hits = (preds == target).sum(axis=0)  # integer counts: exact ties
    abs_err = np.abs(preds - target).sum(axis=0)
    best = np.lexsort((np.arange(candidates.size), abs_err, -hits))[0]
    return float(candidates[best])
