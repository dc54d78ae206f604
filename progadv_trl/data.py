"""The one data model every loader returns: a trajectory is a list of chat messages plus labels.

A *step* is one action of the policy: by default every ``assistant`` message. System, developer, user and tool
messages are context: they condition the policy but are never scored. A loader may name the steps explicitly
(``Trajectory.action_indices``), as the Who&When loader does for its multi-agent logs.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

ROLES = ("system", "developer", "user", "assistant", "tool")
ACTION_ROLE = "assistant"
#: Deepest nesting of lists and objects accepted in metadata and tool-call arguments: JSON written back out (``rank``
#: copies each chosen trajectory) and chat templates recurse once per level, and Python's stack holds ~1000 levels.
MAX_NESTING = 100
_SURROGATE = re.compile("[\ud800-\udfff]")


def json_ready(x: Any) -> Any:
    """``x`` with NaN and infinities replaced by ``None`` (strict JSON), through dicts, lists and tuples."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: json_ready(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [json_ready(v) for v in x]
    return x


class ProgadvDataError(ValueError):
    """Bad input data. The message names the source (file), the record (line or id) and the field."""

    def __init__(self, message: str, *, source: str | None = None, record: str | int | None = None,
                 field: str | None = None):
        self.source, self.record, self.field, self.reason = source, record, field, message
        where = []
        if source is not None:
            where.append(str(source))
        if record is not None:
            where.append(f"record {record}")
        if field is not None:
            where.append(f"field '{field}'")
        super().__init__(f"{': '.join([', '.join(where), message]) if where else message}")


@dataclass(frozen=True)
class ToolCall:
    """One tool call of an assistant message: ``name`` and ``arguments`` (a dict, or a string as the model wrote it)."""

    name: str
    arguments: dict[str, Any] | str = field(default_factory=dict)
    id: str | None = None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name, "arguments": self.arguments}
        if self.id is not None:
            out["id"] = self.id
        return out


@dataclass(frozen=True)
class Message:
    """One chat message. ``name`` is the speaking agent in multi-agent logs."""

    role: str
    content: str
    tool_calls: tuple[ToolCall, ...] = ()
    name: str | None = None

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"role": self.role, "content": self.content}
        if self.tool_calls:
            out["tool_calls"] = [c.to_dict() for c in self.tool_calls]
        if self.name is not None:
            out["name"] = self.name
        return out

    def to_chat(self) -> dict[str, Any]:
        """The message as a chat template expects it (OpenAI-style ``tool_calls``)."""
        out: dict[str, Any] = {"role": self.role, "content": self.content}
        if self.tool_calls:
            out["tool_calls"] = [
                {"type": "function", **({"id": c.id} if c.id else {}),
                 "function": {"name": c.name, "arguments": c.arguments}}
                for c in self.tool_calls
            ]
        if self.name is not None:
            out["name"] = self.name
        return out


@dataclass
class Trajectory:
    """An agent trajectory.

    Args:
        messages: the conversation, in order.
        id: a unique identifier (loading fills ``"<index>"`` when the source has none).
        group: trajectories with the same group answer the same task (best-of-N picks one per group).
        reward: the outcome; success is ``reward >= success_threshold`` (1.0 by default).
        mistake_step: 0-based index into ``messages`` of the decisive error, when labelled.
        metadata: anything else the source carried.
        action_indices: the message indices that are steps; ``None`` means every assistant message.
    """

    messages: list[Message]
    id: str | None = None
    group: str | None = None
    reward: float | None = None
    mistake_step: int | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    action_indices: tuple[int, ...] | None = None
    #: Where the trajectory was read (set on loading): the source (file path, ``<list>``, ...) and the record
    #: (``"3 (line 5)"``, a row index, ...). Not data: not compared, not written by :meth:`to_dict`.
    source: str | None = field(default=None, compare=False, repr=False)
    source_record: str | int | None = field(default=None, compare=False, repr=False)

    @property
    def steps(self) -> tuple[int, ...]:
        """Message indices of the policy's actions, in order."""
        if self.action_indices is not None:
            return tuple(self.action_indices)
        return tuple(i for i, m in enumerate(self.messages) if m.role == ACTION_ROLE)

    def success(self, threshold: float = 1.0) -> bool | None:
        return None if self.reward is None else bool(self.reward >= threshold)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"id": self.id, "messages": [m.to_dict() for m in self.messages]}
        for key in ("group", "reward", "mistake_step"):
            if getattr(self, key) is not None:
                out[key] = getattr(self, key)
        if self.action_indices is not None:
            out["action_indices"] = list(self.action_indices)
        if self.metadata:
            out["metadata"] = self.metadata
        return out

    def error(self, message: str, field: str | None = None) -> ProgadvDataError:
        """A :class:`ProgadvDataError` about this trajectory, naming where it was read (file and line, when a loader
        read it; else its id) and ``field``: for the errors found after loading (rendering, chat templates)."""
        if self.source is not None:
            return ProgadvDataError(message, source=self.source,
                                    record=self.source_record if self.source_record is not None else self.id,
                                    field=field)
        return ProgadvDataError(message, record=self.id, field=field)

    def validate(self, source: str | None = None, record: str | int | None = None) -> "Trajectory":
        """Check the invariants every consumer relies on; raise :class:`ProgadvDataError` naming the field.

        Besides roles, steps and labels: every string (content, names, ids, tool calls, metadata keys and values) must
        be valid Unicode text (no lone surrogate such as JSON's ``"\\ud800"``, which no tokenizer or UTF-8 output
        takes), and metadata and tool-call arguments may nest at most :data:`MAX_NESTING` levels."""
        source = source if source is not None else self.source
        rec = record if record is not None else (self.source_record if self.source_record is not None else self.id)

        def fail(msg: str, fld: str) -> None:
            raise ProgadvDataError(msg, source=source, record=rec, field=fld)

        if not self.messages:
            fail("a trajectory needs at least one message", "messages")
        for i, m in enumerate(self.messages):
            if m.role not in ROLES:
                fail(f"unknown role {m.role!r} (expected one of {', '.join(ROLES)})", f"messages[{i}].role")
            if not isinstance(m.content, str):
                fail(f"content must be a string, got {type(m.content).__name__}", f"messages[{i}].content")
        steps = self.steps
        if not steps:
            fail("no action to score: a trajectory needs at least one assistant message", "messages")
        if any(not (0 <= s < len(self.messages)) for s in steps):
            fail(f"action index out of range 0..{len(self.messages) - 1}", "action_indices")
        if self.reward is not None and not _finite(self.reward):
            fail(f"reward must be a finite number, got {_short(self.reward)}", "reward")
        if self.mistake_step is not None and self.mistake_step not in steps:
            fail(f"mistake_step {self.mistake_step} is not the index of an action message (actions: {list(steps)})",
                 "mistake_step")
        for value, fld in ((self.id, "id"), (self.group, "group")):
            _check_tree(value, fld, fail)
        for i, m in enumerate(self.messages):
            _check_tree(m.role, f"messages[{i}].role", fail)
            _check_tree(m.content, f"messages[{i}].content", fail)
            _check_tree(m.name, f"messages[{i}].name", fail)
            for j, c in enumerate(m.tool_calls):
                for key in ("name", "arguments", "id"):
                    _check_tree(getattr(c, key), f"messages[{i}].tool_calls[{j}].{key}", fail)
        _check_tree(self.metadata, "metadata", fail)
        return self


def _finite(x: Any) -> bool:
    try:
        return math.isfinite(x)
    except OverflowError:  # an int too large for a float (a 400-digit reward)
        return False


def _short(x: Any) -> str:
    if isinstance(x, int) and not isinstance(x, bool) and x.bit_length() > 200:
        return f"an integer of {x.bit_length()} bits"
    text = repr(x)
    return text if len(text) <= 60 else text[:60] + "..."


def _check_tree(value: Any, path: str, fail) -> None:
    """Every string in ``value`` (dict keys included) valid Unicode text, and at most MAX_NESTING levels of lists and
    dicts; iterative, so a hostile depth cannot exhaust the stack. ``fail(message, field)`` raises."""
    stack = [(value, path, 0)]
    while stack:
        v, where, depth = stack.pop()
        if isinstance(v, str):
            bad = _SURROGATE.search(v)
            if bad:
                fail(f"not valid Unicode text: a lone surrogate {ascii(bad.group())} at character {bad.start()}",
                     where)
        elif isinstance(v, (Mapping, list, tuple)):
            if depth >= MAX_NESTING:
                fail(f"nested more than {MAX_NESTING} levels deep", where if len(where) <= 60 else where[:60] + "...")
            if isinstance(v, Mapping):
                for k, item in v.items():
                    if isinstance(k, str) and _SURROGATE.search(k):
                        fail(f"not valid Unicode text: a key holds a lone surrogate ({ascii(k)[:60]})", where)
                    stack.append((item, f"{where}.{k}" if isinstance(k, str) else f"{where}[{k!r}]", depth + 1))
            else:
                stack.extend((item, f"{where}[{n}]", depth + 1) for n, item in enumerate(v))
