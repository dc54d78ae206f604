"""Sources read through the ``datasets`` library: a folder written by ``Dataset.save_to_disk`` (or
``DatasetDict.save_to_disk``), a folder of ``.parquet`` files or one ``.parquet`` file (streamed, read in place), and a
Hugging Face Hub dataset id ``owner/name`` (``datasets.load_dataset``, which reads its local cache offline with
``HF_HUB_OFFLINE=1``). ``<source>:<split>`` picks a split; a source with one split needs none. The rows are then read
like a ``datasets.Dataset`` (see :mod:`.objects`). Details: ``docs/formats.md``.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from ..data import ProgadvDataError

_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*")
_SPLIT = re.compile(r"\w[\w.-]*")
_FILE_SUFFIXES = (".jsonl", ".json", ".parquet", ".csv", ".txt", ".arrow")


def is_saved_dataset(path: Path) -> bool:
    """Whether ``path`` is a folder written by ``save_to_disk`` (a Dataset or a DatasetDict)."""
    return (path / "dataset_dict.json").is_file() or ((path / "state.json").is_file()
                                                       and (path / "dataset_info.json").is_file())


def is_dataset_dir(path: Path) -> bool:
    """Whether the folder ``path`` holds a saved dataset or ``.parquet`` files (at any depth)."""
    return path.is_dir() and (is_saved_dataset(path) or next(path.rglob("*.parquet"), None) is not None)


def _is_hub_id(text: str) -> bool:
    return bool(_HUB_ID.fullmatch(text)) and not text.lower().endswith(_FILE_SUFFIXES)


def dataset_source(text: str) -> tuple[str, str | None] | None:
    """``(location, split)`` when ``text`` names a dataset folder, a ``.parquet`` file or a Hub id (not an existing
    path), optionally followed by ``:<split>``; ``None`` otherwise."""
    def names(location: str) -> bool:
        p = Path(location)
        if p.exists():
            return is_dataset_dir(p) or (p.is_file() and p.suffix.lower() == ".parquet")
        return _is_hub_id(location)

    if Path(text).exists():
        return (text, None) if names(text) else None
    if names(text):
        return text, None
    base, sep, split = text.rpartition(":")
    if sep and base and _SPLIT.fullmatch(split) and names(base):
        return base, split
    return None


def load_dataset_source(location: str, split: str | None, src: str) -> Any:
    """The ``datasets.Dataset`` (or ``IterableDataset``) at ``location``: one split of it when it has several."""
    try:
        import datasets
    except ImportError:
        raise ProgadvDataError("reading a dataset folder, a parquet file or a Hub dataset needs the datasets "
                               "package: pip install datasets", source=src) from None
    path = Path(location)
    try:
        if path.is_dir() and is_saved_dataset(path):
            data = datasets.load_from_disk(location)
        elif path.is_file():
            data = datasets.load_dataset("parquet", data_files={"train": location}, streaming=True)
        elif path.is_dir():
            data = datasets.load_dataset(location, streaming=True)
        else:
            data = datasets.load_dataset(location)
    except Exception as e:  # not found, offline without a cache, bad files: the library's own words
        what = ("cannot load the dataset" if path.exists()
                else "no such file or directory, and no Hugging Face Hub dataset of that name could be loaded")
        raise ProgadvDataError(f"{what}: {type(e).__name__}: {e}", source=src) from None
    if isinstance(data, (datasets.DatasetDict, datasets.IterableDatasetDict)):
        splits = list(data)
        if split is None and len(splits) == 1:
            split = splits[0]
        if split is None:
            raise ProgadvDataError(f"the dataset has splits {splits}; name one as '{location}:<split>'", source=src)
        if split not in data:
            raise ProgadvDataError(f"no split {split!r}; the dataset has {splits}", source=src)
        return data[split]
    if split is not None:
        raise ProgadvDataError(f"the dataset has no splits, so ':{split}' names none", source=src)
    return data
