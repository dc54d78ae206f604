"""TRL dataset rows: standard (``{"prompt": str, "completion": str}``) or conversational (both lists of messages)
prompt/completion rows, with an optional ``reward`` (else ``rewards``, else ``score``). Rows without a ``group`` are
grouped by prompt, as best-of-N over GRPO completions needs. Rows with ``messages`` are read as our JSONL. Fields and
examples: ``docs/formats.md``.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

from ..data import Message, Trajectory
from .jsonl import parse_record
from .records import MISSING, Context, build_trajectory, parse_messages, type_name

_TRL_REWARD_KEYS = ("reward", "rewards", "score")


class _PromptGroups:
    """Rows without a group share one per distinct prompt: the position of the prompt's first row."""

    def __init__(self):
        self._first: dict[bytes, str] = {}

    def group(self, prompt: Any, position: int) -> str:
        text = prompt if isinstance(prompt, str) else "\0" + json.dumps(prompt, sort_keys=True, default=str)
        key = hashlib.sha1(text.encode("utf-8", "surrogatepass")).digest()
        return self._first.setdefault(key, str(position))


def _parse_trl_row(obj: Any, ctx: Context, groups: _PromptGroups, position: int) -> Trajectory:
    """One TRL row (``position``: its 0-based index in the source) as a Trajectory (not yet validated)."""
    if not isinstance(obj, Mapping):
        ctx.fail(f"a record must be a JSON object, got {type_name(obj)}")
    if "prompt" not in obj and "messages" in obj:  # conversational language modeling: our own format
        return parse_record(obj, ctx)
    prompt, completion = obj.get("prompt", MISSING), obj.get("completion", MISSING)
    for key, value in (("prompt", prompt), ("completion", completion)):
        if value is MISSING or value is None:
            ctx.fail(f"missing {key} (a TRL prompt/completion row needs both)", key)
    if isinstance(prompt, str):
        if not isinstance(completion, str):
            ctx.fail(f"prompt is a string, so completion must be a string too, got {type_name(completion)}",
                     "completion")
        messages = [Message(role="user", content=prompt), Message(role="assistant", content=completion)]
    elif isinstance(prompt, (list, tuple)):
        if not isinstance(completion, (list, tuple)):
            ctx.fail(f"prompt is a list of messages, so completion must be one too, got {type_name(completion)}",
                     "completion")
        messages = parse_messages(prompt, ctx, "prompt") + parse_messages(completion, ctx, "completion")
    else:
        ctx.fail(f"prompt must be a string or a list of messages, got {type_name(prompt)}", "prompt")
    reward_key = next((k for k in _TRL_REWARD_KEYS if k in obj), None)
    group = groups.group(prompt, position)  # registered even when the row names its group
    if obj.get("group") is not None:
        group = None
    return build_trajectory(obj, messages, ctx, ("prompt", "completion"), reward_key=reward_key, group=group)


def read_records(kind: str, items: Iterable[tuple[Context, Any]]) -> Iterator[tuple[Trajectory, Context]]:
    """Each ``(ctx, row)`` of one source as a ``"trl"`` row or (any other ``kind``) as a record of our format."""
    groups = _PromptGroups()
    for position, (ctx, row) in enumerate(items):
        yield (_parse_trl_row(row, ctx, groups, position) if kind == "trl" else parse_record(row, ctx)), ctx
