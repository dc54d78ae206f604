"""``ProgressAdvantageCallback``: what a GRPO/RLOO user adds to a run.

    trainer = GRPOTrainer(model=..., reward_funcs=..., args=GRPOConfig(...), train_dataset=...)
    trainer.add_callback(ProgressAdvantageCallback(trainer=trainer, config=ProgressAdvantageConfig(
        heldout="heldout.jsonl")))
    trainer.train()

At train begin it finds (or makes) the reference (:mod:`progadv_trl.reference`), then evaluates held-out rollouts with
:class:`~progadv_trl.monitor.ProgressAdvantageMonitor` at train begin, every ``eval_steps`` and at the end, at the
trainer's temperature and beta (1.0 when beta is 0). Metrics go into the trainer's own log rows under ``progadv/``
(appended to ``trainer._metrics``, never through ``trainer.log()``, which would steal GRPO's row), and every
evaluation is appended to ``<output_dir>/progadv-history.jsonl``. The final scorer is exported to
``<output_dir>/progadv-scorer`` and the best one to ``progadv-scorer-best``. The callback's state is saved in every
checkpoint and restored on ``resume_from_checkpoint``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

from transformers import TrainerCallback

from .config import ProgressAdvantageConfig
from .monitor import ProgressAdvantageMonitor
from .reference import resolve_reference

logger = logging.getLogger(__name__)
STATE_FILE = "progadv_state.json"


def _load_prompt_rows(source) -> list[dict]:
    if isinstance(source, (str, Path)):
        from datasets import load_dataset

        path = str(source)
        kind = "json" if path.endswith((".json", ".jsonl")) else path.rsplit(".", 1)[-1]
        return list(load_dataset(kind, data_files=path, split="train"))
    rows = list(source)
    return [r if isinstance(r, dict) else {"prompt": r} for r in rows]


class ProgressAdvantageCallback(TrainerCallback):
    """Scores held-out rollouts with progress advantage during training, tracks drift, exports the scorer.

    Args:
        trainer: the ``GRPOTrainer`` / ``RLOOTrainer`` (or any ``Trainer`` with ``beta`` and ``ref_model``) it is
            added to; callback events do not carry the trainer or its reference, so it is passed here, as TRL's own
            ``LogCompletionsCallback(trainer=...)`` does.
        config: a :class:`ProgressAdvantageConfig` (``heldout``, ``heldout_prompts`` or ``sampler`` required).
        sampler: ``sampler(policy) -> list[Trajectory]``: fresh labelled rollouts for each evaluation, for multi-turn
            agents whose environment loop the callback cannot run itself (``rollout_func``/``environment_factory``
            trainers): run your environment with the current policy and return the episodes as trajectories.
    """

    def __init__(self, trainer, config: ProgressAdvantageConfig | None = None, *, sampler=None, **overrides):
        config = config or ProgressAdvantageConfig()
        self.config = dataclasses.replace(config, **overrides) if overrides else config
        if self.config.heldout is None and self.config.heldout_prompts is None and sampler is None:
            raise ValueError("ProgressAdvantageCallback needs held-out data: set heldout= (labelled rollouts), "
                             "heldout_prompts= (prompts the policy completes, labelled by the trainer's rewards) "
                             "or pass sampler= (your environment loop)")
        self._user_sampler = sampler
        self.trainer = trainer
        args = trainer.args
        self.eval_steps = self.config.eval_steps or _trainer_eval_steps(args)
        if self.eval_steps is None or self.eval_steps <= 0:
            raise ValueError(f"eval interval must be a positive number of steps, got {self.eval_steps}")
        tok = trainer.processing_class
        tok = getattr(tok, "tokenizer", tok)
        if self.config.rendering == "chat_template" and not getattr(tok, "chat_template", None):
            raise ValueError("the trainer's tokenizer has no chat template: set one or use rendering='plain'")
        self.tokenizer = tok
        self._heldout = None
        if self.config.heldout is not None:
            from .loaders import load_trajectories

            self._heldout = load_trajectories(self.config.heldout)  # bad data fails now, not mid-run
            if self.config.quality_metric in ("auroc", "spearman", "best_of_n") and not any(
                    t.reward is not None for t in self._heldout):
                raise ValueError(f"quality_metric={self.config.quality_metric!r} needs rewards on the held-out "
                                 "rollouts; none has one")
        self._prompt_rows = (_load_prompt_rows(self.config.heldout_prompts)
                             if self.config.heldout_prompts is not None else None)
        self.monitor: ProgressAdvantageMonitor | None = None
        self._last_eval_step: int | None = None

    # ------------------------------------------------------------------ helpers
    @property
    def temperature(self) -> float:
        return float(getattr(self.trainer, "temperature", None) or getattr(self.trainer.args, "temperature", 1.0))

    @property
    def beta(self) -> float:
        beta = float(getattr(self.trainer, "beta", getattr(self.trainer.args, "beta", 0.0)) or 0.0)
        return beta if beta > 0 else 1.0

    def _sampler(self):
        if self._prompt_rows is None:
            return self._user_sampler
        from .rollouts import sample_rollouts

        n = self.config.eval_num_generations or getattr(self.trainer.args, "num_generations", None) or 8

        def sample(policy):
            rows = sample_rollouts(self.trainer, policy, self._prompt_rows, n, seed=self.config.seed,
                                   tag="heldout-prompt")
            return rows + (self._user_sampler(policy) if self._user_sampler is not None else [])

        return sample

    def _evaluate(self, state) -> dict:
        metrics = self.monitor.evaluate(self.trainer.model, state.global_step, temperature=self.temperature,
                                        beta=self.beta)
        self._last_eval_step = state.global_step
        return metrics

    def _push(self, metrics: dict) -> None:
        """Into GRPO's/RLOO's own next log row: one value per key (the latest evaluation), never trainer.log()."""
        store = getattr(self.trainer, "_metrics", None)
        if store is None:
            return
        mode = "train"
        for key, value in metrics.items():
            if isinstance(value, (int, float)):
                store[mode][key] = [float(value)]

    # ------------------------------------------------------------------ events
    def on_train_begin(self, args, state, control, **kwargs):
        output_dir = Path(args.output_dir)
        resumed = _resumed_state(output_dir, state.global_step)
        reference = resolve_reference(self.trainer, self.config, output_dir,
                                      resumed.get("reference") if resumed else None)
        self.monitor = ProgressAdvantageMonitor(
            reference, self.tokenizer, self.config, output_dir if state.is_world_process_zero else None,
            heldout=self._heldout, sampler=self._sampler())
        if resumed:
            self.monitor.load_state_dict(resumed["monitor"], up_to_step=state.global_step)
            self._last_eval_step = resumed.get("last_eval_step")
        if self._last_eval_step != state.global_step:
            self._push(self._evaluate(state))

    def on_step_end(self, args, state, control, **kwargs):
        due = state.global_step % self.eval_steps == 0 or state.global_step >= state.max_steps
        if due and self._last_eval_step != state.global_step:
            self._push(self._evaluate(state))

    def on_save(self, args, state, control, **kwargs):
        if not state.is_world_process_zero or self.monitor is None:
            return
        ckpt = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if ckpt.is_dir():
            data = {"monitor": self.monitor.state_dict(), "reference": self.monitor.reference.describe(),
                    "last_eval_step": self._last_eval_step, "eval_steps": self.eval_steps}
            tmp = ckpt / (STATE_FILE + ".tmp")
            tmp.write_text(json.dumps(data), encoding="utf-8")
            tmp.replace(ckpt / STATE_FILE)

    def on_train_end(self, args, state, control, **kwargs):
        if self.monitor is None:
            return
        if self._last_eval_step != state.global_step:  # stopped early, between evaluations
            self._evaluate(state)
        if self.config.export:
            self.monitor.export(self.trainer.model, step=state.global_step, temperature=self.temperature,
                                beta=self.beta)


def _trainer_eval_steps(args) -> int | None:
    strategy = str(getattr(args, "eval_strategy", "no"))
    if "steps" in strategy and getattr(args, "eval_steps", None):
        return int(args.eval_steps) if args.eval_steps >= 1 else None
    steps = getattr(args, "logging_steps", None)
    return int(steps) if steps and steps >= 1 else None


def _resumed_state(output_dir: Path, global_step: int) -> dict | None:
    if global_step <= 0:
        return None
    path = output_dir / f"checkpoint-{global_step}" / STATE_FILE
    if not path.is_file():
        logger.warning("resuming at step %d without progadv state in %s: the history restarts here",
                       global_step, path.parent)
        return None
    return json.loads(path.read_text(encoding="utf-8"))
