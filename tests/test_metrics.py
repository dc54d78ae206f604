import json
import math

import pytest
import torch

from progadv_trl.metrics import (
    attribution_metrics,
    auroc,
    best_of_n,
    evaluate_methods,
    format_table,
    kendall_tau,
    spearman,
)
from progadv_trl.selection import ATTRIBUTION_METHODS, fit_attribution_threshold, predict_mistake, select_best_of_n

NAN = float("nan")


# --- uses -------------------------------------------------------------------------------------------------------


def test_select_best_of_n_ties_and_nan():
    scores = [0.5, 0.9, 0.9, NAN, 0.1, NAN, NAN, 2.0]
    groups = ["a", "a", "a", "b", "b", "c", "c", "d"]
    assert select_best_of_n(scores, groups) == {"a": 1, "b": 4, "c": 5, "d": 7}
    assert list(select_best_of_n(scores, groups)) == ["a", "b", "c", "d"]
    assert select_best_of_n([], []) == {}
    with pytest.raises(ValueError):
        select_best_of_n([1.0], [])


def test_predict_mistake_by_hand():
    v = torch.tensor([1.0, -3.0, 2.5, -1.0, -0.5])  # running sum [1, -2, 0.5, -0.5, -1]
    assert predict_mistake(v) == 1
    assert predict_mistake(v, "running_sum") == 1
    assert predict_mistake(v, "step") == 1
    assert predict_mistake([0.0, 1.0, -1.0, -0.5], "running_sum") == 3  # [0, 1, 0, -0.5]
    assert predict_mistake([0.0, 1.0, -1.0, -0.5], "step") == 2
    assert predict_mistake(v, "threshold", threshold=0.0) == 1  # first q < 0
    assert predict_mistake(v, "threshold", threshold=2.0) == 0
    assert predict_mistake(v, "threshold", threshold=-5.0) == 1  # none below -> argmin of running sum
    # ties -> first
    assert predict_mistake([-1.0, 0.0, 1.0, -1.0], "running_sum") == 0
    assert predict_mistake([2.0, -1.0, -1.0], "step") == 1
    # NaN steps (empty baseline steps) are never the step argmin and count 0 in running sums
    assert predict_mistake([NAN, 1.0, 2.0], "step") == 1
    assert predict_mistake([1.0, NAN, -2.0], "running_sum") == 2
    assert predict_mistake([NAN, NAN], "step") == 0


def test_predict_mistake_errors():
    with pytest.raises(ValueError, match="threshold"):
        predict_mistake([1.0], "threshold")
    with pytest.raises(ValueError, match="running_sum, step, threshold"):
        predict_mistake([1.0], "median")
    with pytest.raises(ValueError, match="no steps"):
        predict_mistake(torch.zeros(0))
    assert ATTRIBUTION_METHODS == ("running_sum", "step", "threshold", "change_point", "first_below")


def test_fit_attribution_threshold_accuracy():
    # A: q [1, -2, -1], error 1 -> right for thr <= 1; B: q [-0.5, -1.5, 0.5], error 0 -> right for thr > -0.5;
    # C: q [2, 3, -1], error 2 -> right for thr <= 2. All right on (-0.5, 1]: candidates there are 0.0 and 0.75.
    vals = [torch.tensor([1.0, -3.0, 1.0]), torch.tensor([-0.5, -1.0, 2.0]), torch.tensor([2.0, 1.0, -4.0])]
    thr = fit_attribution_threshold(vals, [1, 0, 2])
    assert thr == 0.0
    assert [predict_mistake(v, "threshold", thr) for v in vals] == [1, 0, 2]


def test_fit_attribution_threshold_mae_tie_break():
    # T1: q [0, -1, -2, -3], error 0; T2: q [0, -1], error 1. Every candidate gets 1/2 right; summed |err| is
    # 3, 2, 2, 1, 1 for candidates -3.5, -2.5, -1.5, -0.5, 0.5 -> the first with the smallest MAE is -0.5.
    vals = [torch.tensor([0.0, -1.0, -1.0, -1.0]), torch.tensor([0.0, -1.0])]
    assert fit_attribution_threshold(vals, [0, 1]) == -0.5
    with pytest.raises(ValueError):
        fit_attribution_threshold([torch.zeros(0)], [0])
    with pytest.raises(ValueError):
        fit_attribution_threshold(vals, [0])


# --- metrics ----------------------------------------------------------------------------------------------------


def test_auroc_by_hand_and_edge_cases():
    assert auroc([0.1, 0.4, 0.35, 0.8], [0, 0, 1, 1]) == 0.75
    assert auroc([0.1, NAN, 0.8], [0, 0, 1]) == 1.0  # NaN score dropped
    assert math.isnan(auroc([0.1, 0.2], [1, 1]))
    assert math.isnan(auroc([0.1], [1]))
    assert math.isnan(auroc([], []))
    assert math.isnan(auroc([NAN, 0.3], [0, 1]))


def test_rank_correlations_and_edge_cases():
    assert spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert spearman([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    assert kendall_tau([1, 2, 3], [1, 3, 2]) == pytest.approx(1 / 3)
    assert math.isnan(spearman([1, 1, 1], [1, 2, 3]))
    assert math.isnan(spearman([1], [2]))
    assert math.isnan(kendall_tau([1, 2], [5, 5]))
    assert spearman([1, NAN, 2, 3], [1, 5, 2, 3]) == pytest.approx(1.0)


def test_best_of_n_by_hand():
    scores = [0.2, 0.9, 0.5, 0.1, 0.3, 0.7]
    groups = ["x", "x", "x", "y", "y", "z"]
    success = [True, False, True, False, True, False]
    assert best_of_n(scores, groups, success) == {
        "best_of_n": pytest.approx(1 / 3),  # picks 1 (fail), 4 (success), 5 (fail)
        "mean_success": pytest.approx((2 / 3 + 1 / 2 + 0) / 3),
        "oracle": pytest.approx(2 / 3),
        "n_groups": 3,
    }
    empty = best_of_n([], [], [])
    assert empty["n_groups"] == 0 and math.isnan(empty["best_of_n"])


def test_attribution_metrics():
    assert attribution_metrics([0, 2, 3], [0, 1, 5]) == {"accuracy": pytest.approx(1 / 3), "mae": 1.0, "n": 3}
    empty = attribution_metrics([], [])
    assert empty["n"] == 0 and math.isnan(empty["accuracy"]) and math.isnan(empty["mae"])


def test_evaluate_methods_by_hand():
    step_values = [
        torch.zeros(0),  # unlabelled for attribution
        torch.tensor([1.0, -2.0, 0.5]),  # q [1, -1, -0.5] -> 1; step argmin 1
        torch.tensor([-1.0, 0.5]),  # q [-1, -0.5] -> 0; step argmin 0
        torch.tensor([0.3]),
        torch.tensor([0.2, -0.3, -0.1]),  # q [0.2, -0.1, -0.2] -> 2; step argmin 1
    ]
    methods = {
        "pa": {"scores": [0.9, 0.1, 0.2, 0.8, 0.5], "step_values": step_values},
        "pa_step": {"scores": torch.tensor([0.9, 0.1, 0.2, 0.8, 0.5]), "step_values": step_values},
        "rand": {"scores": [0.1, 0.9, 0.8, 0.2, NAN]},
    }
    table = evaluate_methods(
        methods,
        success=[True, False, False, True, None],
        groups=["a", "a", "b", "b", "c"],
        mistake_steps=[None, 1, 0, None, 2],
        attribution={"pa": "running_sum"},
    )
    pa, pa_step, rand = table["pa"], table["pa_step"], table["rand"]
    assert pa["auroc"] == 1.0 and rand["auroc"] == 0.0
    assert pa["spearman"] == pytest.approx(4 / math.sqrt(20)) and rand["spearman"] == pytest.approx(-4 / math.sqrt(20))
    assert (pa["best_of_n"], pa["mean_success"], pa["oracle"], pa["n_groups"]) == (1.0, 0.5, 1.0, 2)
    assert (rand["best_of_n"], rand["mean_success"], rand["oracle"], rand["n_groups"]) == (0.0, 0.5, 1.0, 2)
    assert pa["n_success_labelled"] == 4
    assert (pa["attribution_accuracy"], pa["attribution_mae"], pa["n_attribution_labelled"]) == (1.0, 0.0, 3)
    assert pa_step["attribution_accuracy"] == pytest.approx(2 / 3)
    assert pa_step["attribution_mae"] == pytest.approx(1 / 3)
    assert math.isnan(rand["attribution_accuracy"]) and rand["n_attribution_labelled"] == 0
    assert list(pa) == [
        "auroc", "spearman", "best_of_n", "mean_success", "oracle", "n_groups", "attribution_accuracy",
        "attribution_mae", "n_success_labelled", "n_attribution_labelled",
    ]
    json.dumps(table)  # plain Python numbers
    assert all(type(v) in (float, int) for row in table.values() for v in row.values())


def test_evaluate_methods_without_labels():
    table = evaluate_methods({"m": {"scores": [1.0, 2.0]}})
    row = table["m"]
    assert math.isnan(row["auroc"]) and math.isnan(row["best_of_n"]) and math.isnan(row["attribution_accuracy"])
    assert row["n_success_labelled"] == 0 and row["n_groups"] == 0
    with pytest.raises(ValueError):
        evaluate_methods({"m": {"scores": [1.0]}}, success=[True, False])


def test_format_table():
    table = {"pa": {"auroc": 0.71234, "n": 3, "mae": NAN}, "rand": {"auroc": 0.5}}
    assert format_table(table) == (
        "| method | auroc | n | mae |\n"
        "|---|---|---|---|\n"
        "| pa | 0.712 | 3 | - |\n"
        "| rand | 0.500 | - | - |"
    )
    assert format_table(table, columns=["auroc"]) == "| method | auroc |\n|---|---|\n| pa | 0.712 |\n| rand | 0.500 |"
