"""Which parallel set-ups the monitor can score under, and a clear refusal for the others.

One process, DDP and DeepSpeed ZeRO-1/2 hold whole parameters on every rank: the decoder is run directly. FSDP2
(``fully_shard``: parameters as ``DTensor`` shards) and DeepSpeed ZeRO-3 (partitioned parameters) are scored through a
forward of the sharded root module, whose hooks gather each layer's shards and free them again, with the LM head's
weight alone gathered for the fused kernel (:mod:`progadv_trl.models`); every rank runs the same number of forwards
(:mod:`progadv_trl.distributed`). FSDP1 (the ``FullyShardedDataParallel`` wrapper and its flat parameters) is refused
by name before any forward: scoring under it would crash, hang, or read flattened shards.
"""

from __future__ import annotations

import torch


class UnsupportedSetupError(RuntimeError):
    """The models are sharded in a way the scorer cannot read."""


def _fsdp_module_type():
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover - torch < 2.6 or without distributed
        return None
    return FSDPModule


def _dtensor_type():
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch without distributed
        return None
    return DTensor


def sharding_of(model: torch.nn.Module | None) -> str | None:
    """``"fsdp2"``, ``"fsdp1"``, ``"zero3"`` or ``None`` (whole parameters on this rank) for a model or its wrapper."""
    if model is None:
        return None
    fsdp2, dtensor = _fsdp_module_type(), _dtensor_type()
    for m in model.modules():
        if type(m).__name__ == "FullyShardedDataParallel":
            return "fsdp1"
        if fsdp2 is not None and isinstance(m, fsdp2):
            return "fsdp2"
    for p in model.parameters():
        if dtensor is not None and isinstance(p, dtensor):
            return "fsdp2"  # DTensor parameters without fully_shard (tensor parallel): read the same way
        if hasattr(p, "ds_id"):  # DeepSpeed ZeRO-3 partitioned parameter
            return "zero3"
    return None


def accelerator_sharding(trainer) -> str | None:
    """What the trainer's accelerator shards with: ``"fsdp2"``, ``"fsdp1"``, ``"zero3"`` or ``None``."""
    state = getattr(getattr(trainer, "accelerator", None), "state", None)
    if state is None:
        return None
    fsdp = getattr(state, "fsdp_plugin", None)
    if fsdp is not None:
        return "fsdp2" if int(getattr(fsdp, "fsdp_version", 1) or 1) == 2 else "fsdp1"
    ds = getattr(state, "deepspeed_plugin", None)
    if ds is not None and int(getattr(ds, "zero_stage", 0) or 0) == 3:
        return "zero3"
    return None


UNSUPPORTED = {"fsdp1": "FSDP1 (the FullyShardedDataParallel wrapper, flat parameters)"}


def check_supported(*models, trainer=None) -> None:
    """Raise :class:`UnsupportedSetupError` naming the set-up when a model (or the trainer's accelerator) is sharded
    in a way the scorer cannot read; one process, DDP, ZeRO-1/2/3 and FSDP2 pass."""
    found = [accelerator_sharding(trainer)] if trainer is not None else []
    found += [sharding_of(model) for model in models]
    for kind in found:
        if kind in UNSUPPORTED:
            raise UnsupportedSetupError(
                f"progadv: the policy or reference is sharded with {UNSUPPORTED[kind]}; scoring under it is not "
                "supported (it would crash, hang or read flattened shards). Use FSDP2 (accelerate: fsdp_version=2; "
                "torch: fully_shard), DeepSpeed ZeRO-3, DDP or one process, or score the saved checkpoints "
                "afterwards with `progadv score --policy ... --reference ...`.")
