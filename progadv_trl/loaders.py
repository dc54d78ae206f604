"""Load agent trajectories from files, ``datasets.Dataset`` objects and lists into :class:`~progadv_trl.data.Trajectory`.

Public API::

    load_trajectories(source, format="auto", *, success_threshold=None, limit=None) -> list[Trajectory]
    iter_trajectories(source, format="auto", *, success_threshold=None, limit=None) -> Iterator[Trajectory]
    save_trajectories(path, trajectories) -> None
    whowhen_agent(message) -> str
    FORMATS = ("jsonl", "trl", "tau2", "whowhen", "dataset")

``source`` is a path (``str`` / ``Path``) to a file or directory, a ``datasets.Dataset`` (or ``IterableDataset``),
a list of dicts, or a list of :class:`Trajectory` (returned validated). Every returned trajectory has passed
:meth:`Trajectory.validate`; a trajectory without an ``id`` gets its 0-based position in the source as a string, and
ids must be unique within one source. Every error is a :class:`ProgadvDataError` whose message names the source
(the file path, ``<list>`` or ``<Dataset>``), the record and, where there is one, the field. Records are named:

* JSONL files: ``record N (line L)``, N the 1-based record number (blank lines are skipped and not counted), L the
  1-based line number in the file;
* lists and datasets: the 0-based row index, plus the row's id when it has one;
* tau2 files: the 0-based index in ``simulations``, plus the simulation id;
* Who&When logs: the trajectory id ``"<subset>/<file stem>"`` (the source is the log's path).

``success_threshold`` is accepted for symmetry with the rest of the library; loading does not use it.

Formats
-------
``jsonl`` (ours, also what :func:`save_trajectories` writes): one JSON object per line::

    {"id": "a1", "group": "task-7", "reward": 1.0, "mistake_step": 3, "metadata": {...}, "action_indices": [1, 3],
     "messages": [{"role": "user", "content": "..."},
                  {"role": "assistant", "content": null, "tool_calls": [{"name": "f", "arguments": {"x": 1}, "id": "c1"}],
                   "name": "agent-A"}]}

Only ``messages`` is required. Roles: system, developer, user, assistant, tool. ``tool_calls`` entries are
``{"name", "arguments", "id"?}`` or OpenAI's ``{"type": "function", "id"?, "function": {"name", "arguments"}}``;
``arguments`` is kept as given (a dict, or the JSON string the model wrote; missing/null gives ``{}``). ``content``
may be missing or null only on a message that has tool calls (it becomes ``""``). ``reward`` is a finite number, a
bool (stored as 1.0/0.0) or null; ``mistake_step`` an int, a string of ASCII digits, or null, and must be the index
of an action; ``action_indices`` a strictly increasing list of ints. ``id`` and ``group`` are strings (ints are
converted). Unknown top-level keys are moved into ``metadata`` (a key present in both is an error). Lines are read as
bytes and decoded as strict UTF-8 one at a time (so huge files stream and a bad byte is reported with its line); a
UTF-8 byte-order mark at the start of the file is ignored. JSON's ``NaN``/``Infinity`` parse, but are rejected as a
reward; so is an integer too large for a float. Every string must be valid Unicode text (a lone surrogate escape such
as ``"\\ud800"`` is an error naming its field), and metadata and tool-call arguments may nest at most 100 levels
(:data:`~progadv_trl.data.MAX_NESTING`). Errors found after loading (a chat template that fails on a record, an
action the template does not render) name the file and record too: each trajectory keeps where it was read
(``Trajectory.source`` / ``source_record``).

``trl``: rows of a TRL dataset. Standard prompt/completion ``{"prompt": str, "completion": str}`` becomes
``[user: prompt, assistant: completion]``; conversational prompt/completion (both lists of messages) becomes the prompt
messages followed by the completion messages. A row that has ``messages`` instead (TRL's conversational language
modeling type) is read as ``jsonl``. Optional columns: ``reward`` (else ``rewards``, else ``score``: the first of these
present is the reward, the others go to metadata), ``id``, ``group``, and the other ``jsonl`` fields. When a row has
no ``group`` (missing or null), rows with the same prompt share a group, named by the 0-based position of the row where
that prompt first occurred (e.g. ``"0"``): the grouping best-of-N over GRPO completions needs. Unknown columns go to
metadata. Works from a ``.jsonl`` file, a ``datasets.Dataset`` or a list of dicts.

``tau2``: a tau2-bench results JSON file ``{"simulations": [{"id", "task_id", "messages": [...], "reward_info":
{"reward", ...}, ...}], ...}``. Messages are read as in ``jsonl`` (tool results are ``role: "tool"`` messages:
context, not steps; tau2's extra message fields such as ``turn_idx`` are ignored). id = simulation id, group =
``task_id``, reward = ``reward_info.reward`` (no or null ``reward_info`` gives reward None). Every other simulation
field (``trial``, ``termination_reason``, ``reward_info`` itself, ...) is kept in metadata; the file's top-level
fields other than ``simulations`` are not.

``whowhen``: the Who&When failure-attribution benchmark (folders ``Hand-Crafted/`` and ``Algorithm-Generated/`` of
``N.json`` logs). The source is the top directory (both subsets, Hand-Crafted first), one subset directory, or one
log file; files load in numeric order of their stem (1, 2, ..., 10). The subset is the name of the log's folder; when
that folder is neither subset name, a log whose ``history[0].role`` is ``"human"`` is Hand-Crafted, any other is
Algorithm-Generated. Each log has ``history`` (a list of ``{content, role}`` or ``{content, name, role}``) and
``mistake_step``, a 0-based index into ``history`` stored as a string. Mapping:

* Hand-Crafted (``history_offset`` 0): ``history[0]`` is the human's question and becomes
  ``Message(role="user", content=...)``, context. Every later entry becomes ``Message(role="assistant",
  content=..., name=<its original role string, e.g. "Orchestrator (thought)" or "WebSurfer">)``.
* Algorithm-Generated (``history_offset`` 1): the question is not in ``history``; ``Message(role="user",
  content=question)`` is prepended and every history entry becomes ``Message(role="assistant", content=...,
  name=<its "name" field, else its role>)``, so message index = history index + 1.
* Steps (``action_indices``): every message after the question whose content is non-empty after ``strip()``
  (the benchmark scores every non-empty message after the question).
* ``mistake_step`` = ``int(log["mistake_step"]) + history_offset``; a label that points at the question or at an
  empty message is an error (no log of the released benchmark does).
* id = ``"<subset>/<stem>"`` (e.g. ``"Hand-Crafted/12"``), group = None, reward = 0.0 (every log is a failure).
* metadata: ``mistake_agent``, ``mistake_step_raw`` (the original string), ``question``, ``ground_truth``,
  ``subset``, ``history_offset``, ``mistake_reason``, ``history_roles`` (each entry's original role, which
  ``rendering="plain"`` uses as the tag, as the paper code does), plus every other top-level field of the log except
  ``history`` (``question_ID``, ``level``, ``is_correct`` / ``is_corrected``, ``system_prompt``, ...).

:func:`whowhen_agent` gives the agent that spoke a message: the part of its name before ``" ("`` for Hand-Crafted
names such as ``"Orchestrator (-> WebSurfer)"``, else the name as is. The benchmark's ``mistake_agent`` does not
always equal ``whowhen_agent(messages[mistake_step])`` (3 of 58 Hand-Crafted and 3 of 126 Algorithm-Generated logs
differ); the loader keeps both and does not check.

``dataset``: a ``datasets.Dataset`` / ``IterableDataset`` or a list of dicts whose rows are ``jsonl`` records
(``messages``) or ``trl`` rows (``prompt`` + ``completion``), detected from the first row. Arrow stores a list of
structs with the union of their keys, so rows from a Dataset may carry null-filled keys (e.g. ``"name": None`` on
messages, or null entries inside dict tool arguments); nulls are read as absent where the field is optional.

``format="auto"``: a directory is ``whowhen`` (if it has a ``Hand-Crafted`` / ``Algorithm-Generated`` subfolder or
``N.json`` logs with ``history``); a ``.json`` file is ``tau2`` when it has ``simulations`` and ``whowhen`` (one log)
when it has ``history``; a ``.jsonl`` file is ``jsonl`` when its first non-blank record has ``messages`` and ``trl``
when it has ``prompt`` and ``completion``; a Dataset or list is detected from its first row (a list of
:class:`Trajectory` is returned validated).
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import math
import numbers
import os
import sys
import tempfile
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

from .data import ROLES, Message, ProgadvDataError, ToolCall, Trajectory

__all__ = ["FORMATS", "load_trajectories", "iter_trajectories", "save_trajectories", "whowhen_agent",
           "WHOWHEN_SUBSETS"]

FORMATS = ("jsonl", "trl", "tau2", "whowhen", "dataset")
WHOWHEN_SUBSETS = ("Hand-Crafted", "Algorithm-Generated")

_MISSING = object()
_OURS_KEYS = ("id", "group", "reward", "mistake_step", "metadata", "action_indices")
_TRL_REWARD_KEYS = ("reward", "rewards", "score")


# ----------------------------------------------------------------------------------------------------------- helpers


def _tname(value: Any) -> str:
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


class _Ctx:
    """Where we are: the source name and the record label, for error messages."""

    __slots__ = ("src", "rec")

    def __init__(self, src: str, rec: str | int | None):
        self.src, self.rec = src, rec

    def fail(self, message: str, field: str | None = None):
        raise ProgadvDataError(message, source=self.src, record=self.rec, field=field)


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _nameable(value: Any) -> bool:
    """Whether a record's raw id can name it in messages (a string, or an int short enough to print)."""
    return isinstance(value, str) or (isinstance(value, int) and not isinstance(value, bool)
                                      and value.bit_length() <= 200)


def _parse_str_id(value: Any, ctx: _Ctx, field: str) -> str | None:
    if value is None:
        return None
    if isinstance(value, str):
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        if value.bit_length() > 200:  # str() of a 5000-digit int raises; no id is that long
            ctx.fail(f"an integer id of {value.bit_length()} bits is too long; use a string", field)
        return str(value)
    ctx.fail(f"must be a string (or an int), got {_tname(value)}", field)


def _parse_reward(value: Any, ctx: _Ctx, field: str = "reward") -> float | None:
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
    ctx.fail(f"reward must be a finite number, a bool or null, got {_tname(value)} {value!r:.60}", field)


def _parse_index(value: Any, ctx: _Ctx, field: str) -> int | None:
    """An int, or a string of ASCII digits (Who&When stores indices as strings), or None."""
    if value is None:
        return None
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str) and value.isascii() and value.isdigit():
        if len(value) > 18:  # int() refuses > 4300 digits; no message index has 19
            ctx.fail(f"index out of range: a {len(value)}-digit number", field)
        return int(value)
    ctx.fail(f"must be an int (or a string of digits), got {_tname(value)} {value!r:.60}", field)


def _parse_tool_call(call: Any, ctx: _Ctx, field: str) -> ToolCall:
    if not isinstance(call, Mapping):
        ctx.fail(f"a tool call must be an object, got {_tname(call)}", field)
    fn = call.get("function")
    if fn is not None:  # OpenAI form {"type": "function", "id"?, "function": {"name", "arguments"}}
        if not isinstance(fn, Mapping):
            ctx.fail(f"must be an object with name and arguments, got {_tname(fn)}", f"{field}.function")
        name, args, base = fn.get("name"), fn.get("arguments"), f"{field}.function"
    else:
        name, args, base = call.get("name"), call.get("arguments"), field
    if name is None:
        ctx.fail("missing tool name", f"{base}.name")
    if not isinstance(name, str) or not name:
        ctx.fail(f"tool name must be a non-empty string, got {_tname(name)} {name!r:.60}", f"{base}.name")
    if args is None:
        args = {}
    elif isinstance(args, Mapping):
        args = dict(args)
    elif not isinstance(args, str):
        ctx.fail(f"arguments must be an object or a JSON string, got {_tname(args)}", f"{base}.arguments")
    call_id = call.get("id")
    if call_id is not None and not isinstance(call_id, str):
        ctx.fail(f"tool call id must be a string, got {_tname(call_id)}", f"{field}.id")
    return ToolCall(name=name, arguments=args, id=call_id)


def _parse_message(m: Any, ctx: _Ctx, field: str) -> Message:
    if not isinstance(m, Mapping):
        ctx.fail(f"a message must be an object, got {_tname(m)}", field)
    role = m.get("role")
    if role is None:
        ctx.fail("missing role", f"{field}.role")
    if not isinstance(role, str):
        ctx.fail(f"role must be a string, got {_tname(role)}", f"{field}.role")
    if role not in ROLES:
        ctx.fail(f"unknown role {role!r} (expected one of {', '.join(ROLES)})", f"{field}.role")
    raw_calls = m.get("tool_calls")
    calls: tuple[ToolCall, ...] = ()
    if raw_calls is not None:
        if not isinstance(raw_calls, (list, tuple)):
            ctx.fail(f"tool_calls must be a list, got {_tname(raw_calls)}", f"{field}.tool_calls")
        calls = tuple(_parse_tool_call(c, ctx, f"{field}.tool_calls[{j}]") for j, c in enumerate(raw_calls))
    content = m.get("content", _MISSING)
    if content is _MISSING or content is None:
        if not calls:
            what = "missing content" if content is _MISSING else "content is null"
            ctx.fail(f"{what} (allowed only on a message with tool_calls)", f"{field}.content")
        content = ""
    elif not isinstance(content, str):
        ctx.fail(f"content must be a string, got {_tname(content)}", f"{field}.content")
    name = m.get("name")
    if name is not None and not isinstance(name, str):
        ctx.fail(f"name must be a string, got {_tname(name)}", f"{field}.name")
    return Message(role=role, content=content, tool_calls=calls, name=name)


def _parse_messages(value: Any, ctx: _Ctx, field: str) -> list[Message]:
    if value is _MISSING:
        ctx.fail("missing messages", field)
    if not isinstance(value, (list, tuple)):
        ctx.fail(f"messages must be a list of message objects, got {_tname(value)}", field)
    return [_parse_message(m, ctx, f"{field}[{i}]") for i, m in enumerate(value)]


def _build(obj: Mapping, messages: list[Message], ctx: _Ctx, consumed: Iterable[str],
           reward_key: str | None = "reward", group: str | None = None) -> Trajectory:
    """The fields every dict record shares: id, group, reward, mistake_step, metadata, action_indices, extras."""
    tid = _parse_str_id(obj.get("id"), ctx, "id")
    grp = _parse_str_id(obj.get("group"), ctx, "group")
    if grp is None:
        grp = group
    reward = _parse_reward(obj.get(reward_key), ctx, reward_key) if reward_key else None
    mistake = _parse_index(obj.get("mistake_step"), ctx, "mistake_step")
    if mistake is not None and not 0 <= mistake < len(messages):
        ctx.fail(f"mistake_step {mistake} is out of range 0..{len(messages) - 1}", "mistake_step")
    actions = obj.get("action_indices")
    if actions is not None:
        if not isinstance(actions, (list, tuple)) or not all(
                isinstance(a, int) and not isinstance(a, bool) for a in actions):
            ctx.fail(f"action_indices must be a list of ints, got {_tname(actions)} {actions!r:.60}",
                     "action_indices")
        if any(b <= a for a, b in zip(actions, actions[1:])):
            ctx.fail(f"action_indices must be strictly increasing, got {list(actions)!r:.80}", "action_indices")
        actions = tuple(actions)
    meta = obj.get("metadata")
    if meta is None:
        meta = {}
    elif not isinstance(meta, Mapping):
        ctx.fail(f"metadata must be an object, got {_tname(meta)}", "metadata")
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


def _from_ours(obj: Any, ctx: _Ctx) -> Trajectory:
    if not isinstance(obj, Mapping):
        ctx.fail(f"a record must be a JSON object, got {_tname(obj)}")
    messages = _parse_messages(obj.get("messages", _MISSING), ctx, "messages")
    return _build(obj, messages, ctx, ("messages",))


class _PromptGroups:
    """Rows without a group share one per distinct prompt: the position of the prompt's first row."""

    def __init__(self):
        self._first: dict[bytes, str] = {}

    def group(self, prompt: Any, position: int) -> str:
        text = prompt if isinstance(prompt, str) else "\0" + json.dumps(prompt, sort_keys=True, default=str)
        key = hashlib.sha1(text.encode("utf-8", "surrogatepass")).digest()
        return self._first.setdefault(key, str(position))


def _from_trl(obj: Any, ctx: _Ctx, groups: _PromptGroups, position: int) -> Trajectory:
    if not isinstance(obj, Mapping):
        ctx.fail(f"a record must be a JSON object, got {_tname(obj)}")
    if "prompt" not in obj and "messages" in obj:  # conversational language modeling: our own format
        return _from_ours(obj, ctx)
    prompt, completion = obj.get("prompt", _MISSING), obj.get("completion", _MISSING)
    for key, value in (("prompt", prompt), ("completion", completion)):
        if value is _MISSING or value is None:
            ctx.fail(f"missing {key} (a TRL prompt/completion row needs both)", key)
    if isinstance(prompt, str):
        if not isinstance(completion, str):
            ctx.fail(f"prompt is a string, so completion must be a string too, got {_tname(completion)}",
                     "completion")
        messages = [Message(role="user", content=prompt), Message(role="assistant", content=completion)]
    elif isinstance(prompt, (list, tuple)):
        if not isinstance(completion, (list, tuple)):
            ctx.fail(f"prompt is a list of messages, so completion must be one too, got {_tname(completion)}",
                     "completion")
        messages = _parse_messages(prompt, ctx, "prompt") + _parse_messages(completion, ctx, "completion")
    else:
        ctx.fail(f"prompt must be a string or a list of messages, got {_tname(prompt)}", "prompt")
    reward_key = next((k for k in _TRL_REWARD_KEYS if k in obj), None)
    group = groups.group(prompt, position)  # registered even when the row names its group
    if obj.get("group") is not None:
        group = None
    return _build(obj, messages, ctx, ("prompt", "completion"), reward_key=reward_key, group=group)


def _row_kind(row: Any) -> str | None:
    if isinstance(row, Mapping):
        if "messages" in row:
            return "jsonl"
        if "prompt" in row and "completion" in row:
            return "trl"
    return None


def _unknown_format(src: str, rec: Any, what: str) -> ProgadvDataError:
    return ProgadvDataError(f"cannot tell the format: {what}; known formats: {', '.join(FORMATS)} "
                            f"(pass format=...)", source=src, record=rec)


# ------------------------------------------------------------------------------------------------------ file reading


def _iter_json_lines(path: Path, src: str) -> Iterator[tuple[_Ctx, Any]]:
    """(ctx, parsed object) per non-blank line; strict UTF-8 per line so errors carry their line number."""
    try:
        fh = open(path, "rb")
    except OSError as e:
        raise ProgadvDataError(f"cannot open: {e.strerror or e}", source=src) from None
    with fh:
        n = 0
        for lineno, raw in enumerate(fh, 1):
            ctx = _Ctx(src, f"{n + 1} (line {lineno})")
            try:
                text = raw.decode("utf-8-sig" if lineno == 1 else "utf-8", errors="strict")
            except UnicodeDecodeError as e:
                raise ProgadvDataError(f"line is not valid UTF-8 ({e.reason} at byte {e.start} of the line)",
                                       source=src, record=ctx.rec) from None
            if not text.strip():
                continue
            n += 1
            try:
                obj = json.loads(text)
            except json.JSONDecodeError as e:
                raise ProgadvDataError(f"malformed JSON: {e.msg} at column {e.colno}", source=src,
                                       record=ctx.rec) from None
            except RecursionError:
                raise ProgadvDataError("malformed JSON: nested too deeply", source=src, record=ctx.rec) from None
            except ValueError as e:  # e.g. an integer of more than 4300 digits
                raise ProgadvDataError(f"unreadable JSON: {str(e).split(';')[0]}", source=src,
                                       record=ctx.rec) from None
            yield ctx, obj


def _read_json_file(path: Path, src: str, record: Any = None) -> Any:
    try:
        data = path.read_bytes()
    except OSError as e:
        raise ProgadvDataError(f"cannot read: {e.strerror or e}", source=src, record=record) from None
    try:
        text = data.decode("utf-8-sig", errors="strict")
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b"\n") + 1
        raise ProgadvDataError(f"not valid UTF-8 ({e.reason} at line {line}, byte offset {e.start})", source=src,
                               record=record) from None
    if not text.strip():
        raise ProgadvDataError("empty file (no trajectories)", source=src, record=record)
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise ProgadvDataError(f"malformed JSON: {e.msg} at line {e.lineno}, column {e.colno}", source=src,
                               record=record) from None
    except RecursionError:
        raise ProgadvDataError("malformed JSON: nested too deeply", source=src, record=record) from None
    except ValueError as e:  # e.g. an integer of more than 4300 digits
        raise ProgadvDataError(f"unreadable JSON: {str(e).split(';')[0]}", source=src, record=record) from None


def _iter_jsonl_file(path: Path, src: str, fmt: str) -> Iterator[tuple[Trajectory, _Ctx]]:
    records = _iter_json_lines(path, src)
    first = next(records, None)
    if first is None:
        return
    if fmt == "auto":
        fmt = _row_kind(first[1])
        if fmt is None:
            keys = sorted(first[1]) if isinstance(first[1], Mapping) else _tname(first[1])
            raise _unknown_format(src, first[0].rec, f"first record has neither 'messages' nor 'prompt' and "
                                                     f"'completion' (keys: {keys!r:.120})")
    groups = _PromptGroups()
    for pos, (ctx, obj) in enumerate(itertools.chain([first], records)):
        traj = _from_trl(obj, ctx, groups, pos) if fmt == "trl" else _from_ours(obj, ctx)
        yield traj, ctx


# -------------------------------------------------------------------------------------------------------- tau2


def _iter_tau2(path: Path, src: str, data: Any = _MISSING) -> Iterator[tuple[Trajectory, _Ctx]]:
    if data is _MISSING:
        data = _read_json_file(path, src)
    top = _Ctx(src, None)
    if not isinstance(data, Mapping):
        top.fail(f"a tau2 results file must be a JSON object with 'simulations', got {_tname(data)}")
    sims = data.get("simulations", _MISSING)
    if sims is _MISSING:
        top.fail("missing simulations", "simulations")
    if not isinstance(sims, list):
        top.fail(f"simulations must be a list, got {_tname(sims)}", "simulations")
    for i, sim in enumerate(sims):
        ctx = _Ctx(src, i)
        if not isinstance(sim, Mapping):
            ctx.fail(f"a simulation must be an object, got {_tname(sim)}", f"simulations[{i}]")
        if _nameable(sim.get("id")):
            ctx.rec = f"{i} (id {sim['id']!r})"
        messages = _parse_messages(sim.get("messages", _MISSING), ctx, "messages")
        reward_info = sim.get("reward_info")
        if reward_info is None:
            reward = None
        elif isinstance(reward_info, Mapping):
            reward = _parse_reward(reward_info.get("reward"), ctx, "reward_info.reward")
        else:
            ctx.fail(f"reward_info must be an object, got {_tname(reward_info)}", "reward_info")
        traj = Trajectory(messages=messages, id=_parse_str_id(sim.get("id"), ctx, "id"),
                          group=_parse_str_id(sim.get("task_id"), ctx, "task_id"), reward=reward,
                          metadata={k: v for k, v in sim.items() if k not in ("id", "task_id", "messages")})
        yield traj, ctx


# ----------------------------------------------------------------------------------------------------- Who&When


def whowhen_agent(message: Message) -> str:
    """The agent that spoke ``message`` in a Who&When log: ``"Orchestrator"`` for ``"Orchestrator (thought)"`` or
    ``"Orchestrator (-> WebSurfer)"``; otherwise the message's name as is (its role when it has no name)."""
    name = message.name if message.name is not None else message.role
    return name.split(" (", 1)[0]


def _numeric_order(p: Path) -> tuple:
    return (0, int(p.stem), p.name) if p.stem.isascii() and p.stem.isdigit() else (1, 0, p.name)


def _whowhen_files(root: Path) -> list[tuple[Path, str | None]]:
    subsets = [root / s for s in WHOWHEN_SUBSETS if (root / s).is_dir()]
    dirs = subsets or [root]
    out = []
    for d in dirs:
        subset = d.name if d.name in WHOWHEN_SUBSETS else None
        out.extend((f, subset) for f in sorted(d.glob("*.json"), key=_numeric_order) if f.is_file())
    return out


def _is_whowhen_dir(root: Path) -> bool:
    if any((root / s).is_dir() for s in WHOWHEN_SUBSETS):
        return True
    files = [f for f in sorted(root.glob("*.json"), key=_numeric_order) if f.stem.isdigit()]
    if not files:
        return False
    try:
        data = json.loads(files[0].read_bytes().decode("utf-8-sig"))
    except (OSError, ValueError, RecursionError):
        return False
    return isinstance(data, Mapping) and "history" in data


def _whowhen_log(path: Path, src: str, subset: str | None, data: Any = _MISSING) -> tuple[Trajectory, _Ctx]:
    hint = subset or path.parent.name
    ctx = _Ctx(src, f"{hint}/{path.stem}" if hint in WHOWHEN_SUBSETS else path.stem)
    if data is _MISSING:
        data = _read_json_file(path, src, record=ctx.rec)
    if not isinstance(data, Mapping):
        ctx.fail(f"a Who&When log must be a JSON object, got {_tname(data)}")
    history = data.get("history", _MISSING)
    if history is _MISSING:
        ctx.fail("missing history", "history")
    if not isinstance(history, list) or not history:
        ctx.fail(f"history must be a non-empty list, got {_tname(history)}", "history")
    for i, h in enumerate(history):
        if not isinstance(h, Mapping):
            ctx.fail(f"a history entry must be an object, got {_tname(h)}", f"history[{i}]")
        for key in ("content", "role"):
            if not isinstance(h.get(key), str):
                ctx.fail(f"missing or not a string ({_tname(h.get(key))})", f"history[{i}].{key}")
        if h.get("name") is not None and not isinstance(h["name"], str):
            ctx.fail(f"name must be a string, got {_tname(h['name'])}", f"history[{i}].name")
    if subset is None:
        subset = path.parent.name if path.parent.name in WHOWHEN_SUBSETS else (
            "Hand-Crafted" if history[0]["role"] == "human" else "Algorithm-Generated")
    ctx.rec = f"{subset}/{path.stem}"
    question = data.get("question")
    if subset == "Hand-Crafted":
        offset = 0
        messages = [Message(role="user", content=history[0]["content"])]
        messages += [Message(role="assistant", content=h["content"], name=h["role"]) for h in history[1:]]
    else:
        offset = 1
        if not isinstance(question, str):
            ctx.fail(f"an Algorithm-Generated log needs the question as a string, got {_tname(question)}",
                     "question")
        messages = [Message(role="user", content=question)]
        messages += [Message(role="assistant", content=h["content"],
                             name=h["name"] if h.get("name") is not None else h["role"]) for h in history]
    steps = tuple(i for i in range(1, len(messages)) if messages[i].content.strip())
    raw = data.get("mistake_step")
    mistake = _parse_index(raw, ctx, "mistake_step")
    if mistake is not None:
        if mistake >= len(history):
            ctx.fail(f"mistake_step {raw!r} is out of range: history has {len(history)} entries", "mistake_step")
        mistake += offset
        if mistake not in steps:
            what = "the question" if mistake == 0 else "an empty message"
            ctx.fail(f"mistake_step {raw!r} (message {mistake}) points at {what}, which is not a scored step",
                     "mistake_step")
    meta: dict[str, Any] = {
        "mistake_agent": data.get("mistake_agent"), "mistake_step_raw": raw, "question": question,
        "ground_truth": data.get("ground_truth"), "subset": subset, "history_offset": offset,
        "mistake_reason": data.get("mistake_reason"), "history_roles": [h["role"] for h in history],
    }
    for key, value in data.items():
        if key not in meta and key not in ("history", "mistake_step"):
            meta[key] = value
    traj = Trajectory(messages=messages, id=f"{subset}/{path.stem}", group=None, reward=0.0, mistake_step=mistake,
                      metadata=meta, action_indices=steps)
    return traj, ctx


def _iter_whowhen(path: Path, src: str, data: Any = _MISSING) -> Iterator[tuple[Trajectory, _Ctx]]:
    if path.is_dir():
        files = _whowhen_files(path)
        if not files:
            raise ProgadvDataError("no Who&When logs (N.json) found", source=src)
        for f, subset in files:
            yield _whowhen_log(f, str(f), subset)
    else:
        yield _whowhen_log(path, src, None, data)


# ------------------------------------------------------------------------------------------------------ dispatch


def _hf_dataset_kind(obj: Any) -> str | None:
    ds = sys.modules.get("datasets")  # an object can only be a Dataset if `datasets` was imported
    if ds is None:
        return None
    if isinstance(obj, (getattr(ds, "DatasetDict", ()), getattr(ds, "IterableDatasetDict", ()))):
        return "dict"
    if isinstance(obj, (getattr(ds, "Dataset", ()), getattr(ds, "IterableDataset", ()))):
        return "dataset"
    return None


def _iter_rows(rows: Iterable, src: str, fmt: str) -> Iterator[tuple[Trajectory, _Ctx]]:
    it = iter(rows)
    first = next(it, _MISSING)
    if first is _MISSING:
        return
    if isinstance(first, Trajectory):
        if fmt not in ("auto", "dataset"):
            raise ProgadvDataError(f"a list of Trajectory objects has no format {fmt!r}; use format='auto'",
                                   source=src)
        yield from _iter_objects(itertools.chain([first], it), src)
        return
    kind = _row_kind(first) if fmt in ("auto", "dataset") else fmt
    if kind is None:
        what = (f"first row has neither 'messages' nor 'prompt' and 'completion' (keys: {sorted(first)!r:.120})"
                if isinstance(first, Mapping) else f"rows must be dicts or Trajectory objects, got {_tname(first)}")
        raise _unknown_format(src, 0, what)
    if kind not in ("jsonl", "trl"):
        raise ProgadvDataError(f"format {kind!r} reads from a file path, not from rows", source=src)
    groups = _PromptGroups()
    for i, row in enumerate(itertools.chain([first], it)):
        ctx = _Ctx(src, i)
        if isinstance(row, Mapping) and _nameable(row.get("id")):
            ctx.rec = f"{i} (id {row['id']!r})"
        yield (_from_trl(row, ctx, groups, i) if kind == "trl" else _from_ours(row, ctx)), ctx


def _check_trajectory(t: Any, ctx: _Ctx) -> None:
    """Type checks a hand-built Trajectory needs before ``validate`` can run on it."""
    if not isinstance(t, Trajectory):
        ctx.fail(f"expected a Trajectory, got {type(t).__name__}")
    if not isinstance(t.messages, (list, tuple)):
        ctx.fail(f"messages must be a list, got {_tname(t.messages)}", "messages")
    for i, m in enumerate(t.messages):
        if not isinstance(m, Message):
            ctx.fail(f"expected a Message, got {type(m).__name__}", f"messages[{i}]")
    for key in ("id", "group"):
        if getattr(t, key) is not None and not isinstance(getattr(t, key), str):
            ctx.fail(f"must be a string or None, got {_tname(getattr(t, key))}", key)
    if t.reward is not None and not isinstance(t.reward, numbers.Real):
        ctx.fail(f"reward must be a number or None, got {_tname(t.reward)}", "reward")
    if t.mistake_step is not None and (isinstance(t.mistake_step, bool) or not isinstance(t.mistake_step, int)):
        ctx.fail(f"mistake_step must be an int or None, got {_tname(t.mistake_step)}", "mistake_step")
    if t.action_indices is not None and not all(
            isinstance(a, int) and not isinstance(a, bool) for a in t.action_indices):
        ctx.fail("action_indices must be ints", "action_indices")
    if not isinstance(t.metadata, Mapping):
        ctx.fail(f"metadata must be a dict, got {_tname(t.metadata)}", "metadata")


def _iter_objects(items: Iterable, src: str) -> Iterator[tuple[Trajectory, _Ctx]]:
    for i, t in enumerate(items):
        ctx = _Ctx(src, i)
        _check_trajectory(t, ctx)
        if t.id is not None:
            ctx.rec = f"{i} (id {t.id!r})"
        yield t, ctx


def _iter_path(path: Path, fmt: str) -> Iterator[tuple[Trajectory, _Ctx]]:
    src = str(path)
    if not path.exists():
        raise ProgadvDataError("no such file or directory", source=src)
    if fmt == "dataset":
        raise ProgadvDataError("format 'dataset' takes a datasets.Dataset or a list of dicts, not a path; for a "
                               ".jsonl file use 'jsonl' or 'trl'", source=src)
    if path.is_dir():
        if fmt == "auto":
            if not _is_whowhen_dir(path):
                raise _unknown_format(src, None, "a directory is read as Who&When logs, but this one has no "
                                                 "Hand-Crafted/Algorithm-Generated folder and no N.json logs")
            fmt = "whowhen"
        if fmt != "whowhen":
            raise ProgadvDataError(f"format {fmt!r} needs a file, got a directory", source=src)
        yield from _iter_whowhen(path, src)
        return
    suffix = path.suffix.lower()
    if fmt == "auto":
        if suffix == ".jsonl":
            fmt = "auto-jsonl"
        elif suffix == ".json":
            data = _read_json_file(path, src)
            if isinstance(data, Mapping) and "simulations" in data:
                yield from _iter_tau2(path, src, data)
            elif isinstance(data, Mapping) and "history" in data:
                yield from _iter_whowhen(path, src, data)
            else:
                keys = sorted(data)[:12] if isinstance(data, Mapping) else _tname(data)
                raise _unknown_format(src, None, f"a .json file needs 'simulations' (tau2) or 'history' "
                                                 f"(Who&When), got {keys!r:.120}")
            return
        else:
            raise _unknown_format(src, None, f"unknown file extension {suffix or '(none)'!r}; expected .jsonl or "
                                             f".json")
    if fmt in ("jsonl", "trl", "auto-jsonl"):
        yield from _iter_jsonl_file(path, src, "auto" if fmt == "auto-jsonl" else fmt)
    elif fmt == "tau2":
        yield from _iter_tau2(path, src)
    else:  # whowhen
        yield from _iter_whowhen(path, src)


def _iter_source(source: Any, fmt: str) -> tuple[str, Iterator[tuple[Trajectory, _Ctx]]]:
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        return str(path), _iter_path(path, fmt)
    kind = _hf_dataset_kind(source)
    if kind == "dict":
        raise ProgadvDataError(f"got a DatasetDict with splits {list(source)}; pass one split, e.g. "
                               f"dataset['train']", source="<DatasetDict>")
    if kind == "dataset":
        return "<Dataset>", _iter_rows(source, "<Dataset>", fmt)
    if isinstance(source, (list, tuple)):
        return "<list>", _iter_rows(source, "<list>", fmt)
    raise ProgadvDataError(f"unsupported source type {type(source).__name__}: pass a path, a datasets.Dataset, a "
                           f"list of dicts or a list of Trajectory")


def _generate(source: Any, fmt: str, limit: int | None) -> Iterator[Trajectory]:
    src, items = _iter_source(source, fmt)
    if limit == 0:
        return
    seen: dict[str, Any] = {}
    count = 0
    for traj, ctx in items:
        if traj.id is None:
            traj = dataclasses.replace(traj, id=str(count))
        traj.validate(source=ctx.src, record=ctx.rec)
        # remembered, so that errors found later (rendering, chat templates) name the file and line too
        traj = dataclasses.replace(traj, source=ctx.src, source_record=ctx.rec)
        if traj.id in seen:
            raise ProgadvDataError(f"duplicate id {traj.id!r} (first used by record {seen[traj.id]})",
                                   source=ctx.src, record=ctx.rec, field="id")
        seen[traj.id] = ctx.rec
        count += 1
        yield traj
        if limit is not None and count >= limit:
            return
    if count == 0:
        raise ProgadvDataError("empty source: no trajectories", source=src)


# ---------------------------------------------------------------------------------------------------------- API


def iter_trajectories(source: Any, format: str = "auto", *, success_threshold: float | None = None,
                      limit: int | None = None) -> Iterator[Trajectory]:
    """Stream validated trajectories from ``source`` (see the module docstring for sources and formats).

    Args:
        source: a path to a file or directory, a ``datasets.Dataset``, a list of dicts or a list of Trajectory.
        format: one of :data:`FORMATS`, or ``"auto"`` to detect it.
        success_threshold: not used by loading (accepted for a uniform signature).
        limit: stop after this many trajectories (``None``: all).

    Raises:
        ProgadvDataError: bad arguments (at once) or bad data (while iterating), naming source, record and field.
    """
    if format not in FORMATS and format != "auto":
        raise ProgadvDataError(f"unknown format {format!r}; expected 'auto' or one of {', '.join(FORMATS)}",
                               field="format")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 0):
        raise ProgadvDataError(f"limit must be a non-negative int or None, got {limit!r}", field="limit")
    if success_threshold is not None and (isinstance(success_threshold, bool)
                                          or not isinstance(success_threshold, numbers.Real)):
        raise ProgadvDataError(f"success_threshold must be a number or None, got {success_threshold!r}",
                               field="success_threshold")
    return _generate(source, format, limit)


def load_trajectories(source: Any, format: str = "auto", *, success_threshold: float | None = None,
                      limit: int | None = None) -> list[Trajectory]:
    """All validated trajectories of ``source`` as a list; ``list(iter_trajectories(...))``."""
    return list(iter_trajectories(source, format, success_threshold=success_threshold, limit=limit))


def save_trajectories(path: str | os.PathLike, trajectories: Iterable[Trajectory]) -> None:
    """Write ``trajectories`` as our JSONL (one :meth:`Trajectory.to_dict` per line, UTF-8).

    Each trajectory is validated and ids must be unique. The file is written atomically: to a temporary file in
    the same directory, then ``os.replace``-d over ``path``; on any error ``path`` is left as it was.
    """
    path = Path(path)
    src = str(path)
    directory = path.parent
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=directory)
    except OSError as e:
        raise ProgadvDataError(f"cannot write in {str(directory)!r}: {e.strerror or e}", source=src) from None
    try:
        with os.fdopen(fd, "w", encoding="utf-8", errors="strict", newline="\n") as fh:
            seen: set[str] = set()
            for i, t in enumerate(trajectories):
                ctx = _Ctx(src, i)
                _check_trajectory(t, ctx)
                if t.id is not None:
                    ctx.rec = f"{i} (id {t.id!r})"
                    if t.id in seen:
                        ctx.fail(f"duplicate id {t.id!r}", "id")
                    seen.add(t.id)
                t.validate(source=src, record=ctx.rec)
                try:
                    line = json.dumps(t.to_dict(), ensure_ascii=False)
                    fh.write(line + "\n")
                except (TypeError, ValueError) as e:
                    ctx.fail(f"cannot be written as JSON: {e}", "metadata")
            fh.flush()
            os.fsync(fh.fileno())
        mask = os.umask(0)
        os.umask(mask)
        os.chmod(tmp, 0o666 & ~mask)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
