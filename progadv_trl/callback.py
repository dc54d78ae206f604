"""``ProgressAdvantageCallback``: what a GRPO/RLOO user adds to a run.

    trainer = GRPOTrainer(model=..., reward_funcs=..., args=GRPOConfig(...), train_dataset=...)
    trainer.add_callback(ProgressAdvantageCallback(trainer=trainer, config=ProgressAdvantageConfig(
        heldout="heldout.jsonl")))
    trainer.train()

At train begin it finds (or makes) the reference (:mod:`progadv_trl.reference`), then evaluates held-out rollouts with
:class:`~progadv_trl.monitor.ProgressAdvantageMonitor` at train begin, every ``eval_steps`` and at the end, at the
trainer's temperature and beta (1.0 when beta is 0). The interval is ``config.eval_steps``, else the trainer's own
resolved ``eval_steps`` (``eval_strategy="steps"``), else its resolved ``logging_steps``.

Every evaluation reaches the trainer's logs (and so every ``report_to`` integration): when the trainer writes a log
row at that step and keeps GRPO/RLOO's ``_metrics`` store, the metrics ride in that row beside the trainer's own keys
(``trainer.log()`` would take GRPO's accumulated metrics out of their row); otherwise (train begin, train end, steps
without a row, trainers without the store) they get a row of their own through the base ``Trainer.log``. Every
evaluation is also appended to ``<output_dir>/progadv-history.jsonl``. The final scorer is exported to
``<export_dir>/scorer`` and the best one to ``<export_dir>/scorer-best`` (``export_dir`` defaults to
``<output_dir>/_progadv``, which ``push_to_hub`` skips). The callback's state is saved in every checkpoint and
restored on ``resume_from_checkpoint``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from pathlib import Path

from transformers import TrainerCallback

from .config import ProgressAdvantageConfig
from .monitor import ProgressAdvantageMonitor, export_root
from .reference import resolve_reference
from .sharding import check_supported

logger = logging.getLogger(__name__)
STATE_FILE = "progadv_state.json"


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
        self.eval_steps: int | None = self.config.eval_steps  # resolved against the trainer state at train begin
        tok = trainer.processing_class
        tok = getattr(tok, "tokenizer", tok)
        if self.config.rendering == "chat_template" and not getattr(tok, "chat_template", None):
            raise ValueError("the trainer's tokenizer has no chat template: set one or use rendering='plain'")
        self.tokenizer = tok
        self._heldout = None
        if self.config.heldout is not None:
            from .formats import load_trajectories

            self._heldout = load_trajectories(self.config.heldout)  # bad data fails now, not mid-run
            if self.config.quality_metric in ("auroc", "spearman", "best_of_n") and not any(
                    t.reward is not None for t in self._heldout):
                raise ValueError(f"quality_metric={self.config.quality_metric!r} needs rewards on the held-out "
                                 "rollouts; none has one")
        self._prompt_rows = None
        if self.config.heldout_prompts is not None:  # bad prompts or a trainer that cannot complete them fail now
            from .rollouts import check_trainer, load_prompt_rows

            check_trainer(trainer)
            self._prompt_rows = load_prompt_rows(self.config.heldout_prompts)
        self.monitor: ProgressAdvantageMonitor | None = None
        self._last_eval_step: int | None = None
        self._in_row: dict[str, float] | None = None  # metrics waiting in the trainer's _metrics for its next row
        self._warned_no_log = False

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

        n = self.config.eval_num_generations or self.trainer.num_generations

        def sample(policy):  # policy is trainer.model: the trainer generates with it (vLLM: its synced copy)
            rows = sample_rollouts(self.trainer, self._prompt_rows, n, seed=self.config.seed, tag="heldout-prompt")
            return rows + (self._user_sampler(policy) if self._user_sampler is not None else [])

        return sample

    def _evaluate(self, state) -> dict:
        metrics = self.monitor.evaluate(self.trainer.model, state.global_step, temperature=self.temperature,
                                        beta=self.beta)
        self._last_eval_step = state.global_step
        return metrics

    def _report(self, metrics: dict, row_follows: bool = False) -> None:
        """Send one evaluation to the trainer's logs: into the trainer's own row at this step when one follows and
        the trainer keeps a ``_metrics`` store (GRPO, RLOO), else as a row of its own."""
        self._flush_unlogged()
        values = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        store = self._train_store()
        if row_follows and store is not None:
            for key, value in values.items():
                store[key] = [value]
            self._in_row = values
        else:
            self._log_row(values)

    def _flush_unlogged(self) -> None:
        """Metrics left in the store after the row that should have carried them: give them their own row."""
        if self._in_row is not None:
            values, self._in_row = self._in_row, None
            for key in values:
                (self._train_store() or {}).pop(key, None)
            self._log_row(values)

    def _train_store(self) -> dict | None:
        """GRPO's/RLOO's per-mode metric store for training rows (``trainer._metrics["train"]``), if it has one."""
        store = getattr(self.trainer, "_metrics", None)
        return store["train"] if isinstance(store, dict) and isinstance(store.get("train"), dict) else None

    def _log_row(self, values: dict[str, float]) -> None:
        from transformers import Trainer

        finite = {k: v for k, v in values.items() if math.isfinite(v)}  # JSON loggers refuse NaN
        if isinstance(self.trainer, Trainer) and getattr(self.trainer, "state", None) is not None:
            Trainer.log(self.trainer, finite)  # the base method: GRPO's override would empty its metric store
        elif not self._warned_no_log:
            self._warned_no_log = True
            logger.warning("progadv: %s is not a transformers Trainer, so evaluations are not sent to its loggers; "
                           "they are in progadv-history.jsonl", type(self.trainer).__name__)

    # ------------------------------------------------------------------ events
    def on_train_begin(self, args, state, control, **kwargs):
        if self.config.eval_steps is None:
            self.eval_steps = _trainer_eval_steps(args, state)
        check_supported(self.trainer.model, getattr(self.trainer, "ref_model", None), trainer=self.trainer)
        output_dir = Path(args.output_dir)
        export_dir = export_root(self.config, output_dir)
        resumed = _resumed_state(output_dir, state.global_step)
        reference = resolve_reference(self.trainer, self.config, export_dir,
                                      resumed.get("reference") if resumed else None)
        self.monitor = ProgressAdvantageMonitor(
            reference, self.tokenizer, self.config, output_dir if state.is_world_process_zero else None,
            heldout=self._heldout, sampler=self._sampler(), export_dir=export_dir)
        if resumed:
            self.monitor.load_state_dict(resumed["monitor"], up_to_step=state.global_step)
            self._last_eval_step = resumed.get("last_eval_step")
        if self._last_eval_step != state.global_step:
            self._report(self._evaluate(state))  # no trainer row at train begin: a row of its own

    def on_step_end(self, args, state, control, **kwargs):
        due = state.global_step % self.eval_steps == 0 or state.global_step >= state.max_steps
        if due and self._last_eval_step != state.global_step:
            # the trainer's flow callback ran first and decided whether this step writes a log row
            self._report(self._evaluate(state), row_follows=bool(control.should_log))

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self._in_row is not None:
            if logs and any(key in logs for key in self._in_row):
                self._in_row = None
            else:  # the trainer wrote its row without reading its store: a row of their own instead
                self._flush_unlogged()

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
        self._flush_unlogged()
        if self._last_eval_step != state.global_step:  # stopped between evaluations
            self._report(self._evaluate(state))
        if self.config.export:
            path = self.monitor.export(self.trainer.model, step=state.global_step, temperature=self.temperature,
                                       beta=self.beta)
            best = self.monitor.export_best(self.trainer.model)
            if path is not None:
                logger.info("progadv: scorer exported to %s%s", path, f", best to {best}" if best else "")


def _trainer_eval_steps(args, state) -> int:
    """The trainer's own interval, as its flow callback resolves it: ``state.eval_steps`` under
    ``eval_strategy="steps"`` (a fraction of ``max_steps`` already made absolute), else ``state.logging_steps``."""
    from transformers.trainer_utils import IntervalStrategy

    steps = None
    if args.eval_strategy == IntervalStrategy.STEPS:
        steps = getattr(state, "eval_steps", None)
    if not steps:
        steps = getattr(state, "logging_steps", None) or getattr(args, "logging_steps", None)
    if steps and 0 < steps < 1:  # a fraction the state did not resolve (state built by hand)
        steps = math.ceil(state.max_steps * steps)
    if not steps or steps < 1:
        raise ValueError(f"progadv: cannot tell the evaluation interval from the trainer (eval_steps="
                         f"{getattr(args, 'eval_steps', None)}, logging_steps={getattr(args, 'logging_steps', None)});"
                         " set ProgressAdvantageConfig.eval_steps")
    return int(steps)


def _resumed_state(output_dir: Path, global_step: int) -> dict | None:
    if global_step <= 0:
        return None
    path = output_dir / f"checkpoint-{global_step}" / STATE_FILE
    if not path.is_file():
        logger.warning("resuming at step %d without progadv state in %s: the history restarts here",
                       global_step, path.parent)
        return None
    return json.loads(path.read_text(encoding="utf-8"))
