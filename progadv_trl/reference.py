"""Keeping the reference in every training set-up (BRIEF section 3: TRL 1.16 hides it in four ways).

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
policy as its reference.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from .drift import weight_drift
from .models import ModelView, is_peft_model, load_causal_lm, strip_wrappers, unwrap

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
                    delta = module.get_delta_weight(active)
                    ref = module.get_delta_weight(ref_adapter) if ref_adapter else torch.zeros_like(delta)
                    pairs.append((delta, ref))
            for name, p in unwrap(model).named_parameters():
                if "lora_" not in name:
                    base_norm.append(p.detach().double().pow(2).sum().item())
            num = sum((d.double() - r.double()).pow(2).sum().item() for d, r in pairs)
            return (num / sum(base_norm)) ** 0.5 if base_norm else float("nan")
        if self._view is None and self.path:  # on disk: stream it tensor by tensor instead of loading the model
            return weight_drift(_safetensors_pairs(unwrap(model), Path(self.path)))
        ref_model = unwrap(self.view().model)
        ref_params = dict(ref_model.named_parameters())
        return weight_drift((p, ref_params[n]) for n, p in unwrap(model).named_parameters() if n in ref_params)


def _safetensors_pairs(model, folder: Path):
    from safetensors import safe_open

    params = dict(model.named_parameters())
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            for name in f.keys():
                if name in params:
                    yield params[name], f.get_tensor(name)


def snapshot(model, path: str | Path, placement: str, device=None) -> Reference:
    """Freeze a copy of ``model`` (``type(m)(m.config)`` + ``load_state_dict``, never ``deepcopy``: TRL patches
    forwards per instance) and write it to ``path``; ``placement`` says where the live copy is kept."""
    base = unwrap(model)
    path = Path(path)
    if not (path / "config.json").exists():
        clone = type(base)(base.config).to(dtype=base.dtype)
        clone.load_state_dict(base.state_dict())
        clone.save_pretrained(str(path), safe_serialization=True)
        del clone
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
    placement = "device" if config.reference_placement == "auto" else config.reference_placement
    snap_dir = Path(export_dir) / SNAPSHOT_DIR
    if resumed_state and resumed_state.get("kind") == "snapshot":
        return load_snapshot(resumed_state["path"], placement, next(unwrap(model).parameters()).device)
    if is_peft_model(model):
        if "ref" in model.peft_config:
            return Reference("ref_adapter", ModelView(trainer.model, adapter="ref"))
        if beta == 0.0 and (REF_ADAPTER in model.peft_config or _lora_b_nonzero(model, model.active_adapter)):
            return _frozen_adapter_copy(trainer.model, snap_dir, resumed_state)
        return Reference("adapters_off", ModelView(trainer.model, adapter="off"))
    sync = bool(getattr(getattr(trainer, "args", None), "sync_ref_model", False))
    ref_model = getattr(trainer, "ref_model", None)
    if ref_model is not None and (not sync or config.follow_sync_ref_model):
        return Reference("trl_ref_model", ModelView(ref_model))
    if sync:
        logger.warning("sync_ref_model=True moves TRL's reference toward the policy; progadv keeps the initial policy "
                       "as its reference (set follow_sync_ref_model=True to follow TRL's)")
    return snapshot(trainer.model, snap_dir, placement)


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
