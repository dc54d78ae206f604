"""Output files of the ``progadv`` commands: one mechanism, :class:`OutputFile`, keeps inputs and earlier results safe.

Every command that writes a file (``score``, ``rank``, ``attribute``, ``evaluate``) opens it with ``with
OutputFile(...) as out`` before it loads a model or reads its input. Entering checks, writing nothing but the lock:

* the path names a file (not a directory, not ending in ``/``) whose folder exists and is writable;
* it is none of the files the command reads (``--input``, every file of an input folder, ``--config``, the model
  folders), compared by device and inode, so symlinks, hardlinks, ``..`` and other spellings of a path are caught;
  and it does not lie inside an input folder (a later run would read it as input);
* an existing non-empty output is replaced only with ``--overwrite`` and continued only with ``--resume``;
* an exclusive ``fcntl.flock`` on ``.<name>.lock`` beside the output (which records pid, host, command and start
  time, so the refusal says who holds it). The kernel drops the lock when its process dies, even by ``kill -9``: a
  lock file left behind never blocks. The lock file is removed on release; a holder verifies after locking that the
  path still names the inode it locked, so removing it cannot let two runs in;
* with ``--resume``: every line of the existing output is a JSON object with an ``id``, or the command stops
  (exit 1, naming file and line) before changing anything. Only a last line without its newline that does not parse
  (a run killed mid-write) is cut; a complete object whose newline is missing is kept and the newline added; an id
  written twice (e.g. by an older version run twice at once) is kept once, at its first place, since both lines came
  from the same settings (checked below). A pipe, FIFO or device cannot be resumed (reading it would block).

Streamed outputs (``score``, ``attribute``) are opened for writing only at the first result (or at the end when there
is none), after the settings are checked, the first input record has been read and the models have loaded: a typo in
``--input``, a bad ``--limit`` or config never truncates anything, even with ``--overwrite``. Each line is one
``write`` on an ``O_APPEND`` descriptor, and Ctrl-C during that write is held back until the line is complete.
Non-streamed outputs (``rank``, ``evaluate``) are written to a temporary file in the same folder and swapped in with
``os.replace``: the old file stays whole until the new one is complete.

``score`` records its settings in ``<output>.progadv.json`` (written atomically, after the output is truncated and
before the first line, so it never vouches for older content). ``--resume`` compares them and refuses a mismatch
naming the keys: the scoring config except the execution-only fields (:data:`EXECUTION_ONLY`, which change scores by
less than 1e-5), ``--details``, ``--dtype``, ``--format``, the models and the input (``--limit`` may
change: it selects records, not how they are scored). Models are identified by their content
(:func:`model_fingerprint`), not path or mtime, so a moved or copied checkpoint still matches and a checkpoint
retrained in place does not. The input is checked record by record: every ``score`` line carries ``input_sha256``,
the SHA-256 of its trajectory's canonical JSON (:func:`record_sha256`), and ``--resume`` requires the input to begin
with the records already scored, in order, each with the same hash (:meth:`OutputFile.skip_done`); this is checked
before the models load and before anything is written. Another path, a copy, reformatted JSON or records appended
after them still match; a changed, removed or reordered record already scored does not. A record that made the
first run fail (and was never scored) can be fixed and the run resumed. Limits: model weights larger than 16 MiB are
compared by 64 sampled blocks, not every byte; two names of one file (hardlinks) get different locks. The other
commands remove a settings record left at their output path, so ``score --resume`` cannot continue another
command's file.

``score`` launched in several processes (``torchrun``, ``accelerate launch``) writes the same single file: rank 0
alone enters :class:`OutputFile` (checks, lock, settings record, ``--resume`` scan) and writes every line, in input
order; the other processes :meth:`~OutputFile.follow` it, receiving the records already written so that they skip
and check the same ones. The file equals a single process's (scores to 1e-5), so a run may be resumed with another
number of processes.
"""

from __future__ import annotations

import datetime
import glob
import hashlib
import json
import os
import signal
import socket
import stat
import sys
import threading
from pathlib import Path
from typing import Any, Iterable

from .data import ProgadvDataError, json_ready

try:
    import fcntl
except ImportError:  # not POSIX: outputs are not locked
    fcntl = None

SIDECAR_SUFFIX = ".progadv.json"
SIDECAR_VERSION = 1
#: Config fields that change how scores are computed, not what they are (README: batch size and backend change
#: scores by less than 1e-5); ``--resume`` may change them, e.g. a smaller batch after running out of memory.
EXECUTION_ONLY = frozenset({"batch_size", "chunk_size", "backend"})
_FULL_HASH_BYTES = 16 << 20  # model files up to this size are hashed whole, larger ones sampled
_SAMPLES, _SAMPLE_BYTES = 64, 64 << 10


class UsageError(Exception):
    """Bad usage (the CLI exits 2 with the message)."""


class Interrupted(KeyboardInterrupt):
    """Ctrl-C, with a sentence saying what the output holds (the CLI prints it and exits 130)."""


# ---------------------------------------------------------------------------------------------------- fingerprints
def _files(root: Path, hidden: bool = False) -> list[tuple[str, Path]]:
    """(relative name, path) of the regular files under ``root`` (itself when a file), sorted; hidden ones skipped
    unless ``hidden``."""
    if not root.is_dir():
        return [("", root)]
    out = []
    for d, dirs, names in os.walk(root):
        dirs[:] = sorted(x for x in dirs if hidden or not x.startswith("."))
        for name in names:
            p = Path(d) / name
            if (hidden or not name.startswith(".")) and p.is_file():
                out.append((p.relative_to(root).as_posix(), p))
    return sorted(out)


def model_fingerprint(path: str | os.PathLike) -> str:
    """Content identity of a model folder: names, sizes and bytes of its files, the large ones (weights) sampled at
    64 evenly spaced 64 KiB blocks (4 MiB per file, so a 100 GB checkpoint costs milliseconds). A path that does not
    exist (a hub id) is identified by its name."""
    p = Path(path)
    if not p.exists():
        return f"name:{path}"
    h = hashlib.sha256()
    for rel, f in _files(p):
        size = f.stat().st_size
        h.update(f"{rel}\0{size}\0".encode())
        with open(f, "rb") as fh:
            if size <= _FULL_HASH_BYTES:
                for block in iter(lambda: fh.read(1 << 20), b""):
                    h.update(block)
            else:
                for i in range(_SAMPLES):
                    fh.seek(i * (size - _SAMPLE_BYTES) // (_SAMPLES - 1))
                    h.update(fh.read(_SAMPLE_BYTES))
    return "sha256:" + h.hexdigest()


def record_sha256(record: dict[str, Any]) -> str:
    """SHA-256 of a trajectory's canonical JSON (``Trajectory.to_dict()``, sorted keys): its identity on resume."""
    text = json.dumps(json_ready(record), sort_keys=True, ensure_ascii=False, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


def _flat(d: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(d, dict) or not d:
        return {prefix.rstrip("."): d}
    out: dict[str, Any] = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}{k}."))
    return out


def _short(v: Any) -> str:
    s = json.dumps(v)
    return s if len(s) <= 40 else s[:37] + "..."


# ---------------------------------------------------------------------------------------------------- the file
class OutputFile:
    """The output of one command run; see the module docstring.

    Args:
        path: ``--output`` as given.
        command: the command name (recorded in the lock and the settings record).
        inputs: ``(flag, path)`` of everything the command reads; the output must be none of these files (nor any
            file inside a folder among them).
        input_dirs: folders the output must not be inside (the ``--input`` folder).
        overwrite: replace an existing non-empty output.
        resume: continue an existing output (``done_records`` then holds the ids already written).
        atomic: write with :meth:`write_all` (temporary file, then ``os.replace``) instead of :meth:`write_line`.
        record_settings: keep the settings (:meth:`expect`) in ``<output>.progadv.json`` for a later ``--resume``.
    """

    def __init__(self, path: str | os.PathLike, *, command: str, inputs: Iterable[tuple[str, Any]] = (),
                 input_dirs: Iterable[Any] = (), overwrite: bool = False, resume: bool = False,
                 atomic: bool = False, record_settings: bool = False):
        self.given = os.fspath(path)
        self.command, self.overwrite, self.resume = command, overwrite, resume
        self.atomic, self.record_settings = atomic, record_settings
        self.inputs = [(flag, os.fspath(p)) for flag, p in inputs if p is not None]
        self.input_dirs = [os.fspath(p) for p in input_dirs if p is not None]
        self.done_records: list[tuple[str, str | None]] = []  # (id, input_sha256) of the lines kept, in order
        self.record_hashes: dict[str, str] = {}  # id -> input_sha256 of the records read for scoring
        self.written = 0  # lines written by this run
        self.kept = 0  # lines already there (resume), after repair
        self.special = False  # a device, pipe or FIFO: written as is, never locked, truncated or resumed
        self.path = self.given
        self._fd: int | None = None
        self._opened = False  # the output has been opened for writing (truncated, repaired or replaced)
        self._lock_fd: int | None = None
        self._temps: list[str] = []
        self._scan: dict[str, Any] | None = None
        self._recorded: dict[str, Any] | None = None
        self.settings: dict[str, Any] = {}
        self.about: dict[str, Any] = {}
        self._old_sigint: Any = None
        self._in_write = self._sigint_pending = False

    # ------------------------------------------------------------------ names
    @property
    def sidecar(self) -> str:
        return self.path + SIDECAR_SUFFIX

    def _beside(self, suffix: str) -> str:
        d, name = os.path.split(self.path)
        return os.path.join(d, f".{name}{suffix}")

    @property
    def lock_path(self) -> str:
        return self._beside(".lock")

    # ------------------------------------------------------------------ entering: checks before any work
    def __enter__(self) -> "OutputFile":
        try:
            self._check_path()
            if not self.special:
                self._lock()
                for stale in glob.glob(glob.escape(self._beside(".tmp-")) + "*"):  # left by a killed run
                    _unlink(stale)
                self._check_existing()
            if not self.atomic:
                self._defer_sigint()
        except BaseException:
            self._release()
            raise
        return self

    def _check_path(self) -> None:
        g = self.given
        if not g.strip():
            raise UsageError("--output is empty")
        if self.overwrite and self.resume:
            raise UsageError("give either --overwrite (start over) or --resume (continue), not both")
        if g.endswith(("/", os.sep)) or os.path.basename(g) in (".", ".."):
            raise UsageError(f"--output {g}: names a folder; give a file name (e.g. {g.rstrip('/')}/out.jsonl)")
        try:
            st = os.stat(g)
        except FileNotFoundError:
            st = None
        except NotADirectoryError:
            raise UsageError(f"--output {g}: a part of the path above it is a file, not a folder") from None
        except OSError as e:
            raise UsageError(f"--output {g}: {e.strerror or e}") from None
        if st is not None and stat.S_ISDIR(st.st_mode):
            raise UsageError(f"--output {g}: is a folder; give a file name inside it")
        self.special = st is not None and not stat.S_ISREG(st.st_mode)
        if self.special:  # /dev/stdout on a pipe, /dev/null, a FIFO: written as is
            if self.resume:
                raise UsageError(f"--output {g}: --resume needs a regular file, and this is a "
                                 f"{_kind(st.st_mode)} (reading it back would block or read nothing)")
        else:
            self.path = os.path.realpath(g)  # a symlinked output is written (and locked) at its target
            parent = os.path.dirname(self.path)
            if not os.path.isdir(parent):
                raise UsageError(f"--output {g}: the folder {parent} does not exist; create it first")
            if not os.access(parent, os.W_OK | os.X_OK):
                raise UsageError(f"--output {g}: the folder {parent} is not writable")
            if st is not None and not os.access(self.path, os.W_OK):
                raise UsageError(f"--output {g}: the file is not writable")
            longest = max((self.lock_path, self._beside(".tmp-99")) + ((self.sidecar,) if self.record_settings else ()),
                          key=lambda p: len(os.fsencode(os.path.basename(p))))
            try:
                name_max = os.pathconf(parent, "PC_NAME_MAX")
            except (OSError, ValueError):
                name_max = 255
            if len(os.fsencode(os.path.basename(longest))) > name_max:
                raise UsageError(f"--output {g}: the file name is too long for the files kept beside it (such as "
                                 f"{os.path.basename(longest)[:40]}...; at most {name_max} bytes): choose a shorter one")
            for companion in (self.sidecar, self.lock_path):
                if os.path.lexists(companion) and not os.path.isfile(companion):
                    raise UsageError(f"--output {g}: {companion}, which progadv keeps beside it, is not a regular "
                                     f"file; move it away")
        self._check_not_an_input()

    def _check_existing(self) -> None:
        """Under the lock (so that a run in progress is reported as such): keep an existing output unless told."""
        size = os.path.getsize(self.path) if os.path.isfile(self.path) else 0
        if size and self.resume:
            self._scan_existing()
        elif size and not self.overwrite:
            how = "--overwrite to replace it" + (" or --resume to continue it" if self.record_settings else "")
            raise UsageError(f"--output {self.given}: already exists ({size} bytes); pass {how}, or choose another "
                             f"file")

    def _check_not_an_input(self) -> None:
        ours = {}
        for p in (self.path, self.sidecar, self.lock_path):
            try:
                s = os.stat(p)
                ours[(s.st_dev, s.st_ino)] = p
            except OSError:
                pass
        for flag, src in self.inputs:
            root = Path(src)
            if not root.exists():
                continue
            for _, f in _files(root, hidden=True):
                try:
                    s = f.stat()
                except OSError:
                    continue
                hit = ours.get((s.st_dev, s.st_ino))
                if hit is not None:
                    what = "--output" if hit == self.path else f"--output's companion file {hit}"
                    inside = f" (the file {f} inside it)" if root.is_dir() else ""
                    raise UsageError(f"{what} is the same file as {flag} {src}{inside}; refusing to overwrite an "
                                     f"input: choose another --output")
        for src in self.input_dirs:
            if self.special or not os.path.isdir(src):
                continue
            real = os.path.realpath(src)
            if os.path.commonpath([real, self.path]) == real:
                raise UsageError(f"--output {self.given} is inside the --input folder {src}; a later run would read "
                                 f"it as input: choose a file outside it")

    # ------------------------------------------------------------------ the lock
    def _lock(self) -> None:
        if fcntl is None:
            return
        path = self.lock_path
        for _ in range(20):
            try:
                fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            except PermissionError:  # another user's lock file (left behind): locking needs only read access
                try:
                    fd = os.open(path, os.O_RDONLY)
                except OSError as e:
                    raise UsageError(f"--output {self.given}: cannot open its lock file {path}: {e.strerror}") from None
            except OSError as e:
                raise UsageError(f"--output {self.given}: cannot create its lock file {path}: {e.strerror}") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _read_holder(fd)
                os.close(fd)
                raise UsageError(f"--output {self.given}: in use by another progadv run ({holder}); wait for it to "
                                 f"finish or choose another --output (lock: {path})") from None
            try:
                same = os.path.samestat(os.fstat(fd), os.stat(path))
            except FileNotFoundError:
                same = False
            if same:  # the previous holder did not remove the file between our open and our lock
                self._lock_fd = fd
                info = {"pid": os.getpid(), "host": socket.gethostname(), "command": f"progadv {self.command}",
                        "started": _now()}
                try:
                    os.ftruncate(fd, 0)
                    os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)
                except OSError:  # opened read-only: the lock holds, only the holder's description is missing
                    pass
                return
            os.close(fd)
        raise UsageError(f"--output {self.given}: could not take the lock {path}")

    def _release(self) -> None:
        if self._old_sigint is not None:
            signal.signal(signal.SIGINT, self._old_sigint)
            self._old_sigint = None
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        for t in self._temps:
            _unlink(t)
        self._temps.clear()
        if self._lock_fd is not None:
            _unlink(self.lock_path)  # while still holding it; see _lock
            os.close(self._lock_fd)
            self._lock_fd = None

    def __exit__(self, exc_type, exc, tb) -> bool:
        self._release()
        if exc_type is not None and issubclass(exc_type, KeyboardInterrupt) and not isinstance(exc, Interrupted):
            raise Interrupted(self._interrupted_message()) from exc
        return False

    def _interrupted_message(self) -> str:
        if not self._opened:
            return f"interrupted; {self.given} was not changed"
        total = self.kept + self.written
        if self.special:
            return f"interrupted after {self.written} lines to {self.given}"
        if self.record_settings:
            return (f"interrupted; {self.given} holds {total} complete lines ({self.written} written by this run); "
                    f"run the same command with --resume to continue")
        return (f"interrupted; {self.given} holds the {total} complete lines written so far; run the command again "
                f"with --overwrite for all of them")

    # ------------------------------------------------------------------ --resume: what is there
    def _scan_existing(self) -> None:
        """Read the existing output (nothing is changed here): ids in order, and what a repair must do."""
        ids: list[str] = []
        seen: set[str] = set()
        records: list[tuple[int, int]] = []  # byte spans of the lines kept
        hashes: list[str | None] = []
        cut = None
        add_newline = False
        offset = lineno = dups = 0
        with open(self.path, "rb") as f:
            for raw in f:
                lineno += 1
                start, offset = offset, offset + len(raw)
                complete = raw.endswith(b"\n")
                if not raw.strip():
                    if not complete:
                        cut = start
                    continue
                try:
                    obj = json.loads(raw)
                except (ValueError, RecursionError):
                    if not complete:  # the last line, cut by a kill mid-write
                        cut = start
                        break
                    raise ProgadvDataError(
                        f"line {lineno} is not valid JSON; --resume continues a file whose lines are complete "
                        f"results. Nothing was changed: fix or remove that line, or start over with --overwrite",
                        source=self.path) from None
                rid = obj.get("id") if isinstance(obj, dict) else None
                if not isinstance(obj, dict) or isinstance(rid, bool) or not isinstance(rid, (str, int)):
                    what = (f"is a JSON {_json_kind(obj)}, not an object" if not isinstance(obj, dict)
                            else "has no 'id'" if "id" not in obj else f"has an unusable 'id' ({_short(rid)})")
                    raise ProgadvDataError(
                        f"line {lineno} {what}; --resume continues a `progadv {self.command}` output, one result "
                        f"object with an 'id' per line. Nothing was changed: choose another --output, or start "
                        f"over with --overwrite", source=self.path)
                if not complete:
                    add_newline = True
                if str(rid) in seen:
                    dups += 1
                    continue
                seen.add(str(rid))
                ids.append(str(rid))
                hashes.append(obj.get("input_sha256") if isinstance(obj.get("input_sha256"), str) else None)
                records.append((start, offset))
        self.done_records = list(zip(ids, hashes))
        self._scan = {"size": offset, "cut": cut, "newline": add_newline, "dups": dups, "spans": records,
                      "ids": ids}
        if not ids:  # nothing complete: a fresh start (the partial content is cut when writing begins)
            return
        if not os.path.exists(self.sidecar):
            raise UsageError(f"--resume: {self.given} has no settings record ({self.sidecar}), so it cannot be "
                             f"checked that it was written with these settings (was it written by an older progadv, "
                             f"or by another command?). Nothing was changed: start over with --overwrite, or "
                             f"choose another --output")
        try:
            rec = json.loads(Path(self.sidecar).read_text(encoding="utf-8"))
            if not isinstance(rec, dict) or not isinstance(rec.get("settings"), dict):
                raise ValueError("not a settings record")
        except (OSError, ValueError) as e:
            raise UsageError(f"--resume: the settings record {self.sidecar} is unreadable ({e}); nothing was "
                             f"changed: start over with --overwrite, or choose another --output") from None
        if rec.get("command") != self.command:
            raise UsageError(f"--resume: {self.given} was written by `progadv {rec.get('command')}`, not "
                             f"`progadv {self.command}`; nothing was changed")
        self._recorded = rec["settings"]

    # ------------------------------------------------------------------ settings
    def expect(self, section: str, value: dict[str, Any], about: dict[str, Any] | None = None) -> None:
        """Record a settings section; when resuming, refuse (UsageError) if it differs from the recorded one."""
        value = json.loads(json.dumps(json_ready(value), default=str))
        self.settings[section] = value
        self.about.update(about or {})
        if self._recorded is None:
            return
        old, new = _flat(self._recorded.get(section, {}), f"{section}."), _flat(value, f"{section}.")
        skip = {f"config.{k}" for k in EXECUTION_ONLY} if section == "config" else set()
        diff = [k for k in sorted(set(old) | set(new)) if k not in skip and old.get(k, "<unset>") != new.get(k, "<unset>")]
        if diff:
            shown = "; ".join(f"{k}: {_short(old.get(k, '<unset>'))} then, {_short(new.get(k, '<unset>'))} now"
                              for k in diff[:8])
            raise UsageError(f"--resume: {self.given} was written with other settings ({shown}"
                             f"{'; ...' if len(diff) > 8 else ''}). Nothing was changed: resume with the same "
                             f"settings, start over with --overwrite, or choose another --output")

    def follow(self, done_records: list[tuple[str, str | None]]) -> None:
        """Make this (never entered) object another process's view of the output that rank 0 holds: the records it
        found already written (:attr:`done_records` there), so that :meth:`skip_done` skips and checks exactly the
        same ones here. A follower never opens, locks or writes the file."""
        if self._lock_fd is not None or self._fd is not None:
            raise RuntimeError("follow() is for another process's view; this one holds the output")
        self.done_records = [(str(rid), digest) for rid, digest in done_records]

    def skip_done(self, trajectories: Iterable, source: str, limit: int | None = None) -> Iterable:
        """The input without the records already scored (``--resume``), which must come first, in order, unchanged
        (same ``input_sha256``); refuse (UsageError, nothing changed) when they do not. Remembers each yielded
        record's hash in :attr:`record_hashes` for its output line."""
        expected = self.done_records
        n = 0
        for traj in trajectories:
            digest = record_sha256(traj.to_dict())
            if n < len(expected):
                rid, recorded = expected[n]
                where = f"record {n + 1} of {source}"
                if str(traj.id) != rid:
                    raise UsageError(f"--resume: {where} is {str(traj.id)!r} but line {n + 1} of {self.given} is "
                                     f"{rid!r}: this is another input (or its records were reordered or removed). "
                                     f"Nothing was changed: resume with the input the output was written from, start "
                                     f"over with --overwrite, or choose another --output")
                if recorded is not None and recorded != digest:
                    raise UsageError(f"--resume: {where} ({rid!r}) changed since it was scored (input_sha256 "
                                     f"{recorded[:12]}... then, {digest[:12]}... now). Nothing was changed: restore "
                                     f"it, start over with --overwrite, or choose another --output")
                n += 1
                continue
            n += 1
            self.record_hashes[str(traj.id)] = digest
            yield traj
        if n < len(expected) and (limit is None or n < limit):
            raise UsageError(f"--resume: {source} has {n} records but {self.given} already holds {len(expected)} "
                             f"results: this is another input (or records were removed). Nothing was changed")

    # ------------------------------------------------------------------ writing
    def _defer_sigint(self) -> None:
        """Ctrl-C during a line's write is held back until the line is complete (main thread, default handler)."""
        if threading.current_thread() is not threading.main_thread():
            return
        if signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
            return

        def handler(signum, frame):
            if self._in_write:
                self._sigint_pending = True
                return
            raise KeyboardInterrupt

        self._old_sigint = signal.signal(signal.SIGINT, handler)

    def _open_stream(self) -> None:
        self._opened = True
        if self.special:
            self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND)
            return
        scan = self._scan
        if scan and scan["ids"]:
            self._repair(scan)
            self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND)
        else:  # a new output, or --overwrite (validated and models loaded by now), or nothing complete to resume
            self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND, 0o666)
        if self.record_settings:  # after the truncation, before the first line: never vouches for older content
            record = {"progadv_output": SIDECAR_VERSION, "command": self.command, "output": self.path,
                      "settings": self.settings, "about": {**self.about, "written_at": _now(),
                                                           "host": socket.gethostname()}}
            self._replace(self.sidecar, (json.dumps(record, indent=1, ensure_ascii=False) + "\n").encode())
        else:
            _unlink(self.sidecar)  # another command's output now: a settings record left here would be stale

    def _repair(self, scan: dict[str, Any]) -> None:
        if os.path.getsize(self.path) != scan["size"]:
            raise UsageError(f"--resume: {self.given} changed while it was being checked; nothing was changed")
        with open(self.path, "rb") as f:
            if scan["dups"]:  # rewrite with each id once, at its first place
                parts = []
                for a, b in scan["spans"]:
                    f.seek(a)
                    line = f.read(b - a)
                    parts.append(line if line.endswith(b"\n") else line + b"\n")
                self._replace(self.path, b"".join(parts), mode_of=self.path)
                print(f"progadv: --resume: {self.given} held {scan['dups']} duplicate line(s) (an id written twice); "
                      f"kept the first of each", file=sys.stderr)
                self.kept = len(scan["spans"])
                return
        if scan["cut"] is not None:
            os.truncate(self.path, scan["cut"])
        elif scan["newline"]:
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND)
            try:
                os.write(fd, b"\n")
            finally:
                os.close(fd)
        self.kept = len(scan["spans"])

    def _replace(self, target: str, data: bytes, mode_of: str | None = None) -> None:
        tmp = self._beside(f".tmp-{len(self._temps)}")  # one writer at a time: the lock
        self._temps.append(tmp)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        try:
            while data:
                data = data[os.write(fd, data):]
            os.fsync(fd)
            if mode_of is not None and os.path.exists(mode_of):
                os.fchmod(fd, stat.S_IMODE(os.stat(mode_of).st_mode))
        finally:
            os.close(fd)
        os.replace(tmp, target)
        self._temps.remove(tmp)

    def write_line(self, line: str) -> None:
        """Append one line (a streamed output); opens the file at the first call."""
        if self._fd is None:
            self._open_stream()
        data = (line + "\n").encode("utf-8")
        self._in_write = True
        try:
            while data:
                data = data[os.write(self._fd, data):]
            self.written += 1
        finally:
            self._in_write = False
        if self._sigint_pending:
            self._sigint_pending = False
            raise KeyboardInterrupt

    def finish(self) -> None:
        """End of a streamed output: create (or truncate, or repair) it even when no line was written."""
        if self._fd is None and not (self.special and self.written == 0):
            self._open_stream()

    def write_all(self, text: str) -> None:
        """The whole output at once: a temporary file in the same folder, swapped in with ``os.replace``."""
        data = text.encode("utf-8")
        if self.special:
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND)
            try:
                while data:
                    data = data[os.write(fd, data):]
            finally:
                os.close(fd)
        else:
            self._opened = True
            _unlink(self.sidecar)
            self._replace(self.path, data, mode_of=self.path)
        self.written = text.count("\n")


# ---------------------------------------------------------------------------------------------------- helpers
def _now() -> str:
    return datetime.datetime.now().astimezone().isoformat(timespec="seconds")


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _read_holder(fd: int) -> str:
    try:
        info = json.loads(os.pread(fd, 4096, 0).decode("utf-8"))
        return f"pid {info['pid']} on {info['host']}, `{info['command']}` started {info['started']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "it has not said who it is yet"


def _kind(mode: int) -> str:
    return ("pipe or FIFO" if stat.S_ISFIFO(mode) else "character device" if stat.S_ISCHR(mode)
            else "block device" if stat.S_ISBLK(mode) else "socket" if stat.S_ISSOCK(mode) else "special file")


def _json_kind(obj: Any) -> str:
    return {list: "list", str: "string", int: "number", float: "number", bool: "boolean",
            type(None): "null"}.get(type(obj), type(obj).__name__)
