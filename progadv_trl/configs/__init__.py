"""The YAML configs shipped with the package, found by name: ``progadv train --config grpo_tiny``.

Each file's header comment shows the command that uses it. A ``--config`` value that is an existing file is used as
given; a bare name (no folder part, ``.yaml`` optional) that is not a file names one of these.
"""

from __future__ import annotations

import os
from pathlib import Path

DIRECTORY = Path(__file__).resolve().parent


def packaged() -> dict[str, Path]:
    """``{name: path}`` of the packaged configs, the name being the file name without ``.yaml``."""
    return {p.stem: p for p in sorted(DIRECTORY.glob("*.yaml"))}


def resolve(config: str | os.PathLike) -> Path:
    """The file that ``config`` names: itself when it is a file, else the packaged config of that bare name.

    Raises ``FileNotFoundError`` naming what was looked for and the packaged names."""
    text = os.fspath(config)
    path = Path(text)
    if text and path.is_file():
        return path
    bare = text and os.sep not in text and not (os.altsep and os.altsep in text)
    if bare:
        found = packaged().get(path.stem if path.suffix == ".yaml" else text)
        if found is not None:
            return found
    raise FileNotFoundError(f"{text!r}: no such file" + (", and no packaged config of that name" if bare else "")
                            + f" (packaged configs: {', '.join(packaged())})")
