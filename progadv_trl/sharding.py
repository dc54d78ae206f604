"""Which parallel set-ups the monitor can score under, and a clear refusal for the others.

The fused kernel reads each model's final hidden states and its LM head's full weight, and the monitor runs the
inner decoder directly. That is exact for one process and for DDP (every rank holds the whole model), and for
DeepSpeed ZeRO-1/2 (only optimizer state and gradients are partitioned). Under FSDP (parameters as ``DTensor`` shards,
or FSDP1's flat parameters) and DeepSpeed ZeRO-3 (parameters partitioned, each rank holding an empty placeholder)
it would crash, hang, or read empty weights, so :func:`check_supported` refuses them by name before any forward.
"""

from __future__ import annotations

import torch


class UnsupportedSetupError(RuntimeError):
    """The models are sharded in a way the scorer cannot read yet."""


def sharding_of(model: torch.nn.Module | None) -> str | None:
    """``"fsdp"``, ``"zero3"`` or ``None`` (whole parameters on this rank) for a model or its wrapper."""
    if model is None:
        return None
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch without distributed
        DTensor = ()
    if type(model).__name__ in ("FullyShardedDataParallel", "FSDPModule") or any(
            type(m).__name__.startswith("FSDP") for m in model.modules()):
        return "fsdp"
    for p in model.parameters():
        if DTensor and isinstance(p, DTensor):
            return "fsdp"
        if hasattr(p, "ds_id") or hasattr(p, "ds_status"):  # DeepSpeed ZeRO-3 partitioned parameter
            return "zero3"
    return None


def accelerator_sharding(trainer) -> str | None:
    """What the trainer's accelerator shards with: ``"fsdp"``, ``"zero3"`` or ``None``."""
    state = getattr(getattr(trainer, "accelerator", None), "state", None)
    if state is None:
        return None
    if getattr(state, "fsdp_plugin", None) is not None:
        return "fsdp"
    ds = getattr(state, "deepspeed_plugin", None)
    if ds is not None and int(getattr(ds, "zero_stage", 0) or 0) == 3:
        return "zero3"
    return None


_NAMES = {"fsdp": "FSDP (sharded parameters)", "zero3": "DeepSpeed ZeRO-3 (partitioned parameters)"}


def check_supported(*models, trainer=None) -> None:
    """Raise :class:`UnsupportedSetupError` naming the set-up when a model (or the trainer's accelerator) shards
    parameters; one process, DDP and ZeRO-1/2 pass."""
    found = accelerator_sharding(trainer) if trainer is not None else None
    for model in models:
        found = found or sharding_of(model)
    if found:
        raise UnsupportedSetupError(
            f"progadv: the policy or reference is sharded with {_NAMES[found]}; scoring under it is not supported "
            "yet (it would crash, hang or read empty weights). Supported: one process, DDP, DeepSpeed ZeRO-1/2. "
            "Score the saved checkpoints afterwards with `progadv score --policy ... --reference ...` instead.")
