"""Who&When failure-attribution logs (folders ``Hand-Crafted/`` and ``Algorithm-Generated/`` of ``N.json`` files):
each log is one failed trajectory whose messages after the question are its steps, with the benchmark's labelled
``mistake_step`` and ``mistake_agent``. The source is the top folder, one subset folder or one log. The mapping
field by field, with an example: ``docs/formats.md``. :class:`AgentAttribution` gives the agent-level answer of
``progadv attribute``.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

from ..data import Message, ProgadvDataError, Trajectory
from .reading import read_json_file
from .records import MISSING, Context, parse_index, type_name

WHOWHEN_SUBSETS = ("Hand-Crafted", "Algorithm-Generated")


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


def is_whowhen_dir(root: Path) -> bool:
    """Whether ``root`` holds a subset folder, or ``N.json`` logs whose first has ``history``."""
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


def _whowhen_log(path: Path, src: str, subset: str | None, data: Any = MISSING) -> tuple[Trajectory, Context]:
    """One log as a Trajectory; ``subset`` None: from the log's folder name, else from its first entry's role."""
    hint = subset or path.parent.name
    ctx = Context(src, f"{hint}/{path.stem}" if hint in WHOWHEN_SUBSETS else path.stem)
    if data is MISSING:
        data = read_json_file(path, src, record=ctx.rec)
    if not isinstance(data, Mapping):
        ctx.fail(f"a Who&When log must be a JSON object, got {type_name(data)}")
    history = data.get("history", MISSING)
    if history is MISSING:
        ctx.fail("missing history", "history")
    if not isinstance(history, list) or not history:
        ctx.fail(f"history must be a non-empty list, got {type_name(history)}", "history")
    for i, h in enumerate(history):
        if not isinstance(h, Mapping):
            ctx.fail(f"a history entry must be an object, got {type_name(h)}", f"history[{i}]")
        for key in ("content", "role"):
            if not isinstance(h.get(key), str):
                ctx.fail(f"missing or not a string ({type_name(h.get(key))})", f"history[{i}].{key}")
        if h.get("name") is not None and not isinstance(h["name"], str):
            ctx.fail(f"name must be a string, got {type_name(h['name'])}", f"history[{i}].name")
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
            ctx.fail(f"an Algorithm-Generated log needs the question as a string, got {type_name(question)}",
                     "question")
        messages = [Message(role="user", content=question)]
        messages += [Message(role="assistant", content=h["content"],
                             name=h["name"] if h.get("name") is not None else h["role"]) for h in history]
    steps = tuple(i for i in range(1, len(messages)) if messages[i].content.strip())
    raw = data.get("mistake_step")
    mistake = parse_index(raw, ctx, "mistake_step")
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


def iter_whowhen(path: Path, src: str, data: Any = MISSING) -> Iterator[tuple[Trajectory, Context]]:
    """The logs of a Who&When folder, or the one log ``path`` (``data``: its contents, when already read)."""
    if path.is_dir():
        files = _whowhen_files(path)
        if not files:
            raise ProgadvDataError("no Who&When logs (N.json) found", source=src)
        for f, subset in files:
            yield _whowhen_log(f, str(f), subset)
    else:
        yield _whowhen_log(path, src, None, data)


class AgentAttribution:
    """Agent-level attribution over a stream of trajectories: :meth:`remember` notes who spoke each message
    (:func:`whowhen_agent`) as the trajectories stream by; :meth:`predict` names the agent of a predicted mistake
    step and counts it against the log's ``mistake_agent`` (``hits`` of ``labelled``)."""

    def __init__(self):
        self._speakers: dict[str, tuple[list[str], Any]] = {}
        self.hits = self.labelled = 0

    def remember(self, trajectories: Iterable[Trajectory]) -> Iterator[Trajectory]:
        for t in trajectories:
            self._speakers[str(t.id)] = ([whowhen_agent(m) for m in t.messages], t.metadata.get("mistake_agent"))
            yield t

    def predict(self, trajectory_id: Any, step: int) -> tuple[str, Any]:
        """``(agent of message step, mistake_agent or None)`` of a remembered trajectory, which is then forgotten."""
        agents, mistake_agent = self._speakers.pop(str(trajectory_id))
        if mistake_agent is not None:
            self.labelled, self.hits = self.labelled + 1, self.hits + (agents[step] == mistake_agent)
        return agents[step], mistake_agent
