"""TRL stepwise supervision rows (process reward model data): ``{"prompt": str or messages, "completions": [str, ...],
"labels": [bool, ...]}``, one label per completion step (``True`` = the step is correct).

A row is one trajectory: the prompt as a ``user`` message (or the prompt's messages), then ONE ``assistant`` message
whose content is the steps joined by :data:`STEP_SEPARATOR`. Scored with that separator as ``step_separator`` (the
loader records it in ``metadata["step_separator"]`` and ``progadv score`` / ``evaluate`` apply it), every completion
element is exactly one scored step: the loader refuses steps that would split or merge (an empty step, a step holding
the separator, a step whose trailing newline runs into it). ``metadata["step_labels"]`` keeps the labels and
``metadata["first_error_step"]`` the index of the first ``False`` (``None`` when all are ``True``); the reward is
1.0 when every step is correct, else 0.0 (a ``reward`` column, when present, is used instead). Rows are grouped by
prompt as TRL rows are. Fields and an example: ``docs/formats.md``.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

from ..data import Message, Trajectory
from ..rendering import _split_parts
from .jsonl import parse_record
from .records import MISSING, Context, build_trajectory, parse_messages, parse_reward, type_name
from .trl import _PromptGroups, read_records

#: What the steps of a row are joined with, and the ``step_separator`` that scores each of them as one step.
STEP_SEPARATOR = "\n\n"
#: The metadata keys the loader fills.
SEPARATOR_KEY, LABELS_KEY, FIRST_ERROR_KEY = "step_separator", "step_labels", "first_error_step"
_COLUMNS = ("prompt", "completions", "labels")


def is_stepwise_row(row: Any) -> bool:
    """Whether ``row`` has TRL's stepwise-supervision columns: ``prompt``, ``completions`` and ``labels``."""
    return isinstance(row, Mapping) and all(k in row for k in _COLUMNS)


def _is_bool(x: Any) -> bool:
    return isinstance(x, bool) or type(x).__name__ == "bool_"  # numpy's bool from Arrow / pandas


def _steps(completions: Any, labels: Any, ctx: Context) -> tuple[list[str], list[bool]]:
    for key, value in (("completions", completions), ("labels", labels)):
        if value is MISSING or value is None:
            ctx.fail(f"missing {key} (a stepwise row needs prompt, completions and labels)", key)
        if isinstance(value, (str, bytes, Mapping)) or not isinstance(value, Iterable):
            ctx.fail(f"{key} must be a list, got {type_name(value)}", key)
    completions, labels = list(completions), list(labels)
    if not completions:
        ctx.fail("completions is empty: a stepwise row needs at least one step", "completions")
    if len(labels) != len(completions):
        ctx.fail(f"labels has {len(labels)} entries but completions has {len(completions)} steps (one label per "
                 f"step)", "labels")
    for i, (step, label) in enumerate(zip(completions, labels)):
        if not isinstance(step, str):
            ctx.fail(f"a step must be a string, got {type_name(step)}", f"completions[{i}]")
        if not step.strip():
            ctx.fail("the step is empty (or only whitespace)", f"completions[{i}]")
        if STEP_SEPARATOR in step:
            ctx.fail(f"the step holds the step separator {STEP_SEPARATOR!r}, so it would be scored as several "
                     f"steps; replace it in the data", f"completions[{i}]")
        if not _is_bool(label):
            ctx.fail(f"a label must be true or false, got {type_name(label)} {label!r:.40}", f"labels[{i}]")
    return completions, [bool(x) for x in labels]


def join_steps(steps: list[str], ctx: Context) -> str:
    """The content of the one assistant message: ``steps`` joined by :data:`STEP_SEPARATOR`, checked to split back
    (as :mod:`~progadv_trl.rendering` cuts a step at its separator) into exactly these steps."""
    content = STEP_SEPARATOR.join(steps)
    expected = list(itertools.accumulate(len(s) + len(STEP_SEPARATOR) for s in steps[:-1]))
    cuts = _split_parts(0, len(content), 0, content, STEP_SEPARATOR)[1:-1]
    if cuts != expected:
        i = next((j for j, (a, b) in enumerate(zip(cuts, expected)) if a != b), min(len(cuts), len(expected)))
        i = min(i, len(steps) - 1)
        ctx.fail(f"the step ends with {steps[i][-3:]!r}, which runs into the step separator {STEP_SEPARATOR!r}: its "
                 f"scored step would not end where it does; strip the trailing newline", f"completions[{i}]")
    return content


def parse_stepwise_row(obj: Any, ctx: Context, groups: _PromptGroups, position: int) -> Trajectory:
    """One stepwise row (``position``: its 0-based index in the source) as a Trajectory (not yet validated)."""
    if not isinstance(obj, Mapping):
        ctx.fail(f"a record must be a JSON object, got {type_name(obj)}")
    for key in ("mistake_step", "action_indices"):
        if obj.get(key) is not None:
            ctx.fail(f"a stepwise row takes its steps and first error from completions and labels; remove {key}", key)
    prompt = obj.get("prompt", MISSING)
    if isinstance(prompt, str):
        messages = [Message(role="user", content=prompt)]
    elif isinstance(prompt, (list, tuple)):
        messages = parse_messages(prompt, ctx, "prompt")
    elif prompt is MISSING or prompt is None:
        ctx.fail("missing prompt (a stepwise row needs prompt, completions and labels)", "prompt")
    else:
        ctx.fail(f"prompt must be a string or a list of messages, got {type_name(prompt)}", "prompt")
    steps, labels = _steps(obj.get("completions", MISSING), obj.get("labels", MISSING), ctx)
    messages.append(Message(role="assistant", content=join_steps(steps, ctx)))
    group = groups.group(prompt, position)
    if obj.get("group") is not None:
        group = None
    traj = build_trajectory(obj, messages, ctx, _COLUMNS, reward_key=None, group=group)
    first_error = next((i for i, ok in enumerate(labels) if not ok), None)
    for key in (SEPARATOR_KEY, LABELS_KEY, FIRST_ERROR_KEY):
        if key in traj.metadata:
            ctx.fail(f"metadata key {key!r} is filled by the stepwise loader", f"metadata.{key}")
    metadata = {**traj.metadata, SEPARATOR_KEY: STEP_SEPARATOR, LABELS_KEY: labels, FIRST_ERROR_KEY: first_error}
    reward = parse_reward(obj.get("reward"), ctx)
    return dataclasses.replace(traj, reward=float(first_error is None) if reward is None else reward,
                               metadata=metadata, action_indices=(len(messages) - 1,))


def read_rows(kind: str, items: Iterable[tuple[Context, Any]]) -> Iterator[tuple[Trajectory, Context]]:
    """Each ``(ctx, row)`` of one source as a ``"stepwise"`` row, a ``"trl"`` row or (any other ``kind``) a record of
    our format."""
    if kind != "stepwise":
        yield from read_records(kind, items)
        return
    groups = _PromptGroups()
    for position, (ctx, row) in enumerate(items):
        if isinstance(row, Mapping) and "messages" in row and "prompt" not in row:
            yield parse_record(row, ctx), ctx
        else:
            yield parse_stepwise_row(row, ctx, groups, position), ctx


def stepwise_separator(traj: Trajectory) -> str | None:
    """The ``step_separator`` a trajectory of this loader must be scored with (one step per completion element), or
    ``None`` for any other trajectory."""
    sep = traj.metadata.get(SEPARATOR_KEY)
    return sep if isinstance(sep, str) and sep and isinstance(traj.metadata.get(LABELS_KEY), list) else None
