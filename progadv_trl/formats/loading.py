"""Loading: which reader a source needs (``format="auto"`` detects it), then validation, default ids, unique ids and
the ``limit``. The sources and the detection rules: ``docs/formats.md``.
"""

from __future__ import annotations

import dataclasses
import itertools
import numbers
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from ..data import ProgadvDataError, Trajectory
from .hf import dataset_source, load_dataset_source
from .objects import hf_dataset_kind, iter_rows
from .reading import iter_json_lines, read_json_file
from .records import FORMATS, ROW_KINDS_TEXT, Context, row_kind, type_name, unknown_format
from .stepwise import read_rows
from .tau2 import iter_tau2
from .who_and_when import is_whowhen_dir, iter_whowhen

#: A ``.json`` file that holds one JSON document per line (what ``Dataset.to_json`` writes).
_LINES = object()


def _iter_jsonl_file(path: Path, src: str, fmt: str) -> Iterator[tuple[Trajectory, Context]]:
    """A ``.jsonl`` file of our records, TRL rows or stepwise rows (``fmt="auto"``: as its first record)."""
    records = iter_json_lines(path, src)
    first = next(records, None)
    if first is None:
        return
    if fmt == "auto":
        fmt = row_kind(first[1])
        if fmt is None:
            keys = sorted(first[1]) if isinstance(first[1], Mapping) else type_name(first[1])
            raise unknown_format(src, first[0].rec, f"first record has none of {ROW_KINDS_TEXT} "
                                                    f"(keys: {keys!r:.120})")
    yield from read_rows(fmt, itertools.chain([first], records))


def _read_json_or_lines(path: Path, src: str) -> Any:
    """The parsed ``.json`` file, or :data:`_LINES` when it holds one JSON document per line."""
    try:
        return read_json_file(path, src)
    except ProgadvDataError as e:
        if e.reason.startswith("malformed JSON: Extra data"):
            return _LINES
        raise


def _iter_path(path: Path, fmt: str, src: str,
               dataset: tuple[str, str | None] | None) -> Iterator[tuple[Trajectory, Context]]:
    if dataset is not None:  # a saved dataset or parquet folder, a parquet file, a Hub id (":split" optional)
        yield from iter_rows(load_dataset_source(*dataset, src), src, fmt)
        return
    if not path.exists():
        raise ProgadvDataError("no such file or directory", source=src)
    if fmt == "dataset":
        raise ProgadvDataError("format 'dataset' takes a datasets.Dataset, a list of dicts, a dataset folder, a "
                               ".parquet file or a Hub dataset id; for a .jsonl file use 'jsonl', 'trl' or "
                               "'stepwise'", source=src)
    if path.is_dir():
        if fmt == "auto":
            if not is_whowhen_dir(path):
                raise unknown_format(src, None, "a directory is read as Who&When logs or as a dataset (saved with "
                                                "save_to_disk, or .parquet files), but this one has no "
                                                "Hand-Crafted/Algorithm-Generated folder, no N.json logs and no "
                                                "dataset")
            fmt = "whowhen"
        if fmt != "whowhen":
            raise ProgadvDataError(f"format {fmt!r} needs a file, got a directory", source=src)
        yield from iter_whowhen(path, src)
        return
    suffix = path.suffix.lower()
    if fmt == "auto":
        if suffix == ".jsonl":
            fmt = "auto-jsonl"
        elif suffix == ".json":
            data = _read_json_or_lines(path, src)
            if data is _LINES:
                fmt = "auto-jsonl"
            elif isinstance(data, Mapping) and "simulations" in data:
                yield from iter_tau2(path, src, data)
            elif isinstance(data, Mapping) and "history" in data:
                yield from iter_whowhen(path, src, data)
            elif isinstance(data, list) or row_kind(data) is not None:  # a list of rows, or one row
                yield from iter_rows(data if isinstance(data, list) else [data], src, "auto")
            else:
                keys = sorted(data)[:12] if isinstance(data, Mapping) else type_name(data)
                raise unknown_format(src, None, f"a .json file needs 'simulations' (tau2) or 'history' "
                                                f"(Who&When), or a list of rows, got {keys!r:.120}")
            if fmt != "auto-jsonl":
                return
        else:
            raise unknown_format(src, None, f"unknown file extension {suffix or '(none)'!r}; expected .jsonl, "
                                            f".json or .parquet")
    if fmt == "stepwise" and suffix == ".json":
        data = _read_json_or_lines(path, src)
        if data is not _LINES:
            if not isinstance(data, (list, Mapping)):
                raise ProgadvDataError(f"a stepwise .json file holds a list of rows (or one row per line), got "
                                       f"{type_name(data)}", source=src)
            yield from iter_rows(data if isinstance(data, list) else [data], src, "stepwise")
            return
    if fmt in ("jsonl", "trl", "stepwise", "auto-jsonl"):
        yield from _iter_jsonl_file(path, src, "auto" if fmt == "auto-jsonl" else fmt)
    elif fmt == "tau2":
        yield from iter_tau2(path, src)
    else:  # whowhen
        yield from iter_whowhen(path, src)


def _iter_source(source: Any, fmt: str) -> tuple[str, Iterator[tuple[Trajectory, Context]]]:
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        dataset = dataset_source(os.fspath(source)) if fmt not in ("tau2", "whowhen") else None
        src = os.fspath(source) if dataset is not None else str(path)
        return src, _iter_path(path, fmt, src, dataset)
    kind = hf_dataset_kind(source)
    if kind == "dict":
        raise ProgadvDataError(f"got a DatasetDict with splits {list(source)}; pass one split, e.g. "
                               f"dataset['train']", source="<DatasetDict>")
    if kind == "dataset":
        return "<Dataset>", iter_rows(source, "<Dataset>", fmt)
    if isinstance(source, (list, tuple)):
        return "<list>", iter_rows(source, "<list>", fmt)
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


def iter_trajectories(source: Any, format: str = "auto", *, success_threshold: float | None = None,
                      limit: int | None = None) -> Iterator[Trajectory]:
    """Stream validated trajectories from ``source`` (sources and formats: ``docs/formats.md``).

    Args:
        source: a path to a file or directory, a ``datasets.Dataset``, a list of dicts, a list of Trajectory, or a
            dataset folder, ``.parquet`` file or Hub dataset id (``"owner/name"``), each optionally ``":<split>"``.
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
