"""``ProgressAdvantageScorer``: a policy, its reference and a config; trajectories in, step advantages out.

It composes the layers below: :mod:`~progadv_trl.rendering` (tokens and step spans), :mod:`~progadv_trl.token_statistics`
(hidden states through the fused kernel), :mod:`~progadv_trl.trajectory_scores` (advantages, baselines, uses). It also saves
and loads itself (:meth:`save_pretrained` / :meth:`from_pretrained`, implemented in :mod:`~progadv_trl.persistence`):
safetensors only, no remote code unless asked, atomic writes, every score-relevant file hashed and verified on load.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import torch

from .baselines import policy_statistics
from .config import ScoringConfig, as_scoring
from .data import Trajectory
from .models import ModelView, is_adapter_dir, is_peft_model, load_causal_lm, load_tokenizer, name_or_path, unwrap
from .persistence import check_override_names, load_scorer, save_scorer
from .reference_blend import BLEND_ATTR, blend_into_, check_alpha, model_like
from .rendering import TrajectoryTokenizer, same_tokenization
from .trajectory_scores import TrajectoryScore, attribute, choose_best_of_n, evaluation_table, score_trajectory
from .token_statistics import compute_token_stats

logger = logging.getLogger(__name__)

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

    #: SHA-256 naming the exported scorer (its config, metadata and manifest), set by save/load; see persistence.
    digest: str | None = None

    def __init__(self, policy: ModelView, reference: ModelView, tokenizer, reference_tokenizer=None,
                 config: ScoringConfig | None = None, provenance: dict | None = None):
        self.policy, self.reference = policy, reference
        self.config = as_scoring(config)
        self.tokenizer = tokenizer
        if reference_tokenizer is not None and same_tokenization(tokenizer, reference_tokenizer):
            reference_tokenizer = None
        self.reference_tokenizer = reference_tokenizer
        self.provenance = dict(provenance or {})
        self._check_vocab()
        cfg = self.config
        # a model cannot attend past its context: longer inputs are cut to it (and say so), never scored past it
        contexts = [c for c in (_context_length(policy), _context_length(reference)) if c is not None]
        self.max_tokens = min([cfg.max_length, *contexts])
        self._warned_context = False
        self._tokenize = TrajectoryTokenizer(tokenizer, cfg.rendering, cfg.step_separator, self.max_tokens)
        self._tokenize_ref = None if reference_tokenizer is None else TrajectoryTokenizer(
            reference_tokenizer, cfg.rendering, cfg.step_separator, self.max_tokens)

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
                    config: ScoringConfig | None = None, device: str | torch.device | None = None,
                    dtype: torch.dtype | None = None, trust_remote_code: bool = False,
                    device_map: str | dict | None = None, attn_implementation: str | None = None,
                    revision: str | None = None, reference_revision: str | None = None, quantization_config=None,
                    reference_alpha: float | None = None, **config_overrides) -> "ProgressAdvantageScorer":
        """A scorer from two models (paths or loaded models).

        Args:
            policy: the RL-trained policy: a path, a loaded model, or a PEFT adapter (path or ``PeftModel``).
            reference: the reference it was regularised toward. ``None`` with a PEFT policy means the adapter's base
                (adapters switched off); otherwise required.
            tokenizer: the policy's tokenizer (default: loaded from the policy path, or the adapter's base).
            reference_tokenizer: the reference's when it differs (default: loaded from the reference path and used
                only when it tokenizes differently).
            config: a :class:`ScoringConfig` (or a :class:`ProgressAdvantageConfig`, of which only the scoring fields
                are kept); keyword overrides (``beta=``, ``temperature=``, ...) apply
                on top.
            device_map, attn_implementation, quantization_config: passed to ``from_pretrained`` for both models
                (see :func:`~progadv_trl.models.load_causal_lm`); ``quantization_config`` is a ``BitsAndBytesConfig``
                or its dict (``{"load_in_4bit": True}`` with an adapter policy: QLoRA, a 4-bit base and its adapter).
            revision, reference_revision: the hub revision of the policy / the reference (refused for a local folder).
            reference_alpha: score against the weight-space blend ``theta_ref + a * (theta - theta_ref)`` of the
                reference and the policy instead of the reference (same architecture; ``0 < a < 1`` interpolates,
                ``a < 0`` extrapolates away from the policy, ``a = 1`` is refused). A reference loaded from a path is
                blended in place; a loaded reference model is copied once. Recorded in :attr:`provenance`; saving
                such a scorer stores the blend (``reference="copy"``).
        """
        load = {"dtype": dtype, "device": device, "trust_remote_code": trust_remote_code, "device_map": device_map,
                "attn_implementation": attn_implementation, "quantization_config": quantization_config}
        config = _with_overrides(config, config_overrides)
        provenance: dict[str, Any] = {}
        policy_model = load_causal_lm(policy, revision=revision, **load)
        provenance["policy"] = str(policy) if not isinstance(policy, torch.nn.Module) else name_or_path(policy_model)
        if revision is not None:
            provenance["policy_revision"] = revision
        if reference_alpha is not None:
            check_alpha(reference_alpha)
            if reference is None:
                raise ValueError("reference_alpha blends the reference with the policy: it needs a reference (not "
                                 "the base of a PEFT adapter policy)")
        if reference is None:
            if not is_peft_model(policy_model):
                raise ValueError("reference is required unless the policy is a PEFT adapter (whose base is the "
                                 "reference)")
            reference_view = ModelView(policy_model, adapter="off")
            provenance["reference"] = "adapters-off"
        else:
            ref_model = load_causal_lm(reference, revision=reference_revision, **load)
            reference_view = ModelView(ref_model)
            provenance["reference"] = (str(reference) if not isinstance(reference, torch.nn.Module)
                                       else name_or_path(ref_model))
            if reference_revision is not None:
                provenance["reference_revision"] = reference_revision
            if reference_alpha is not None:
                reference_view = _blended_reference(policy_model, ref_model, reference_alpha,
                                                    in_place=not isinstance(reference, torch.nn.Module))
                provenance["reference_alpha"] = float(reference_alpha)
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
        if self.max_tokens < cfg.max_length and not self._warned_context:
            long = [t for t, tok in zip(trajs, toks) if tok.tokens_cut]
            if long:
                self._warned_context = True
                logger.warning("progadv: trajectory %r (and maybe others) is longer than the models' context of %d "
                               "tokens (max_length=%d); it is cut from the left to the context, and its 'truncated' "
                               "field records what was cut", long[0].id, self.max_tokens, cfg.max_length)
        stats = compute_token_stats(
            self.policy, self.reference, toks, ref_toks, temperature=cfg.temperature, top_k=cfg.top_k,
            chunk_size=cfg.chunk_size, batch_size=cfg.batch_size, all_positions=details,
            policy_stats=policy_statistics(cfg.baselines), with_kl=with_drift, backend=cfg.backend,
            pad_id=_pad_id(self.tokenizer),
            reference_pad_id=None if self.reference_tokenizer is None else _pad_id(self.reference_tokenizer))
        results = [score_trajectory(t, tok, st, cfg, reference_tok=None if ref_toks is None else ref_toks[i],
                                    details=details)
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
    def save_pretrained(self, save_directory: str | os.PathLike, *, reference: str = "copy",
                        token: str | bool | None = None) -> Path:
        """Write the scorer to ``save_directory`` atomically, with a manifest of every file (see
        :mod:`~progadv_trl.persistence`).

        Layout: ``progadv_config.json`` (config, metadata, manifest, digest); ``policy/`` (full weights and
        tokenizer, or only the PEFT adapter); ``reference/`` (full weights) unless ``reference="link"`` (then only
        the reference folder's path and the hashes of its score-relevant files are recorded, and loading needs
        that folder passed explicitly) or ``reference="hub"`` (a Hub reference recorded by repo id, commit and the
        same hashes, refused unless its weights equal that commit's files; loading downloads exactly that commit,
        with ``token`` if given); ``reference_adapter/`` / ``reference_tokenizer/`` when needed; ``README.md``, the
        model card (documentation: not verified on load).

        Refuses a symlink, a file, or a non-empty folder that is not a scorer; overwriting a scorer keeps its other
        top-level files (carried over) and refuses unknown files inside its model folders.
        """
        return save_scorer(self, save_directory, reference, token=token)

    def push_to_hub(self, repo_id: str, *, private: bool | None = None, token: str | bool | None = None,
                    revision: str | None = None, commit_message: str | None = None, reference: str = "copy"):
        """Upload the scorer to the Hugging Face Hub repository ``repo_id`` (created if needed): the folder
        :meth:`save_pretrained` writes, model card included. ``reference="hub"`` records a Hub reference by repo id
        and commit instead of uploading a copy of it. Files of a previous export in the repository's model folders
        are deleted by the same commit. Returns the ``CommitInfo``."""
        from .hub import push_scorer

        return push_scorer(self, repo_id, private=private, token=token, revision=revision,
                           commit_message=commit_message, reference=reference)

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, *, reference: str | os.PathLike | None = None,
                        device: str | torch.device | None = None, dtype: torch.dtype | None = None,
                        trust_remote_code: bool = False, expected_digest: str | None = None,
                        revision: str | None = None, token: str | bool | None = None,
                        cache_dir: str | os.PathLike | None = None,
                        **config_overrides) -> "ProgressAdvantageScorer":
        """Load a scorer saved by :meth:`save_pretrained`, after verifying every file against its manifest.

        Args:
            directory: a local folder, else a Hugging Face Hub repo id (``owner/name``), downloaded with
                ``snapshot_download`` and verified like a local folder; a local folder of that name keeps priority.
            reference: the reference folder of a scorer saved with ``reference="link"`` (required then, verified
                against the recorded hashes) or ``reference="hub"`` (optional then: a local copy of that commit);
                refused for a stored reference.
            expected_digest: refuse the folder unless its :attr:`digest` is this (pin an export you trust).
            revision, token, cache_dir: for a Hub repository: its branch, tag or commit, the access token, the
                cache folder (token and cache_dir also serve a Hub-linked reference).
            config_overrides: config fields to change (only those named; the rest keep their saved values).
        """
        from .hub import scorer_folder

        check_override_names(config_overrides)
        folder, links_into = scorer_folder(directory, revision=revision, token=token, cache_dir=cache_dir)
        parts = load_scorer(folder, reference=reference, device=device, dtype=dtype,
                            trust_remote_code=trust_remote_code, expected_digest=expected_digest,
                            make_config=lambda saved: _with_overrides(saved, config_overrides),
                            links_into=links_into, token=token, cache_dir=cache_dir)
        digest = parts.pop("digest")
        scorer = cls(**parts)
        scorer.digest = digest
        return scorer


def _blended_reference(policy_model, ref_model, alpha: float, in_place: bool) -> ModelView:
    """The reference ``theta_ref + alpha * (theta - theta_ref)`` as a view: ``ref_model`` itself blended in place
    (``in_place``), else a copy of it (one model copy, never a third full state dict)."""
    for name, model in (("policy", policy_model), ("reference", ref_model)):
        if is_peft_model(model):
            raise ValueError(f"reference_alpha: the {name} is a PEFT adapter; blending needs two full models of the "
                             f"same architecture (merge the adapter first: merge_and_unload())")
        if getattr(unwrap(model), "is_quantized", False):
            raise ValueError(f"reference_alpha: the {name} is quantized; blending needs full-precision weights")
    ref = unwrap(ref_model)
    target = ref if in_place else model_like(ref)
    blend_into_(target, ref, unwrap(policy_model), alpha)
    setattr(target, BLEND_ATTR, {"reference_alpha": float(alpha)})
    return ModelView(target)


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


def _context_length(view) -> int | None:
    """The model's context length from its config (``max_position_embeddings`` and its aliases), if it has one. A
    cached reference (no model loaded) is skipped: loading it just to read its config would defeat the cache."""
    model = vars(view).get("model")
    config = getattr(unwrap(model), "config", None) if model is not None else None
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, name, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 1:
            return value
    return None


def _with_overrides(config: ScoringConfig | None, overrides: dict) -> ScoringConfig:
    """``config`` (default: the defaults) with the keyword overrides that were given (``None`` means not given);
    only those settings change, checked as everywhere (:meth:`ScoringConfig.merged`)."""
    config = as_scoring(config)
    given = {k: v for k, v in overrides.items() if v is not None}
    return config.merged(given, source="keyword arguments") if given else config