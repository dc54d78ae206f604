"""In-memory sources (format ``dataset``): a ``datasets.Dataset`` / ``IterableDataset`` or a list of dicts whose rows
are our JSONL records, TRL rows or TRL stepwise rows (detected from the first row), or a list of
:class:`~progadv_trl.data.Trajectory` (checked and returned). Records are named by their 0-based row index, plus the
row's id when it has one. Details: ``docs/formats.md``.
"""

from __future__ import annotations

import itertools
import sys
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

from ..data import ProgadvDataError, Trajectory
from .records import ROW_KINDS_TEXT, MISSING, Context, nameable, object_context, row_kind, type_name, unknown_format
from .stepwise import read_rows


def hf_dataset_kind(obj: Any) -> str | None:
    """``"dict"`` for a (Iterable)DatasetDict, ``"dataset"`` for a (Iterable)Dataset, else None."""
    ds = sys.modules.get("datasets")  # an object can only be a Dataset if `datasets` was imported
    if ds is None:
        return None
    if isinstance(obj, (getattr(ds, "DatasetDict", ()), getattr(ds, "IterableDatasetDict", ()))):
        return "dict"
    if isinstance(obj, (getattr(ds, "Dataset", ()), getattr(ds, "IterableDataset", ()))):
        return "dataset"
    return None


def _row_context(src: str, i: int, row: Any) -> Context:
    ctx = Context(src, i)
    if isinstance(row, Mapping) and nameable(row.get("id")):
        ctx.rec = f"{i} (id {row['id']!r})"
    return ctx


def iter_rows(rows: Iterable, src: str, fmt: str) -> Iterator[tuple[Trajectory, Context]]:
    """The rows of a Dataset or list (named ``src``) as trajectories, in format ``fmt`` (``"auto"``: detected)."""
    it = iter(rows)
    first = next(it, MISSING)
    if first is MISSING:
        return
    if isinstance(first, Trajectory):
        if fmt not in ("auto", "dataset"):
            raise ProgadvDataError(f"a list of Trajectory objects has no format {fmt!r}; use format='auto'",
                                   source=src)
        yield from _iter_objects(itertools.chain([first], it), src)
        return
    kind = row_kind(first) if fmt in ("auto", "dataset") else fmt
    if kind is None:
        what = (f"first row has none of {ROW_KINDS_TEXT} (keys: {sorted(first)!r:.120})"
                if isinstance(first, Mapping) else f"rows must be dicts or Trajectory objects, got {type_name(first)}")
        raise unknown_format(src, 0, what)
    if kind not in ("jsonl", "trl", "stepwise"):
        raise ProgadvDataError(f"format {kind!r} reads from a file path, not from rows", source=src)
    rows = ((_row_context(src, i, row), row) for i, row in enumerate(itertools.chain([first], it)))
    yield from read_rows(kind, rows)


def _iter_objects(items: Iterable, src: str) -> Iterator[tuple[Trajectory, Context]]:
    for i, t in enumerate(items):
        yield t, object_context(t, src, i)
