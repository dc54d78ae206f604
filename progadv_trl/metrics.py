"""Evaluation metrics: success prediction (AUROC, rank correlations), best-of-N, failure attribution, and
ProcessBench's first-error protocol (accuracy on erroneous and on correct trajectories, their harmonic mean)."""

from __future__ import annotations

import math
from collections.abc import Hashable, Sequence
from typing import Any

import numpy as np
from scipy.stats import kendalltau, spearmanr
from sklearn.metrics import roc_auc_score

from progadv_trl.selection import (ATTRIBUTION_METHODS, THRESHOLD_METHODS, predict_mistake, rule_values,
                                   select_best_of_n)

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
    :func:`~progadv_trl.selection.select_best_of_n`), ``mean_success`` (mean over groups of the group's mean success,
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


# ------------------------------------------------------------------------------------ ProcessBench (first error)
#: ProcessBench's label of a trajectory whose steps are all correct, and a method's "no error" prediction.
NO_ERROR = -1
PROCESSBENCH_COLUMNS = ("processbench_error_acc", "processbench_correct_acc", "processbench_f1")


def first_error_step(labels: Sequence[bool]) -> int:
    """The 0-based index of the first ``False`` in per-step correctness ``labels``, :data:`NO_ERROR` when none."""
    return next((i for i, ok in enumerate(labels) if not ok), NO_ERROR)


def _rule_values(step_values: Any, rule: str) -> np.ndarray:
    """What a rule compares with the threshold, ``[S]`` (:func:`~progadv_trl.selection.rule_values`): the running
    sum ``q_s = sum_{j<=s} v_j`` (NaN steps add 0) for ``running_sum`` and ``threshold``; ``v`` itself for ``step``
    and ``first_below``, NaN as ``+inf`` (never below a threshold); minus the drop starting at ``s`` for
    ``change_point``."""
    if rule not in ATTRIBUTION_METHODS:
        raise ValueError(f"unknown attribution rule {rule!r}; valid: {', '.join(ATTRIBUTION_METHODS)}")
    v = _to_float_array(step_values)
    if v.size == 0:
        raise ValueError("cannot predict a first error in a trajectory with no steps")
    return rule_values(v, rule)


def predict_first_error(step_values: Any, threshold: float, rule: str = "step") -> int:
    """ProcessBench's prediction from ``[S]`` step values (higher = better): the first erroneous step, or
    :data:`NO_ERROR` when no value of the rule falls below ``threshold``.

    * ``threshold``: the earliest ``s`` with ``q_s < threshold`` (``q``: running sum), else no error.
    * ``running_sum``: ``argmin_s q_s`` when ``min q < threshold``, else no error.
    * ``step`` (the argmin rule of the baselines): ``argmin_s v_s`` when ``min v < threshold``, else no error
      (NaN steps are never picked).
    * ``first_below``: the earliest ``s`` with ``v_s < threshold``, else no error.
    * ``change_point``: the start of the running sum's largest drop ``d`` when ``-d < threshold``, else no error.

    Ties go to the first step. Raises ``ValueError`` for ``S == 0``.
    """
    r = _rule_values(step_values, rule)
    below = np.flatnonzero(r < threshold)
    if below.size == 0:
        return NO_ERROR
    return int(below[0]) if rule in THRESHOLD_METHODS else int(np.argmin(r))


def processbench_metrics(predicted: Sequence[int], first_errors: Sequence[int]) -> dict[str, float]:
    """ProcessBench's scores of predicted first-error steps against the labels (:data:`NO_ERROR` = all correct).

    ``error_acc``: the fraction of erroneous trajectories whose predicted step is the labelled first error;
    ``correct_acc``: the fraction of correct trajectories predicted :data:`NO_ERROR`; ``f1``: their harmonic mean
    ``2ab / (a + b)`` (0 when both are 0); ``n_error``, ``n_correct``: the counts. An accuracy without trajectories of
    its kind is NaN, and so is ``f1`` then.
    """
    if len(predicted) != len(first_errors):
        raise ValueError(f"predicted ({len(predicted)}) and first_errors ({len(first_errors)}) differ in length")
    p, y = np.asarray(predicted, dtype=np.int64), np.asarray(first_errors, dtype=np.int64)
    err, cor = y != NO_ERROR, y == NO_ERROR
    a = float(np.mean(p[err] == y[err])) if err.any() else NAN
    b = float(np.mean(p[cor] == NO_ERROR)) if cor.any() else NAN
    f1 = NAN if math.isnan(a) or math.isnan(b) else (0.0 if a + b == 0 else 2 * a * b / (a + b))
    return {"error_acc": a, "correct_acc": b, "f1": f1, "n_error": int(err.sum()), "n_correct": int(cor.sum())}


def _right_interval(r: np.ndarray, first_error: int, rule: str) -> tuple[float, float]:
    """The thresholds ``t`` for which :func:`predict_first_error` is right, as ``(lo, hi]`` (empty when lo >= hi)."""
    if first_error == NO_ERROR:
        return -math.inf, float(r.min())  # right while nothing is below t
    if first_error >= r.size:
        return math.inf, -math.inf
    if rule in THRESHOLD_METHODS:  # the earliest r_s < t is s = k: r_k < t <= min(r_0 .. r_{k-1})
        return float(r[first_error]), (float(r[:first_error].min()) if first_error else math.inf)
    return (float(r.min()), math.inf) if int(np.argmin(r)) == first_error else (math.inf, -math.inf)


def fit_first_error_threshold(step_values_list: Sequence[Any], first_errors: Sequence[int | None],
                              rule: str = "step") -> float:
    """The threshold of :func:`predict_first_error` with the best ProcessBench F1 on labelled trajectories.

    Each trajectory is right for the thresholds in one interval; candidates are the midpoints between consecutive
    distinct interval ends (and one beyond each end), so every distinct outcome is tried. The objective is F1, or
    the accuracy of the one class present when the other is absent; ties go to the smallest candidate.
    Trajectories with no steps or no label (``None``) are skipped.
    """
    if len(step_values_list) != len(first_errors):
        raise ValueError(f"step_values_list ({len(step_values_list)}) and first_errors ({len(first_errors)}) differ "
                         f"in length")
    intervals, is_error = [], []
    for v, k in zip(step_values_list, first_errors):
        if k is None or _to_float_array(v).size == 0:
            continue
        intervals.append(_right_interval(_rule_values(v, rule), int(k), rule))
        is_error.append(int(k) != NO_ERROR)
    if not intervals:
        raise ValueError("no labelled trajectory with at least one step to fit a threshold on")
    lo, hi = np.asarray(intervals, dtype=np.float64).T
    ends = np.unique(np.concatenate([lo, hi]))
    ends = ends[np.isfinite(ends)]
    if ends.size == 0:
        return 0.0
    ext = np.concatenate([[ends[0] - 1.0], ends, [ends[-1] + 1.0]])
    candidates = (ext[:-1] + ext[1:]) / 2.0  # sorted
    # right for candidate c iff lo < c <= hi: count with a difference array over the sorted candidates
    start = np.searchsorted(candidates, lo, side="right")
    stop = np.searchsorted(candidates, hi, side="right")
    error = np.asarray(is_error)
    hits = {}
    for kind, mask in (("error", error), ("correct", ~error)):
        diff = np.zeros(candidates.size + 1, dtype=np.int64)
        ok = mask & (start < stop)
        np.add.at(diff, start[ok], 1)
        np.add.at(diff, stop[ok], -1)
        hits[kind] = np.cumsum(diff)[:-1] / max(int(mask.sum()), 1)
    a, b = hits["error"], hits["correct"]
    if error.all() or not error.any():
        objective = a if error.all() else b
    else:
        objective = np.divide(2 * a * b, a + b, out=np.zeros_like(a), where=(a + b) > 0)
    return float(candidates[int(np.argmax(objective))])


def processbench_predictions(step_values_list: Sequence[Any], first_errors: Sequence[int | None],
                             rule: str = "step", threshold: float | None = None) -> list[int | None]:
    """Predicted first-error step per trajectory (``None`` where unlabelled or without steps).

    With ``threshold`` given, :func:`predict_first_error` with it. Without, 2-fold cross-fitting: the labelled
    trajectories alternate between two folds in input order, and each fold is predicted with the threshold
    :func:`fit_first_error_threshold` fits on the other, so no trajectory is predicted with a threshold fitted on
    itself; fewer than 2 labelled trajectories give no predictions.
    """
    if len(step_values_list) != len(first_errors):
        raise ValueError(f"step_values_list ({len(step_values_list)}) and first_errors ({len(first_errors)}) differ "
                         f"in length")
    out: list[int | None] = [None] * len(first_errors)
    labelled = [i for i, (v, k) in enumerate(zip(step_values_list, first_errors))
                if k is not None and _to_float_array(v).size]
    if threshold is not None:
        for i in labelled:
            out[i] = predict_first_error(step_values_list[i], threshold, rule)
        return out
    if len(labelled) < 2:
        return out
    folds = [labelled[0::2], labelled[1::2]]
    for fold, other in ((folds[0], folds[1]), (folds[1], folds[0])):
        t = fit_first_error_threshold([step_values_list[i] for i in other], [first_errors[i] for i in other], rule)
        for i in fold:
            out[i] = predict_first_error(step_values_list[i], t, rule)
    return out


def _processbench(values: Sequence[Any] | None, first_errors: Sequence[int | None], rule: str,
                  threshold: float | None) -> dict[str, float]:
    empty = dict.fromkeys(PROCESSBENCH_COLUMNS, NAN)
    if values is None:
        return empty
    if len(values) != len(first_errors):
        raise ValueError(f"{len(values)} step-value lists for {len(first_errors)} first_errors")
    pred = processbench_predictions(values, first_errors, rule, threshold)
    keep = [i for i, p in enumerate(pred) if p is not None]
    if not keep:
        return empty
    res = processbench_metrics([pred[i] for i in keep], [int(first_errors[i]) for i in keep])
    return {"processbench_error_acc": res["error_acc"], "processbench_correct_acc": res["correct_acc"],
            "processbench_f1": res["f1"]}


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
    first_errors: Sequence[int | None] | None = None,
) -> dict[str, dict[str, float]]:
    """Evaluate scoring methods on the same ``n`` trajectories.

    Args:
        methods: name -> ``{"scores": [n] trajectory scores, "step_values": [n] per-step value tensors (optional),
            "threshold": float (optional, for the threshold methods "threshold" and "first_below"),
            "process_values": [n] per-step values that ``first_errors`` index (optional; default ``step_values``),
            "process_threshold": float (optional: the "no error" threshold of :func:`predict_first_error`; default
            the ``threshold`` under a threshold rule, else fitted by 2-fold cross-fitting, see
            :func:`processbench_predictions`)}``.
        success: ``[n]`` bools, ``None`` entries are unlabelled and excluded from AUROC, Spearman and best-of-N.
        groups: ``[n]`` task ids for best-of-N (``None`` entries excluded); no best-of-N when ``None``.
        mistake_steps: ``[n]`` decisive error steps (0-based among the steps) or ``None`` (unlabelled).
        attribution: method name -> :func:`~progadv_trl.selection.predict_mistake` method; default ``"step"`` (argmin).
            ProcessBench predictions use the same rule (:func:`predict_first_error`).
        first_errors: ``[n]`` labelled first erroneous step (0-based among ``process_values``), :data:`NO_ERROR`
            for a trajectory whose steps are all correct, ``None`` unlabelled; when given, the table gains
            :data:`PROCESSBENCH_COLUMNS`.

    Returns:
        name -> ``{auroc, spearman (vs success as 0/1), best_of_n, mean_success, oracle, n_groups,
        attribution_accuracy, attribution_mae, n_success_labelled, n_attribution_labelled}`` (plus
        ``processbench_error_acc, processbench_correct_acc, processbench_f1`` with ``first_errors``): plain floats
        (counts as ints), NaN where not computable. Trajectories with no steps are skipped for attribution.
    """
    attribution = attribution or {}
    n = None
    for seq, what in ((success, "success"), (groups, "groups"), (mistake_steps, "mistake_steps"),
                      (first_errors, "first_errors")):
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
        rule = attribution.get(name, "step")
        row.update(_attribution(step_values, mistake_steps, rule, m.get("threshold")))
        columns = DEFAULT_COLUMNS
        if first_errors is not None:
            given = m.get("process_threshold", m.get("threshold") if rule in THRESHOLD_METHODS else None)
            row.update(_processbench(m.get("process_values", step_values), first_errors, rule, given))
            columns += PROCESSBENCH_COLUMNS
        table[name] = {k: row[k] for k in columns}
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
