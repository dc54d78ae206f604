"""GRPO on a built-in agent task (:mod:`~progadv_trl.envs.tasks`) with TRL 1.16, on CPU, through a ``rollout_func``.

TRL's ``environment_factory`` expects tool calls; here an action is a plain-text reply, so the rollout function runs
the environment loop itself (:func:`~progadv_trl.envs.sampling.run_episodes`) with the current policy at the
trainer's temperature and returns, per episode, ``prompt_ids`` (system + task + generation header),
``completion_ids`` (replies and the observations between them), ``env_mask`` (TRL's ``tool_mask``: 0 on observation
tokens, which are then excluded from the loss, the KL term and the length metrics), the sampling ``logprobs`` and
the episode reward (``env_reward``, read by the reward function). The task of each episode is read back from its
prompt (``env.task_from_prompt``).

With ``beta > 0`` TRL reloads the reference from the policy's ``config._name_or_path``, so the policy is loaded from
the saved reference folder: the run regularises toward exactly the checkpoint the exact DP queries.
"""

from __future__ import annotations

import os
import random
from typing import Sequence

import torch

from .codec import ChatCodec
from .number_line import NumberLineEnv
from .sampling import run_episodes


def make_rollout_func(env, tokenizer, *, seed: int = 0):
    """A TRL ``rollout_func(prompts, trainer) -> dict``: one episode per prompt (TRL already repeats each prompt
    ``num_generations`` times)."""
    codec = ChatCodec(tokenizer, env)
    state: dict = {}

    def rollout_func(prompts, trainer) -> dict:
        if not state:  # one stream per process
            rank = trainer.accelerator.process_index
            state["gen"] = torch.Generator().manual_seed(seed * 1000 + rank)
            state["rng"] = random.Random(seed * 1000 + rank)
        model = trainer.accelerator.unwrap_model(trainer.model)
        tasks = [env.task_from_prompt(p) for p in prompts]
        eps = run_episodes(model, codec, tasks, temperature=trainer.temperature, generator=state["gen"],
                           rng=state["rng"])
        return {"prompt_ids": [e.prompt_ids for e in eps], "completion_ids": [e.completion_ids for e in eps],
                "logprobs": [e.logprobs for e in eps], "env_mask": [e.env_mask for e in eps],
                "env_reward": [e.reward for e in eps]}

    return rollout_func


def env_reward(completions, env_reward, **kwargs) -> list[float]:
    """Reward function: the environment's outcome, passed through from the rollout function."""
    return list(env_reward)


def prompt_dataset(env, n: int, seed: int = 0):
    """``n`` prompts (conversational), tasks drawn uniformly with ``seed``."""
    from datasets import Dataset

    rng, tasks = random.Random(seed), env.tasks()
    return Dataset.from_list([{"prompt": env.prompt(rng.choice(tasks))} for _ in range(n)])


def train_grpo(reference_dir: str | os.PathLike, output_dir: str | os.PathLike, *, env=None,
               beta: float = 0.04, loss_type: str = "grpo", max_steps: int = 100, learning_rate: float = 1e-3,
               num_generations: int = 8, prompts_per_step: int = 8, temperature: float = 1.0,
               callbacks: Sequence = (), seed: int = 0, train: bool = True, save: bool = True, verbose: bool = False,
               **config_overrides):
    """Build a ``GRPOTrainer`` for the policy initialised from ``reference_dir``, train it and save it.

    Args:
        reference_dir: a checkpoint folder (model and tokenizer), e.g. from
            :func:`~progadv_trl.envs.pretrain.train_reference`.
        output_dir: the trainer's output folder; the final policy (and tokenizer) is saved there.
        env: a built-in task's environment (default: the number line).
        beta, loss_type, temperature: GRPO's KL coefficient, loss and generation temperature (``beta=0.0`` with
            ``loss_type="dapo"`` is TRL's default).
        max_steps: optimizer steps; each samples ``prompts_per_step * num_generations`` episodes.
        callbacks: ``TrainerCallback`` objects (e.g. the progress-advantage callback).
        train: ``False`` returns the trainer untrained (to attach things or step manually).
        verbose: print a log row per step (``False``: logs stay in ``trainer.state.log_history``).
        config_overrides: any other ``GRPOConfig`` field.

    Returns:
        the ``GRPOTrainer`` (``trainer.model`` is the trained policy; ``trainer.state.log_history`` its logs).
    """
    from transformers import AutoTokenizer
    from transformers.trainer_callback import PrinterCallback, ProgressCallback
    from trl import GRPOConfig, GRPOTrainer

    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    env = env or NumberLineEnv()
    tokenizer = AutoTokenizer.from_pretrained(str(reference_dir))
    tokenizer.padding_side = "left"
    batch = prompts_per_step * num_generations
    settings = dict(output_dir=str(output_dir), use_cpu=True, bf16=False, beta=beta, loss_type=loss_type,
                    max_steps=max_steps, learning_rate=learning_rate, per_device_train_batch_size=batch,
                    gradient_accumulation_steps=1, num_generations=num_generations, temperature=temperature,
                    max_completion_length=env.max_turns * 40, logging_steps=1, save_strategy="no",
                    report_to="none", seed=seed, data_seed=seed, disable_tqdm=True, lr_scheduler_type="constant")
    settings.update(config_overrides)
    args = GRPOConfig(**settings)
    trainer = GRPOTrainer(model=str(reference_dir), reward_funcs=env_reward, args=args,
                          train_dataset=prompt_dataset(env, max(batch // num_generations, 1) * max_steps, seed),
                          processing_class=tokenizer, callbacks=list(callbacks),
                          rollout_func=make_rollout_func(env, tokenizer, seed=seed))
    if not verbose:
        trainer.remove_callback(PrinterCallback)
        trainer.remove_callback(ProgressCallback)
    if train:
        trainer.train()
        if save:
            trainer.save_model(str(output_dir))
            tokenizer.save_pretrained(str(output_dir))
    return trainer
