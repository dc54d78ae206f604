"""References built from weights: the blend ``theta_ref + alpha * (theta - theta_ref)`` and the reused model that
holds a candidate reference (a blend, or an earlier policy) while it scores.

``alpha`` in ``(0, 1)`` interpolates between the reference and the policy (model merging), ``alpha < 0`` extrapolates
away from the policy, ``alpha = 0`` is the reference itself; ``alpha = 1`` (the policy: every log-ratio 0) is refused.
Both models must have the same architecture: the same parameter names and shapes. Every floating-point parameter is
blended, in float32, and stored back in the reference's dtype; other tensors must be equal in both models.
"""

from __future__ import annotations

import math
from typing import Iterable, Mapping

import torch

BLEND_ATTR = "progadv_reference_blend"  # set on a model built in memory by blending: no folder holds its weights


def check_alpha(alpha, name: str = "reference_alpha") -> float:
    """``alpha`` as a float: finite and not 1 (the policy itself, whose log-ratio is 0 everywhere)."""
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)):
        raise ValueError(f"{name}: expected a number, got {type(alpha).__name__} {alpha!r}")
    alpha = float(alpha)
    if not math.isfinite(alpha):
        raise ValueError(f"{name}: expected a finite number, got {alpha!r}")
    if alpha == 1.0:
        raise ValueError(f"{name}=1 is the policy itself: every log-ratio would be 0. Use 0 < alpha < 1 to "
                         "interpolate toward the policy, alpha < 0 to extrapolate away from it")
    return alpha


def blend_tensor(reference: torch.Tensor, policy: torch.Tensor, alpha: float) -> torch.Tensor:
    """``reference + alpha * (policy - reference)`` computed in float32 (float64 stays float64), returned in the
    reference's dtype on the reference's device."""
    work = torch.promote_types(reference.dtype, torch.float32)
    r = reference.detach().to(work)
    p = policy.detach().to(device=reference.device, dtype=work)
    return (r + alpha * (p - r)).to(reference.dtype)


def check_same_architecture(reference: Iterable[tuple[str, torch.Tensor]],
                            policy: Iterable[tuple[str, torch.Tensor]]) -> None:
    """Raise a ``ValueError`` naming the first tensor that differs in name or shape between the two models."""
    ref, pol = dict(reference), dict(policy)
    for name, r in ref.items():
        if name not in pol:
            raise ValueError(f"cannot blend the reference with the policy: the policy has no parameter {name!r} "
                             f"(shape {tuple(r.shape)}); both must have the same architecture")
        if tuple(pol[name].shape) != tuple(r.shape):
            raise ValueError(f"cannot blend the reference with the policy: parameter {name!r} has shape "
                             f"{tuple(r.shape)} in the reference and {tuple(pol[name].shape)} in the policy; both "
                             "must have the same architecture")
    extra = [name for name in pol if name not in ref]
    if extra:
        raise ValueError(f"cannot blend the reference with the policy: the reference has no parameter {extra[0]!r} "
                         f"(shape {tuple(pol[extra[0]].shape)}); both must have the same architecture")


def blend_state_dicts(reference: Mapping[str, torch.Tensor], policy: Mapping[str, torch.Tensor],
                      alpha: float) -> dict[str, torch.Tensor]:
    """``{name: ref + alpha * (policy - ref)}`` for every floating-point tensor (see :func:`blend_tensor`); other
    tensors (integer buffers) are taken from the reference and must be equal in the policy."""
    alpha = check_alpha(alpha, "alpha")
    check_same_architecture(reference.items(), policy.items())
    out = {}
    for name, r in reference.items():
        p = policy[name]
        if r.is_floating_point():
            out[name] = blend_tensor(r, p, alpha)
        elif torch.equal(r.cpu(), p.cpu()):
            out[name] = r.detach().clone()
        else:
            raise ValueError(f"cannot blend the reference with the policy: the non-float tensor {name!r} differs")
    return out


@torch.no_grad()
def blend_into_(target: torch.nn.Module, reference: torch.nn.Module, policy: torch.nn.Module, alpha: float) -> None:
    """Write the blend of ``reference`` and ``policy`` into ``target``'s parameters, one tensor at a time (memory for
    one tensor besides the three models; ``target`` may be ``reference`` itself: then the blend replaces it in
    place). Tied parameters are blended once."""
    alpha = check_alpha(alpha, "alpha")
    ref = dict(reference.named_parameters())
    pol = dict(policy.named_parameters())
    check_same_architecture(((n, p) for n, p in ref.items()), ((n, p) for n, p in pol.items()))
    for name, t in target.named_parameters():
        t.copy_(blend_tensor(ref[name], pol[name], alpha))


@torch.no_grad()
def model_like(model: torch.nn.Module, device: torch.device | str | None = None) -> torch.nn.Module:
    """A frozen, eval-mode model of ``model``'s class and config holding a copy of its weights and buffers (in their
    dtypes), built without ``deepcopy`` (trainers patch forwards per instance) and without a random initialisation:
    the buffer a candidate reference is written into."""
    device = torch.device(device) if device is not None else next(model.parameters()).device
    with torch.device("meta"):
        clone = type(model)(model.config)
    clone.to_empty(device=device)
    if hasattr(clone, "tie_weights"):
        clone.tie_weights()  # a tied head is one parameter, as in the model it copies
    sources = {**dict(model.named_parameters()), **dict(model.named_buffers())}
    for name, t in [*clone.named_parameters(), *clone.named_buffers()]:
        src = sources[name]
        if t.dtype != src.dtype:
            t.data = torch.empty_like(t, dtype=src.dtype)
        t.copy_(src)
    clone.requires_grad_(False)
    return clone.eval()


@torch.no_grad()
def load_weights_(target: torch.nn.Module, weights: Mapping[str, torch.Tensor]) -> None:
    """Copy ``weights`` (name -> tensor, e.g. an earlier policy's on CPU) into ``target``'s parameters."""
    params = dict(target.named_parameters())
    check_same_architecture(params.items(), weights.items())
    for name, t in params.items():
        t.copy_(weights[name])


def cpu_copy(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter of ``model`` copied to CPU in its dtype (tied parameters once)."""
    return {name: p.detach().to("cpu", copy=True) for name, p in model.named_parameters()}


def nbytes(weights: Mapping[str, torch.Tensor] | torch.nn.Module) -> int:
    """Bytes held by the tensors (a model's parameters and buffers, tied ones once)."""
    if isinstance(weights, torch.nn.Module):
        tensors = {id(t): t for t in [*weights.parameters(), *weights.buffers()]}.values()
    else:
        tensors = weights.values()
    return sum(t.numel() * t.element_size() for t in tensors)
