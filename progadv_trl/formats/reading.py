"""Reading JSON from files: one record per line (``.jsonl``, streamed) or a whole ``.json`` file. Text is strict
UTF-8 (a byte-order mark at the start is ignored), and every error names the file and the line (see
``docs/formats.md``).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ..data import ProgadvDataError
from .records import Context


def _loads(text: str, src: str, record: Any, whole_file: bool) -> Any:
    """``json.loads(text)``; a malformed or unreadable document is a ProgadvDataError with its position."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        where = f"line {e.lineno}, column {e.colno}" if whole_file else f"column {e.colno}"
        raise ProgadvDataError(f"malformed JSON: {e.msg} at {where}", source=src, record=record) from None
    except RecursionError:
        raise ProgadvDataError("malformed JSON: nested too deeply", source=src, record=record) from None
    except ValueError as e:  # e.g. an integer of more than 4300 digits
        raise ProgadvDataError(f"unreadable JSON: {str(e).split(';')[0]}", source=src, record=record) from None


def iter_json_lines(path: Path, src: str) -> Iterator[tuple[Context, Any]]:
    """(ctx, parsed object) per non-blank line; strict UTF-8 per line so errors carry their line number."""
    try:
        fh = open(path, "rb")
    except OSError as e:
        raise ProgadvDataError(f"cannot open: {e.strerror or e}", source=src) from None
    with fh:
        n = 0
        for lineno, raw in enumerate(fh, 1):
            ctx = Context(src, f"{n + 1} (line {lineno})")
            try:
                text = raw.decode("utf-8-sig" if lineno == 1 else "utf-8", errors="strict")
            except UnicodeDecodeError as e:
                raise ProgadvDataError(f"line is not valid UTF-8 ({e.reason} at byte {e.start} of the line)",
                                       source=src, record=ctx.rec) from None
            if not text.strip():
                continue
            n += 1
            yield ctx, _loads(text, src, ctx.rec, whole_file=False)


def read_json_file(path: Path, src: str, record: Any = None) -> Any:
    """The parsed contents of the JSON file ``path`` (``src`` and ``record`` name it in errors)."""
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
    return _loads(text, src, record, whole_file=True)
