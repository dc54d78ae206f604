"""Which failure-attribution rule to use, chosen on validation data: every rule of
:func:`~progadv_trl.selection.predict_mistake` x every method, on labelled number-line episodes.

Inputs are episodes from :func:`~progadv_trl.envs.sampling.sample_episodes` (exact labels in ``metadata``, the
decisive mistake in ``mistake_step``: assistant turn ``t`` is message ``2 + 2t``) and the scorer's results for them,
in the same order. Step values are taken per TURN (``action_values`` reordered by
:func:`~progadv_trl.envs.evaluation.action_index`), so a prediction is a turn and ``offset = predicted - true`` turn
(``< 0``: blamed too early, ``> 0``: too late).

Methods: progress advantage, every baseline in ``results[0].action_values``, and two label-based rows:
``exact_advantage`` (the exact ``A*``, the ceiling of what progress advantage estimates) and
``oracle_success_gap`` (``S*(s, a) - S*(s)``, from which the label is defined: the first turn losing more than the
labelling margin, so ``first_below`` fitted on it is a sanity check that should reach 1.0).

Protocol: :func:`split_groups` halves the episodes by group; thresholds of the threshold rules are fitted on the
validation half; :func:`choose_rule` picks a method's rule from the validation table; the test table is the honest
estimate of the chosen rule. :func:`calibration` bins the rule's margin (:func:`~progadv_trl.selection.mistake_margin`)
to show when an attribution can be trusted.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

from ..data import Trajectory
from ..selection import (ATTRIBUTION_METHODS, THRESHOLD_METHODS, fit_attribution_threshold, mistake_margin,
                         predict_mistake)
from ..trajectory_scores import METHOD, TrajectoryScore
from .evaluation import EXACT, ORACLE, action_index

LABEL_KEYS = {EXACT: "exact_advantage", ORACLE: "optimal_success_advantage"}


def mistake_turn(traj: Trajectory) -> int | None:
    """The labelled decisive mistake as a turn (``(mistake_step - 2) // 2``), ``None`` when unlabelled."""
    return None if traj.mistake_step is None else (traj.mistake_step - 2) // 2


def split_groups(trajectories: Sequence[Trajectory], seed: int = 0) -> tuple[list[int], list[int]]:
    """``(validation_idx, test_idx)``: a deterministic half/half split of whole groups.

    Groups (``trajectory.group``; an episode without one is its own group) in order of first occurrence are permuted
    with ``numpy.random.default_rng(seed)``; the first ``ceil(G / 2)`` go to validation, the rest to test. Both index
    lists are sorted. Episodes of one task's group never straddle the split, so a threshold fitted on validation has
    not seen the test episodes' task draws.
    """
    groups: dict = {}
    for i, t in enumerate(trajectories):
        groups.setdefault(t.group if t.group is not None else ("episode", i), []).append(i)
    members = list(groups.values())
    order = np.random.default_rng(seed).permutation(len(members))
    half = -(-len(members) // 2)
    validation = sorted(i for g in order[:half] for i in members[g])
    test = sorted(i for g in order[half:] for i in members[g])
    return validation, test


def method_names(trajectories: Sequence[Trajectory], results: Sequence[TrajectoryScore]) -> list[str]:
    """Progress advantage, the baselines in ``results[0].action_values``, then the label rows present in metadata."""
    computed = list(results[0].action_values) if results else [METHOD]
    names = [METHOD, *(m for m in computed if m != METHOD)]
    return names + [m for m, key in LABEL_KEYS.items() if trajectories and key in trajectories[0].metadata]


def turn_values(traj: Trajectory, result: TrajectoryScore, method: str) -> np.ndarray:
    """``[T]`` step values of ``method`` per turn of one episode (label rows read from ``traj.metadata``)."""
    if method in LABEL_KEYS:
        return np.asarray(traj.metadata[LABEL_KEYS[method]], dtype=float)
    if method not in result.action_values:
        raise KeyError(f"trajectory {traj.id!r}: no action values for method {method!r} (computed: "
                       f"{', '.join(result.action_values)})")
    values = result.action_values[method]
    return np.asarray([values[i] for i in action_index(traj, result)], dtype=float)


def _labelled(trajectories, results, indices) -> list[int]:
    if len(trajectories) != len(results):
        raise ValueError(f"{len(trajectories)} trajectories but {len(results)} results")
    indices = range(len(trajectories)) if indices is None else indices
    return [i for i in indices if mistake_turn(trajectories[i]) is not None]


def fit_thresholds(trajectories: Sequence[Trajectory], results: Sequence[TrajectoryScore], methods: Sequence[str],
                   rules: Sequence[str], indices: Sequence[int] | None) -> dict[tuple[str, str], float | None]:
    """``(method, rule) -> threshold`` for the threshold rules among ``rules``, fitted on the labelled episodes of
    ``indices`` (:func:`~progadv_trl.selection.fit_attribution_threshold`); ``None`` without labelled episodes."""
    fit = _labelled(trajectories, results, indices)
    out = {}
    for m in methods:
        values = [turn_values(trajectories[i], results[i], m) for i in fit]
        for rule in rules:
            if rule in THRESHOLD_METHODS:
                out[m, rule] = (fit_attribution_threshold(values, [mistake_turn(trajectories[i]) for i in fit], rule)
                                if fit else None)
    return out


def _row(predicted: list[int], actual: list[int], threshold: float | None) -> dict:
    off = np.asarray(predicted, dtype=int) - np.asarray(actual, dtype=int)
    n = int(off.size)
    hist = {int(k): int(c) for k, c in zip(*np.unique(off, return_counts=True))}
    return {"accuracy": float(np.mean(off == 0)) if n else math.nan,
            "mae": float(np.mean(np.abs(off))) if n else math.nan, "n": n, "offset_histogram": hist,
            "too_early": float(np.mean(off < 0)) if n else math.nan,
            "too_late": float(np.mean(off > 0)) if n else math.nan, "threshold": threshold}


def compare_rules(trajectories: Sequence[Trajectory], results: Sequence[TrajectoryScore],
                  methods: Sequence[str] | None = None, rules: Sequence[str] = ATTRIBUTION_METHODS, *,
                  evaluate_idx: Sequence[int] | None = None, fit_idx: Sequence[int] | None = None,
                  seed: int = 0) -> dict[str, dict[str, dict]]:
    """Attribution of every method under every rule on the labelled failures among ``evaluate_idx``.

    Args:
        methods: default :func:`method_names`.
        rules: :data:`~progadv_trl.selection.ATTRIBUTION_METHODS` names.
        evaluate_idx: episodes evaluated (default: all).
        fit_idx: episodes the threshold rules are fitted on; default the validation half of
            ``split_groups(trajectories, seed)``. Pass ``fit_idx=evaluate_idx`` to fit in-sample (e.g. to choose a
            rule on the validation half itself).

    Returns:
        ``{method: {rule: {"accuracy", "mae", "n", "offset_histogram", "too_early", "too_late", "threshold"}}}``:
        exact-turn accuracy, mean ``|offset|``, labelled episodes, ``{offset: count}`` with ``offset = predicted -
        true`` turn, the fractions blamed too early / too late, the fitted threshold (``None`` for the argmin rules).
    """
    for r in rules:
        if r not in ATTRIBUTION_METHODS:
            raise ValueError(f"unknown attribution rule {r!r}; valid: {', '.join(ATTRIBUTION_METHODS)}")
    methods = method_names(trajectories, results) if methods is None else list(methods)
    if fit_idx is None:
        fit_idx = split_groups(trajectories, seed)[0]
    thresholds = fit_thresholds(trajectories, results, methods, rules, fit_idx)
    evaluate = _labelled(trajectories, results, evaluate_idx)
    actual = [mistake_turn(trajectories[i]) for i in evaluate]
    table: dict[str, dict[str, dict]] = {}
    for m in methods:
        values = [turn_values(trajectories[i], results[i], m) for i in evaluate]
        table[m] = {}
        for rule in rules:
            thr = thresholds.get((m, rule))
            if rule in THRESHOLD_METHODS and thr is None:
                table[m][rule] = _row([], [], None)
                continue
            table[m][rule] = _row([predict_mistake(v, rule, thr) for v in values], actual, thr)
    return table


def choose_rule(validation_table: dict[str, dict[str, dict]], method: str = METHOD) -> str:
    """The rule with the highest validation accuracy for ``method``; ties to the lower MAE, then to the order of
    :data:`~progadv_trl.selection.ATTRIBUTION_METHODS`. Rules without a finite accuracy are skipped."""
    if method not in validation_table:
        raise KeyError(f"method {method!r} not in the table (has: {', '.join(validation_table)})")
    rows = [(rule, row) for rule, row in validation_table[method].items()
            if isinstance(row.get("accuracy"), float) and math.isfinite(row["accuracy"])]
    if not rows:
        raise ValueError(f"no rule of {method!r} has a finite accuracy (no labelled failures?)")
    order = {r: k for k, r in enumerate(ATTRIBUTION_METHODS)}
    return min(rows, key=lambda rr: (-rr[1]["accuracy"], rr[1]["mae"], order.get(rr[0], len(order))))[0]


def calibration(trajectories: Sequence[Trajectory], results: Sequence[TrajectoryScore], method: str = METHOD,
                rule: str = "running_sum", threshold: float | None = None, *, indices: Sequence[int] | None = None,
                edges: Sequence[float] | None = None, n_bins: int = 3) -> dict:
    """Attribution accuracy as a function of the rule's margin (:func:`~progadv_trl.selection.mistake_margin`).

    Episodes with one turn are reported apart (``"single_turn"``: nothing else to blame). The others are binned by
    margin with ``edges`` (inner bin boundaries, ascending; default: the ``n_bins``-quantiles of these margins: pass
    the validation half's ``"edges"`` to read the test half on the same bins).

    Returns ``{"edges": [...], "bins": [{"low", "high", "n", "accuracy"}], "single_turn": {"n", "accuracy"}}``
    (``low < margin <= high``; the first bin starts at ``-inf``, the last ends at ``+inf``).
    """
    labelled = _labelled(trajectories, results, indices)
    margins, hits, single = [], [], []
    for i in labelled:
        v = turn_values(trajectories[i], results[i], method)
        hit = predict_mistake(v, rule, threshold) == mistake_turn(trajectories[i])
        if v.size == 1:
            single.append(hit)
        else:
            margins.append(mistake_margin(v, rule, threshold))
            hits.append(hit)
    margins_a, hits_a = np.asarray(margins, dtype=float), np.asarray(hits, dtype=bool)
    if edges is None:
        finite = margins_a[np.isfinite(margins_a)]
        edges = (np.unique(np.quantile(finite, np.arange(1, n_bins) / n_bins)).tolist() if finite.size else [])
    bounds = [-math.inf, *[float(e) for e in edges], math.inf]
    bins = []
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        inside = (margins_a > lo) & (margins_a <= hi)
        n = int(inside.sum())
        bins.append({"low": lo, "high": hi, "n": n, "accuracy": float(hits_a[inside].mean()) if n else math.nan})
    return {"edges": [float(e) for e in edges], "bins": bins,
            "single_turn": {"n": len(single), "accuracy": float(np.mean(single)) if single else math.nan}}


def blame_profile(trajectories: Sequence[Trajectory], results: Sequence[TrajectoryScore], method: str = METHOD,
                  rule: str = "running_sum", threshold: float | None = None, *, indices: Sequence[int] | None = None,
                  margin: float = 0.1) -> dict:
    """Which turns a rule blames on the labelled failures, and the method's step values around the mistake: why a
    rule misses.

    A turn is *dead* when success was already impossible before it (``metadata["exact_value"]`` ``V*(h) = 0``).
    Returns:

    * ``n``, ``n_wrong``: labelled failures, misses;
    * ``last_turn``, ``after_mistake``, ``before_mistake``: fractions of blamed turns that are the episode's last,
      after the labelled mistake, before it;
    * ``blamed_is_loss``: fraction of blamed actions losing more than ``margin`` of success probability
      (``S*(s, a) - S*(s) < -margin``: a real mistake, if not the decisive one);
    * ``wrong_blamed_dead``: fraction of misses that blame a dead turn;
    * ``wrong_blamed_replies``: reply index (``None``: invalid) -> count among misses;
    * ``mean_value``: the method's mean step value (and ``frac_negative``, the fraction below 0) on turns
      ``before`` the mistake, ``at`` it, ``after_live`` and ``after_dead``.
    """
    labelled = _labelled(trajectories, results, indices)
    last = after = before = loss = wrong_dead = 0
    wrong_replies: dict = {}
    by_position: dict[str, list[float]] = {"before": [], "at": [], "after_live": [], "after_dead": []}
    for i in labelled:
        t = trajectories[i]
        v = turn_values(t, results[i], method)
        p, m = predict_mistake(v, rule, threshold), mistake_turn(t)
        alive = [x > 0 for x in t.metadata["exact_value"]]
        last += p == v.size - 1
        after += p > m
        before += p < m
        loss += t.metadata["optimal_success_advantage"][p] < -margin
        if p != m:
            wrong_dead += not alive[p]
            reply = t.metadata["replies"][p]
            wrong_replies[reply] = wrong_replies.get(reply, 0) + 1
        for k, x in enumerate(v):
            where = "before" if k < m else "at" if k == m else "after_live" if alive[k] else "after_dead"
            by_position[where].append(float(x))
    n, n_wrong = len(labelled), after + before

    def frac(k: int, d: int) -> float:
        return k / d if d else math.nan

    return {"n": n, "n_wrong": n_wrong, "last_turn": frac(last, n), "after_mistake": frac(after, n),
            "before_mistake": frac(before, n), "blamed_is_loss": frac(loss, n),
            "wrong_blamed_dead": frac(wrong_dead, n_wrong),
            "wrong_blamed_replies": dict(sorted(wrong_replies.items(), key=lambda kv: -kv[1])),
            "mean_value": {k: float(np.nanmean(x)) if x else math.nan for k, x in by_position.items()},
            "frac_negative": {k: float(np.mean(np.asarray(x) < 0)) if x else math.nan for k, x in by_position.items()}}
