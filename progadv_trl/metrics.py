"""Evaluation metrics: success prediction (AUROC, rank correlations), best-of-N, failure attribution."""

from __future__ import annotations

import math
from collections.abc import Hashable, Sequence
from typing import Any

import numpy as np
from scipy.stats import kendalltau, spearmanr
from sklearn.metrics import roc_auc_score

from progadv_trl.uses import predict_mistake, select_best_of_n

NAN = math.nan
DEFAULT_COLUMNS = (
    "auroc",
    "spearman",
    "best_of_n",
    "mean_success",
    "oracle",
    "n_groups",
    "attribution_accuracy",
    "attribution_mae",
    "n_success_labelled",
    "n_attribution_labelled",
)


def _to_float_array(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().cpu().double().numpy()
    return np.asarray([NAN if v is None else float(v) for v in np.asarray(x, dtype=object).reshape(-1)],
                      dtype=np.float64)


def _pairs(a: Any, b: Any) -> tuple[np.ndarray, np.ndarray]:
    a, b = _to_float_array(a), _to_float_array(b)
    if a.shape != b.shape:
        raise ValueError(f"inputs differ in length: {a.size} and {b.size}")
    keep = ~(np.isnan(a) | np.isnan(b))
    return a[keep], b[keep]


def auroc(scores: Sequence[float], labels: Sequence[bool]) -> float:
    """Area under the ROC curve of ``scores`` against binary ``labels`` (1 = success), via scikit-learn.

    Pairs whose score (or label) is NaN/None are dropped. NaN when fewer than 2 pairs remain or only one class does.
    """
    s, y = _pairs(scores, labels)
    if s.size < 2 or np.unique(y).size < 2:
        return NAN
    return float(roc_auc_score(y.astype(int), s))


def _rank_corr(fn, a: Any, b: Any) -> float:
    x, y = _pairs(a, b)
    if x.size < 2 or np.all(x == x[0]) or np.all(y == y[0]):
        return NAN
    return float(fn(x, y)[0])


def spearman(a: Sequence[float], b: Sequence[float]) -> float:
    """Spearman rank correlation (scipy); NaN pairs dropped; NaN when fewer than 2 pairs or either side constant."""
    return _rank_corr(spearmanr, a, b)


def kendall_tau(a: Sequence[float], b: Sequence[float]) -> float:
    """Kendall's tau-b (scipy); NaN pairs dropped; NaN when fewer than 2 pairs or either side constant."""
    return _rank_corr(kendalltau, a, b)


def best_of_n(scores: Sequence[float], groups: Sequence[Hashable], success: Sequence[bool]) -> dict[str, float]:
    """Best-of-N by score within each group of attempts at one task.

    Returns ``best_of_n`` (mean success of the highest-scoring trajectory per group, see
    :func:`~progadv_trl.uses.select_best_of_n`), ``mean_success`` (mean over groups of the group's mean success,
    pass@1), ``oracle`` (fraction of groups with any success, pass@N) and ``n_groups``. NaNs when empty.
    """
    if not len(scores) == len(groups) == len(success):
        raise ValueError(f"scores ({len(scores)}), groups ({len(groups)}), success ({len(success)}) differ in length")
    picked = select_best_of_n(scores, groups)
    if not picked:
        return {"best_of_n": NAN, "mean_success": NAN, "oracle": NAN, "n_groups": 0}
    members: dict[Hashable, list[float]] = {g: [] for g in picked}
    for g, s in zip(groups, success):
        members[g].append(float(bool(s)))
    return {
        "best_of_n": float(np.mean([float(bool(success[i])) for i in picked.values()])),
        "mean_success": float(np.mean([np.mean(m) for m in members.values()])),
        "oracle": float(np.mean([max(m) for m in members.values()])),
        "n_groups": len(picked),
    }


def attribution_metrics(predicted: Sequence[int], actual: Sequence[int]) -> dict[str, float]:
    """Exact-step ``accuracy`` and ``mae`` (mean ``|pred - actual|`` in steps) of predicted error steps, and ``n``.

    NaNs and ``n = 0`` when empty.
    """
    if len(predicted) != len(actual):
        raise ValueError(f"predicted ({len(predicted)}) and actual ({len(actual)}) differ in length")
    if not len(predicted):
        return {"accuracy": NAN, "mae": NAN, "n": 0}
    p, a = np.asarray(predicted, dtype=np.int64), np.asarray(actual, dtype=np.int64)
    return {"accuracy": float(np.mean(p == a)), "mae": float(np.mean(np.abs(p - a))), "n": int(p.size)}


def _success_metrics(scores: list[float], success: Sequence[Any] | None,
                     groups: Sequence[Any] | None) -> dict[str, float]:
    out: dict[str, float] = {"auroc": NAN, "spearman": NAN, "best_of_n": NAN, "mean_success": NAN, "oracle": NAN,
                             "n_groups": 0, "n_success_labelled": 0}
    if success is None:
        return out
    lab = [i for i, s in enumerate(success) if s is not None]
    y = [float(bool(success[i])) for i in lab]
    sc = [scores[i] for i in lab]
    out.update(auroc=auroc(sc, y), spearman=spearman(sc, y), n_success_labelled=len(lab))
    if groups is not None:
        grouped = [i for i in lab if groups[i] is not None]
        bon = best_of_n([scores[i] for i in grouped], [groups[i] for i in grouped],
                        [bool(success[i]) for i in grouped])
        out.update(bon)
    return out


def _attribution(step_values: Sequence[Any] | None, mistake_steps: Sequence[Any] | None, method: str,
                 threshold: float | None) -> dict[str, float]:
    if step_values is None or mistake_steps is None:
        return {"attribution_accuracy": NAN, "attribution_mae": NAN, "n_attribution_labelled": 0}
    pred, act = [], []
    for v, m in zip(step_values, mistake_steps):
        if m is None or v is None or len(v) == 0:
            continue
        pred.append(predict_mistake(v, method=method, threshold=threshold))
        act.append(int(m))
    res = attribution_metrics(pred, act)
    return {"attribution_accuracy": res["accuracy"], "attribution_mae": res["mae"], "n_attribution_labelled": res["n"]}


def evaluate_methods(
    methods: dict[str, dict[str, Any]],
    *,
    success: Sequence[bool | None] | None = None,
    groups: Sequence[Hashable | None] | None = None,
    mistake_steps: Sequence[int | None] | None = None,
    attribution: dict[str, str] | None = None,
) -> dict[str, dict[str, float]]:
    """Evaluate scoring methods on the same ``n`` trajectories.

    Args:
        methods: name -> ``{"scores": [n] trajectory scores, "step_values": [n] per-step value tensors (optional),
            "threshold": float (optional, for attribution method "threshold")}``.
        success: ``[n]`` bools, ``None`` entries are unlabelled and excluded from AUROC, Spearman and best-of-N.
        groups: ``[n]`` task ids for best-of-N (``None`` entries excluded); no best-of-N when ``None``.
        mistake_steps: ``[n]`` decisive error steps (0-based among the steps) or ``None`` (unlabelled).
        attribution: method name -> :func:`~progadv_trl.uses.predict_mistake` method; default ``"step"`` (argmin).

    Returns:
        name -> ``{auroc, spearman (vs success as 0/1), best_of_n, mean_success, oracle, n_groups,
        attribution_accuracy, attribution_mae, n_success_labelled, n_attribution_labelled}``: plain floats (counts
        as ints), NaN where not computable. Trajectories with no steps are skipped for attribution.
    """
    attribution = attribution or {}
    n = None
    for seq, what in ((success, "success"), (groups, "groups"), (mistake_steps, "mistake_steps")):
        if seq is not None:
            if n is not None and len(seq) != n:
                raise ValueError(f"{what} has {len(seq)} entries, expected {n}")
            n = len(seq)
    table: dict[str, dict[str, float]] = {}
    for name, m in methods.items():
        scores = _to_float_array(m["scores"]).tolist()
        if n is not None and len(scores) != n:
            raise ValueError(f"method {name!r} has {len(scores)} scores, expected {n}")
        step_values = m.get("step_values")
        if step_values is not None and len(step_values) != len(scores):
            raise ValueError(f"method {name!r} has {len(step_values)} step_values, expected {len(scores)}")
        row = _success_metrics(scores, success, groups)
        row.update(_attribution(step_values, mistake_steps, attribution.get(name, "step"), m.get("threshold")))
        table[name] = {k: row[k] for k in DEFAULT_COLUMNS}
    return table


def _cell(v: Any) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    if isinstance(v, (bool, np.bool_)):
        return str(bool(v))
    if isinstance(v, (int, np.integer)):
        return str(int(v))
    return f"{float(v):.3f}"


def format_table(table: dict[str, dict[str, float]], columns: Sequence[str] | None = None) -> str:
    """A Markdown table with one row per method: floats with 3 decimals, ints as ints, ``-`` for NaN or missing.

    ``columns`` defaults to every key in first-seen order.
    """
    if columns is None:
        columns = list(dict.fromkeys(k for row in table.values() for k in row))
    lines = ["| method | " + " | ".join(columns) + " |", "|---|" + "---|" * len(columns)]
    for name, row in table.items():
        lines.append(f"| {name} | " + " | ".join(_cell(row.get(c)) for c in columns) + " |")
    return "\n".join(lines)
