"""Per-token statistics -> step advantages, trajectory scores and baselines; and scores -> the three uses.

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
from .baselines import (BASELINES, deepconf_scores, mean_score, random_scores, self_certainty_score,
                        step_baseline_values)
from .config import ProgressAdvantageConfig
from .data import Trajectory
from .metrics import evaluate_methods
from .rendering import TokenizedTrajectory
from .token_statistics import TokenStats
from .uses import predict_mistake, select_best_of_n

METHOD = "progress_advantage"
# The per-token statistic behind each baseline's per-step values (for attribution), and its sign.
_BASELINE_TOKEN_STAT = {
    "self_certainty": ("self_certainty", 1.0), "deepconf_mean": ("topk_confidence", 1.0),
    "deepconf_tail": ("topk_confidence", 1.0), "deepconf_bottom10": ("topk_confidence", 1.0),
    "deepconf_lowest": ("topk_confidence", 1.0), "policy_logprob": ("logprob", 1.0),
    "reference_logprob": ("ref_logprob", 1.0), "neg_entropy": ("entropy", -1.0),
}


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
        score: the trajectory's progress-advantage score (higher = more likely to succeed).
        steps: per step, in order.
        baselines: baseline name -> trajectory score (higher = more confident).
        action_values: method name -> per action message value used for failure attribution.
        truncated: what left truncation removed, or ``None``.
        tokens: per-token details (``--details``), or ``None``.
    """

    id: str | None
    score: float
    steps: list[StepScore]
    baselines: dict[str, float] = field(default_factory=dict)
    action_messages: list[int] = field(default_factory=list)
    action_values: dict[str, list[float]] = field(default_factory=dict)
    truncated: dict | None = None
    group: str | None = None
    reward: float | None = None
    success: bool | None = None
    mistake_step: int | None = None
    temperature: float = 1.0
    beta: float = 1.0
    tokens: dict | None = None

    def predicted_mistake(self, method: str = "running_sum", threshold: float | None = None,
                          using: str = METHOD) -> int:
        """Message index of the predicted decisive error (``using`` a baseline: argmin of its step values)."""
        values = self.action_values[using]
        pos = predict_mistake(torch.tensor(values, dtype=torch.float64),
                              method=method if using == METHOD else "step", threshold=threshold)
        return self.action_messages[pos]

    def to_dict(self, baselines: Sequence[str] | None = None, with_parts: bool = False) -> dict[str, Any]:
        out: dict[str, Any] = {"id": self.id, "score": self.score,
                               "steps": [s.to_dict(with_parts) for s in self.steps]}
        if self.group is not None:
            out["group"] = self.group
        if baselines:
            out["baselines"] = {b: self.baselines[b] for b in baselines}
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


def score_trajectory(traj: Trajectory, tok: TokenizedTrajectory, stats: TokenStats, config: ProgressAdvantageConfig,
                     *, reference_tok: TokenizedTrajectory | None = None, random_value: float = math.nan,
                     details: bool = False) -> TrajectoryScore:
    """Step advantages, trajectory score, baselines and attribution values of one trajectory.

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

    action = p_steps >= 0
    missing = torch.full_like(lp, float("nan"))  # statistics not computed (baselines not requested)
    token = {k: stats.get(k) if stats.get(k) is not None else missing
             for k in ("self_certainty", "topk_confidence", "entropy")}
    baselines = {"self_certainty": self_certainty_score(token["self_certainty"][action]),
                 **deepconf_scores(token["topk_confidence"][action], window=config.deepconf_window,
                                   tail=config.deepconf_tail),
                 "policy_logprob": mean_score(lp[action]), "reference_logprob": mean_score(lr[r_steps >= 0]),
                 "neg_entropy": -mean_score(token["entropy"][action]), "random": random_value}
    stats = TokenStats({**stats.stats, **token})
    for name, (stat, sign) in _BASELINE_TOKEN_STAT.items():
        idx = msg_p if stat != "ref_logprob" or reference_tok is None else _message_index(reference_tok, r_steps, actions)
        action_values[name] = (sign * step_baseline_values(stats[stat], idx, len(actions))).tolist()
    action_values["random"] = random_scores([f"{traj.id}/{m}" for m in actions], seed=0)

    return TrajectoryScore(
        id=traj.id, score=trajectory_aggregate(values, config.step_agg), steps=steps, baselines=baselines,
        action_messages=actions, action_values=action_values, truncated=tok.truncation(), group=traj.group,
        reward=traj.reward, success=traj.success(config.success_threshold), mistake_step=traj.mistake_step,
        temperature=config.temperature, beta=config.beta,
        tokens=_details(tok, stats, reference_tok) if details else None)


def choose_best_of_n(results: Sequence[TrajectoryScore], using: str = METHOD) -> dict[Any, TrajectoryScore]:
    """The highest-scoring trajectory of each group (ties: the first); ungrouped trajectories form their own group."""
    groups = [r.group if r.group is not None else f"__id__{r.id}" for r in results]
    scores = [r.score if using == METHOD else r.baselines[using] for r in results]
    return {g: results[i] for g, i in select_best_of_n(scores, groups).items()}


def attribute(results: Sequence[TrajectoryScore], method: str = "running_sum",
              threshold: float | None = None) -> list[int]:
    """Predicted decisive-error message index per trajectory."""
    return [r.predicted_mistake(method, threshold) for r in results]


def evaluation_table(results: Sequence[TrajectoryScore], methods: Sequence[str] | None = None, *,
                     attribution: str = "running_sum", threshold: float | None = None) -> dict[str, dict[str, float]]:
    """Metrics (AUROC, Spearman, best-of-N, attribution) for progress advantage and each baseline in ``methods``."""
    methods = [METHOD, *(BASELINES if methods is None else [m for m in methods if m != METHOD])]
    success = [r.success for r in results]
    groups = [r.group for r in results]
    mistakes = [r.action_messages.index(r.mistake_step) if r.mistake_step in r.action_messages else None
                for r in results]
    table_in = {}
    for m in methods:
        scores = [r.score if m == METHOD else r.baselines[m] for r in results]
        table_in[m] = {"scores": scores, "threshold": threshold if m == METHOD else None,
                       "step_values": [torch.tensor(r.action_values[m], dtype=torch.float64) for r in results]}
    return evaluate_methods(table_in, success=success if any(s is not None for s in success) else None,
                            groups=groups if any(g is not None for g in groups) else None,
                            mistake_steps=mistakes if any(m is not None for m in mistakes) else None,
                            attribution={METHOD: attribution})
