"""Per-token statistics of one or two causal-LM heads, fused and chunked over the vocabulary; picks the backend.

Given final hidden states ``h`` (``[N, H]``) and an LM head ``W`` (``[V, H]``, optional bias ``b``), every statistic
is folded online over the vocabulary, so no ``[N, V]`` logits tensor is ever built: a backend folds the running
max / sum-exp / etc. of the logits (:mod:`.heads` has the logit transform), and the shared finishing step
(:mod:`.finish`, which lists the formulas) turns them into the statistics.

Backends, chosen by the ``backend`` argument only:

- ``"torch"`` (:mod:`.torch_fold`): one fp32 GEMM per vocabulary chunk and model, on any device.
- ``"triton"`` (:mod:`.triton_fold`, CUDA): the fold fused into a Triton matmul; it lists what it supports. Opt-in:
  it has passed its tests under Triton's CPU interpreter but not yet on GPU hardware, so ``"auto"`` (the default)
  is the torch path on every device until it has (:data:`.constants.TRITON_VALIDATED`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from functools import partial

import torch

from . import constants, torch_fold
from .constants import BACKENDS, POLICY_STATS, STATS
from .finish import Folded, Plan, finish
from .heads import Head

FoldFn = Callable[[Head, Head | None, Plan], Folded]  # a backend's fold


def _check_stats(stats: Iterable[str], allowed: tuple[str, ...]) -> set[str]:
    stats = tuple(stats)
    unknown = [s for s in stats if s not in allowed]
    if unknown:
        raise ValueError(f"unknown statistics {unknown}; choose from {allowed}")
    return set(stats)


def _check_targets(targets: torch.Tensor, n: int, vocab: int) -> None:
    if targets.dim() != 1 or targets.shape[0] != n:
        raise ValueError(f"targets must be [{n}], got {tuple(targets.shape)}")
    if targets.dtype.is_floating_point or targets.dtype == torch.bool:
        raise ValueError(f"targets must be an integer tensor, got {targets.dtype}")
    if n and (int(targets.min()) < 0 or int(targets.max()) >= vocab):
        raise ValueError(f"targets must lie in [0, {vocab}), got values in "
                         f"[{int(targets.min())}, {int(targets.max())}]")


def _check_common(temperature: float, top_k: int) -> None:
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    if top_k < 1:
        raise ValueError(f"top_k must be at least 1, got {top_k}")


def _triton_fold(policy: Head, reference: Head | None, targets: torch.Tensor, top_k: int,
                 explicit: bool) -> FoldFn | None:
    """The Triton backend's fold if it takes these inputs, else ``None``; ``explicit`` (``backend="triton"``) raises
    instead of returning ``None``, so it never falls back silently."""
    try:
        from . import triton_fold
    except ImportError as e:
        if explicit:
            raise ImportError(f"backend='triton' needs the triton package ({e}); use backend='torch'") from None
        return None
    if explicit and targets.device.type != "cuda" and not triton_fold.INTERPRETED:
        raise ValueError(f"backend='triton' runs on CUDA tensors (got {targets.device.type}); use backend='torch' "
                         "(or set TRITON_INTERPRET=1 before importing triton to run it interpreted)")
    if triton_fold.supports(policy, reference, top_k):
        return triton_fold.fold
    if explicit:
        raise ValueError(f"backend='triton' does not support these inputs (hidden/weight dtypes must match and be "
                         f"fp32/fp16/bf16, top_k <= {triton_fold.MAX_TOP_K}); use backend='torch'")
    return None


def _pick_fold(policy: Head, reference: Head | None, targets: torch.Tensor, top_k: int, chunk_size: int | None,
               backend: str) -> FoldFn:
    """The fold of ``backend``: Triton when asked for (``"auto"``: only once validated, on CUDA), else torch."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    wants_triton = backend == "triton" or (
        backend == "auto" and constants.TRITON_VALIDATED and targets.device.type == "cuda")
    if wants_triton and targets.shape[0]:
        fold = _triton_fold(policy, reference, targets, top_k, explicit=backend == "triton")
        if fold is not None:
            return fold
    return partial(torch_fold.fold, chunk_size=chunk_size)


def _fused_stats(policy: Head, reference: Head | None, targets: torch.Tensor, want: set[str], top_k: int,
                 chunk_size: int | None, backend: str) -> dict[str, torch.Tensor]:
    """Fold with the chosen backend, then finish: shared by both public functions (``reference=None``: one model)."""
    fold = _pick_fold(policy, reference, targets, top_k, chunk_size, backend)
    plan = Plan.of(want, reference is not None, top_k, policy.vocab)
    folded = fold(policy, reference, plan)
    targets = targets.long()
    return finish(plan, folded,
                  target_logits=policy.target_logits(targets) if "logprob" in want else None,
                  ref_target_logits=reference.target_logits(targets) if "ref_logprob" in want else None)


@torch.no_grad()
def two_model_token_stats(
    policy_hidden: torch.Tensor,
    policy_weight: torch.Tensor,
    reference_hidden: torch.Tensor,
    reference_weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    policy_bias: torch.Tensor | None = None,
    reference_bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    policy_logit_scale: float = 1.0,
    reference_logit_scale: float = 1.0,
    policy_softcap: float | None = None,
    reference_softcap: float | None = None,
    stats: Iterable[str] = STATS,
    top_k: int = 20,
    chunk_size: int | None = None,
    backend: str = "auto",
) -> dict[str, torch.Tensor]:
    """Per-token statistics of a policy and its reference over a shared vocabulary, without ``[N, V]`` logits.

    Args:
        policy_hidden: ``[N, H_p]`` final hidden states of the policy; ``policy_weight``: ``[V, H_p]`` its LM head.
        reference_hidden: ``[N, H_r]``; ``reference_weight``: ``[V, H_r]`` (``H_r`` may differ from ``H_p``).
        targets: ``[N]`` token ids in ``[0, V)``.
        policy_bias, reference_bias: optional ``[V]`` head biases.
        temperature, *_logit_scale, *_softcap: the logit transform (see :class:`.heads.Head`).
        stats: any of :data:`STATS`; only those are computed (no reference GEMM without a reference statistic).
        top_k: ``k`` of ``topk_confidence`` (clamped to ``V``).
        chunk_size: vocabulary columns per tile (torch backend); ``None`` picks a CPU-friendly size.
        backend: ``"torch"``, ``"triton"`` (CUDA, opt-in) or ``"auto"`` (torch until Triton is validated on GPU).

    Returns:
        ``{stat: [N] fp32}`` with exactly the requested keys, on the input device.
    """
    want = _check_stats(stats, STATS)
    _check_common(temperature, top_k)
    if policy_weight.shape[0] != reference_weight.shape[0]:
        raise ValueError(f"vocabulary sizes differ: policy {policy_weight.shape[0]} vs reference "
                         f"{reference_weight.shape[0]}")
    if policy_hidden.shape[0] != reference_hidden.shape[0]:
        raise ValueError(f"row counts differ: policy {policy_hidden.shape[0]} vs reference {reference_hidden.shape[0]}")
    policy = Head(policy_hidden, policy_weight, policy_bias, temperature, policy_logit_scale, policy_softcap,
                  "policy")
    reference = Head(reference_hidden, reference_weight, reference_bias, temperature, reference_logit_scale,
                     reference_softcap, "reference")
    _check_targets(targets, policy_hidden.shape[0], policy.vocab)
    return _fused_stats(policy, reference, targets, want, top_k, chunk_size, backend)


@torch.no_grad()
def token_stats(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    logit_scale: float = 1.0,
    softcap: float | None = None,
    temperature: float = 1.0,
    stats: Iterable[str] = POLICY_STATS,
    top_k: int = 20,
    chunk_size: int | None = None,
    backend: str = "auto",
) -> dict[str, torch.Tensor]:
    """Single-model version of :func:`two_model_token_stats` (``hidden`` ``[N, H]``, ``weight`` ``[V, H]``).

    ``stats``: any of :data:`POLICY_STATS`. Returns ``{stat: [N] fp32}`` with exactly the requested keys.
    """
    want = _check_stats(stats, POLICY_STATS)
    _check_common(temperature, top_k)
    head = Head(hidden, weight, bias, temperature, logit_scale, softcap, "model")
    _check_targets(targets, hidden.shape[0], head.vocab)
    return _fused_stats(head, None, targets, want, top_k, chunk_size, backend)
