"""The one data model every loader returns: a trajectory is a list of chat messages plus labels.

A *step* is one action of the policy: by default every ``assistant`` message. System, developer, user and tool
messages are context: they condition the policy but are never scored. A loader may name the steps explicitly
(``Trajectory.action_indices``), as the Who&When loader does for its multi-agent logs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

ROLES = ("system", "developer", "user", "assistant", "tool")
ACTION_ROLE = "assistant"


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
        id: a unique identifier (loaders fill ``"<index>"`` when the source has none).
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

    def validate(self, source: str | None = None, record: str | int | None = None) -> "Trajectory":
        """Check the invariants every consumer relies on; raise :class:`ProgadvDataError` naming the field."""
        rec = record if record is not None else self.id

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
        if self.reward is not None and not math.isfinite(self.reward):
            fail(f"reward must be a finite number, got {self.reward!r}", "reward")
        if self.mistake_step is not None and self.mistake_step not in steps:
            fail(f"mistake_step {self.mistake_step} is not the index of an action message (actions: {list(steps)})",
                 "mistake_step")
        return self
