"""Loading the policy and its reference, and reading what the statistics need: final hidden states and the LM head.

A reference is a :class:`ModelView`: either a separate model, or the policy's own PEFT model with its adapters
switched off (TRL's reference under PEFT), or a frozen adapter of it. Loading never unpickles (safetensors only) and
runs no remote code unless ``trust_remote_code=True``.
"""

from __future__ import annotations

import contextlib
import inspect
import os
from dataclasses import dataclass
from pathlib import Path

import torch

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
        return self.weight.shape[0]


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
        decoder = unwrap(self.model).get_decoder()
        with self.active():
            if shared_prefix > 0:
                return _with_shared_prefix(decoder, input_ids, attention_mask, shared_prefix)
            mask = None if bool(attention_mask.all()) else attention_mask  # no padding: SDPA's causal kernel
            return decoder(input_ids=input_ids, attention_mask=mask, use_cache=False).last_hidden_state


def _with_shared_prefix(decoder, input_ids, attention_mask, p: int) -> torch.Tensor:
    rows = input_ids.shape[0]
    prefix = decoder(input_ids=input_ids[:1, :p], use_cache=True)
    cache = getattr(prefix, "cache", None) or prefix.past_key_values
    cache.batch_repeat_interleave(rows)
    mask = attention_mask if not bool(attention_mask.all()) else None
    # transformers >= 5.24 names the argument `cache` (`past_key_values` is deprecated there)
    name = "cache" if "cache" in inspect.signature(decoder.forward).parameters else "past_key_values"
    suffix = decoder(input_ids=input_ids[:, p:], attention_mask=mask, use_cache=True, **{name: cache})
    return torch.cat([prefix.last_hidden_state.expand(rows, -1, -1), suffix.last_hidden_state], 1)


def is_adapter_dir(path: str | os.PathLike) -> bool:
    return (Path(path) / "adapter_config.json").is_file()


def _check_safetensors(path: Path) -> None:
    if path.is_dir() and not any(f.suffix in WEIGHT_SUFFIXES for f in path.iterdir()):
        pickled = [f.name for f in path.iterdir() if f.suffix in (".bin", ".pt", ".pth", ".ckpt", ".pkl")]
        raise ValueError(f"{path}: no .safetensors weights"
                         + (f" (found {pickled}: pickled weights are never loaded)" if pickled else ""))


def load_causal_lm(source, *, dtype: torch.dtype | None = None, device: str | torch.device | None = None,
                   trust_remote_code: bool = False, adapter_base=None):
    """A causal LM from a loaded model (returned as is) or a local folder / hub id; an adapter folder gives a
    ``PeftModel`` on its base (``adapter_base`` overrides the base recorded in the adapter config)."""
    if isinstance(source, torch.nn.Module):
        return source
    from transformers import AutoModelForCausalLM

    kwargs = {"trust_remote_code": trust_remote_code, "use_safetensors": True}
    if dtype is not None:
        kwargs["dtype"] = dtype
    path = Path(source)
    if path.exists():
        _check_safetensors(path)
    if path.exists() and is_adapter_dir(path):
        import json

        from peft import PeftModel

        base_src = adapter_base
        if base_src is None:
            base_src = json.loads((path / "adapter_config.json").read_text())["base_model_name_or_path"]
        base = load_causal_lm(base_src, dtype=dtype, device=device, trust_remote_code=trust_remote_code)
        model = PeftModel.from_pretrained(base, str(path), is_trainable=False)
    else:
        model = AutoModelForCausalLM.from_pretrained(str(source), **kwargs)
    if device is not None:
        model.to(device)
    return model.eval()


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
            h = self._view.head
            self._head = LMHead(h.weight.detach().clone(), None if h.bias is None else h.bias.detach().clone(),
                                h.logit_scale, h.softcap)
            self._view = None
