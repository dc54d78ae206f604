"""Our JSONL format: one trajectory per line, ``{"messages": [...], "id"?, "group"?, "reward"?, "mistake_step"?,
"metadata"?, "action_indices"?}`` (only ``messages`` is required; unknown keys go to ``metadata``). It is what
:func:`save_trajectories` writes, and TRL's conversational language-modeling rows are read the same way. Fields and
an example: ``docs/formats.md``.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from ..data import ProgadvDataError, Trajectory
from .records import MISSING, Context, build_trajectory, object_context, parse_messages, type_name


def parse_record(obj: Any, ctx: Context) -> Trajectory:
    """One record of our format (a dict with ``messages``) as a Trajectory (not yet validated)."""
    if not isinstance(obj, Mapping):
        ctx.fail(f"a record must be a JSON object, got {type_name(obj)}")
    messages = parse_messages(obj.get("messages", MISSING), ctx, "messages")
    return build_trajectory(obj, messages, ctx, ("messages",))


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
                ctx = object_context(t, src, i)
                if t.id is not None:
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
