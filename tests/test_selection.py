"""The attribution rules added beside running_sum/step/threshold: change_point and first_below, their margins and
threshold fitting, and how the config and the ProcessBench metrics read them."""

import math

import numpy as np
import pytest
import torch

from progadv_trl.config import ConfigError, ScoringConfig
from progadv_trl.metrics import NO_ERROR, fit_first_error_threshold, predict_first_error
from progadv_trl.selection import (ATTRIBUTION_METHODS, THRESHOLD_METHODS, fit_attribution_threshold, mistake_margin,
                                   predict_mistake, rule_values)

NAN = float("nan")


def test_change_point_blames_where_the_largest_drop_begins():
    v = [1.0, -1.0, -1.0, -1.5, 3.0]  # q [1, 0, -1, -2.5, 0.5]; drops from s: 2.5, 3.5, 2.5, 1.5, -3
    np.testing.assert_allclose(rule_values(v, "change_point"), [-2.5, -3.5, -2.5, -1.5, 3.0])
    assert predict_mistake(v, "change_point") == 1
    assert predict_mistake(v, "running_sum") == 3  # the bottom of the drop
    assert predict_mistake(v, "step") == 3  # the single worst step
    assert predict_mistake([0.5, -2.0, -1.0, 0.5], "change_point") == 1  # drops 2.5, 3, 1, -0.5
    assert predict_mistake([1.0, 2.0, 0.5], "change_point") == 2  # no drop: the step rule
    assert predict_mistake(torch.tensor([-1.0, 1.0, -1.0]), "change_point") == 0  # tie (drop 1 at 0 and 2) -> first


def test_change_point_never_blames_a_step_without_value():
    # q [1, 1, -1]: the drops starting at 1 (NaN) and 2 are both 2; the NaN step must not take the blame
    assert predict_mistake([1.0, NAN, -2.0], "change_point") == 2
    assert predict_mistake([NAN, NAN], "change_point") == 0


def test_first_below_blames_the_first_step_under_the_threshold():
    v = [0.5, -0.2, -1.0, -3.0]
    assert predict_mistake(v, "first_below", threshold=-0.5) == 2
    assert predict_mistake(v, "first_below", threshold=0.0) == 1
    assert predict_mistake(v, "first_below", threshold=-5.0) == 3  # none below: the step argmin
    assert predict_mistake(v, "threshold", threshold=-0.5) == 2  # running sum [0.5, 0.3, -0.7, -3.7]
    assert predict_mistake([NAN, -1.0], "first_below", threshold=0.0) == 1  # NaN is never below
    with pytest.raises(ValueError, match="needs a threshold"):
        predict_mistake(v, "first_below")


def test_mistake_margin_by_hand():
    v = [1.0, -3.0, 2.5, -1.0, -0.5]  # running sum [1, -2, 0.5, -0.5, -1]
    assert mistake_margin(v, "running_sum") == 1.0  # -1 - (-2)
    assert mistake_margin(v, "step") == 2.0  # -1 - (-3)
    assert mistake_margin(v, "threshold", threshold=0.0) == 1.0  # min(0 - q_1, q_0 - 0)
    assert mistake_margin(v, "threshold", threshold=0.75) == 0.25  # min(0.75 + 2, 1 - 0.75)
    assert mistake_margin(v, "first_below", threshold=-2.5) == 0.5  # min(-2.5 + 3, 1 + 2.5)
    assert mistake_margin([-1.0, 2.0], "first_below", threshold=0.0) == 1.0  # s = 0: nothing earlier
    assert mistake_margin([1.0, 2.0], "first_below", threshold=0.0) == -1.0  # fallback: nothing below
    assert mistake_margin([-1.0, -1.0], "step") == 0.0  # a tie
    assert mistake_margin([-1.0], "change_point") == math.inf


def test_fit_first_below_threshold():
    # first_below (nothing below: the step argmin) is right on A = [0.5, -1, -2] (error 1) for -1 < t <= 0.5, on
    # B (error 0) for every t, on C (error 2) for t <= -0.3: all three on (-1, -0.3], whose candidates are -0.9 and
    # -0.55 (midpoints of the distinct step values -1, -0.8, -0.3); the tie goes to the smaller
    vals = [[0.5, -1.0, -2.0], [-0.8, 0.1], [-0.2, -0.3, -1.5]]
    thr = fit_attribution_threshold(vals, [1, 0, 2], "first_below")
    assert thr == pytest.approx(-0.9)
    assert [predict_mistake(v, "first_below", thr) for v in vals] == [1, 0, 2]
    # the running-sum rule cannot: A (q [0.5, -0.5, -2.5]) needs -0.5 < t <= 0.5, C (q [-0.2, -0.5, -2]) t <= -0.5
    rs = fit_attribution_threshold(vals, [1, 0, 2], "threshold")
    assert sum(predict_mistake(v, "threshold", rs) == m for v, m in zip(vals, [1, 0, 2])) == 2
    with pytest.raises(ValueError, match="has no threshold"):
        fit_attribution_threshold(vals, [1, 0, 2], "change_point")


def test_rule_lists_are_consistent():
    assert set(THRESHOLD_METHODS) <= set(ATTRIBUTION_METHODS)
    assert ScoringConfig(attribution="change_point").attribution == "change_point"
    assert ScoringConfig(attribution="first_below", attribution_threshold=-0.3).attribution_threshold == -0.3
    with pytest.raises(ConfigError, match="attribution_threshold"):
        ScoringConfig(attribution="first_below")
    with pytest.raises(ValueError, match="change_point, first_below"):
        predict_mistake([1.0], "median")


def test_processbench_reads_the_new_rules():
    assert predict_first_error([0.5, -1.0, -2.0], 0.0, "first_below") == 1
    assert predict_first_error([0.5, -1.0, -2.0], -3.0, "first_below") == NO_ERROR
    v = [1.0, -1.0, -1.0, -1.5, 3.0]  # -drops [-2.5, -3.5, -2.5, -1.5, 3]
    assert predict_first_error(v, -3.0, "change_point") == 1
    assert predict_first_error(v, -4.0, "change_point") == NO_ERROR
    # an error at step 1 and an all-correct trajectory: first_below separates them at any t in (-1, 0.2]
    thr = fit_first_error_threshold([[0.5, -1.0], [0.2, 0.3]], [1, NO_ERROR], "first_below")
    assert -1.0 < thr <= 0.2
