"""Loading the policy and its reference, and reading what the statistics need: final hidden states and the LM head.

A reference is a :class:`ModelView`: either a separate model, or the policy's own PEFT model with its adapters
switched off (TRL's reference under PEFT), or a frozen adapter of it. Loading never unpickles (safetensors only) and
runs no remote code unless ``trust_remote_code=True``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from .sharding import sharding_of

WEIGHT_SUFFIXES = (".safetensors",)


@dataclass
class LMHead:
    """What turns a final hidden state into logits: ``z = (h @ weight.T + bias) * logit_scale``, then
    ``softcap * tanh(z / softcap)`` when soft-capped (Gemma)."""

    weight: torch.Tensor
    bias: torch.Tensor | None = None
    logit_scale: float = 1.0
    softcap: float | None = None

    @property
    def vocab_size(self) -> int:
        return (getattr(self.weight, "ds_shape", None) or self.weight.shape)[0]  # ZeRO-3 keeps a 0-size placeholder


def gather_head(head: LMHead) -> LMHead:
    """``head`` with whole tensors on this rank: a ``DTensor`` weight (FSDP2) is all-gathered with
    ``full_tensor()``, a ZeRO-3 partitioned one copied out of ``deepspeed.zero.GatheredParameters``; only the head
    (weight and bias) is gathered, never the rest of the model. Under sharding this is a collective: every rank calls
    it. Whole tensors are returned as they are."""
    weight, bias = head.weight, head.bias
    if hasattr(weight, "ds_id"):
        import deepspeed

        with deepspeed.zero.GatheredParameters([p for p in (weight, bias) if p is not None], modifier_rank=None):
            weight = weight.detach().clone()
            bias = None if bias is None else bias.detach().clone()
    else:
        weight, bias = whole_tensor(weight), whole_tensor(bias)
    return dataclasses.replace(head, weight=weight, bias=bias)


def unsharded_copy(view: "ModelView") -> "ModelView | None":
    """A whole copy of a sharded view's model on rank 0's CPU (``None`` on the other ranks; the view itself when it
    is not sharded), for saving: FSDP2's full state dict gathered by ``get_model_state_dict(full_state_dict=True,
    cpu_offload=True)``, ZeRO-3's one parameter at a time in ``GatheredParameters``, loaded into a model built on the
    meta device (tensors in their own dtype, no second initialisation). A collective: every rank calls it."""
    model = strip_wrappers(view.model)
    kind = sharding_of(model)
    if kind is None:
        return view
    if is_peft_model(model):
        from .sharding import UnsupportedSetupError

        raise UnsupportedSetupError(f"progadv: saving a PEFT model sharded with {kind} is not supported; set "
                                    "export=False and save the adapter with the trainer")
    main = torch.distributed.get_rank() == 0
    if kind == "zero3":
        import deepspeed

        state = {}
        for name, p in model.named_parameters():
            with deepspeed.zero.GatheredParameters([p], modifier_rank=None):
                if main:
                    state[name] = p.detach().to("cpu", copy=True)
    else:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not main:
        return None
    cls = next(c for c in type(model).__mro__ if not c.__name__.startswith("FSDP"))  # fully_shard's subclass
    with torch.device("meta"):
        clone = cls(model.config)
    clone.load_state_dict(state, strict=False, assign=True)
    clone.tie_weights()  # a tied head is one parameter, gathered once under its first name
    missing = [n for n, p in clone.named_parameters() if p.is_meta]
    if missing:
        raise RuntimeError(f"progadv: the gathered state dict of the sharded model lacks {missing[:5]}")
    return ModelView(clone.eval(), view.adapter)


def whole_tensor(t: torch.Tensor | None) -> torch.Tensor | None:
    """``t`` itself, or the all-gathered value of a ``DTensor`` (FSDP2 shards; a collective)."""
    if t is not None and hasattr(t, "full_tensor") and hasattr(t, "placements"):  # a DTensor
        return t.full_tensor().detach()
    return t


def is_peft_model(model) -> bool:
    try:
        from peft import PeftModel
    except ImportError:  # pragma: no cover - peft is a dependency
        return False
    return isinstance(model, PeftModel)


def strip_wrappers(model):
    """The module inside DDP/accelerate/DeepSpeed wrappers (a ``PeftModel`` stays a ``PeftModel``)."""
    while hasattr(model, "module") and isinstance(getattr(model, "module"), torch.nn.Module):
        model = model.module
    return model


def unwrap(model):
    """The ``PreTrainedModel`` inside DDP/accelerate/PEFT wrappers."""
    model = strip_wrappers(model)
    if is_peft_model(model):
        model = model.get_base_model()
    return model


def lm_head(model) -> LMHead:
    """The output head of a causal LM, with the logit transforms its config declares."""
    base = unwrap(model)
    out = base.get_output_embeddings()
    if out is None or not hasattr(out, "weight"):
        raise ValueError(f"{type(base).__name__} has no output embedding (LM head) to score with")
    cfg = base.config.get_text_config() if hasattr(base.config, "get_text_config") else base.config
    scale = float(getattr(cfg, "logit_scale", None) or 1.0)  # Cohere multiplies
    if getattr(cfg, "logits_scaling", None):  # Granite divides
        scale /= float(cfg.logits_scaling)
    softcap = getattr(cfg, "final_logit_softcapping", None)
    return LMHead(out.weight, getattr(out, "bias", None), scale, float(softcap) if softcap else None)


class ModelView:
    """A causal LM as one distribution: ``model`` with its adapters as given, or switched off / set to one adapter.

    Args:
        model: a ``PreTrainedModel`` or ``PeftModel`` (possibly wrapped by DDP/accelerate).
        adapter: ``None`` = as the model is; ``"off"`` = PEFT adapters disabled; any other string = that adapter.
    """

    def __init__(self, model, adapter: str | None = None):
        if adapter is not None and not is_peft_model(strip_wrappers(model)):
            raise ValueError(f"adapter={adapter!r} needs a PEFT model, got {type(model).__name__}")
        self.model = model
        self.adapter = adapter

    @contextlib.contextmanager
    def active(self):
        peft_model = strip_wrappers(self.model)
        if self.adapter is None:
            yield
        elif self.adapter == "off":
            with peft_model.disable_adapter():
                yield
        else:
            previous = peft_model.active_adapter
            peft_model.set_adapter(self.adapter)
            try:
                yield
            finally:
                peft_model.set_adapter(previous)

    @property
    def device(self) -> torch.device:
        return next(unwrap(self.model).parameters()).device

    @property
    def head(self) -> LMHead:
        return lm_head(self.model)

    @torch.no_grad()
    def hidden_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                      shared_prefix: int = 0) -> torch.Tensor:
        """``[B, L, H]`` final (post-norm) hidden states of right-padded rows.

        ``shared_prefix = P > 0`` says the rows share their first ``P`` tokens: the prefix is encoded once and its
        key/value cache reused for every row's suffix (a best-of-N group's prompt costs one pass, not N).
        """
        with self.active():
            if sharding_of(strip_wrappers(self.model)) is not None:
                return _root_forward(strip_wrappers(self.model), input_ids, attention_mask)
            decoder = unwrap(self.model).get_decoder()
            if shared_prefix > 0:
                return _with_shared_prefix(decoder, input_ids, attention_mask, shared_prefix)
            mask = None if bool(attention_mask.all()) else attention_mask  # no padding: SDPA's causal kernel
            return decoder(input_ids=input_ids, attention_mask=mask, use_cache=False).last_hidden_state


def _root_forward(model, input_ids, attention_mask) -> torch.Tensor:
    """``[B, L, H]`` final hidden states from one forward of the root module, for sharded models: FSDP2's and
    ZeRO-3's hooks on it gather each layer's shards and free them (running the inner decoder would bypass the root's
    and meet sharded embeddings). A forward hook on the decoder keeps its output; the head is run on the last position
    only (``logits_to_keep=1``), so no ``[B, L, vocab]`` logits are built. One forward per call, whatever the data."""
    base = unwrap(model)
    keep_one = "logits_to_keep" in inspect.signature(base.forward).parameters
    captured: list[torch.Tensor] = []

    def hook(module, args, output):
        hidden = output.last_hidden_state if hasattr(output, "last_hidden_state") else output[0]
        captured.append(hidden)
        if not keep_one:  # hand the head the last position only
            if hasattr(output, "last_hidden_state"):
                output.last_hidden_state = hidden[:, -1:]
                return output
            return (hidden[:, -1:], *output[1:])
        return None

    handle = base.get_decoder().register_forward_hook(hook)
    try:
        mask = None if bool(attention_mask.all()) else attention_mask
        model(input_ids=input_ids, attention_mask=mask, use_cache=False, **({"logits_to_keep": 1} if keep_one else {}))
    finally:
        handle.remove()
    _reshard(model)
    return captured[-1]


def _reshard(model) -> None:
    """Free FSDP2's unsharded parameters (the root keeps them after a forward without backward), so that the model is
    left as training expects it: every parameter a ``DTensor`` shard."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover
        return
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


def cache_keyword(forward) -> str:
    """The keyword a model's ``forward`` takes its key/value cache by: transformers >= 5.24 names it ``cache``
    (``past_key_values`` is deprecated there)."""
    return "cache" if "cache" in inspect.signature(forward).parameters else "past_key_values"


def _with_shared_prefix(decoder, input_ids, attention_mask, p: int) -> torch.Tensor:
    rows = input_ids.shape[0]
    prefix = decoder(input_ids=input_ids[:1, :p], use_cache=True)
    cache = getattr(prefix, "cache", None) or prefix.past_key_values
    cache.batch_repeat_interleave(rows)
    mask = attention_mask if not bool(attention_mask.all()) else None
    suffix = decoder(input_ids=input_ids[:, p:], attention_mask=mask, use_cache=True,
                     **{cache_keyword(decoder.forward): cache})
    return torch.cat([prefix.last_hidden_state.expand(rows, -1, -1), suffix.last_hidden_state], 1)


def is_adapter_dir(path: str | os.PathLike) -> bool:
    return (Path(path) / "adapter_config.json").is_file()


def _check_safetensors(path: Path) -> None:
    if path.is_dir() and not any(f.suffix in WEIGHT_SUFFIXES for f in path.iterdir()):
        pickled = [f.name for f in path.iterdir() if f.suffix in (".bin", ".pt", ".pth", ".ckpt", ".pkl")]
        raise ValueError(f"{path}: no .safetensors weights"
                         + (f" (found {pickled}: pickled weights are never loaded)" if pickled else ""))


def load_causal_lm(source, *, dtype: torch.dtype | None = None, device: str | torch.device | None = None,
                   trust_remote_code: bool = False, adapter_base=None, device_map: str | dict | None = None,
                   attn_implementation: str | None = None, revision: str | None = None, quantization_config=None):
    """A causal LM from a loaded model (returned as is) or a local folder / hub id; an adapter folder gives a
    ``PeftModel`` on its base (``adapter_base`` overrides the base recorded in the adapter config).

    ``device_map``, ``attn_implementation``, ``revision`` and ``quantization_config`` (a transformers
    ``BitsAndBytesConfig`` or its dict, e.g. ``{"load_in_4bit": True}``) go to ``from_pretrained``; for an adapter
    folder they apply to its base. ``revision`` names a revision of a hub repository: it is refused for a local
    folder, which has none. A quantized model is placed with ``device_map={"": device}`` (it cannot be moved).
    """
    if isinstance(source, torch.nn.Module):
        return source
    from transformers import AutoModelForCausalLM

    if device is not None and device_map is not None:
        raise ValueError(f"give device ({device!r}) or device_map ({device_map!r}), not both")
    quantization_config = _quantization_config(quantization_config)
    if quantization_config is not None and device is not None:
        device_map, device = {"": str(device)}, None
    path = Path(source)
    if path.exists():
        _check_safetensors(path)
    if path.exists() and is_adapter_dir(path):
        import json

        from peft import PeftModel

        base_src = adapter_base
        if base_src is None:
            base_src = json.loads((path / "adapter_config.json").read_text())["base_model_name_or_path"]
        base = load_causal_lm(base_src, dtype=dtype, device=device, trust_remote_code=trust_remote_code,
                              device_map=device_map, attn_implementation=attn_implementation, revision=revision,
                              quantization_config=quantization_config)
        model = PeftModel.from_pretrained(base, str(path), is_trainable=False)
    else:
        if revision is not None and path.exists():
            raise ValueError(f"revision={revision!r}: {source} is a local folder, which has no revisions (revision "
                             f"selects a commit, branch or tag of a hub model id); check out that revision into a "
                             f"folder and load it, or drop revision")
        kwargs = {"trust_remote_code": trust_remote_code, "use_safetensors": True}
        for name, value in (("dtype", dtype), ("device_map", device_map), ("attn_implementation", attn_implementation),
                            ("revision", revision), ("quantization_config", quantization_config)):
            if value is not None:
                kwargs[name] = value
        model = AutoModelForCausalLM.from_pretrained(str(source), **kwargs)
    if device is not None:
        model.to(device)
    return model.eval()


def _quantization_config(config):
    """``config`` as a transformers quantization config (a dict without ``quant_method`` is a
    ``BitsAndBytesConfig``); a clear error when bitsandbytes, which it needs, is not installed."""
    if config is None:
        return None
    if isinstance(config, dict):
        from transformers import BitsAndBytesConfig
        from transformers.quantizers import AutoQuantizationConfig

        config = (AutoQuantizationConfig.from_dict(dict(config)) if "quant_method" in config
                  else BitsAndBytesConfig(**config))
    method = getattr(config, "quant_method", None)
    if getattr(method, "value", method) == "bitsandbytes":
        import importlib.util

        if importlib.util.find_spec("bitsandbytes") is None:
            raise ValueError("quantization_config (4-bit / 8-bit loading) needs the bitsandbytes package, which is "
                             "not installed: pip install bitsandbytes")
    return config


def load_tokenizer(source, *, trust_remote_code: bool = False):
    """The tokenizer saved with a model (or an adapter's base), loaded the way users load it (``AutoTokenizer``)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(source), trust_remote_code=trust_remote_code)
    # transformers builds an empty tokenizer (one token, encodes everything to []) for a model folder without
    # tokenizer files: scoring with it would give numbers, all wrong
    if len(tokenizer) < 2 or not tokenizer("a b", add_special_tokens=False)["input_ids"]:
        raise ValueError(f"{source}: no usable tokenizer there (transformers built an empty one with "
                         f"{len(tokenizer)} token(s)); save the tokenizer with the model or pass tokenizer=")
    return tokenizer


def name_or_path(model) -> str | None:
    base = unwrap(model)
    return getattr(base.config, "_name_or_path", None) or None


class CachedView:
    """A reference whose final hidden states are remembered per token sequence.

    A fixed held-out set then costs one reference forward for the whole run: later evaluations read the cache.
    The underlying model is loaded on the first miss (``load``) and can be released afterwards (:meth:`release`),
    keeping only a copy of the LM head. Entries not used by an evaluation are dropped at its end, so fresh rollouts
    do not accumulate.
    """

    def __init__(self, load):
        self._load, self._view, self._head = load, None, None
        self._cache: dict[bytes, torch.Tensor] = {}
        self._used: set[bytes] = set()
        self.hits = self.misses = 0
        self._sharded = False

    def _model_view(self) -> ModelView:
        if self._view is None:
            self._view = self._load()
        return self._view

    @property
    def model(self):
        return self._model_view().model

    @property
    def adapter(self):
        return self._model_view().adapter

    @property
    def head(self) -> LMHead:
        return self._head if self._head is not None else self._model_view().head

    @property
    def device(self) -> torch.device:
        return self.head.weight.device

    @torch.no_grad()
    def hidden_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                      shared_prefix: int = 0) -> torch.Tensor:
        if self._sharded:
            return self._model_view().hidden_states(input_ids, attention_mask, shared_prefix)
        lengths = attention_mask.sum(-1).tolist()
        keys = [input_ids[b, :n].cpu().numpy().tobytes() for b, n in enumerate(lengths)]
        self._used.update(keys)
        if all(k in self._cache for k in keys):
            self.hits += len(keys)
            first = self._cache[keys[0]]
            out = first.new_zeros((len(keys), input_ids.shape[1], first.shape[-1]))
            for b, (k, n) in enumerate(zip(keys, lengths)):
                out[b, :n] = self._cache[k]
            return out.to(self.device)
        self.misses += len(keys)
        hidden = self._model_view().hidden_states(input_ids, attention_mask, shared_prefix)
        if sharding_of(strip_wrappers(self._view.model)) is not None:
            self._sharded = True  # every rank must run every forward: no cache (a hit would skip a collective)
            return hidden
        for b, (k, n) in enumerate(zip(keys, lengths)):
            self._cache[k] = hidden[b, :n].detach().to("cpu")
        return hidden

    def end_evaluation(self) -> None:
        """Drop entries the last evaluation did not use."""
        self._cache = {k: v for k, v in self._cache.items() if k in self._used}
        self._used = set()

    def release(self) -> None:
        """Let go of the model (keep a copy of its head): the next miss loads it again."""
        if self._view is not None:
            h = gather_head(self._view.head)
            self._head = LMHead(h.weight.detach().clone(), None if h.bias is None else h.bias.detach().clone(),
                                h.logit_scale, h.softcap)
            self._view = None
