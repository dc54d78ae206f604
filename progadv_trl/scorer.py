"""``ProgressAdvantageScorer``: a policy, its reference and a config; trajectories in, step advantages out.

It composes the layers below: :mod:`~progadv_trl.rendering` (tokens and step spans), :mod:`~progadv_trl.token_statistics`
(hidden states through the fused kernel), :mod:`~progadv_trl.results` (advantages, baselines, uses). It also saves
and loads itself (:meth:`save_pretrained` / :meth:`from_pretrained`): safetensors only, no remote code unless asked,
atomic writes.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import torch

from . import __version__
from .baselines import random_scores
from .config import CONFIG_VERSION, ProgressAdvantageConfig
from .data import Trajectory
from .models import (ModelView, is_adapter_dir, is_peft_model, load_causal_lm, load_tokenizer, name_or_path,
                     strip_wrappers, unwrap, weights_sha256)
from .rendering import TrajectoryTokenizer, same_tokenization
from .results import TrajectoryScore, attribute, choose_best_of_n, evaluation_table, score_trajectory
from .token_statistics import compute_token_stats

CONFIG_NAME = "progadv_config.json"
POLICY_DIR, REFERENCE_DIR, REFERENCE_TOKENIZER_DIR = "policy", "reference", "reference_tokenizer"
REFERENCE_ADAPTER_DIR = "reference_adapter"


def _sha256_text(text: str | None) -> str | None:
    import hashlib

    return None if text is None else hashlib.sha256(text.encode("utf-8")).hexdigest()


class ProgressAdvantageScorer:
    """Scores trajectories step by step with ``beta * (log pi - log pi_ref)`` and reports baselines beside it.

    Build it with :meth:`from_models` or :meth:`from_pretrained`.

    Example:
        ```python
        scorer = ProgressAdvantageScorer.from_models("runs/grpo/checkpoint-500", "Qwen/Qwen3-0.6B", beta=0.04)
        results = scorer.score(load_trajectories("rollouts.jsonl"))
        results[0].score, [s.advantage for s in results[0].steps]
        ```
    """

    def __init__(self, policy: ModelView, reference: ModelView, tokenizer, reference_tokenizer=None,
                 config: ProgressAdvantageConfig | None = None, provenance: dict | None = None):
        self.policy, self.reference = policy, reference
        self.config = config or ProgressAdvantageConfig()
        self.tokenizer = tokenizer
        if reference_tokenizer is not None and same_tokenization(tokenizer, reference_tokenizer):
            reference_tokenizer = None
        self.reference_tokenizer = reference_tokenizer
        self.provenance = dict(provenance or {})
        self._check_vocab()
        cfg = self.config
        self._tokenize = TrajectoryTokenizer(tokenizer, cfg.rendering, cfg.step_separator, cfg.max_length)
        self._tokenize_ref = None if reference_tokenizer is None else TrajectoryTokenizer(
            reference_tokenizer, cfg.rendering, cfg.step_separator, cfg.max_length)

    def _check_vocab(self) -> None:
        vp, vr = self.policy.head.vocab_size, self.reference.head.vocab_size
        if self.reference_tokenizer is None and vp != vr:
            raise ValueError(f"policy and reference share a tokenizer but their LM heads differ in vocabulary size "
                             f"({vp} vs {vr}); pass the reference's own tokenizer as reference_tokenizer")
        for name, view, tok in (("policy", self.policy, self.tokenizer),
                                ("reference", self.reference, self.reference_tokenizer or self.tokenizer)):
            if len(tok) > view.head.vocab_size:
                raise ValueError(f"the {name} tokenizer has {len(tok)} tokens but the {name} LM head only "
                                 f"{view.head.vocab_size}: they do not belong together")

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_models(cls, policy, reference=None, tokenizer=None, reference_tokenizer=None, *,
                    config: ProgressAdvantageConfig | None = None, device: str | torch.device | None = None,
                    dtype: torch.dtype | None = None, trust_remote_code: bool = False,
                    **config_overrides) -> "ProgressAdvantageScorer":
        """A scorer from two models (paths or loaded models).

        Args:
            policy: the RL-trained policy: a path, a loaded model, or a PEFT adapter (path or ``PeftModel``).
            reference: the reference it was regularised toward. ``None`` with a PEFT policy means the adapter's base
                (adapters switched off); otherwise required.
            tokenizer: the policy's tokenizer (default: loaded from the policy path, or the adapter's base).
            reference_tokenizer: the reference's when it differs (default: loaded from the reference path and used
                only when it tokenizes differently).
            config: a :class:`ProgressAdvantageConfig`; keyword overrides (``beta=``, ``temperature=``, ...) apply
                on top.
        """
        config = _with_overrides(config, config_overrides)
        provenance: dict[str, Any] = {}
        policy_model = load_causal_lm(policy, dtype=dtype, device=device, trust_remote_code=trust_remote_code)
        provenance["policy"] = str(policy) if not isinstance(policy, torch.nn.Module) else name_or_path(policy_model)
        if reference is None:
            if not is_peft_model(policy_model):
                raise ValueError("reference is required unless the policy is a PEFT adapter (whose base is the "
                                 "reference)")
            reference_view = ModelView(policy_model, adapter="off")
            provenance["reference"] = "adapters-off"
        else:
            ref_model = load_causal_lm(reference, dtype=dtype, device=device, trust_remote_code=trust_remote_code)
            reference_view = ModelView(ref_model)
            provenance["reference"] = (str(reference) if not isinstance(reference, torch.nn.Module)
                                       else name_or_path(ref_model))
        if tokenizer is None:
            tokenizer = _tokenizer_for(policy, policy_model, trust_remote_code)
        if reference_tokenizer is None and reference is not None:
            try:
                reference_tokenizer = _tokenizer_for(reference, reference_view.model, trust_remote_code)
            except (OSError, ValueError):
                reference_tokenizer = None
        return cls(ModelView(policy_model), reference_view, tokenizer, reference_tokenizer, config, provenance)

    # ------------------------------------------------------------------ scoring
    def iter_score(self, trajectories: Iterable[Trajectory], *, details: bool = False,
                   window: int | None = None) -> Iterator[TrajectoryScore]:
        """Score lazily, yielding results in input order; trajectories are batched by length within windows of
        ``window`` (default ``16 * batch_size``) so that long inputs stream."""
        window = window or 16 * self.config.batch_size
        buffer: list[Trajectory] = []
        for traj in trajectories:
            buffer.append(traj)
            if len(buffer) >= window:
                yield from self._score_window(buffer, details)
                buffer = []
        if buffer:
            yield from self._score_window(buffer, details)

    def score(self, trajectories: Iterable[Trajectory], *, details: bool = False) -> list[TrajectoryScore]:
        """Score every trajectory: per-step advantages, trajectory score, baselines (see :class:`TrajectoryScore`)."""
        return list(self.iter_score(trajectories, details=details))

    def score_with_drift(self, trajectories: Sequence[Trajectory]) -> tuple[list[TrajectoryScore], list[dict]]:
        """Scores plus, per trajectory, the action tokens' log-ratios ``[T]`` and exact KL ``[T]`` (drift inputs)."""
        pairs = self._score_window(trajectories, False, with_drift=True)
        return [r for r, _ in pairs], [d for _, d in pairs]

    def _score_window(self, trajs: Sequence[Trajectory], details: bool, with_drift: bool = False) -> list:
        cfg = self.config
        toks = [self._tokenize(t) for t in trajs]
        ref_toks = None if self._tokenize_ref is None else [self._tokenize_ref(t) for t in trajs]
        stats = compute_token_stats(
            self.policy, self.reference, toks, ref_toks, temperature=cfg.temperature, top_k=cfg.top_k,
            chunk_size=cfg.chunk_size, batch_size=cfg.batch_size, all_positions=details,
            policy_stats=_policy_stats_for(cfg.baselines), with_kl=with_drift, backend=cfg.backend,
            pad_id=_pad_id(self.tokenizer),
            reference_pad_id=None if self.reference_tokenizer is None else _pad_id(self.reference_tokenizer))
        rand = random_scores([str(t.id) for t in trajs], seed=cfg.seed)
        results = [score_trajectory(t, tok, st, cfg, reference_tok=None if ref_toks is None else ref_toks[i],
                                    random_value=rand[i], details=details)
                   for i, (t, tok, st) in enumerate(zip(trajs, toks, stats))]
        if not with_drift:
            return results
        drift = []
        for tok, st in zip(toks, stats):
            action = torch.tensor(tok.step_index) >= 0
            if self.reference_tokenizer is None:
                drift.append({"log_ratio": (st["logprob"] - st["ref_logprob"])[action], "kl": st["kl"][action]})
            else:  # no token-level ratio across tokenizations
                drift.append({"log_ratio": torch.empty(0), "kl": None})
        return list(zip(results, drift))

    # the three uses, over scored results
    best_of_n = staticmethod(choose_best_of_n)

    def attribute(self, results: Sequence[TrajectoryScore]) -> list[int]:
        """Predicted decisive-error message index per trajectory, with the configured method."""
        return attribute(results, self.config.attribution, self.config.attribution_threshold)

    def evaluate(self, results: Sequence[TrajectoryScore], methods: Sequence[str] | None = None) -> dict:
        """Metric table: progress advantage and the baselines (default: the configured ``baselines``)."""
        return evaluation_table(results, self.config.baselines if methods is None else methods, attribution=self.config.attribution,
                                threshold=self.config.attribution_threshold)

    # ------------------------------------------------------------------ save / load
    def save_pretrained(self, save_directory: str | os.PathLike, *, reference: str = "copy") -> Path:
        """Write the scorer to ``save_directory`` atomically.

        Layout: ``progadv_config.json``; ``policy/`` (full weights and tokenizer, or only the PEFT adapter);
        ``reference/`` (full weights) unless the reference is the adapter's base (then the base is saved there once)
        or ``reference="link"`` (only its local path and the SHA-256 of its safetensors files, verified on load);
        ``reference_tokenizer/`` when the reference tokenizes differently.
        """
        if reference not in ("copy", "link"):
            raise ValueError(f"reference={reference!r}: expected 'copy' or 'link'")
        target = Path(save_directory)
        target.parent.mkdir(parents=True, exist_ok=True)
        _recover(target)
        stale_dirs = [*target.parent.glob(f".{target.name}.tmp-*"), *target.parent.glob(f".{target.name}.old-*")]
        for stale in stale_dirs:  # left by a killed save (the target itself is whole: _recover ran)
            shutil.rmtree(stale, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
        try:
            meta = self._write(tmp, reference)
            (tmp / CONFIG_NAME).write_text(json.dumps(meta, indent=2, sort_keys=True), encoding="utf-8")
            _atomic_swap(tmp, target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return target

    def _write(self, tmp: Path, reference_mode: str) -> dict:
        policy_model = strip_wrappers(self.policy.model)
        ref_view = self.reference
        meta: dict[str, Any] = {"config": self.config.to_dict(), "library": "progadv-trl",
                                "library_version": __version__, "config_version": CONFIG_VERSION,
                                "provenance": self.provenance,
                                "chat_template_sha256": _sha256_text(getattr(self.tokenizer, "chat_template", None))}
        shares_base = ref_view.model is self.policy.model and ref_view.adapter is not None
        if is_peft_model(policy_model):
            adapter = self.policy.adapter or policy_model.active_adapter
            policy_model.save_pretrained(str(tmp / POLICY_DIR), selected_adapters=[adapter])
            src = tmp / POLICY_DIR / adapter if adapter != "default" else tmp / POLICY_DIR
            meta["policy"] = {"kind": "peft_adapter", "path": os.path.relpath(src, tmp)}
        else:
            policy_model.save_pretrained(str(tmp / POLICY_DIR), safe_serialization=True)
            meta["policy"] = {"kind": "full", "path": POLICY_DIR}
        self.tokenizer.save_pretrained(str(tmp / POLICY_DIR))
        if shares_base:  # the reference is the policy's base, adapters off or with a frozen adapter of its own
            base = unwrap(policy_model)
            ref_meta = {"kind": "adapter_base"}
            if ref_view.adapter != "off":
                policy_model.save_pretrained(str(tmp / REFERENCE_ADAPTER_DIR), selected_adapters=[ref_view.adapter])
                ref_meta["adapter_path"] = os.path.relpath(tmp / REFERENCE_ADAPTER_DIR / ref_view.adapter, tmp)
        else:
            base = unwrap(ref_view.model)
            ref_meta = {"kind": "full"}
        if reference_mode == "link":
            src = name_or_path(base)
            if not src or not Path(src).is_dir():
                raise ValueError("reference='link' needs a reference loaded from a local folder; got "
                                 f"{src!r}. Use reference='copy'")
            ref_meta.update(path=str(Path(src).resolve()), sha256=weights_sha256(src), linked=True)
        else:
            if shares_base:
                with policy_model.disable_adapter():
                    _save_plain_base(base, tmp / REFERENCE_DIR)
            else:
                base.save_pretrained(str(tmp / REFERENCE_DIR), safe_serialization=True)
            ref_meta.update(path=REFERENCE_DIR, sha256=weights_sha256(tmp / REFERENCE_DIR), linked=False)
        meta["reference"] = ref_meta
        if self.reference_tokenizer is not None:
            self.reference_tokenizer.save_pretrained(str(tmp / REFERENCE_TOKENIZER_DIR))
            meta["reference_tokenizer"] = REFERENCE_TOKENIZER_DIR
        return meta

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, *, device: str | torch.device | None = None,
                        dtype: torch.dtype | None = None, trust_remote_code: bool = False,
                        **config_overrides) -> "ProgressAdvantageScorer":
        """Load a scorer saved by :meth:`save_pretrained` (config fields can be overridden by keyword)."""
        root = Path(directory)
        _recover(root)
        meta_path = root / CONFIG_NAME
        if not meta_path.is_file():
            raise FileNotFoundError(f"{root}: not a progadv scorer (missing {CONFIG_NAME})")
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
        except ValueError as e:
            raise ValueError(f"{meta_path}: invalid JSON: {e}") from None
        version = meta.get("config_version")
        if not isinstance(version, int) or version > CONFIG_VERSION:
            raise ValueError(f"{meta_path}: field 'config_version': {version!r} is newer than this progadv-trl "
                             f"supports ({CONFIG_VERSION}); upgrade progadv-trl")
        config = _with_overrides(ProgressAdvantageConfig.from_dict(meta["config"], source=str(meta_path)),
                                 config_overrides)
        ref_meta, pol_meta = meta["reference"], meta["policy"]
        if ref_meta.get("linked"):
            ref_path = Path(ref_meta["path"])
        else:
            ref_path = _inside(root, ref_meta["path"], meta_path, "reference.path")
        if not ref_path.is_dir():
            raise FileNotFoundError(f"{meta_path}: field 'reference.path': {ref_path} does not exist")
        found = weights_sha256(ref_path)
        if found != ref_meta.get("sha256"):
            raise ValueError(f"{meta_path}: field 'reference.sha256': the reference weights at {ref_path} do not "
                             f"match the recorded hash (recorded {ref_meta.get('sha256')}, found {found})")
        pol_path = _inside(root, pol_meta["path"], meta_path, "policy.path")
        tok_path = _inside(root, POLICY_DIR, meta_path, "policy")
        kw = {"dtype": dtype, "device": device, "trust_remote_code": trust_remote_code}
        if pol_meta["kind"] == "peft_adapter":
            policy_model = load_causal_lm(pol_path, adapter_base=ref_path, **kw)
            if ref_meta["kind"] != "adapter_base":
                reference = ModelView(load_causal_lm(ref_path, **kw))
            elif ref_meta.get("adapter_path"):
                policy_model.load_adapter(str(_inside(root, ref_meta["adapter_path"], meta_path, "reference.adapter_path")),
                                          adapter_name="reference", is_trainable=False)
                reference = ModelView(policy_model, adapter="reference")
            else:
                reference = ModelView(policy_model, adapter="off")
        else:
            policy_model = load_causal_lm(pol_path, **kw)
            reference = ModelView(load_causal_lm(ref_path, **kw))
        tokenizer = load_tokenizer(tok_path, trust_remote_code=trust_remote_code)
        ref_tok = None
        if meta.get("reference_tokenizer"):
            ref_tok = load_tokenizer(_inside(root, meta["reference_tokenizer"], meta_path, "reference_tokenizer"),
                                     trust_remote_code=trust_remote_code)
        return cls(ModelView(policy_model), reference, tokenizer, ref_tok, config, meta.get("provenance"))


_STAT_OF_BASELINE = {"self_certainty": "self_certainty", "neg_entropy": "entropy", "deepconf_mean": "topk_confidence",
                     "deepconf_tail": "topk_confidence", "deepconf_bottom10": "topk_confidence",
                     "deepconf_lowest": "topk_confidence"}


def _policy_stats_for(baselines: Sequence[str]) -> tuple[str, ...]:
    """The policy statistics the requested baselines need, beside the log-prob (a top-k fold costs the most)."""
    return tuple(dict.fromkeys(["logprob", *(_STAT_OF_BASELINE[b] for b in baselines if b in _STAT_OF_BASELINE)]))


def _save_plain_base(base, path: Path) -> None:
    """Save a PEFT model's base weights without the LoRA layers (adapters are disabled by the caller)."""
    state = {k.replace("base_layer.", ""): v for k, v in base.state_dict().items() if "lora_" not in k}
    clone = type(base)(base.config)
    clone.load_state_dict(state)
    clone.save_pretrained(str(path), safe_serialization=True)


def _inside(root: Path, rel: str, meta_path: Path, field: str) -> Path:
    path = (root / rel).resolve()
    if root.resolve() not in (path, *path.parents):
        raise ValueError(f"{meta_path}: field '{field}': {rel!r} escapes the scorer directory")
    return path


def _recover(target: Path) -> None:
    """Put back the previous export if a save was killed between moving it aside and moving the new one in."""
    if target.exists():
        return
    olds = sorted(target.parent.glob(f".{target.name}.old-*"), key=lambda p: p.stat().st_mtime)
    if olds and (olds[-1] / CONFIG_NAME).exists():
        os.replace(olds[-1], target)


def _atomic_swap(tmp: Path, target: Path) -> None:
    """Move ``tmp`` to ``target``; an existing ``target`` stays whole until the new one is in place."""
    if not target.exists():
        os.replace(tmp, target)
        return
    old = target.parent / f".{target.name}.old-{uuid.uuid4().hex[:8]}"
    os.replace(target, old)
    try:
        os.replace(tmp, target)
    except BaseException:
        os.replace(old, target)
        raise
    shutil.rmtree(old, ignore_errors=True)


def _pad_id(tokenizer) -> int:
    for tid in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0):
        if tid is not None:
            return tid
    return 0  # pragma: no cover


def _tokenizer_for(source, model, trust_remote_code: bool):
    if not isinstance(source, torch.nn.Module):
        path = Path(str(source))
        if path.exists() and is_adapter_dir(path) and not (path / "tokenizer_config.json").exists():
            source = json.loads((path / "adapter_config.json").read_text())["base_model_name_or_path"]
        return load_tokenizer(source, trust_remote_code=trust_remote_code)
    src = name_or_path(model)
    if not src:
        raise ValueError("cannot find a tokenizer for a model without a name or path; pass tokenizer=")
    return load_tokenizer(src, trust_remote_code=trust_remote_code)


def _with_overrides(config: ProgressAdvantageConfig | None, overrides: dict) -> ProgressAdvantageConfig:
    import dataclasses

    config = config or ProgressAdvantageConfig()
    return dataclasses.replace(config, **{k: v for k, v in overrides.items() if v is not None}) if overrides else config
