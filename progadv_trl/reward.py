"""Progress advantage as a reward function for TRL's ``GRPOTrainer`` and ``RLOOTrainer`` (``reward_funcs=[...]``).

TRL calls a reward function with ``prompts``, ``completions`` and ``completion_ids`` (one entry per completion) and
more keyword arguments (the dataset's columns, ``trainer_state``, ``log_metric``, ...), and expects one float per
completion, or ``None`` where the function gives no reward (TRL turns it into NaN and sums the reward functions with
``nansum``; a completion no function scored gets a zero advantage). It names the function's metrics
(``rewards/<__name__>/mean``, ``.../std``) after ``__name__``.

:class:`ProgressAdvantageReward` turns each prompt-completion pair into a :class:`~progadv_trl.data.Trajectory`
(the prompt's messages, then the completion's; the completion's assistant messages are the steps) and scores it with
an exported :class:`~progadv_trl.scorer.ProgressAdvantageScorer`.
"""

from __future__ import annotations

import logging
import math
import numbers
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from .advantage import STEP_AGGREGATIONS
from .config import ConfigError
from .data import Message, ProgadvDataError, Trajectory
from .formats.records import Context, parse_messages, type_name
from .trajectory_scores import TrajectoryScore
from .scorer import ProgressAdvantageScorer

logger = logging.getLogger(__name__)

_SOURCE = "ProgressAdvantageReward"


class ProgressAdvantageReward:
    r"""A TRL reward function: the progress-advantage score of each completion, from an exported scorer.

    Each prompt-completion pair becomes one trajectory. Standard (text) pairs become a ``user`` message holding the
    prompt and an ``assistant`` message holding the completion, as ``load_trajectories(format="trl")`` reads them.
    Conversational pairs become the prompt's messages followed by the completion's (assistant turns with
    ``tool_calls``, ``tool`` results, further assistant turns). Only the completion's assistant messages are steps:
    assistant turns inside the prompt are context. The reward is the scorer's trajectory score of that trajectory,
    ``step_agg`` over the step advantages ``A_s = beta * token_agg(log pi - log pi_ref)`` (or over their running
    sums when the scorer's config has ``cumulative=True``), then ``scale`` and ``clip``: the value
    ``scorer.score([trajectory])[0].score`` gives, shaped.

    Args:
        scorer: the scorer, e.g. ``ProgressAdvantageScorer.from_pretrained(dir, device="cuda")``. Its models stay
            where it put them; the reward moves nothing to the trainer's device (it returns Python floats).
        step_agg: override the scorer's step aggregation (``"mean"``, ``"sum"``, ``"last"``, ``"min"``, ``"max"``,
            ``"bottom10"``).
        per_step: aggregate the step advantages ``A_1..A_S`` themselves, never their running sums (whatever the
            scorer's ``cumulative``), with ``step_agg`` defaulting to ``"sum"``: ``"sum"`` is ``beta`` times the
            summed log-ratio of the completion's action tokens (a sequence-level implicit reward) with the default
            ``token_agg="sum"``, ``"mean"`` the average step, ``"min"`` the weakest step (the usual process-reward
            aggregation).
        scale: multiply the score by this (e.g. to weigh it against an outcome reward; negative to penalise).
        clip: clamp the scaled score to ``[-clip, clip]`` (a positive number) or to ``[low, high]`` (a pair).
        batch_size: trajectories per forward pass of the scorer's models (default: the scorer's ``batch_size``).
        empty_reward: the reward of a completion that has nothing to score, ``None`` by default (TRL's "no reward":
            the other reward functions decide, and a completion no function scores gets a zero advantage). A
            completion has nothing to score when it is empty (no assistant content and no tool call), when none of
            its tokens is left after the scorer's ``max_length`` cut, or when the scorer refuses it (e.g. a chat
            template that does not render the generated text verbatim; logged once, with the record and field).
        name: the function's ``__name__``, under which TRL logs ``rewards/<name>/mean`` and ``rewards/<name>/std``.
            The reward also logs ``rewards/<name>/unscored_frac``, the fraction of completions given
            ``empty_reward``.

    A completion cut by ``max_completion_length`` is scored like any other: its text as generated.

    Example:
        ```python
        scorer = ProgressAdvantageScorer.from_pretrained("runs/grpo/_progadv/scorer", device="cuda")
        trainer = GRPOTrainer(model=..., reward_funcs=[accuracy_reward, ProgressAdvantageReward(scorer, scale=0.1)],
                              args=GRPOConfig(...), train_dataset=...)
        ```
    """

    def __init__(self, scorer: ProgressAdvantageScorer, *, step_agg: str | None = None, per_step: bool = False,
                 scale: float = 1.0, clip: float | tuple[float, float] | None = None, batch_size: int | None = None,
                 empty_reward: float | None = None, name: str = "progress_advantage"):
        if not isinstance(scorer, ProgressAdvantageScorer):
            raise TypeError(f"{_SOURCE}: scorer must be a ProgressAdvantageScorer, got {type(scorer).__name__}")
        if not isinstance(per_step, bool):
            raise ConfigError(f"expected a boolean (True or False), got {type(per_step).__name__}", source=_SOURCE,
                              field="per_step")
        if step_agg is not None and step_agg not in STEP_AGGREGATIONS:
            raise ConfigError(f"expected one of {', '.join(STEP_AGGREGATIONS)}, got {step_agg!r}", source=_SOURCE,
                              field="step_agg")
        if not isinstance(name, str) or not name:
            raise ConfigError(f"expected a non-empty string, got {name!r}", source=_SOURCE, field="name")
        self.scale = _finite("scale", scale)
        self.clip = _clip_bounds(clip)
        self.empty_reward = None if empty_reward is None else _finite("empty_reward", empty_reward)
        self.__name__ = name
        overrides: dict[str, Any] = {}
        if batch_size is not None:
            overrides["batch_size"] = batch_size
        if per_step:
            overrides.update(cumulative=False, step_agg=step_agg or "sum")
        elif step_agg is not None:
            overrides["step_agg"] = step_agg
        self.scorer = scorer if not overrides else _with_config(scorer, scorer.config.merged(overrides, source=_SOURCE))
        self._warned: set[str] = set()

    def __repr__(self) -> str:
        cfg = self.scorer.config
        return (f"{type(self).__name__}(name={self.__name__!r}, step_agg={cfg.step_agg!r}, "
                f"cumulative={cfg.cumulative}, scale={self.scale}, clip={self.clip}, empty_reward={self.empty_reward})")

    def __call__(self, prompts: Sequence[Any], completions: Sequence[Any], completion_ids: Sequence[Any] | None = None,
                 **kwargs) -> list[float | None]:
        """One reward per completion (``None``, or ``empty_reward``, where there is nothing to score).

        Raises:
            ProgadvDataError: a prompt that is not text or a list of messages (naming the record and the field).
                Problems of a completion (model output) never raise: that completion gets ``empty_reward``.
        """
        if len(prompts) != len(completions):
            raise ValueError(f"{_SOURCE}: {len(prompts)} prompts but {len(completions)} completions")
        trajectories = [self.trajectory(p, c, i) for i, (p, c) in enumerate(zip(prompts, completions))]
        todo = [i for i, t in enumerate(trajectories) if t is not None]
        with torch.no_grad():
            results = self._score([trajectories[i] for i in todo])
        rewards: list[float | None] = [self.empty_reward] * len(trajectories)
        scored = 0
        for i, result in zip(todo, results):
            if result is None:
                continue
            if sum(s.n_tokens for s in result.steps) == 0:
                self._warn("no_tokens", f"record {i}: none of the completion's tokens is left after the scorer's "
                                        f"max_length cut ({self.scorer.max_tokens} tokens)")
                continue
            if not math.isfinite(result.score):
                self._warn("not_finite", f"record {i}: the score is {result.score}")
                continue
            rewards[i] = self.shape(result.score)
            scored += 1
        log_metric = kwargs.get("log_metric")
        if callable(log_metric) and rewards:
            log_metric(f"rewards/{self.__name__}/unscored_frac", 1.0 - scored / len(rewards))
        return rewards

    def shape(self, score: float) -> float:
        """``clamp(scale * score, low, high)``: the reward of a trajectory score."""
        value = self.scale * score
        if self.clip is not None:
            value = min(max(value, self.clip[0]), self.clip[1])
        return float(value)

    def trajectory(self, prompt: Any, completion: Any, index: int = 0) -> Trajectory | None:
        """The trajectory scored for one prompt-completion pair (``index``: its place in the batch, for errors), or
        ``None`` when the completion has nothing to score."""
        ctx = Context(_SOURCE, index)
        if isinstance(prompt, str):
            if not isinstance(completion, str):
                ctx.fail(f"the prompt is text, so the completion must be text too, got {type_name(completion)}",
                         f"completions[{index}]")
            if completion == "":
                self._warn("empty", f"record {index}: the completion is empty")
                return None
            return self._checked(Trajectory([Message("user", prompt), Message("assistant", completion)],
                                            id=str(index), action_indices=(1,)))
        if not isinstance(prompt, (list, tuple)):
            ctx.fail(f"a prompt must be text or a list of messages, got {type_name(prompt)}", f"prompts[{index}]")
        if not isinstance(completion, (list, tuple)):
            ctx.fail(f"the prompt is a list of messages, so the completion must be one too, got "
                     f"{type_name(completion)}", f"completions[{index}]")
        context = parse_messages(_text_messages(prompt, ctx, f"prompts[{index}]"), ctx, f"prompts[{index}]")
        try:
            generated = parse_messages(_text_messages(completion, ctx, f"completions[{index}]"), ctx,
                                       f"completions[{index}]")
        except ProgadvDataError as e:
            self._warn("bad_completion", str(e))
            return None
        if not any(m.content or m.tool_calls for m in generated if m.role == "assistant"):
            self._warn("empty", f"record {index}: the completion has no assistant content and no tool call")
            return None
        steps = tuple(len(context) + j for j, m in enumerate(generated) if m.role == "assistant")
        return self._checked(Trajectory(context + generated, id=str(index), action_indices=steps))

    def _checked(self, trajectory: Trajectory) -> Trajectory | None:
        try:
            return trajectory.validate()
        except ProgadvDataError as e:  # e.g. text that is not valid Unicode, which no tokenizer takes
            self._warn("bad_completion", str(e))
            return None

    def _score(self, trajectories: list[Trajectory]) -> list[TrajectoryScore | None]:
        """Scores in order; a trajectory the scorer refuses (a rendering problem) gets ``None``, the others their
        score (then computed one by one, so that one completion cannot cost its batch its rewards)."""
        if not trajectories:
            return []
        try:
            return self.scorer.score(trajectories)
        except ProgadvDataError:
            pass
        out: list[TrajectoryScore | None] = []
        for t in trajectories:
            try:
                out.append(self.scorer.score([t])[0])
            except ProgadvDataError as e:
                self._warn("refused", str(e))
                out.append(None)
        return out

    def _warn(self, kind: str, detail: str) -> None:
        if kind not in self._warned:
            self._warned.add(kind)
            logger.warning("%s %r: %s; such completions get reward %r (this is logged once; their share is logged "
                           "as rewards/%s/unscored_frac)", _SOURCE, self.__name__, detail, self.empty_reward,
                           self.__name__)


def _with_config(scorer: ProgressAdvantageScorer, config) -> ProgressAdvantageScorer:
    """A scorer sharing ``scorer``'s models and tokenizers, with another config."""
    return type(scorer)(scorer.policy, scorer.reference, scorer.tokenizer, scorer.reference_tokenizer, config,
                        scorer.provenance)


def _text_messages(messages: Sequence[Any], ctx: Context, field: str) -> list[Any]:
    """``messages`` with content given as blocks (``[{"type": "text", "text": ...}]``, as vision-language datasets and
    tool results write it) joined into text; any other block is refused: the scorer reads text only."""
    out = []
    for j, m in enumerate(messages):
        content = m.get("content") if isinstance(m, Mapping) else None
        if isinstance(content, (list, tuple)):
            texts = []
            for k, block in enumerate(content):
                kind = block.get("type") if isinstance(block, Mapping) else None
                if kind != "text" or not isinstance(block.get("text"), str):
                    ctx.fail(f"only text content blocks can be scored, got {type_name(block)} of type {kind!r}",
                             f"{field}[{j}].content[{k}]")
                texts.append(block["text"])
            m = {**m, "content": "".join(texts)}
        out.append(m)
    return out


def _finite(name: str, value: Any) -> float:
    try:
        out = float(value) if isinstance(value, numbers.Real) and not isinstance(value, bool) else math.nan
    except OverflowError:  # a 400-digit integer
        out = math.inf
    if not math.isfinite(out):
        raise ConfigError(f"expected a finite number, got {type(value).__name__} {value!r:.60}", source=_SOURCE,
                          field=name)
    return out


def _clip_bounds(clip: Any) -> tuple[float, float] | None:
    if clip is None:
        return None
    if isinstance(clip, (list, tuple)):
        if len(clip) != 2:
            raise ConfigError(f"expected a positive number or a pair (low, high), got {clip!r:.60}", source=_SOURCE,
                              field="clip")
        low, high = _finite("clip", clip[0]), _finite("clip", clip[1])
    else:
        high = _finite("clip", clip)
        low = -high
    if not low < high:
        raise ConfigError(f"expected low < high (or a positive number), got {clip!r:.60}", source=_SOURCE,
                          field="clip")
    return low, high
