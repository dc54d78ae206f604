"""Per-token statistics -> a :class:`TrajectoryScore` (step advantages, the requested methods' scores and step values);
and scored trajectories -> best-of-N choices, attributions and metric tables.

:func:`score_trajectory` composes the pure functions of :mod:`progadv_trl.advantage` and
:mod:`progadv_trl.baselines` for one trajectory. :func:`choose_best_of_n`, :func:`attribute` and
:func:`evaluation_table` turn a list of :class:`TrajectoryScore` into selections, attributions and metrics.

Failure attribution works on *action messages*: when a step separator splits a message into several steps, the
message's value is the sum of its steps' advantages (advantages add up) or the token mean of a baseline statistic.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

from .advantage import cumulative, step_advantages, token_aggregate, trajectory_aggregate
from .baselines import REGISTRY
from .config import ScoringConfig
from .data import Trajectory
from .metrics import evaluate_methods, first_error_step
from .rendering import TokenizedTrajectory
from .token_statistics import TokenStats
from .selection import DEFAULT_ATTRIBUTION, predict_mistake, select_best_of_n

METHOD = "progress_advantage"


@dataclass
class StepScore:
    """One step: the action message it belongs to, its advantage, and how many of its tokens were scored."""

    message_index: int
    advantage: float
    n_tokens: int
    part: int = 0

    def to_dict(self, with_part: bool = False) -> dict[str, Any]:
        out = {"message_index": self.message_index, "advantage": self.advantage, "n_tokens": self.n_tokens}
        if with_part:
            out["part"] = self.part
        return out


@dataclass
class TrajectoryScore:
    """A scored trajectory.

    Attributes:
        scores: method name -> trajectory score (higher = more likely to succeed): ``"progress_advantage"`` and the
            baselines that were asked for, nothing else.
        steps: per step, in order.
        action_values: method name -> per action message value used for failure attribution.
        step_values: method name -> per step value (one per entry of ``steps``; progress advantage: the step
            advantages), for step-level labels.
        step_labels: per step correctness labels (``metadata["step_labels"]``, e.g. TRL stepwise data), or ``None``.
        truncated: what left truncation removed, or ``None``.
        tokens: per-token details (``--details``), or ``None``.
    """

    id: str | None
    scores: dict[str, float]
    steps: list[StepScore]
    action_messages: list[int] = field(default_factory=list)
    action_values: dict[str, list[float]] = field(default_factory=dict)
    step_values: dict[str, list[float]] = field(default_factory=dict)
    step_labels: list[bool] | None = None
    truncated: dict | None = None
    group: str | None = None
    reward: float | None = None
    success: bool | None = None
    mistake_step: int | None = None
    temperature: float = 1.0
    beta: float = 1.0
    tokens: dict | None = None

    @property
    def score(self) -> float:
        """The progress-advantage trajectory score."""
        return self.scores[METHOD]

    @property
    def baselines(self) -> dict[str, float]:
        """Baseline name -> trajectory score, for the baselines that were computed."""
        return {m: v for m, v in self.scores.items() if m != METHOD}

    def score_of(self, method: str) -> float:
        """The trajectory score of ``method`` (progress advantage or a computed baseline)."""
        if method not in self.scores:
            raise KeyError(f"{method!r} was not computed for trajectory {self.id!r} (computed: "
                           f"{', '.join(self.scores)}); ask for it in the config's baselines")
        return self.scores[method]

    def predicted_mistake(self, method: str = DEFAULT_ATTRIBUTION, threshold: float | None = None,
                          using: str = METHOD) -> int:
        """Message index of the predicted decisive error (``using`` a baseline: argmin of its step values)."""
        self.score_of(using)
        values = self.action_values[using]
        pos = predict_mistake(torch.tensor(values, dtype=torch.float64),
                              method=method if using == METHOD else "step", threshold=threshold)
        return self.action_messages[pos]

    def to_dict(self, baselines: Sequence[str] | None = None, with_parts: bool = False) -> dict[str, Any]:
        """JSON-ready; ``baselines`` (default: every computed one) go under ``"baselines"``."""
        out: dict[str, Any] = {"id": self.id, "score": self.score,
                               "steps": [s.to_dict(with_parts) for s in self.steps]}
        if self.group is not None:
            out["group"] = self.group
        names = list(self.baselines) if baselines is None else list(baselines)
        if names:
            out["baselines"] = {b: self.score_of(b) for b in names}
        out["truncated"] = self.truncated
        out["beta"], out["temperature"] = self.beta, self.temperature
        if self.tokens is not None:
            out["tokens"] = self.tokens
        return out


def _nan_to_none(values: torch.Tensor) -> list[float | None]:
    return [None if math.isnan(v) else v for v in values.tolist()]


def _details(tok: TokenizedTrajectory, stats: TokenStats, ref_tok: TokenizedTrajectory | None) -> dict[str, Any]:
    out = {"input_ids": tok.input_ids, "step_index": tok.step_index,
           "policy_logprob": _nan_to_none(stats["logprob"])}
    if ref_tok is None:
        out["reference_logprob"] = _nan_to_none(stats["ref_logprob"])
    else:
        out["reference_input_ids"] = ref_tok.input_ids
        out["reference_step_index"] = ref_tok.step_index
        out["reference_logprob"] = _nan_to_none(stats["ref_logprob"])
    return out


def _scored_steps(tok: TokenizedTrajectory, values: torch.Tensor) -> torch.Tensor:
    """Step index with unscored (NaN) positions moved to context."""
    step = torch.tensor(tok.step_index, dtype=torch.long)
    return torch.where(torch.isnan(values), torch.full_like(step, -1), step)


def _message_index(tok: TokenizedTrajectory, step_index: torch.Tensor, actions: list[int]) -> torch.Tensor:
    """Map step ordinals to action-message ordinals (several parts of one message -> one ordinal)."""
    lut = torch.tensor([actions.index(m) for m, _ in tok.steps] + [-1], dtype=torch.long)
    return lut[step_index]  # -1 indexes the trailing -1


def score_trajectory(traj: Trajectory, tok: TokenizedTrajectory, stats: TokenStats, config: ScoringConfig,
                     *, reference_tok: TokenizedTrajectory | None = None, details: bool = False) -> TrajectoryScore:
    """Step advantages, trajectory score, the configured baselines and attribution values of one trajectory.

    ``reference_tok`` is given when the reference tokenizes differently: each model's log-probs are then aggregated
    over its own tokens of a step and subtracted (exact for ``token_agg="sum"``).
    """
    n_steps = len(tok.steps)
    lp, lr = stats["logprob"], stats["ref_logprob"]
    p_steps = _scored_steps(tok, lp)
    if reference_tok is None:
        r_steps = p_steps
        adv = step_advantages(lp, lr, p_steps, n_steps, beta=config.beta, token_agg=config.token_agg,
                              per_model=config.per_model_aggregation)
    else:
        r_steps = _scored_steps(reference_tok, lr)
        adv = config.beta * (token_aggregate(lp, p_steps, n_steps, config.token_agg)
                             - token_aggregate(lr, r_steps, n_steps, config.token_agg))
    adv = adv.to(torch.float64)
    values = cumulative(adv) if config.cumulative else adv
    counts = torch.bincount(p_steps[p_steps >= 0], minlength=n_steps).tolist()
    steps = [StepScore(m, float(a), int(c), p) for (m, p), a, c in zip(tok.steps, adv.tolist(), counts)]

    actions = sorted({m for m, _ in tok.steps})
    msg_p = _message_index(tok, p_steps, actions)
    if reference_tok is None:
        msg_adv = step_advantages(lp, lr, msg_p, len(actions), beta=config.beta, token_agg=config.token_agg,
                                  per_model=config.per_model_aggregation)
    else:
        msg_r = _message_index(reference_tok, r_steps, actions)
        msg_adv = config.beta * (token_aggregate(lp, msg_p, len(actions), config.token_agg)
                                 - token_aggregate(lr, msg_r, len(actions), config.token_agg))
    action_values = {METHOD: msg_adv.to(torch.float64).tolist()}
    step_values = {METHOD: adv.tolist()}
    scores = {METHOD: trajectory_aggregate(values, config.step_agg)}
    key = str(traj.id)
    for name in config.baselines:
        baseline = REGISTRY[name]
        if baseline.statistic == "ref_logprob" and reference_tok is not None:  # on the reference's own tokens
            token_values, scored, message = lr, r_steps >= 0, _message_index(reference_tok, r_steps, actions)
            step = r_steps
        else:
            token_values = lp if baseline.statistic is None else stats[baseline.statistic]
            scored, message, step = p_steps >= 0, msg_p, p_steps
        scores[name] = baseline.trajectory(token_values[scored], config, key)
        action_values[name] = baseline.steps(token_values, message, actions, key)
        step_values[name] = baseline.steps(token_values, step, list(range(n_steps)), key)
    labels = traj.metadata.get("step_labels")

    return TrajectoryScore(
        id=traj.id, scores=scores, steps=steps, action_messages=actions, action_values=action_values,
        step_values=step_values,
        step_labels=list(labels) if isinstance(labels, list) and all(isinstance(x, bool) for x in labels) else None,
        truncated=tok.truncation(), group=traj.group, reward=traj.reward,
        success=traj.success(config.success_threshold), mistake_step=traj.mistake_step,
        temperature=config.temperature, beta=config.beta,
        tokens=_details(tok, stats, reference_tok) if details else None)


def choose_best_of_n(results: Sequence[TrajectoryScore], using: str = METHOD) -> dict[Any, TrajectoryScore]:
    """The highest-scoring trajectory of each group (ties: the first); ungrouped trajectories form their own group."""
    groups = [r.group if r.group is not None else f"__id__{r.id}" for r in results]
    scores = [r.score_of(using) for r in results]
    return {g: results[i] for g, i in select_best_of_n(scores, groups).items()}


def attribute(results: Sequence[TrajectoryScore], method: str = DEFAULT_ATTRIBUTION,
              threshold: float | None = None) -> list[int]:
    """Predicted decisive-error message index per trajectory."""
    return [r.predicted_mistake(method, threshold) for r in results]


def evaluation_table(results: Sequence[TrajectoryScore], methods: Sequence[str] | None = None, *,
                     attribution: str = DEFAULT_ATTRIBUTION, threshold: float | None = None) -> dict[str, dict[str, float]]:
    """Metrics (AUROC, Spearman, best-of-N, attribution) for progress advantage and each baseline in ``methods``
    (default: every method the results were scored with)."""
    computed = list(results[0].scores) if results else [METHOD]
    methods = [METHOD, *(m for m in (computed if methods is None else methods) if m != METHOD)]
    success = [r.success for r in results]
    groups = [r.group for r in results]
    mistakes = [r.action_messages.index(r.mistake_step) if r.mistake_step in r.action_messages else None
                for r in results]
    first_errors = _first_errors(results)
    table_in = {}
    for m in methods:
        table_in[m] = {"scores": [r.score_of(m) for r in results], "threshold": threshold if m == METHOD else None,
                       "step_values": [torch.tensor(r.action_values[m], dtype=torch.float64) for r in results]}
        if first_errors is not None:
            table_in[m]["process_values"] = [r.step_values[m] for r in results]
    return evaluate_methods(table_in, success=success if any(s is not None for s in success) else None,
                            groups=groups if any(g is not None for g in groups) else None,
                            mistake_steps=mistakes if any(m is not None for m in mistakes) else None,
                            attribution={METHOD: attribution}, first_errors=first_errors)


def _first_errors(results: Sequence[TrajectoryScore]) -> list[int | None] | None:
    """Per result, the first ``False`` of its step labels (``-1``: all correct; ``None``: no labels), or ``None``
    when no result has step labels; labels must match the scored steps one to one."""
    if all(r.step_labels is None for r in results):
        return None
    out: list[int | None] = []
    for r in results:
        if r.step_labels is not None and len(r.step_labels) != len(r.steps):
            raise ValueError(f"trajectory {r.id!r} has {len(r.step_labels)} step labels but was scored as "
                             f"{len(r.steps)} steps: score it with the step_separator its loader recorded "
                             f"(metadata['step_separator'])")
        out.append(None if r.step_labels is None else first_error_step(r.step_labels))
    return out
