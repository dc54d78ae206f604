"""Fresh held-out rollouts: the trainer completes held-out prompts the way it completes training prompts, and its
reward functions label them.

Generation goes through the trainer's own ``_generate`` (GRPO and RLOO): the same backend (vLLM server or colocate
when the trainer uses it, else transformers ``generate``), prompt rendering (``chat_template_kwargs``, tools) and
sampling settings (``generation_kwargs``, temperature, top-p/top-k/min-p, repetition penalty,
``max_completion_length``) as training. Rewards go through the trainer's own ``_calculate_rewards``: its reward
functions (async ones and reward models with their ``reward_processing_classes`` included) get the keyword arguments
of a training call (``prompts``, ``completions``, ``completion_ids``, ``trainer_state``, ``log_extra``,
``log_metric`` and every other column of the prompt row), and the reward is their ``reward_weights``-weighted sum,
as the trainer logs it (``None`` when every function returned ``None``).

Under several processes each rank completes its share of the prompts (:func:`~progadv_trl.distributed.split_evenly`:
every rank the same number, as every rank takes part in the trainer's collective calls; padding results dropped),
and every rank gets all the rollouts back in input order.
"""

from __future__ import annotations

import contextlib
import inspect
import math
from collections.abc import Mapping
from typing import Any, Sequence

import torch

from .data import Message, ProgadvDataError, Trajectory
from .distributed import merge_in_order, split_evenly
from .formats.records import Context, parse_messages

SOURCE = "heldout_prompts"


def load_prompt_rows(source) -> list[dict]:
    """Held-out prompt rows (dicts with a ``prompt`` and any other columns) from a JSON/JSONL/CSV/Parquet path, a
    ``datasets.Dataset`` or a list of rows (a bare string or message list is a row's prompt); checked here so bad data
    fails before training, naming the record and the field."""
    if isinstance(source, (str, bytes)) or hasattr(source, "__fspath__"):
        from datasets import load_dataset

        path = str(source)
        kind = "json" if path.endswith((".json", ".jsonl")) else path.rsplit(".", 1)[-1]
        rows, name = list(load_dataset(kind, data_files=path, split="train")), path
    else:
        rows, name = [r if isinstance(r, Mapping) else {"prompt": r} for r in source], SOURCE
    if not rows:
        raise ProgadvDataError("no held-out prompts", source=name)
    for i, row in enumerate(rows):
        ctx = Context(name, i)
        if "prompt" not in row or row["prompt"] is None:
            ctx.fail("missing prompt (a string or a list of chat messages)", "prompt")
        if not isinstance(row["prompt"], str):
            if not isinstance(row["prompt"], (list, tuple)) or not row["prompt"]:
                ctx.fail("prompt must be a string or a non-empty list of chat messages", "prompt")
            parse_messages(row["prompt"], ctx, "prompt")
        for key in ("image", "images"):
            if row.get(key) is not None:
                ctx.fail("images in held-out prompts are not supported; pass sampler= to the callback instead", key)
    kinds = {isinstance(r["prompt"], str) for r in rows}
    if len(kinds) > 1:
        raise ProgadvDataError("prompts mix strings and chat messages; use one kind, like the training data",
                               source=name, field="prompt")
    return [dict(r) for r in rows]


def check_trainer(trainer) -> None:
    """Raise unless ``trainer`` can complete held-out prompts itself: a GRPO/RLOO trainer without ``rollout_func`` or
    ``environment_factory`` (their episodes need the user's loop: pass ``sampler=`` to the callback)."""
    name = type(trainer).__name__
    if not (callable(getattr(trainer, "_generate", None)) and callable(getattr(trainer, "_calculate_rewards", None))
            and hasattr(trainer, "reward_funcs")):
        raise ValueError(f"heldout_prompts needs a trainer that generates and rewards completions (GRPOTrainer, "
                         f"RLOOTrainer); {name} does not: pass fixed labelled rollouts (heldout=) or sampler=")
    for attr, what in (("rollout_func", "rollout_func"), ("environment_factories", "environment_factory")):
        if getattr(trainer, attr, None) is not None:
            raise ValueError(f"heldout_prompts cannot run {name}'s {what} episodes: pass sampler= to the callback "
                             "(your environment loop returning trajectories)")


@torch.no_grad()
def sample_rollouts(trainer, rows: Sequence[dict[str, Any]], n: int, *, seed: int = 0,
                    tag: str = "heldout") -> list[Trajectory]:
    """``n`` completions per row by ``trainer`` (GRPO/RLOO), rewarded by its reward functions.

    Every process must call this with the same ``rows``. Returns ``len(rows) * n`` trajectories in row order, ids
    ``<tag>-<row>-<k>``, group ``<tag>-<row>``, on every process.
    """
    from accelerate.utils import gather_object

    check_trainer(trainer)
    rank, world = trainer.accelerator.process_index, trainer.accelerator.num_processes
    shard, _ = split_evenly(range(len(rows)), rank, world)  # row indices; every rank the same number
    inputs = [dict(rows[i]) for i in shard for _ in range(n)]  # each prompt n times in a row, as GRPO's sampler does
    prompts = [x["prompt"] for x in inputs]
    device = trainer.accelerator.device
    with _training_state_kept(trainer, n, len(inputs)), \
            torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed + rank)  # the same draws at every evaluation; the training's RNG stream is untouched
        out = trainer._generate(prompts)
        if len(out) == 3:  # RLOO: prompt_ids, completion_ids, completions
            completion_ids, completions, extra = out[1], out[2], {}
        else:  # GRPO: prompt_ids, completion_ids, tool_mask, completions, logprobs, extra_fields, images, tool_images
            completion_ids, completions, extra = out[1], out[3], out[5]
        for i, x in enumerate(inputs):  # extra fields of the generation reach the reward functions, as in GRPO
            for key, values in extra.items():
                x[key] = values[i] if isinstance(values, list) else values
        per_func = trainer._calculate_rewards(inputs, prompts, completions, completion_ids)  # all ranks', rank-major
    weights = trainer.reward_weights.to(per_func.device, per_func.dtype)
    rewards = (per_func * weights).nansum(dim=1)
    rewards[torch.isnan(per_func).all(dim=1)] = torch.nan  # no function scored it: unlabelled, as GRPO logs it
    rewards = rewards.view(world, len(shard), n).tolist()
    completions = gather_object([list(completions)])  # one list per rank
    groups = merge_in_order([
        [list(zip(completions[r][j * n:(j + 1) * n], rewards[r][j])) for j in range(len(range(r, len(rows), world)))]
        for r in range(world)])  # each rank's own prompts (padding dropped), back in input order
    trajectories: list[Trajectory] = []
    for i, (row, group) in enumerate(zip(rows, groups)):
        ctx = Context(SOURCE, i)
        prompt = row["prompt"]
        context = [Message("user", prompt)] if isinstance(prompt, str) else parse_messages(prompt, ctx, "prompt")
        for k, (completion, reward) in enumerate(group):
            reply = ([Message("assistant", completion)] if isinstance(completion, str)
                     else parse_messages(completion, ctx, f"completion[{k}]"))
            trajectories.append(Trajectory(context + reply, id=f"{tag}-{i}-{k}", group=f"{tag}-{i}",
                                           reward=None if math.isnan(reward) else reward))
    return trajectories


@contextlib.contextmanager
def _training_state_kept(trainer, n: int, batch: int):
    """What the trainer's ``_generate`` / ``_calculate_rewards`` touch, put back afterwards.

    They log into ``trainer._metrics[mode]`` (completion lengths, ``num_tokens``), reward functions may log through
    ``log_extra`` / ``log_metric`` into ``_pending_extra_logs`` / ``_pending_metrics``, and in train mode
    ``_generate`` adds to ``state.num_input_tokens_seen``: all restored, so the training logs stay the training's.
    The model runs in eval mode (``mode == "eval"``) with ``num_generations_eval = n``, the group size the vLLM backend
    reads. Tool trainers keep per-batch tool tables (``_sync_tool_dicts``); ours are built for this batch from the
    trainer's standalone tools, as GRPO builds them, and the training's put back. A vLLM weight sync triggered here is
    kept: it loads the current weights, which the next training generation would load anyway.
    """
    model = trainer.model
    was_training = model.training
    metrics = {mode: {k: list(v) for k, v in store.items()} for mode, store in getattr(trainer, "_metrics", {}).items()}
    pending = {name: {k: list(v) for k, v in getattr(trainer, name).items()}
               for name in ("_pending_extra_logs", "_pending_metrics")
               if isinstance(getattr(trainer, name, None), dict)}
    tokens_seen = trainer.state.num_input_tokens_seen
    missing = object()
    kept = {name: getattr(trainer, name, missing) for name in ("num_generations_eval", "_sync_tool_dicts",
                                                               "_async_tool_dicts")}
    model.eval()
    trainer.num_generations_eval = n
    if getattr(trainer, "tools", None):
        tools = list(getattr(trainer, "_standalone_tools", None) or [])
        trainer._sync_tool_dicts = [{t.__name__: t for t in tools if not inspect.iscoroutinefunction(t)}
                                    for _ in range(batch)]
        trainer._async_tool_dicts = [{t.__name__: t for t in tools if inspect.iscoroutinefunction(t)}
                                     for _ in range(batch)]
    try:
        yield
    finally:
        model.train(was_training)
        for mode, saved in metrics.items():
            trainer._metrics[mode].clear()
            trainer._metrics[mode].update(saved)
        for name, saved in pending.items():
            getattr(trainer, name).clear()
            getattr(trainer, name).update(saved)
        trainer.state.num_input_tokens_seen = tokens_seen
        for name, value in kept.items():
            if value is missing:
                if hasattr(trainer, name):
                    delattr(trainer, name)
            else:
                setattr(trainer, name, value)
