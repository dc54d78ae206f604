import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from progadv_trl.advantage import (
    STEP_AGGREGATIONS,
    TOKEN_AGGREGATIONS,
    cumulative,
    step_advantages,
    token_aggregate,
    trajectory_aggregate,
)

NAN = float("nan")

# context, step 0 (3 tokens), context, step 1 (2 tokens), step 2 empty, step 3 (1 token)
VALUES = torch.tensor([NAN, 1.0, -2.0, 4.0, NAN, 3.0, 5.0, 7.0], dtype=torch.float64)
STEPS = torch.tensor([-1, 0, 0, 0, -1, 1, 1, 3])


@pytest.mark.parametrize(
    "how, expected",
    [
        ("sum", [3.0, 8.0, 0.0, 7.0]),
        ("mean", [1.0, 4.0, 0.0, 7.0]),
        ("last", [4.0, 5.0, 0.0, 7.0]),
        ("min", [-2.0, 3.0, 0.0, 7.0]),
        ("max", [4.0, 5.0, 0.0, 7.0]),
    ],
)
def test_token_aggregate_by_hand(how, expected):
    out = token_aggregate(VALUES, STEPS, 4, how)
    assert out.dtype == torch.float64
    assert torch.equal(out, torch.tensor(expected, dtype=torch.float64))


def test_token_aggregate_last_is_by_position_not_value():
    values = torch.tensor([5.0, 1.0, 9.0, 2.0])
    steps = torch.tensor([1, 0, 1, 0])
    assert token_aggregate(values, steps, 2, "last").tolist() == [2.0, 9.0]


def test_token_aggregate_dtype_promotion_and_empty():
    assert token_aggregate(torch.tensor([1, 2]), torch.tensor([0, 0]), 1).dtype == torch.float32
    assert token_aggregate(torch.tensor([1.0, 2.0], dtype=torch.bfloat16), torch.tensor([0, 0]), 1).dtype == (
        torch.float32
    )
    for how in TOKEN_AGGREGATIONS:
        assert token_aggregate(torch.tensor([NAN]), torch.tensor([-1]), 2, how).tolist() == [0.0, 0.0]
        assert token_aggregate(torch.zeros(0), torch.zeros(0, dtype=torch.long), 0, how).shape == (0,)


def test_token_aggregate_errors():
    with pytest.raises(ValueError, match="sum, mean, last, min, max"):
        token_aggregate(VALUES, STEPS, 4, "median")
    with pytest.raises(ValueError):
        token_aggregate(VALUES, STEPS, 3)  # step 3 out of range
    with pytest.raises(ValueError):
        token_aggregate(VALUES[:3], STEPS, 4)
    with pytest.raises(ValueError):
        token_aggregate(VALUES, STEPS - 1, 4)  # -2


def test_token_aggregate_is_differentiable():
    v = torch.tensor([1.0, 2.0, 3.0], requires_grad=True)
    token_aggregate(v, torch.tensor([0, 0, 1]), 2, "mean").sum().backward()
    assert v.grad.tolist() == [0.5, 0.5, 1.0]


def _naive(values, steps, n_steps, how):
    out = []
    for s in range(n_steps):
        xs = [v for v, i in zip(values, steps) if i == s]
        if not xs:
            out.append(0.0)
        elif how == "sum":
            out.append(sum(xs))
        elif how == "mean":
            out.append(sum(xs) / len(xs))
        elif how == "last":
            out.append(xs[-1])
        elif how == "min":
            out.append(min(xs))
        else:
            out.append(max(xs))
    return out


@settings(max_examples=60, deadline=None)
@given(
    data=st.lists(
        st.tuples(st.floats(-100, 100, allow_nan=False), st.integers(-1, 5)), min_size=0, max_size=40
    ),
    extra_steps=st.integers(0, 3),
    how=st.sampled_from(TOKEN_AGGREGATIONS),
)
def test_token_aggregate_matches_naive_loop(data, extra_steps, how):
    values = [v for v, _ in data]
    steps = [s for _, s in data]
    n_steps = max(steps + [-1]) + 1 + extra_steps
    out = token_aggregate(
        torch.tensor(values, dtype=torch.float64), torch.tensor(steps, dtype=torch.long), n_steps, how
    )
    expected = _naive(values, steps, n_steps, how)
    assert out.tolist() == pytest.approx(expected, rel=1e-12, abs=1e-9)


LP = torch.tensor([NAN, -1.0, -3.0, -math.inf, -0.5, -2.0])
LR = torch.tensor([NAN, -2.0, -1.0, -math.inf, -1.5, -0.5])
IDX = torch.tensor([-1, 0, 0, -1, 1, 1])


def test_step_advantages_difference_ignores_nan_context():
    # diffs: step 0 -> [1, -2], step 1 -> [1, -1.5]
    assert step_advantages(LP, LR, IDX, 2).tolist() == [-1.0, -0.5]
    assert step_advantages(LP, LR, IDX, 2, token_agg="mean").tolist() == [-0.5, -0.25]
    assert step_advantages(LP, LR, IDX, 2, token_agg="min").tolist() == [-2.0, -1.5]
    assert step_advantages(LP, LR, IDX, 2, token_agg="max").tolist() == [1.0, 1.0]
    assert step_advantages(LP, LR, IDX, 2, token_agg="last").tolist() == [-2.0, -1.5]


def test_step_advantages_per_model_differs_for_min_max():
    # per model: min lp = [-3, -2], min lr = [-2, -1.5] -> [-1, -0.5]; max lp = [-1, -0.5], max lr = [-1, -0.5] -> 0
    assert step_advantages(LP, LR, IDX, 2, token_agg="min", per_model=True).tolist() == [-1.0, -0.5]
    assert step_advantages(LP, LR, IDX, 2, token_agg="max", per_model=True).tolist() == [0.0, 0.0]
    # sum, mean and last are the same either way (linear / same token)
    for how in ("sum", "mean", "last"):
        assert torch.allclose(
            step_advantages(LP, LR, IDX, 2, token_agg=how, per_model=True),
            step_advantages(LP, LR, IDX, 2, token_agg=how),
        )


def test_step_advantages_beta_and_empty_steps():
    out = step_advantages(LP, LR, IDX, 3, beta=0.1)
    assert torch.allclose(out, torch.tensor([-0.1, -0.05, 0.0]))
    with pytest.raises(ValueError):
        step_advantages(LP, LR[:3], IDX, 2)


def test_cumulative():
    assert cumulative(torch.tensor([1.0, -2.0, 0.5])).tolist() == [1.0, -1.0, -0.5]
    assert cumulative(torch.zeros(0)).shape == (0,)


@pytest.mark.parametrize(
    "how, expected",
    [("mean", 1.25), ("sum", 5.0), ("last", -1.0), ("min", -1.0), ("max", 4.0), ("bottom10", -1.0)],
)
def test_trajectory_aggregate_by_hand(how, expected):
    assert trajectory_aggregate(torch.tensor([2.0, 4.0, 0.0, -1.0]), how) == expected


def test_trajectory_aggregate_bottom10():
    # S = 25 -> ceil(2.5) = 3 lowest: -5, -4, -3
    v = torch.arange(25, dtype=torch.float64)
    v[7], v[13], v[20] = -3.0, -5.0, -4.0
    assert trajectory_aggregate(v, "bottom10") == -4.0
    # S = 30 -> exactly 3 (no 0.1 * 30 = 3.0000000000000004 rounding up to 4)
    assert trajectory_aggregate(torch.arange(30.0), "bottom10") == 1.0
    # S = 1 -> 1; S = 11 -> 2
    assert trajectory_aggregate(torch.tensor([3.0]), "bottom10") == 3.0
    assert trajectory_aggregate(torch.arange(11.0), "bottom10") == 0.5


def test_trajectory_aggregate_errors():
    with pytest.raises(ValueError, match="no steps"):
        trajectory_aggregate(torch.zeros(0))
    with pytest.raises(ValueError, match="bottom10"):
        trajectory_aggregate(torch.ones(3), "median")
    assert set(STEP_AGGREGATIONS) == {"mean", "sum", "last", "min", "max", "bottom10"}
