"""``ProgressAdvantageMonitor``: evaluate a policy against its reference on held-out rollouts, track drift, export.

The callback is a thin layer over it; custom loops (PPO, verl, OpenRLHF) call it directly::

    monitor = ProgressAdvantageMonitor(reference=ref_model, tokenizer=tok, config=ProgressAdvantageConfig(
        heldout="heldout.jsonl", beta=0.05, temperature=0.7), output_dir="runs/ppo")
    for step in range(num_steps):
        ...  # rollouts, losses, optimizer step
        if step % 50 == 0:
            metrics = monitor.evaluate(policy, step)   # {"progadv/auroc": ..., "progadv/kl/mean": ..., ...}
    monitor.export(policy)                             # runs/ppo/_progadv/scorer
    monitor.export_best(policy)                        # runs/ppo/_progadv/scorer-best (the best evaluation)

Under ``torch.distributed``, every rank scores its share of the held-out rollouts (the same number on every rank,
so that sharded models run the same forwards everywhere: :mod:`progadv_trl.distributed`), results are gathered in
input order, and every rank computes the same metrics; only rank 0 writes files.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from .baselines import BASELINES
from .config import ProgressAdvantageConfig
from .data import Trajectory
from .distributed import merge_in_order, split_evenly
from .drift import DecayDetector, token_drift
from .hub import heldout_metrics
from .metrics import kendall_tau
from .models import CachedView, ModelView, strip_wrappers, unsharded_copy
from .reference import Reference
from .reference_candidates import ReferenceCandidates, candidate_metrics, choose, split_groups
from .trajectory_scores import METHOD, evaluation_table
from .scorer import ProgressAdvantageScorer
from .sharding import check_supported, sharding_of

logger = logging.getLogger(__name__)
HISTORY_FILE = "progadv-history.jsonl"
EXPORT_DIR, SCORER_DIR, BEST_SCORER_DIR = "_progadv", "scorer", "scorer-best"
QUALITY_COLUMNS = ("auroc", "spearman", "best_of_n", "mean_success", "oracle", "attribution_accuracy",
                   "attribution_mae")


def _dist():
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def _gather(obj):
    rank, world = _dist()
    if world == 1:
        return [obj]
    out = [None] * world
    torch.distributed.all_gather_object(out, obj)
    return out


def _finite(x):
    return x if isinstance(x, (int, float)) and math.isfinite(x) else None


class ProgressAdvantageMonitor:
    """Evaluates ``beta * (log pi - log pi_ref)`` on held-out rollouts during training.

    Args:
        reference: the reference (a model, a :class:`~progadv_trl.models.ModelView`, or a resolved
            :class:`~progadv_trl.reference.Reference`).
        tokenizer: the policy's tokenizer (with its chat template).
        config: a :class:`ProgressAdvantageConfig`; ``heldout`` names the fixed labelled rollouts.
        output_dir: where ``progadv-history.jsonl`` goes (``None``: nothing written).
        export_dir: where the exported scorers go (``scorer/``, ``scorer-best/``); default ``config.export_dir``
            (relative to ``output_dir``), else ``<output_dir>/_progadv``.
        sampler: optional ``sampler(policy) -> list[Trajectory]`` producing fresh labelled rollouts (held-out
            prompts completed by the current policy); they are scored beside the fixed ones.
    """

    def __init__(self, reference, tokenizer, config: ProgressAdvantageConfig | None = None,
                 output_dir: str | Path | None = None, *, heldout: Sequence[Trajectory] | None = None,
                 sampler: Callable[[Any], list[Trajectory]] | None = None, export_dir: str | Path | None = None):
        self.config = config or ProgressAdvantageConfig()
        if isinstance(reference, Reference):
            self.reference = reference
        else:
            self.reference = Reference("given", reference if isinstance(reference, ModelView) else ModelView(reference))
        self.tokenizer = tokenizer
        self.output_dir = Path(output_dir) if output_dir is not None else None
        if export_dir is None and self.output_dir is not None:
            export_dir = export_root(self.config, self.output_dir)
        self.export_dir = Path(export_dir) if export_dir is not None else None
        if heldout is None and self.config.heldout is not None:
            from .formats import load_trajectories

            heldout = load_trajectories(self.config.heldout)
        self.heldout = list(heldout or [])
        self.sampler = sampler
        if not self.heldout and sampler is None:
            raise ValueError("ProgressAdvantageMonitor needs held-out rollouts: set config.heldout (labelled "
                             "trajectories) or config.heldout_prompts")
        moving = self.reference.kind == "trl_ref_model" and self.config.follow_sync_ref_model
        self._cached = CachedView(self.reference.view) if self.config.reference_cache and not moving else None
        self.history: list[dict] = []
        self.detector = DecayDetector(self.config.decay_margin)
        self.last_results: list = []
        self._previous_scores: dict[str, float] = {}
        self._best: dict | None = None  # best_export="end": the best evaluation's trainable weights, on CPU
        self.candidates = ReferenceCandidates(self.config.reference_candidates) \
            if self.config.reference_candidates else None

    # ------------------------------------------------------------------ evaluation
    def _scorer(self, policy, reference_view, temperature: float, beta: float) -> ProgressAdvantageScorer:
        baselines = self.config.baselines or (list(BASELINES) if self.config.log_baselines else [])
        cfg = dataclasses.replace(self.config.scoring(), temperature=temperature, beta=beta, baselines=baselines)
        return ProgressAdvantageScorer(policy if isinstance(policy, (ModelView, CachedView)) else ModelView(policy),
                                       reference_view, self.tokenizer, None, cfg)

    @torch.no_grad()
    def evaluate(self, policy, step: int, *, temperature: float | None = None, beta: float | None = None) -> dict:
        """Score the held-out rollouts with ``policy``; returns the ``progadv/...`` metrics (also kept in
        :attr:`history` and appended to ``progadv-history.jsonl``)."""
        t0 = time.perf_counter()
        temperature = self.config.temperature if temperature is None else temperature
        beta = self.config.beta if beta is None else beta
        model = policy.model if isinstance(policy, ModelView) else policy
        check_supported(model, None if self.reference._view is None else self.reference._view.model)
        was_training = model.training
        model.eval()
        try:
            trajectories = list(self.heldout)
            if self.sampler is not None:
                trajectories += self.sampler(policy)
            rank, world = _dist()
            counts = _gather(len(trajectories))
            if len(set(counts)) > 1:
                raise ValueError(f"progadv: the ranks hold different numbers of rollouts to score ({counts}, by "
                                 "rank); the held-out set and the sampler must give every rank the same list")
            shard, n_real = split_evenly(trajectories, rank, world)
            ref_view = self._cached if self._cached is not None else self.reference.view()
            scorer = self._scorer(policy, ref_view, temperature, beta)
            results, drift = scorer.score_with_drift(shard)
            results, drift = results[:n_real], drift[:n_real]  # the rest repeat an item to keep ranks in step
            t1_results = None
            if self.config.also_temperature_one and temperature != 1.0:
                t1_results = self._scorer(policy, ref_view, 1.0, beta).score(shard)[:n_real]
            weight = self.reference.weight_drift(model)
            candidates = None
            if self.candidates is not None:
                candidates = self._score_candidates(policy, shard, n_real, temperature, beta)
        finally:
            model.train(was_training)
            if self._cached is not None:
                self._cached.end_evaluation()
                if self.reference.kind == "snapshot" and self.reference.device is not None and \
                        self.reference._view is None:  # a snapshot kept on disk: do not hold it between evaluations
                    self._cached.release()
        results, drift, t1_results = self._unshard(_gather((results, drift, t1_results)))
        metrics = self._metrics(results, drift, t1_results, weight)
        if candidates is not None:
            metrics.update(self._candidate_metrics(results, candidates, policy, step))
        metrics["progadv/seconds"] = time.perf_counter() - t0
        self._record(step, metrics, results, temperature, beta, policy)
        return metrics

    def _score_candidates(self, policy, shard, n_real: int, temperature: float, beta: float) -> dict[str, list]:
        """This rank's results with every other candidate reference available now, built one at a time in one
        reused model; the policy's hidden states are computed once for all of them."""
        policy_view = policy if isinstance(policy, ModelView) else ModelView(policy)
        self.candidates.check(policy_view.model, None)  # before a reference kept on disk is loaded
        reference_view = self.reference.view()
        self.candidates.check(policy_view.model, reference_view)
        cached_policy = CachedView(lambda: policy_view)
        out = {}
        for candidate in self.candidates.candidates[1:]:
            if not self.candidates.available(candidate):
                continue
            view = self.candidates.view(candidate, policy_view.model, reference_view.model)
            out[candidate.name] = self._scorer(cached_policy, view, temperature, beta).score(shard)[:n_real]
        return out

    def _candidate_metrics(self, results, candidates: dict[str, list], policy, step: int) -> dict:
        """Every candidate's metrics on the validation and test groups, the chosen one; then this evaluation's policy
        is kept for the ``previous`` candidates."""
        gathered = _gather(candidates)
        by_name = {name: merge_in_order([g[name] for g in gathered]) for name in candidates}
        by_name = {"initial": results, **by_name}
        val, test = split_groups(results, self.config.validation_fraction)
        out: dict = {}
        for name, res in by_name.items():
            out.update(candidate_metrics(name, res, val, test, self.config))
        chosen = choose([c for c in self.candidates.candidates if c.name in by_name], out, self.config.quality_metric)
        cands = self.candidates
        cands.chosen = chosen
        cands.chosen_previous = cands.previous(chosen) if chosen.kind == "previous" else None
        out["progadv/reference/chosen"] = chosen.name
        out["progadv/reference/chosen_index"] = cands.candidates.index(chosen)
        out["progadv/reference/n_val"], out["progadv/reference/n_test"] = len(val), len(test)
        cands.remember(policy.model if isinstance(policy, ModelView) else policy, step)
        return out

    @staticmethod
    def _unshard(gathered):
        """Every rank's ``(results, drift, t1_results)``, in rank order -> the three lists in input order."""
        results = merge_in_order([res for res, _, _ in gathered])
        drift = merge_in_order([dr for _, dr, _ in gathered])
        t1 = merge_in_order([t1r for _, _, t1r in gathered]) if gathered[0][2] is not None else None
        return results, drift, t1

    def _metrics(self, results, drift, t1_results, weight: float) -> dict[str, float]:
        cfg = self.config
        out: dict[str, float] = {}
        table = evaluation_table(results, None if cfg.log_baselines else [], attribution=cfg.attribution,
                                 threshold=cfg.attribution_threshold)
        for col in QUALITY_COLUMNS:
            out[f"progadv/{col}"] = table[METHOD][col]
        if cfg.log_baselines:
            for name, row in table.items():
                if name != METHOD:
                    for col in ("auroc", "spearman", "best_of_n", "attribution_accuracy"):
                        out[f"progadv/baseline/{name}/{col}"] = row[col]
        if t1_results is not None:
            t1 = evaluation_table(t1_results, [], attribution=cfg.attribution, threshold=cfg.attribution_threshold)
            for col in ("auroc", "spearman", "best_of_n", "attribution_accuracy"):
                out[f"progadv/t1/{col}"] = t1[METHOD][col]
        ratios = [d["log_ratio"] for d in drift if d is not None and d["log_ratio"].numel()]
        kls = [d["kl"] for d in drift if d is not None and d["kl"] is not None]
        if ratios:
            stats = token_drift(torch.cat(ratios), torch.cat(kls) if kls else None)
            out.update({f"progadv/{k}": v for k, v in stats.items()})
        out["progadv/weight_drift"] = weight
        out["progadv/score/mean"] = float(torch.tensor([r.score for r in results], dtype=torch.float64).mean())
        scores = {str(r.id): r.score for r in results}
        common = [k for k in scores if k in self._previous_scores]
        if len(common) >= 2:
            out["progadv/rank_stability"] = kendall_tau([scores[k] for k in common],
                                                        [self._previous_scores[k] for k in common])
        self._previous_scores = scores
        out["progadv/n_trajectories"] = len(results)
        return out

    def _record(self, step: int, metrics: dict, results, temperature: float, beta: float, policy) -> None:
        entry = {"step": int(step), "temperature": temperature, "beta": beta,
                 **{k: v if isinstance(v, str) else _finite(v) for k, v in metrics.items()}}
        self.history.append(entry)
        self.last_results = results
        quality = metrics.get(_quality_key(self.config, metrics))
        if len({r.score for r in results}) <= 1:  # all scores tied (policy == reference): no signal to rank yet
            quality = float("nan")
        is_best, warning = self.detector.update(step, quality)
        if warning:
            logger.warning(warning)
        if self.is_main_process and self.output_dir is not None:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            with open(self.output_dir / HISTORY_FILE, "a", encoding="utf-8") as f:
                f.write(json.dumps(entry) + "\n")
        if not self.is_main_process and not self._sharded(policy):  # sharded: every rank takes part in exports
            return
        if is_best and self.config.export and self.export_dir is not None:
            if self.config.best_export == "every_best":
                self.export(policy, self.export_dir / BEST_SCORER_DIR, step=step, temperature=temperature, beta=beta)
            elif self.config.best_export == "end":
                self._best = {"step": step, "temperature": temperature, "beta": beta,
                              "weights": _trainable_copy(policy)}
                if self.candidates is not None:  # the chosen reference of that evaluation (an earlier policy: kept)
                    self._best["candidate"] = (self.candidates.chosen, self.candidates.chosen_previous)

    @property
    def is_main_process(self) -> bool:
        return _dist()[0] == 0

    def _sharded(self, policy, reference_view: ModelView | None = None) -> bool:
        """Whether the policy (or the given reference view) is sharded (FSDP2, ZeRO-3): saving it is a collective."""
        views = (policy if isinstance(policy, ModelView) else ModelView(policy), reference_view)
        return any(v is not None and sharding_of(strip_wrappers(v.model)) is not None for v in views)

    # ------------------------------------------------------------------ export and state
    def export(self, policy, path: str | Path | None = None, *, step: int | None = None,
               temperature: float | None = None, beta: float | None = None, _candidate=None) -> Path | None:
        """Save a scorer (policy + reference + config) that reproduces this monitor's scores; rank 0 writes. Under
        FSDP2 / ZeRO-3 every rank must call it: the weights are gathered to rank 0 first. With
        ``reference_candidates`` the reference is the last chosen candidate (built from the given policy), recorded in
        the provenance (``reference_candidate``, ``reference_alpha`` / ``reference_step``, ``reference_choice``)."""
        policy_view = policy if isinstance(policy, ModelView) else ModelView(policy)
        sharded = self._sharded(policy_view)
        if not self.is_main_process and not sharded:
            return None
        ref_view = self.reference.view()
        if sharded:
            policy_view, ref_view = unsharded_copy(policy_view), unsharded_copy(ref_view)
        if not self.is_main_process:
            return None
        if path is None:
            if self.export_dir is None:
                raise ValueError("export() needs a path when the monitor has no output_dir or export_dir")
            path = self.export_dir / SCORER_DIR
        temperature = self.config.temperature if temperature is None else temperature
        beta = self.config.beta if beta is None else beta
        provenance = {"step": step, "reference": self.reference.describe()}
        if self.candidates is not None:
            candidate, previous = _candidate or (self.candidates.chosen, self.candidates.chosen_previous)
            self.candidates.check(policy_view.model, ref_view)
            ref_view = self.candidates.view(candidate, policy_view.model, ref_view.model,
                                            weights=None if previous is None else previous[1])
            provenance.update(self.candidates.provenance(candidate, None if previous is None else previous[0]))
            provenance["reference_choice"] = _choice(self.history, step, candidate.name, self.config)
        scorer = self._scorer(policy_view, ref_view, temperature, beta)
        scorer.provenance = provenance
        metrics = heldout_metrics(self.history, step, temperature, beta)  # shown in the exported model card
        if metrics is not None:
            scorer.provenance["heldout_metrics"] = metrics
        return scorer.save_pretrained(path)

    def export_best(self, policy, path: str | Path | None = None) -> Path | None:
        """Write the best evaluation's scorer (``best_export="end"``): the kept weights are put into ``policy`` for
        the save and the current ones put back after; rank 0 only. Returns the path, or ``None`` when nothing is
        kept (no best yet, another rank, or the best came before a resume)."""
        if self._best is None or not (self.is_main_process or self._sharded(policy)):
            if self.config.best_export == "end" and self.is_main_process and self.detector.best_step is not None:
                logger.warning("progadv: the best evaluation (step %s) is not in memory (it came before a resume); "
                               "scorer-best not written. best_export='every_best' writes it when it happens",
                               self.detector.best_step)
            return None
        if path is None:
            if self.export_dir is None:
                raise ValueError("export_best() needs a path when the monitor has no output_dir or export_dir")
            path = self.export_dir / BEST_SCORER_DIR
        best = self._best
        current = _trainable_copy(policy)
        _load_trainable(policy, best["weights"])
        try:
            return self.export(policy, path, step=best["step"], temperature=best["temperature"], beta=best["beta"],
                               _candidate=best.get("candidate"))
        finally:
            _load_trainable(policy, current)

    def state_dict(self) -> dict:
        return {"history": self.history, "detector": self.detector.state_dict(),
                "previous_scores": self._previous_scores, "reference": self.reference.describe()}

    def load_state_dict(self, state: dict, up_to_step: int | None = None) -> None:
        """Restore from a checkpoint; evaluations after ``up_to_step`` (done after that checkpoint) are dropped."""
        self.history = [h for h in state.get("history", []) if up_to_step is None or h["step"] <= up_to_step]
        det = state.get("detector", {})
        self.detector = DecayDetector(self.config.decay_margin)
        for h in self.history:  # recompute the best from the kept history
            self.detector.update(h["step"], h.get(_quality_key(self.config, h)) or float("nan"))
        self._previous_scores = state.get("previous_scores", {}) if det is not None else {}
        if self.candidates is not None and self.history:  # the last choice, unless it was an earlier policy (not kept)
            last = self.history[-1].get("progadv/reference/chosen")
            self.candidates.chosen = next((c for c in self.candidates.candidates
                                           if c.name == last and c.kind != "previous"), self.candidates.candidates[0])
        if self.output_dir is not None and self.is_main_process:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            with open(self.output_dir / HISTORY_FILE, "w", encoding="utf-8") as f:
                f.writelines(json.dumps(h) + "\n" for h in self.history)


def _quality_key(config: ProgressAdvantageConfig, metrics: dict) -> str:
    """The metric that ranks evaluations: the quality metric, or with reference candidates the chosen candidate's
    validation value of it (the pair that would be exported)."""
    chosen = metrics.get("progadv/reference/chosen")
    if config.reference_candidates and isinstance(chosen, str):
        return f"progadv/reference/{chosen}/val/{config.quality_metric}"
    return f"progadv/{config.quality_metric}"


def _choice(history: list[dict], step: int | None, name: str, config: ProgressAdvantageConfig) -> dict:
    """How the exported candidate was chosen: the quality metric on the validation and test groups at ``step``."""
    entry = next((h for h in reversed(history) if h["step"] == step), {})
    prefix = f"progadv/reference/{name}"
    return {"quality_metric": config.quality_metric, "val": entry.get(f"{prefix}/val/{config.quality_metric}"),
            "test": entry.get(f"{prefix}/test/{config.quality_metric}"),
            "candidates": list(config.reference_candidates)}


def export_root(config: ProgressAdvantageConfig, output_dir: str | Path) -> Path:
    """Where scorers and the snapshot reference go: ``config.export_dir`` (relative to ``output_dir``) or
    ``<output_dir>/_progadv`` (``Trainer.push_to_hub`` skips names that start with ``_``)."""
    return Path(output_dir) / (config.export_dir if config.export_dir is not None else EXPORT_DIR)


def _trainable_params(policy) -> dict[str, torch.nn.Parameter]:
    model = policy.model if isinstance(policy, ModelView) else policy
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def _trainable_copy(policy) -> dict[str, torch.Tensor]:
    """The parameters training changes (only the adapter under PEFT), copied to CPU in their dtype."""
    return {name: p.detach().to("cpu", copy=True) for name, p in _trainable_params(policy).items()}


@torch.no_grad()
def _load_trainable(policy, weights: dict[str, torch.Tensor]) -> None:
    params = _trainable_params(policy)
    for name, value in weights.items():
        params[name].copy_(value)
