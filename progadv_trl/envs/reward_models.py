"""Trained reward models as baselines: an outcome reward model (ORM) and a process reward model (PRM), both
initialised from the reference checkpoint and trained on labelled episodes.

* ORM: ``AutoModelForSequenceClassification`` (``num_labels=1``) trained with TRL's ``RewardTrainer`` on pairs
  ``(chosen, rejected)`` = ``(successful, failed)`` episodes of the same group (same task), pre-tokenized
  (``chosen_ids`` / ``rejected_ids``). Its scalar at position ``i`` depends on tokens ``<= i`` only (causal model,
  the head reads each position's hidden state), so one forward pass gives the score of every prefix:
  ``s_t`` = the score of the prefix that ends with reply ``t``'s end-of-turn token, ``s_{-1}`` = the score at the
  last prompt token. Trajectory score ``s_{T-1}``; step value ``s_t - s_{t-1}`` (the change of predicted success
  the reply caused); attribution: argmin of the step values.
* PRM: ``AutoModelForTokenClassification`` (``num_labels=2``) trained with transformers' ``Trainer`` on one label per
  reply, at its last token (the end-of-turn token), ``-100`` elsewhere: class 1 ("good") when the reply did not lose
  success probability, ``metadata["optimal_success_advantage"][t] >= -margin`` (``margin`` 0.1, the mistake labels'
  margin, :meth:`~progadv_trl.envs.exact.ExactSolution.annotate`). Step value ``log P(good)``; trajectory score
  ``min_t P(good)``; attribution: argmin of the step values (the reply the PRM trusts least).

What a model reads: the episode as the scorer renders it (:class:`~progadv_trl.rendering.TrajectoryTokenizer`, chat
template, each piece tokenized on its own: the ids the policy sampled, see :mod:`~progadv_trl.envs.codec`), cut after
the last reply's end-of-turn token. The final observation is left out: it states the outcome ("You reached the
goal"), which no scorer of the policy's actions may read.

Training budget (:class:`RewardModelConfig`), the same whatever the number of episodes: ``max_steps=300`` optimizer
steps of ``batch_size=16`` (ORM: 16 pairs, i.e. 32 sequences; PRM: 16 episodes), AdamW at ``learning_rate=1e-3``
with linear decay, no warmup, no weight decay, float32 on CPU; the epochs this amounts to depend on the data size
and are reported in :attr:`RewardModel.info` with the wall and CPU seconds it took (``seconds``, ``cpu_seconds``:
the process's CPU time, which another load on the machine does not inflate). From the demo's reference the ORM has
123,520 parameters and the PRM 123,586.

On the number-line task the episode an ORM reads still shows the outcome almost surely: an episode ends before the
turn budget only by a success or an invalid reply, and the last observation and reply show whether a last move could
reach the goal (``benchmarks/trained_reward_models.py`` prints a label-free rule built on exactly that).
"""

from __future__ import annotations

import math
import tempfile
import time
from dataclasses import asdict, dataclass, field
from typing import Sequence

import torch

from ..baselines import REGISTRY
from ..data import Trajectory
from ..rendering import TokenizedTrajectory, TrajectoryTokenizer
from ..trajectory_scores import METHOD, TrajectoryScore

LABEL_FIELD = "optimal_success_advantage"


@dataclass
class RewardModelConfig:
    """How a reward model is trained (identical for every data size: a fixed number of optimizer steps)."""

    max_steps: int = field(default=300, metadata={"help": "Optimizer steps, whatever the number of episodes."})
    batch_size: int = field(default=16, metadata={"help": "Pairs (ORM) or episodes (PRM) per optimizer step."})
    learning_rate: float = field(default=1e-3, metadata={"help": "AdamW peak learning rate (linear decay to 0)."})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay."})
    margin: float = field(default=0.1, metadata={
        "help": "PRM: a reply is good when it loses at most this much success probability against the best action "
                "(metadata['optimal_success_advantage'] >= -margin)."})
    seed: int = field(default=0, metadata={"help": "Seed of the head's initialisation and the batch order."})

    def __post_init__(self):
        if self.max_steps < 1 or self.batch_size < 1 or not self.learning_rate > 0:
            raise ValueError(f"need max_steps >= 1, batch_size >= 1, learning_rate > 0; got {self}")


@dataclass
class RewardModelScore:
    """One episode under a reward model: ``score`` (higher = more likely to succeed), per reply (assistant message
    ``message_indices[t]``) the step value and the raw output (ORM: prefix score ``s_t``; PRM: ``P(good)``)."""

    score: float
    message_indices: list[int]
    step_values: list[float]
    raw: list[float]


def reply_ends(tok: TokenizedTrajectory) -> list[int]:
    """Position of each step's last token (``[n_steps]``); a step with no token (cut by truncation) is an error."""
    ends = [-1] * len(tok.steps)
    for pos, s in enumerate(tok.step_index):
        if s >= 0:
            ends[s] = pos
    if any(e < 0 for e in ends):
        raise ValueError("a reply lost all its tokens to truncation")
    return ends


def _render(traj: Trajectory, tokenizer: TrajectoryTokenizer) -> tuple[list[int], list[int], list[int]]:
    """``(input_ids cut after the last reply, message index per reply, position of each reply's last token)``."""
    tok = tokenizer(traj)
    if any(part for _, part in tok.steps):
        raise traj.error("reward models score whole replies: render without a step separator", field="messages")
    try:
        ends = reply_ends(tok)
    except ValueError as e:
        raise traj.error(f"{e}; raise max_length", field="messages") from None
    if ends and ends[0] == 0:
        raise traj.error("no context before the first reply", field="messages")
    return tok.input_ids[: ends[-1] + 1], [m for m, _ in tok.steps], ends


def _require_outcomes(trajectories: Sequence[Trajectory]) -> None:
    for t in trajectories:
        if t.reward is None:
            raise t.error("an ORM is trained on outcomes: this episode has no reward", field="reward")
        if t.group is None:
            raise t.error("an ORM pairs successes and failures of the same task: this episode has no group",
                          field="group")


def step_labels(traj: Trajectory, margin: float) -> list[int]:
    """PRM label per assistant turn: 1 when ``metadata["optimal_success_advantage"][t] >= -margin``, else 0."""
    gaps = traj.metadata.get(LABEL_FIELD) if isinstance(traj.metadata, dict) else None
    if gaps is None:
        raise traj.error("a PRM is trained on per-step labels: this episode has none (label it with an exact solver, "
                         "sample_episodes(..., solver=...))", field=f"metadata.{LABEL_FIELD}")
    if not isinstance(gaps, list) or not all(isinstance(g, (int, float)) and math.isfinite(g) for g in gaps):
        raise traj.error("expected a list of finite numbers, one per assistant turn", field=f"metadata.{LABEL_FIELD}")
    if len(gaps) != len(traj.steps):
        raise traj.error(f"{len(gaps)} labels for {len(traj.steps)} assistant turns", field=f"metadata.{LABEL_FIELD}")
    return [int(g >= -margin) for g in gaps]


def orm_pairs(trajectories: Sequence[Trajectory], tokenizer: TrajectoryTokenizer) -> list[dict]:
    """Every ``(success, failure)`` pair within each group: ``{"chosen_ids", "rejected_ids"}`` (TRL's pre-tokenized
    preference format)."""
    _require_outcomes(trajectories)
    by_group: dict = {}
    for t in trajectories:
        by_group.setdefault(t.group, ([], []))[0 if t.success() else 1].append(_render(t, tokenizer)[0])
    pairs = [{"chosen_ids": c, "rejected_ids": r} for won, lost in by_group.values() for c in won for r in lost]
    if not pairs:
        raise ValueError(f"no group of these {len(trajectories)} episodes has both a success and a failure: "
                         "an ORM needs (success, failure) pairs of the same task")
    return pairs


def prm_examples(trajectories: Sequence[Trajectory], tokenizer: TrajectoryTokenizer, margin: float) -> list[dict]:
    """Per episode ``{"input_ids", "labels"}``: the step label at each reply's last token, ``-100`` elsewhere."""
    out = []
    for t in trajectories:
        labels_t = step_labels(t, margin)
        ids, _, ends = _render(t, tokenizer)
        labels = [-100] * len(ids)
        for pos, y in zip(ends, labels_t, strict=True):
            labels[pos] = y
        out.append({"input_ids": ids, "labels": labels})
    return out


@dataclass
class RewardModel:
    """A trained ORM or PRM (``kind``), its tokenizer and ``info`` (data, budget, seconds, final training loss)."""

    kind: str
    model: torch.nn.Module
    tokenizer: object
    info: dict

    @torch.no_grad()
    def score(self, trajectories: Sequence[Trajectory], batch_size: int = 64) -> list[RewardModelScore]:
        """Each episode's score and per-reply values (see the module docstring)."""
        render = TrajectoryTokenizer(self.tokenizer)
        views = [_render(t, render) for t in trajectories]
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        self.model.eval()
        out = []
        for i in range(0, len(views), batch_size):
            chunk = views[i: i + batch_size]
            width = max(len(ids) for ids, _, _ in chunk)
            ids = torch.full((len(chunk), width), pad, dtype=torch.long)
            mask = torch.zeros_like(ids)
            for r, (x, _, _) in enumerate(chunk):
                ids[r, : len(x)], mask[r, : len(x)] = torch.tensor(x), 1
            values = self._position_values(ids, mask).double()
            for r, (_, messages, ends) in enumerate(chunk):
                out.append(self._episode(values[r], messages, ends))
        return out

    def _position_values(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """``[B, L]``: ORM score of each prefix, or PRM ``log P(good)`` at each position."""
        if self.kind == "orm":
            base = getattr(self.model, self.model.base_model_prefix)
            hidden = base(input_ids=ids, attention_mask=mask).last_hidden_state
            return self.model.score(hidden).squeeze(-1).float()
        return torch.log_softmax(self.model(input_ids=ids, attention_mask=mask).logits.float(), -1)[..., 1]

    def _episode(self, values: torch.Tensor, messages: list[int], ends: list[int]) -> RewardModelScore:
        at = values[torch.tensor(ends)]
        if self.kind == "orm":
            prefix = torch.cat([values[ends[0] - 1: ends[0]], at])  # s_{-1}: the last prompt token
            return RewardModelScore(float(at[-1]), messages, prefix.diff().tolist(), at.tolist())
        return RewardModelScore(float(at.exp().min()), messages, at.tolist(), at.exp().tolist())


def _n_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _budget(config: RewardModelConfig, n_examples: int) -> dict:
    return {"max_steps": config.max_steps, "batch_size": config.batch_size, "learning_rate": config.learning_rate,
            "lr_schedule": "linear", "weight_decay": config.weight_decay,
            "epochs": config.max_steps * config.batch_size / n_examples}


def _common_args(config: RewardModelConfig, output_dir: str) -> dict:
    return dict(output_dir=output_dir, max_steps=config.max_steps, per_device_train_batch_size=config.batch_size,
                learning_rate=config.learning_rate, weight_decay=config.weight_decay, lr_scheduler_type="linear",
                warmup_steps=0, use_cpu=True, bf16=False, activation_checkpointing=False, save_strategy="no",
                report_to="none", logging_steps=max(1, config.max_steps // 10), seed=config.seed,
                data_seed=config.seed, disable_tqdm=True, dataloader_num_workers=0)


def _fit(trainer) -> None:
    """Train without printing every log dict (``disable_tqdm`` adds a printer); the log stays in ``state``."""
    from transformers.trainer_callback import PrinterCallback

    trainer.remove_callback(PrinterCallback)
    trainer.train()


def _final_loss(log_history: list[dict]) -> float | None:
    losses = [r["loss"] for r in log_history if "loss" in r]
    return float(losses[-1]) if losses else None


def train_orm(reference_dir, trajectories: Sequence[Trajectory], config: RewardModelConfig | None = None
              ) -> RewardModel:
    """An ORM from ``reference_dir`` (TRL ``RewardTrainer``) on the ``(success, failure)`` pairs of
    ``trajectories``."""
    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl import RewardConfig, RewardTrainer

    config = config or RewardModelConfig()
    tokenizer = AutoTokenizer.from_pretrained(str(reference_dir))
    pairs = orm_pairs(trajectories, TrajectoryTokenizer(tokenizer))
    start, cpu = time.time(), time.process_time()
    with tempfile.TemporaryDirectory() as tmp:
        args = RewardConfig(**_common_args(config, tmp), max_length=None)
        trainer = RewardTrainer(model=str(reference_dir), args=args, train_dataset=Dataset.from_list(pairs),
                                processing_class=tokenizer)
        _fit(trainer)
    seconds, cpu = time.time() - start, time.process_time() - cpu
    accuracy = [r["accuracy"] for r in trainer.state.log_history if "accuracy" in r]
    info = {"kind": "orm", "n_episodes": len(trajectories), "n_examples": len(pairs), "example": "pair",
            **_budget(config, len(pairs)), "seconds": round(seconds, 1), "cpu_seconds": round(cpu, 1),
            "n_parameters": _n_parameters(trainer.model), "final_loss": _final_loss(trainer.state.log_history),
            "final_pair_accuracy": accuracy[-1] if accuracy else None, "config": asdict(config)}
    return RewardModel("orm", trainer.model.eval(), tokenizer, info)


def train_prm(reference_dir, trajectories: Sequence[Trajectory], config: RewardModelConfig | None = None
              ) -> RewardModel:
    """A PRM from ``reference_dir`` (transformers ``Trainer``, token classification at each reply's last token)."""
    from datasets import Dataset
    from transformers import (AutoModelForTokenClassification, AutoTokenizer, DataCollatorForTokenClassification,
                              Trainer, TrainingArguments, set_seed)
    from transformers.utils import logging as hf_logging

    config = config or RewardModelConfig()
    tokenizer = AutoTokenizer.from_pretrained(str(reference_dir))
    examples = prm_examples(trajectories, TrajectoryTokenizer(tokenizer), config.margin)
    start, cpu = time.time(), time.process_time()
    set_seed(config.seed)  # the new head's initialisation
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # "newly initialized: score.weight" is the point here
    try:
        model = AutoModelForTokenClassification.from_pretrained(str(reference_dir), num_labels=2,
                                                                dtype=torch.float32)
    finally:
        hf_logging.set_verbosity(verbosity)
    with tempfile.TemporaryDirectory() as tmp:
        trainer = Trainer(model=model, args=TrainingArguments(**_common_args(config, tmp)),
                          train_dataset=Dataset.from_list(examples),
                          data_collator=DataCollatorForTokenClassification(tokenizer), processing_class=tokenizer)
        _fit(trainer)
    seconds, cpu = time.time() - start, time.process_time() - cpu
    n_steps = sum(y != -100 for e in examples for y in e["labels"])
    n_good = sum(y == 1 for e in examples for y in e["labels"])
    info = {"kind": "prm", "n_episodes": len(trajectories), "n_examples": len(examples), "example": "episode",
            "n_labelled_steps": n_steps, "good_fraction": n_good / n_steps if n_steps else float("nan"),
            **_budget(config, len(examples)), "seconds": round(seconds, 1), "cpu_seconds": round(cpu, 1),
            "n_parameters": _n_parameters(model), "final_loss": _final_loss(trainer.state.log_history),
            "config": asdict(config)}
    return RewardModel("prm", model.eval(), tokenizer, info)


def add_reward_model_rows(trajectories: Sequence[Trajectory], results: Sequence[TrajectoryScore],
                          models: dict[str, RewardModel]) -> None:
    """Add each model as a method row of ``results`` (in place): ``result.scores[name]`` (trajectory score),
    ``result.action_values[name]`` (one value per entry of ``action_messages``) and ``result.step_values[name]``
    (per scored step: its message's value), so :func:`~progadv_trl.trajectory_scores.evaluation_table` and
    :func:`~progadv_trl.envs.evaluation.evaluate_episodes` report them beside progress advantage and the
    baselines (attribution rule ``"step"``: argmin of the values)."""
    if len(trajectories) != len(results):
        raise ValueError(f"{len(trajectories)} trajectories but {len(results)} results: pass them in the same order")
    for t, r in zip(trajectories, results):
        if t.id is not None and r.id is not None and t.id != r.id:
            raise ValueError(f"trajectory {t.id!r} was given with the result of {r.id!r}: pass them in the same order")
    for name, model in models.items():
        if name == METHOD or name in REGISTRY:
            raise ValueError(f"reward model name {name!r} is taken by a built-in method: choose another")
        for t, r, s in zip(trajectories, results, model.score(trajectories), strict=True):
            by_message = dict(zip(s.message_indices, s.step_values))
            missing = [m for m in r.action_messages if m not in by_message]
            if missing:
                raise t.error(f"the result scores messages {missing} that {name!r} does not see as replies",
                              field="messages")
            r.scores[name] = s.score
            r.action_values[name] = [by_message[m] for m in r.action_messages]
            r.step_values[name] = [by_message[st.message_index] for st in r.steps]
