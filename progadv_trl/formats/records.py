"""The parts every format shares: where a record is (:class:`Context`, for errors naming source, record and field),
the field parsers (ids, rewards, indices, messages, tool calls) and the common record fields
(:func:`build_trajectory`). The fields are described in ``docs/formats.md``.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable, Mapping
from typing import Any

from ..data import ROLES, Message, ProgadvDataError, ToolCall, Trajectory

FORMATS = ("jsonl", "trl", "stepwise", "tau2", "whowhen", "dataset")

#: A key that is absent (``None`` is a value: JSON's null).
MISSING = object()
_OURS_KEYS = ("id", "group", "reward", "mistake_step", "metadata", "action_indices")


def type_name(value: Any) -> str:
    """The JSON name of ``value``'s type, for error messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, str):
        return "string"
    if isinstance(value, Mapping):
        return "object"
    if isinstance(value, (list, tuple)):
        return "list"
    return type(value).__name__


class Context:
    """Where we are: the source name and the record label, for error messages."""

    __slots__ = ("src", "rec")

    def __init__(self, src: str, rec: str | int | None):
        self.src, self.rec = src, rec

    def fail(self, message: str, field: str | None = None):
        raise ProgadvDataError(message, source=self.src, record=self.rec, field=field)


def nameable(value: Any) -> bool:
    """Whether a record's raw id can name it in messages (a string, or an int short enough to print)."""
    return isinstance(value, str) or (isinstance(value, int) and not isinstance(value, bool)
                                      and value.bit_length() <= 200)


def parse_str_id(value: Any, ctx: Context, field: str) -> str | None:
    if value is None:
        return None
    if isinstance(value, str):
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        if value.bit_length() > 200:  # str() of a 5000-digit int raises; no id is that long
            ctx.fail(f"an integer id of {value.bit_length()} bits is too long; use a string", field)
        return str(value)
    ctx.fail(f"must be a string (or an int), got {type_name(value)}", field)


def parse_reward(value: Any, ctx: Context, field: str = "reward") -> float | None:
    if value is None:
        return None
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, numbers.Real):
        try:
            out = float(value)
        except OverflowError:  # a 400-digit integer
            ctx.fail(f"reward must be a finite number, got an integer of {value.bit_length()} bits", field)
        if not math.isfinite(out):
            ctx.fail(f"reward must be a finite number, got {value!r}", field)
        return out
    ctx.fail(f"reward must be a finite number, a bool or null, got {type_name(value)} {value!r:.60}", field)


def parse_index(value: Any, ctx: Context, field: str) -> int | None:
    """An int, or a string of ASCII digits (Who&When stores indices as strings), or None."""
    if value is None:
        return None
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str) and value.isascii() and value.isdigit():
        if len(value) > 18:  # int() refuses > 4300 digits; no message index has 19
            ctx.fail(f"index out of range: a {len(value)}-digit number", field)
        return int(value)
    ctx.fail(f"must be an int (or a string of digits), got {type_name(value)} {value!r:.60}", field)


def _parse_tool_call(call: Any, ctx: Context, field: str) -> ToolCall:
    if not isinstance(call, Mapping):
        ctx.fail(f"a tool call must be an object, got {type_name(call)}", field)
    fn = call.get("function")
    if fn is not None:  # OpenAI form {"type": "function", "id"?, "function": {"name", "arguments"}}
        if not isinstance(fn, Mapping):
            ctx.fail(f"must be an object with name and arguments, got {type_name(fn)}", f"{field}.function")
        name, args, base = fn.get("name"), fn.get("arguments"), f"{field}.function"
    else:
        name, args, base = call.get("name"), call.get("arguments"), field
    if name is None:
        ctx.fail("missing tool name", f"{base}.name")
    if not isinstance(name, str) or not name:
        ctx.fail(f"tool name must be a non-empty string, got {type_name(name)} {name!r:.60}", f"{base}.name")
    if args is None:
        args = {}
    elif isinstance(args, Mapping):
        args = dict(args)
    elif not isinstance(args, str):
        ctx.fail(f"arguments must be an object or a JSON string, got {type_name(args)}", f"{base}.arguments")
    call_id = call.get("id")
    if call_id is not None and not isinstance(call_id, str):
        ctx.fail(f"tool call id must be a string, got {type_name(call_id)}", f"{field}.id")
    return ToolCall(name=name, arguments=args, id=call_id)


def _parse_message(m: Any, ctx: Context, field: str) -> Message:
    if not isinstance(m, Mapping):
        ctx.fail(f"a message must be an object, got {type_name(m)}", field)
    role = m.get("role")
    if role is None:
        ctx.fail("missing role", f"{field}.role")
    if not isinstance(role, str):
        ctx.fail(f"role must be a string, got {type_name(role)}", f"{field}.role")
    if role not in ROLES:
        ctx.fail(f"unknown role {role!r} (expected one of {', '.join(ROLES)})", f"{field}.role")
    raw_calls = m.get("tool_calls")
    calls: tuple[ToolCall, ...] = ()
    if raw_calls is not None:
        if not isinstance(raw_calls, (list, tuple)):
            ctx.fail(f"tool_calls must be a list, got {type_name(raw_calls)}", f"{field}.tool_calls")
        calls = tuple(_parse_tool_call(c, ctx, f"{field}.tool_calls[{j}]") for j, c in enumerate(raw_calls))
    content = m.get("content", MISSING)
    if content is MISSING or content is None:
        if not calls:
            what = "missing content" if content is MISSING else "content is null"
            ctx.fail(f"{what} (allowed only on a message with tool_calls)", f"{field}.content")
        content = ""
    elif not isinstance(content, str):
        ctx.fail(f"content must be a string, got {type_name(content)}", f"{field}.content")
    name = m.get("name")
    if name is not None and not isinstance(name, str):
        ctx.fail(f"name must be a string, got {type_name(name)}", f"{field}.name")
    return Message(role=role, content=content, tool_calls=calls, name=name)


def parse_messages(value: Any, ctx: Context, field: str) -> list[Message]:
    if value is MISSING:
        ctx.fail("missing messages", field)
    if not isinstance(value, (list, tuple)):
        ctx.fail(f"messages must be a list of message objects, got {type_name(value)}", field)
    return [_parse_message(m, ctx, f"{field}[{i}]") for i, m in enumerate(value)]


def build_trajectory(obj: Mapping, messages: list[Message], ctx: Context, consumed: Iterable[str],
                     reward_key: str | None = "reward", group: str | None = None) -> Trajectory:
    """The fields every dict record shares: id, group, reward, mistake_step, metadata, action_indices, extras."""
    tid = parse_str_id(obj.get("id"), ctx, "id")
    grp = parse_str_id(obj.get("group"), ctx, "group")
    if grp is None:
        grp = group
    reward = parse_reward(obj.get(reward_key), ctx, reward_key) if reward_key else None
    mistake = parse_index(obj.get("mistake_step"), ctx, "mistake_step")
    if mistake is not None and not 0 <= mistake < len(messages):
        ctx.fail(f"mistake_step {mistake} is out of range 0..{len(messages) - 1}", "mistake_step")
    actions = obj.get("action_indices")
    if actions is not None:
        if not isinstance(actions, (list, tuple)) or not all(
                isinstance(a, int) and not isinstance(a, bool) for a in actions):
            ctx.fail(f"action_indices must be a list of ints, got {type_name(actions)} {actions!r:.60}",
                     "action_indices")
        if any(b <= a for a, b in zip(actions, actions[1:])):
            ctx.fail(f"action_indices must be strictly increasing, got {list(actions)!r:.80}", "action_indices")
        actions = tuple(actions)
    meta = obj.get("metadata")
    if meta is None:
        meta = {}
    elif not isinstance(meta, Mapping):
        ctx.fail(f"metadata must be an object, got {type_name(meta)}", "metadata")
    meta = dict(meta)
    known = set(consumed) | set(_OURS_KEYS)
    for key, value in obj.items():
        if key in known or key == reward_key:
            continue
        if key in meta:
            ctx.fail(f"key {key!r} is both a top-level field and a metadata key", str(key))
        meta[key] = value
    return Trajectory(messages=messages, id=tid, group=grp, reward=reward, mistake_step=mistake,
                      metadata=meta, action_indices=actions)


def row_kind(row: Any) -> str | None:
    """``"jsonl"`` for a row with ``messages``, ``"trl"`` for one with ``prompt`` and ``completion``, ``"stepwise"``
    for one with ``prompt``, ``completions`` and ``labels`` (TRL stepwise supervision), else None."""
    if isinstance(row, Mapping):
        if "messages" in row:
            return "jsonl"
        if "prompt" in row and "completion" in row:
            return "trl"
        if "prompt" in row and "completions" in row and "labels" in row:
            return "stepwise"
    return None


#: What ``row_kind`` looks for, for "cannot tell the format" messages.
ROW_KINDS_TEXT = "'messages', 'prompt' and 'completion', or 'prompt', 'completions' and 'labels'"


def unknown_format(src: str, rec: Any, what: str) -> ProgadvDataError:
    return ProgadvDataError(f"cannot tell the format: {what}; known formats: {', '.join(FORMATS)} "
                            f"(pass format=...)", source=src, record=rec)


def check_trajectory(t: Any, ctx: Context) -> None:
    """Type checks a hand-built Trajectory needs before ``validate`` can run on it."""
    if not isinstance(t, Trajectory):
        ctx.fail(f"expected a Trajectory, got {type(t).__name__}")
    if not isinstance(t.messages, (list, tuple)):
        ctx.fail(f"messages must be a list, got {type_name(t.messages)}", "messages")
    for i, m in enumerate(t.messages):
        if not isinstance(m, Message):
            ctx.fail(f"expected a Message, got {type(m).__name__}", f"messages[{i}]")
    for key in ("id", "group"):
        if getattr(t, key) is not None and not isinstance(getattr(t, key), str):
            ctx.fail(f"must be a string or None, got {type_name(getattr(t, key))}", key)
    if t.reward is not None and not isinstance(t.reward, numbers.Real):
        ctx.fail(f"reward must be a number or None, got {type_name(t.reward)}", "reward")
    if t.mistake_step is not None and (isinstance(t.mistake_step, bool) or not isinstance(t.mistake_step, int)):
        ctx.fail(f"mistake_step must be an int or None, got {type_name(t.mistake_step)}", "mistake_step")
    if t.action_indices is not None and not all(
            isinstance(a, int) and not isinstance(a, bool) for a in t.action_indices):
        ctx.fail("action_indices must be ints", "action_indices")
    if not isinstance(t.metadata, Mapping):
        ctx.fail(f"metadata must be a dict, got {type_name(t.metadata)}", "metadata")


def object_context(t: Any, src: str, index: int) -> Context:
    """Where the hand-built trajectory ``t`` is (its index, plus its id when it has one), once its type checks pass."""
    ctx = Context(src, index)
    check_trajectory(t, ctx)
    if t.id is not None:
        ctx.rec = f"{index} (id {t.id!r})"
    return ctx
