"""Scored number-line episodes against their exact labels: the demo's metric table.

Inputs are episodes from :func:`~progadv_trl.envs.sampling.sample_episodes` (``metadata`` holds the exact per-step
values, ``mistake_step`` the decisive error) and the scorer's results for them, in the same order. Assistant turn
``t`` of an episode is message ``2 + 2t``.

Rows: progress advantage and every baseline the scorer computed, plus two ceilings built from the labels:

* ``exact_advantage``: the exact ``A*(h, y)`` of the KL-regularised optimum as step values (what progress advantage
  estimates), aggregated like progress advantage (mean over steps, running-sum attribution);
* ``oracle_success_gap``: the unregularised advantage ``S*(s, a) - S*(s)`` (success probability lost against the
  best action) as step values, aggregated by mean, attribution by its argmin.

Every number comes with a 95% bootstrap interval (:func:`bootstrap`): groups of episodes (the best-of-N unit) are
resampled with replacement and the whole table recomputed; "better than" claims use the interval of the paired
difference over the same resamples.

Columns: per-step Spearman with ``A*`` (all steps, and "live" steps where success was still possible and the reply
valid) and with the unregularised advantage; the least-squares slope of the step values on ``A*`` over live steps
(1: same scale; below 1: compressed); AUROC of the trajectory score for success; best-of-N, pass@1
(``mean_success``) and pass@N (``oracle``); failure attribution accuracy and MAE on failed episodes with a labelled
mistake.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from ..data import Trajectory
from ..metrics import evaluate_methods, spearman
from ..selection import DEFAULT_ATTRIBUTION
from ..trajectory_scores import METHOD, TrajectoryScore, evaluation_table

EXACT = "exact_advantage"
ORACLE = "oracle_success_gap"
N_BOOTSTRAP = 200


def action_index(traj: Trajectory, result: TrajectoryScore) -> list[int]:
    """Position in ``result.action_messages`` of each turn of ``traj`` (turn ``t`` is message ``2 + 2t``)."""
    n = len(traj.metadata["exact_advantage"])
    return [result.action_messages.index(2 + 2 * t) for t in range(n)]


def step_arrays(trajectories: Sequence[Trajectory], results: Sequence[TrajectoryScore]) -> dict[str, np.ndarray]:
    """Per action step of every episode (flattened, ``[n_steps]``): ``exact`` (A*), ``success_gap`` (the
    unregularised advantage), ``live`` (bool) and one array per method in ``results[0].action_values``."""
    methods = list(results[0].action_values) if results else []
    out: dict[str, list] = {"exact": [], "success_gap": [], "live": [], **{m: [] for m in methods}}
    for traj, res in zip(trajectories, results, strict=True):
        meta = traj.metadata
        out["exact"] += meta["exact_advantage"]
        out["success_gap"] += meta["optimal_success_advantage"]
        out["live"] += [v > 0 and r is not None for v, r in zip(meta["exact_value"], meta["replies"])]
        idx = action_index(traj, res)
        for m in methods:
            out[m] += [res.action_values[m][i] for i in idx]
    arrays = {k: np.asarray(v, dtype=float) for k, v in out.items()}
    arrays["live"] = arrays["live"].astype(bool)
    return arrays


def spearman_columns(steps: dict[str, np.ndarray], methods: Sequence[str]) -> dict[str, dict[str, float]]:
    """Per method: Spearman of its step values with A* (all steps, live steps) and with the unregularised advantage."""
    live = steps["live"]
    return {m: {"spearman_exact": spearman(steps[m], steps["exact"]),
                "spearman_exact_live": spearman(steps[m][live], steps["exact"][live]),
                "spearman_unregularised": spearman(steps[m], steps["success_gap"]),
                "slope_exact_live": slope(steps["exact"][live], steps[m][live])} for m in methods}


def slope(x: np.ndarray, y: np.ndarray) -> float:
    """Least-squares slope of ``y`` on ``x`` (NaN pairs dropped; NaN when ``x`` is constant): 1 for values on the
    scale of A*, below 1 when they are compressed."""
    keep = np.isfinite(x) & np.isfinite(y)
    x, y = x[keep], y[keep]
    if x.size < 2 or np.all(x == x[0]):
        return float("nan")
    xc = x - x.mean()
    return float(xc @ (y - y.mean()) / (xc @ xc))


def ceiling_rows(trajectories: Sequence[Trajectory]) -> dict[str, dict[str, float]]:
    """Metric rows of the two label-based ceilings (see the module docstring)."""
    success = [t.success() for t in trajectories]
    groups = [t.group for t in trajectories]
    mistakes = [None if t.mistake_step is None else (t.mistake_step - 2) // 2 for t in trajectories]
    methods = {}
    for name, key in ((EXACT, "exact_advantage"), (ORACLE, "optimal_success_advantage")):
        values = [np.asarray(t.metadata[key], dtype=float) for t in trajectories]
        methods[name] = {"scores": [float(v.mean()) if v.size else 0.0 for v in values], "step_values": values}
    return evaluate_methods(methods, success=success, groups=groups, mistake_steps=mistakes,
                            attribution={EXACT: DEFAULT_ATTRIBUTION, ORACLE: "step"})


def evaluate_episodes(trajectories: Sequence[Trajectory], results: Sequence[TrajectoryScore]) -> dict:
    """The full evaluation of one set of scored episodes.

    Returns ``{"table": {method: {column: value}}, "n_episodes", "n_steps", "n_live_steps", "success",
    "n_failed", "n_attribution_labelled", "kl_per_episode"}``; ``kl_per_episode`` is the mean over episodes of the
    summed log-ratio (``advantage / beta``), a sample estimate of ``KL(policy || reference)`` per episode when the
    episodes were sampled from the policy.
    """
    table = {**evaluation_table(results), **ceiling_rows(trajectories)}
    steps = step_arrays(trajectories, results)
    steps[EXACT], steps[ORACLE] = steps["exact"], steps["success_gap"]
    for name, cols in spearman_columns(steps, list(table)).items():
        table[name].update(cols)
    kl = [sum(s.advantage for s in r.steps) / r.beta for r in results]
    return {"table": table, "n_episodes": len(results), "n_steps": int(steps["exact"].size),
            "n_live_steps": int(steps["live"].sum()), "success": float(np.mean([t.success() for t in trajectories])),
            "n_failed": sum(not t.success() for t in trajectories),
            "n_attribution_labelled": sum(t.mistake_step is not None for t in trajectories),
            "kl_per_episode": float(np.mean(kl))}


def best_baseline(table: dict[str, dict[str, float]], column: str) -> tuple[str, float]:
    """The baseline (not progress advantage, not a ceiling) with the highest ``column``; NaNs ignored."""
    rows = [(name, row[column]) for name, row in table.items()  # NaN in memory, null once read from metrics.json
            if name not in (METHOD, EXACT, ORACLE) and isinstance(row.get(column), (int, float))
            and np.isfinite(row[column])]
    return max(rows, key=lambda r: r[1]) if rows else ("-", float("nan"))


def bootstrap(trajectories: Sequence[Trajectory], results: Sequence[TrajectoryScore], n: int = N_BOOTSTRAP,
              seed: int = 0) -> dict[str, dict[str, np.ndarray]]:
    """``n`` resampled tables: method -> column -> ``[n]`` values. Whole groups are drawn with replacement (a group
    drawn twice counts as two groups), so best-of-N keeps its groups of 8 and the resamples keep the episode count."""
    by_group: dict = {}
    for i, t in enumerate(trajectories):
        by_group.setdefault(t.group if t.group is not None else f"episode-{i}", []).append(i)
    groups = list(by_group.values())
    rng = np.random.default_rng(seed)
    draws: dict[str, dict[str, list]] = {}
    for _ in range(n):
        trajs, res = [], []
        for k, g in enumerate(rng.integers(0, len(groups), len(groups))):
            for i in groups[g]:
                trajs.append(dataclasses.replace(trajectories[i], group=f"b{k}"))
                res.append(dataclasses.replace(results[i], group=f"b{k}"))
        for method, row in evaluate_episodes(trajs, res)["table"].items():
            for col, value in row.items():
                draws.setdefault(method, {}).setdefault(col, []).append(value)
    return {m: {c: np.asarray(v, dtype=float) for c, v in cols.items()} for m, cols in draws.items()}


def interval(values: np.ndarray) -> list[float] | None:
    """The 95% percentile interval of bootstrap values (NaN resamples left out), or ``None``."""
    values = values[np.isfinite(values)]
    return None if values.size < 10 else [float(np.percentile(values, 2.5)), float(np.percentile(values, 97.5))]


def intervals(draws: dict[str, dict[str, np.ndarray]]) -> dict[str, dict[str, list[float] | None]]:
    """method -> column -> 95% interval, from :func:`bootstrap`."""
    return {m: {c: interval(v) for c, v in cols.items()} for m, cols in draws.items()}
