import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from progadv_trl.baselines import (
    BASELINES,
    deepconf_scores,
    mean_score,
    random_scores,
    self_certainty_score,
    step_baseline_values,
)

KEYS = ("deepconf_mean", "deepconf_tail", "deepconf_bottom10", "deepconf_lowest")


def test_baseline_names():
    assert len(BASELINES) == 9 and "random" in BASELINES and "deepconf_lowest" in BASELINES


def test_mean_scores_and_empty():
    assert self_certainty_score(torch.tensor([1.0, 2.0, 6.0])) == 3.0
    assert mean_score(torch.tensor([-1.0, -2.0])) == -1.5
    assert math.isnan(mean_score(torch.zeros(0)))
    assert math.isnan(self_certainty_score(torch.zeros(0)))


def test_deepconf_by_hand():
    c = torch.tensor([4.0, 2.0, 0.0, 6.0, 8.0])
    out = deepconf_scores(c, window=2, tail=3)
    # windows of 2: [3, 1, 3, 7] -> ceil(0.4) = 1 lowest -> 1
    assert out == {"deepconf_mean": 4.0, "deepconf_tail": 14 / 3, "deepconf_bottom10": 1.0, "deepconf_lowest": 1.0}
    # window and tail longer than the trajectory: a single window, the whole trajectory
    out = deepconf_scores(c)
    assert all(out[k] == 4.0 for k in KEYS)


def test_deepconf_empty_and_errors():
    assert all(math.isnan(v) for v in deepconf_scores(torch.zeros(0)).values())
    with pytest.raises(ValueError):
        deepconf_scores(torch.ones(3), window=0)


def _naive_deepconf(c, window, tail):
    n = len(c)
    w = min(window, n)
    groups = sorted(sum(c[i:i + w]) / w for i in range(n - w + 1))
    k = math.ceil(len(groups) / 10)
    return {
        "deepconf_mean": sum(c) / n,
        "deepconf_tail": sum(c[-min(tail, n):]) / min(tail, n),
        "deepconf_bottom10": sum(groups[:k]) / k,
        "deepconf_lowest": groups[0],
    }


@settings(max_examples=60, deadline=None)
@given(
    c=st.lists(st.floats(0, 20, allow_nan=False), min_size=1, max_size=60),
    window=st.integers(1, 70),
    tail=st.integers(1, 70),
)
def test_deepconf_matches_naive_loop(c, window, tail):
    out = deepconf_scores(torch.tensor(c, dtype=torch.float64), window=window, tail=tail)
    expected = _naive_deepconf(c, window, tail)
    for k in KEYS:
        assert out[k] == pytest.approx(expected[k], rel=1e-9, abs=1e-9)


def test_random_scores_deterministic_and_order_independent():
    ids = ["a", "b", "c", "d"]
    s = random_scores(ids, seed=3)
    assert all(0.0 <= x < 1.0 for x in s) and len(set(s)) == 4
    assert random_scores(ids[::-1], seed=3) == s[::-1]
    assert random_scores(["c"], seed=3) == [s[2]]
    assert random_scores(ids, seed=4) != s
    assert random_scores([], seed=0) == []


def test_step_baseline_values():
    values = torch.tensor([float("nan"), 1.0, 3.0, 5.0, 2.0])
    steps = torch.tensor([-1, 0, 0, 2, 2])
    out = step_baseline_values(values, steps, 3)
    assert out[0] == 2.0 and math.isnan(out[1]) and out[2] == 3.5
