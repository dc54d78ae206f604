"""Progress advantage: per-token log-ratio of an RL-trained policy to its reference, aggregated per step.

For a policy ``pi`` and its reference ``pi_ref`` the per-token progress advantage is

    A_t = beta * (log pi(a_t | s_t) - log pi_ref(a_t | s_t)).

Every token of a trajectory is either context (``step_index == -1``) or belongs to exactly one step (an action,
numbered ``0 .. S-1`` in order). A step's advantage aggregates ``A_t`` over its tokens (``sum`` is the turn-level
advantage); a trajectory's score aggregates the step advantages.

Pure functions on tensors: no I/O, no model code.
"""

from __future__ import annotations

import torch
from torch import Tensor

TOKEN_AGGREGATIONS = ("sum", "mean", "last", "min", "max")
STEP_AGGREGATIONS = ("mean", "sum", "last", "min", "max", "bottom10")


def _check_choice(how: str, valid: tuple[str, ...], what: str) -> None:
    if how not in valid:
        raise ValueError(f"unknown {what} aggregation {how!r}; valid: {', '.join(valid)}")


def _check_tokens(values: Tensor, step_index: Tensor, n_steps: int) -> None:
    if values.dim() != 1 or step_index.dim() != 1 or values.shape != step_index.shape:
        raise ValueError(
            f"values and step_index must be 1-D of the same length, got {tuple(values.shape)} and "
            f"{tuple(step_index.shape)}"
        )
    if n_steps < 0:
        raise ValueError(f"n_steps must be >= 0, got {n_steps}")
    if step_index.dtype.is_floating_point or step_index.dtype == torch.bool:
        raise ValueError(f"step_index must be an integer tensor, got {step_index.dtype}")
    if step_index.numel() and (int(step_index.min()) < -1 or int(step_index.max()) >= n_steps):
        raise ValueError(f"step_index must lie in [-1, {n_steps - 1}] (-1 = context)")


def token_aggregate(values: Tensor, step_index: Tensor, n_steps: int, how: str = "sum") -> Tensor:
    """Aggregate per-token values within each step.

    Args:
        values: ``[T]`` per-token values. Context positions may hold anything (NaN, inf): they are ignored.
        step_index: ``[T]`` long, the step of each token, ``-1`` for context.
        n_steps: ``S``, the number of steps.
        how: one of :data:`TOKEN_AGGREGATIONS`.

    Returns:
        ``[S]`` tensor in ``values``' dtype promoted to at least float32: ``out[s] = how({values[t] : step_index[t]
        == s})``; ``last`` is the value of the step's last token by position. A step with no tokens (e.g. cut by
        truncation) gives ``0.0``.
    """
    _check_choice(how, TOKEN_AGGREGATIONS, "token")
    _check_tokens(values, step_index, n_steps)
    dtype = torch.promote_types(values.dtype, torch.float32)
    mask = step_index >= 0
    v = values[mask].to(dtype)
    idx = step_index[mask].to(torch.long)
    zeros = torch.zeros(n_steps, dtype=dtype, device=values.device)
    if how in ("sum", "mean"):
        total = zeros.index_add(0, idx, v)
        if how == "sum":
            return total
        count = torch.zeros(n_steps, dtype=dtype, device=values.device).index_add(0, idx, torch.ones_like(v))
        return torch.where(count > 0, total / count.clamp(min=1), zeros)
    if how in ("min", "max"):
        # include_self=False: steps that receive no token keep their initial 0.0
        return zeros.scatter_reduce(0, idx, v, reduce="amin" if how == "min" else "amax", include_self=False)
    # last: the largest position (within the selected tokens) that each step receives
    pos = torch.arange(v.numel(), device=values.device)
    last = torch.full((n_steps,), -1, dtype=torch.long, device=values.device)
    last = last.scatter_reduce(0, idx, pos, reduce="amax", include_self=True)
    if v.numel() == 0:
        return zeros
    return torch.where(last >= 0, v[last.clamp(min=0)], zeros)


def step_advantages(
    policy_logprob: Tensor,
    reference_logprob: Tensor,
    step_index: Tensor,
    n_steps: int,
    *,
    beta: float = 1.0,
    token_agg: str = "sum",
    per_model: bool = False,
) -> Tensor:
    """Per-step progress advantage.

    Args:
        policy_logprob: ``[T]`` ``log pi(a_t | s_t)``.
        reference_logprob: ``[T]`` ``log pi_ref(a_t | s_t)``.
        step_index: ``[T]`` long, ``-1`` for context (values there are ignored, even NaN).
        n_steps: ``S``.
        beta: scale of the advantage.
        token_agg: one of :data:`TOKEN_AGGREGATIONS`.
        per_model: ``False``: ``beta * agg(lp - lr)``. ``True`` (the paper authors' code): ``beta * (agg(lp) -
            agg(lr))``. Identical for ``sum``/``mean`` (linear) and ``last`` (both pick the same token); different
            for ``min``/``max`` (the extremes of ``lp`` and ``lr`` may sit on different tokens).

    Returns:
        ``[S]`` step advantages; empty steps give ``0.0``.
    """
    if policy_logprob.shape != reference_logprob.shape:
        raise ValueError(
            f"policy_logprob {tuple(policy_logprob.shape)} and reference_logprob "
            f"{tuple(reference_logprob.shape)} differ in shape"
        )
    if per_model:
        agg = token_aggregate(policy_logprob, step_index, n_steps, token_agg) - token_aggregate(
            reference_logprob, step_index, n_steps, token_agg
        )
    else:
        agg = token_aggregate(policy_logprob - reference_logprob, step_index, n_steps, token_agg)
    return beta * agg


def cumulative(step_values: Tensor) -> Tensor:
    """Running sum ``q_s = sum_{j <= s} v_j`` of ``[S]`` step values (the ImplicitPRM q-value view), ``[S]``."""
    return torch.cumsum(torch.as_tensor(step_values), dim=0)


def trajectory_aggregate(step_values: Tensor, how: str = "mean") -> float:
    """Aggregate ``[S]`` step values into one trajectory score.

    ``mean``/``sum``/``last``/``min``/``max`` over the steps; ``bottom10`` is the mean of the ``ceil(0.1 * S)``
    lowest steps. Raises ``ValueError`` for ``S == 0``.
    """
    _check_choice(how, STEP_AGGREGATIONS, "step")
    v = torch.as_tensor(step_values).reshape(-1)
    v = v.to(torch.promote_types(v.dtype, torch.float32))
    n = v.numel()
    if n == 0:
        raise ValueError("cannot aggregate a trajectory with no steps")
    if how == "mean":
        out = v.mean()
    elif how == "sum":
        out = v.sum()
    elif how == "last":
        out = v[-1]
    elif how == "min":
        out = v.min()
    elif how == "max":
        out = v.max()
    else:
        k = -(-n // 10)  # ceil(0.1 * n) without float rounding
        out = torch.sort(v).values[:k].mean()
    return float(out)
