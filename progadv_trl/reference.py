"""Keeping the reference in every training set-up (TRL 1.16 keeps it in four different ways).

================================================  ===============================================================
set-up                                            reference
================================================  ===============================================================
beta > 0, full fine-tuning                        TRL's ``trainer.ref_model``
beta = 0 (TRL's default, DAPO), full fine-tuning  our frozen snapshot of the policy at train begin
``sync_ref_model=True``                           the snapshot (TRL's moves); ``follow_sync_ref_model`` follows it
PEFT, fresh adapter                               the same model with adapters off (no second model)
PEFT, pre-trained adapter, beta > 0               TRL's frozen ``"ref"`` adapter
PEFT, pre-trained adapter, beta = 0               our frozen copy of the initial adapter, ``"progadv_ref"``
================================================  ===============================================================

Snapshots are also written to ``<export_dir>/reference`` once, so that a resumed run keeps the *initial*
policy as its reference. Under FSDP2 or ZeRO-3 the snapshot is built from the state dict accelerate gathers
(``Accelerator.get_state_dict``, in the parameters' dtype), written by rank 0 alone, and read back unsharded by every
rank (``reference_placement="auto"`` is then ``"disk"``: loaded only when the reference cache misses).
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path

import torch

from .drift import weight_drift
from .models import ModelView, is_peft_model, load_causal_lm, strip_wrappers, unwrap, whole_tensor
from .sharding import UnsupportedSetupError, sharding_of

logger = logging.getLogger(__name__)
SNAPSHOT_DIR = "reference"
REF_ADAPTER = "progadv_ref"


def _lora_b_nonzero(peft_model, adapter: str = "default") -> bool:
    return any(p.abs().sum().item() > 0 for n, p in peft_model.named_parameters() if f"lora_B.{adapter}." in n)


class Reference:
    """The reference of one training run: how to get it as a :class:`ModelView`, and how far the policy moved."""

    def __init__(self, kind: str, view: ModelView | None = None, path: str | None = None, device=None):
        self.kind, self._view, self.path, self.device = kind, view, path, device

    def view(self) -> ModelView:
        if self._view is None:  # a snapshot kept on disk: loaded for this evaluation only
            return ModelView(load_causal_lm(self.path, device=self.device))
        return self._view

    def describe(self) -> dict:
        return {"kind": self.kind, "path": self.path}

    @torch.no_grad()
    def weight_drift(self, policy) -> float:
        """``||theta - theta_ref|| / ||theta_ref||``; for adapters, the adapters' weight deltas over the base."""
        model = strip_wrappers(policy)
        if self.kind in ("adapters_off", "ref_adapter", REF_ADAPTER):
            ref_adapter = {"adapters_off": None, "ref_adapter": "ref", REF_ADAPTER: REF_ADAPTER}[self.kind]
            active = model.active_adapter
            pairs, base_norm = [], []
            for module in model.modules():
                if hasattr(module, "get_delta_weight") and active in getattr(module, "lora_A", {}):
                    with _whole(*module.parameters()):
                        delta = whole_tensor(module.get_delta_weight(active))
                        ref = whole_tensor(module.get_delta_weight(ref_adapter)) if ref_adapter else \
                            torch.zeros_like(delta)
                    pairs.append((delta, ref))
            for name, p in unwrap(model).named_parameters():
                if "lora_" not in name:
                    with _whole(p) as (w,):
                        base_norm.append(w.detach().double().pow(2).sum().item())
            num = sum((d.double() - r.double()).pow(2).sum().item() for d, r in pairs)
            return (num / sum(base_norm)) ** 0.5 if base_norm else float("nan")
        if self._view is None and self.path:  # on disk: stream it tensor by tensor instead of loading the model
            return weight_drift(_whole_pairs(_safetensors_pairs(unwrap(model), Path(self.path))))
        ref_model = unwrap(self.view().model)
        ref_params = dict(ref_model.named_parameters())
        return weight_drift(_whole_pairs((p, ref_params[n]) for n, p in unwrap(model).named_parameters()
                                         if n in ref_params))


@contextlib.contextmanager
def _whole(*tensors):
    """The tensors' whole values for the block: ZeRO-3 parameters inside ``deepspeed.zero.GatheredParameters``,
    FSDP2 ``DTensor`` s all-gathered; a collective under sharding (every rank enters it), one parameter at a time."""
    partitioned = [t for t in tensors if hasattr(t, "ds_id")]
    if partitioned:
        import deepspeed

        gathered = deepspeed.zero.GatheredParameters(partitioned, modifier_rank=None)
    else:
        gathered = contextlib.nullcontext()
    with gathered:
        yield tuple(whole_tensor(t) for t in tensors)


def _whole_pairs(pairs):
    """``(theta, theta_ref)`` pairs made whole one at a time (memory for one parameter, never the whole model)."""
    for p, r in pairs:
        with _whole(p, r) as whole:
            yield whole


def _safetensors_pairs(model, folder: Path):
    from safetensors import safe_open

    params = dict(model.named_parameters())
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            for name in f.keys():
                if name in params:
                    yield params[name], f.get_tensor(name)


def snapshot(model, path: str | Path, placement: str, device=None, accelerator=None) -> Reference:
    """Write ``model``'s weights to ``path`` (safetensors, in the parameters' dtype; never a ``deepcopy``: TRL patches
    forwards per instance) and load them back as a frozen model; ``placement`` says where the live copy is kept.

    Under FSDP2 / ZeRO-3 the whole state dict is gathered to rank 0's CPU by ``accelerator.get_state_dict(model)``
    (``model``: the DeepSpeed engine under ZeRO-3), a collective every rank enters; rank 0 alone writes it."""
    base = unwrap(model)
    path = Path(path)
    dist = torch.distributed.is_available() and torch.distributed.is_initialized()
    main = not dist or torch.distributed.get_rank() == 0
    if not (path / "config.json").exists():
        if sharding_of(strip_wrappers(model)) is not None:
            if accelerator is None:
                raise ValueError("progadv: a snapshot of a sharded (FSDP2 / ZeRO-3) model needs the trainer's "
                                 "accelerator to gather its state dict")
            state = accelerator.get_state_dict(model)
        else:
            state = base.state_dict() if main else None
        if main:
            base.save_pretrained(str(path), state_dict=state, safe_serialization=True)
        del state
    if dist:
        torch.distributed.barrier()  # the other ranks read what rank 0 wrote
    return load_snapshot(path, placement, device or next(base.parameters()).device)


def load_snapshot(path: str | Path, placement: str, device) -> Reference:
    if placement == "disk":
        return Reference("snapshot", None, str(path), device)
    target = "cpu" if placement == "cpu" else device
    model = load_causal_lm(str(path), device=target)
    model.requires_grad_(False)
    return Reference("snapshot", ModelView(model), str(path), target)


def resolve_reference(trainer, config, export_dir: str | Path, resumed_state: dict | None = None) -> Reference:
    """The reference of ``trainer`` (GRPOTrainer, RLOOTrainer, or anything with ``model``/``ref_model``/``beta``)."""
    model = strip_wrappers(trainer.model)
    beta = float(getattr(trainer, "beta", getattr(getattr(trainer, "args", None), "beta", 0.0)) or 0.0)
    sharded = sharding_of(trainer.model) or sharding_of(getattr(trainer, "model_wrapped", None))
    placement = config.reference_placement
    if placement == "auto":  # a sharded policy does not fit whole on one device: the snapshot stays on disk
        placement = "disk" if sharded else "device"
    snap_dir = Path(export_dir) / SNAPSHOT_DIR
    if resumed_state and resumed_state.get("kind") == "snapshot":
        return load_snapshot(resumed_state["path"], placement, next(unwrap(model).parameters()).device)
    if is_peft_model(model):
        if "ref" in model.peft_config:
            return Reference("ref_adapter", ModelView(trainer.model, adapter="ref"))
        if beta == 0.0 and (REF_ADAPTER in model.peft_config or _lora_b_nonzero(model, model.active_adapter)):
            if sharded:
                raise UnsupportedSetupError(
                    f"progadv: a pre-trained PEFT adapter with beta=0 under {sharded} needs a frozen copy of the "
                    "initial adapter added to the sharded model, which is not supported; set beta > 0 (TRL then "
                    "keeps a frozen 'ref' adapter) or score the checkpoints afterwards with `progadv score`")
            return _frozen_adapter_copy(trainer.model, snap_dir, resumed_state)
        return Reference("adapters_off", ModelView(trainer.model, adapter="off"))
    sync = bool(getattr(getattr(trainer, "args", None), "sync_ref_model", False))
    ref_model = getattr(trainer, "ref_model", None)
    if ref_model is not None and (not sync or config.follow_sync_ref_model):
        return Reference("trl_ref_model", ModelView(ref_model))
    if sync:
        logger.warning("sync_ref_model=True moves TRL's reference toward the policy; progadv keeps the initial policy "
                       "as its reference (set follow_sync_ref_model=True to follow TRL's)")
    source = trainer.model
    if sharded == "zero3":  # accelerate gathers a ZeRO-3 state dict from the engine
        source = getattr(trainer, "deepspeed", None) or getattr(trainer, "model_wrapped", None) or source
    return snapshot(source, snap_dir, placement, accelerator=getattr(trainer, "accelerator", None))


def _frozen_adapter_copy(peft_model, snap_dir: Path, resumed_state: dict | None) -> Reference:
    """A frozen copy of the initial adapter as a second adapter (TRL adds none when beta is 0)."""
    model = strip_wrappers(peft_model)
    active = model.active_adapter
    saved = snap_dir / REF_ADAPTER
    if REF_ADAPTER not in model.peft_config:
        if resumed_state and saved.exists():
            model.load_adapter(str(saved), adapter_name=REF_ADAPTER, is_trainable=False)
        else:
            model.add_adapter(REF_ADAPTER, model.peft_config[active])
            params = dict(model.named_parameters())
            for name, p in params.items():
                if f".{active}." in name and "lora_" in name:
                    params[name.replace(f".{active}.", f".{REF_ADAPTER}.")].data.copy_(p.data)
            model.save_pretrained(str(snap_dir), selected_adapters=[REF_ADAPTER])
        model.set_adapter(active)  # keep training the policy's adapter
    for name, p in model.named_parameters():
        if f".{REF_ADAPTER}." in name:
            p.requires_grad_(False)
    return Reference(REF_ADAPTER, ModelView(peft_model, adapter=REF_ADAPTER), str(saved))
