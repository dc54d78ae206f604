"""The ``progadv`` command: ``score``, ``rank``, ``attribute``, ``evaluate``, ``train``, ``demo``, ``env``, ``view``.

Exit codes: 0 success, 2 bad usage (arguments, config, an --output that would destroy an input or earlier results),
1 bad data (the message names file, record and field), 130 interrupted (Ctrl-C).
Results are streamed: every line already written stays a valid JSON line, and ``--resume`` continues after the last
one. Outputs are checked, locked and written by :class:`progadv_trl.outputs.OutputFile` (see that module).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import itertools
import json
import os
import sys
from collections import Counter
from typing import Any, Iterator

from .config import ConfigError
from .data import ProgadvDataError, json_ready

from .outputs import OutputFile, UsageError  # noqa: F401  (UsageError: bad usage, exit 2)

EXIT_OK, EXIT_DATA, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130


def _json_default(o: Any):
    if hasattr(o, "item"):
        return o.item()
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def _dumps(obj: Any) -> str:
    return json.dumps(json_ready(obj), ensure_ascii=False, default=_json_default)


# ---------------------------------------------------------------------------------------------------- arguments
def _count(text: str) -> int:
    """argparse type of --limit: a non-negative integer (a bad one is a usage error, exit 2)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {value}")
    return value


def _alpha(text: str) -> float:
    """argparse type of --reference-alpha: a finite number other than 1."""
    from .reference_blend import check_alpha

    try:
        return check_alpha(float(text), "--reference-alpha")
    except ValueError as e:
        message = str(e) if "--reference-alpha" in str(e) else f"expected a number, got {text!r}"
        raise argparse.ArgumentTypeError(message) from None


def _config_file(text: str) -> str:
    """argparse type of --config: a file, or the bare name of a packaged config (``grpo_tiny``, ``demo``)."""
    from .configs import resolve

    try:
        return str(resolve(text))
    except FileNotFoundError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _add_model_args(p: argparse.ArgumentParser) -> None:
    from .formats import FORMATS

    g = p.add_argument_group("models")
    g.add_argument("--policy", help="policy checkpoint folder (or PEFT adapter folder)")
    g.add_argument("--reference", help="reference checkpoint folder (default for an adapter: its base); with "
                   "--scorer, the folder of a reference the scorer links to (verified against its recorded hashes)")
    g.add_argument("--scorer", help="a scorer folder saved by save_pretrained / the callback (instead of the models)")
    g.add_argument("--device", default=None, help="torch device, e.g. cpu, cuda, cuda:1 (default: cuda if available, "
                   "else cpu); checked before any model loads")
    g.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"], help="model weights dtype")
    g.add_argument("--trust-remote-code", action="store_true", help="allow model code from the checkpoint")
    g.add_argument("--device-map", help="transformers device_map for --policy/--reference: auto, balanced, "
                   "sequential, a device, or a JSON object (module -> device); instead of --device")
    g.add_argument("--attn-implementation", help="transformers attn_implementation, e.g. eager, sdpa, "
                   "flash_attention_2")
    g.add_argument("--revision", help="hub revision (branch, tag or commit) of --policy (not for a local folder)")
    g.add_argument("--reference-revision", help="hub revision of --reference (not for a local folder)")
    g.add_argument("--reference-alpha", type=_alpha, metavar="A", help="score against the weight-space blend "
                   "reference + A * (policy - reference) of --reference and --policy (same architecture): 0 < A < 1 "
                   "interpolates, A < 0 extrapolates away from the policy, A = 1 (the policy) is refused")
    bits = g.add_mutually_exclusive_group()
    bits.add_argument("--load-in-4bit", action="store_true", help="load --policy/--reference quantized to 4 bits "
                      "with bitsandbytes (an adapter --policy: QLoRA, a 4-bit base and its adapter)")
    bits.add_argument("--load-in-8bit", action="store_true", help="load --policy/--reference quantized to 8 bits "
                      "with bitsandbytes")
    s = p.add_argument_group("settings file")
    from .config import ScoringConfig, _fields

    for name in [n for n, (tp, _) in _fields(ScoringConfig).items() if tp is bool]:
        # HfArgumentParser gives --<flag> [true|false]; --no-<flag> as well
        s.add_argument(f"--no-{name.replace('_', '-')}", dest=name, action="store_false", default=None,
                       help=f"the same as --{name.replace('_', '-')} false")
    s.add_argument("--config", type=_config_file, help="YAML/JSON file with ScoringConfig fields (under 'progadv:' "
                   "or top), or a packaged config's name (score_default, authors_compat). "
                   "Only the fields it names change (over the defaults, or over a --scorer's saved settings); flags "
                   "override the file, again only those given")
    d = p.add_argument_group("data")
    d.add_argument("--input", required=True, help="trajectories: JSONL, TRL dataset JSONL (prompt/completion or "
                   "stepwise), tau2 JSON, Who&When dir, a dataset folder or .parquet, a Hub dataset id[:split]")
    d.add_argument("--format", default="auto", choices=["auto", *FORMATS])
    d.add_argument("--limit", type=_count, help="score only the first N trajectories (N >= 0)")
    d.add_argument("--no-progress", action="store_true", help="no progress on stderr (else a bar with total, rate and "
                   f"ETA on a terminal, a plain line every {PROGRESS_EVERY} trajectories in a log)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="progadv", description="Step-level progress advantage from a policy and "
                                     "its reference: score, rank, attribute, evaluate.")
    from transformers import HfArgumentParser

    sub = parser.add_subparsers(dest="command", required=True, parser_class=HfArgumentParser)
    scoring = {"dataclass_types": [scoring_flags()], "formatter_class": argparse.HelpFormatter}
    p = sub.add_parser("score", **scoring, help="score trajectories step by step (JSONL out, one line per trajectory)")
    _add_model_args(p)
    p.add_argument("--output", required=True, help="output JSONL")
    p.add_argument("--details", action="store_true", help="add per-token ids, step index and log-probs")
    once = p.add_mutually_exclusive_group()
    once.add_argument("--resume", action="store_true", help="continue --output: score only the ids not in it yet "
                      "(refused if it was written with other settings or another input)")
    once.add_argument("--overwrite", action="store_true", help="replace an existing --output")
    p = sub.add_parser("rank", **scoring, help="best-of-N: write the chosen trajectory of each group")
    _add_model_args(p)
    p.add_argument("--output", required=True)
    p.add_argument("--overwrite", action="store_true", help="replace an existing --output")
    p.add_argument("--by", default="progress_advantage", help="progress_advantage or a baseline name")
    p = sub.add_parser("attribute", **scoring, help="failure attribution: the predicted decisive-error step per trajectory")
    _add_model_args(p)
    p.add_argument("--output", required=True)
    p.add_argument("--overwrite", action="store_true", help="replace an existing --output")
    p = sub.add_parser("evaluate", **scoring, help="metric table for progress advantage and the baselines")
    _add_model_args(p)
    p.add_argument("--output", help="write the table as JSON here")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --output")
    p = sub.add_parser("train", help="a GRPO/RLOO run from YAML with the progadv callback attached")
    p.add_argument("--config", required=True, type=_config_file, help="run YAML, or a packaged config's name "
                   "(grpo_tiny)")
    p.add_argument("--output-dir", help="override args.output_dir")
    p.add_argument("--max-steps", type=int, help="override args.max_steps")
    p = sub.add_parser("demo", help="the built-in demo: GRPO on an agent task with exact optimal advantages, the "
                       "callback attached, a report of progress advantage against the baselines")
    p.add_argument("--output-dir", default="progadv-demo", help="where models, caches and the report go")
    p.add_argument("--config", type=_config_file, help="demo YAML, or a packaged config's name (default: the "
                   "settings of the packaged config demo)")
    p.add_argument("--quick", action="store_true", help="the smoke-test settings of the packaged config demo_quick")
    sub.add_parser("env", help="print versions and devices (for bug reports)")
    p = sub.add_parser("view", help="a self-contained HTML page to look at scored trajectories step by step")
    p.add_argument("--scores", required=True, help="the output of `progadv score` (JSONL; its settings record "
                   "<scores>.progadv.json, when present, gives the attribution rule and success threshold)")
    p.add_argument("--input", required=True, help="the trajectories that were scored (matched by id)")
    from .formats import FORMATS

    p.add_argument("--format", default="auto", choices=["auto", *FORMATS], help="the --format it was scored with")
    p.add_argument("--tokenizer", help="the policy's tokenizer folder, to show the tokens of --details scores as "
                   "text (default: token ids)")
    p.add_argument("--output", required=True, help="the HTML page")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --output")
    return parser


_SCORING_GROUP = "scoring settings (ScoringConfig fields: only those given change)"


def scoring_flags() -> type:
    """Every :class:`~progadv_trl.config.ScoringConfig` field as a flag (``--token-agg`` / ``--token_agg``), built by
    transformers' ``HfArgumentParser`` from a dataclass of the same fields whose defaults are ``None`` (= not given,
    so that a --scorer's saved settings are kept), with the field's help, choices, range and default."""
    import typing

    from .config import SCORING_FIELDS, ScoringConfig, _fields, _range_text

    hints = typing.get_type_hints(ScoringConfig)
    defaults = {f.name: f.default if f.default is not dataclasses.MISSING else f.default_factory()
                for f in dataclasses.fields(ScoringConfig)}
    rows = []
    for name in SCORING_FIELDS:
        meta = _fields(ScoringConfig)[name][1]
        tp = hints[name]
        inner = [a for a in typing.get_args(tp) if a is not type(None)] if type(None) in typing.get_args(tp) else [tp]
        choices = meta.get("choices") or meta.get("item_choices")
        text = meta["help"].rstrip(".")
        if choices:
            text += f"; one of {', '.join(map(str, choices))}" + (" (several: comma- or space-separated)"
                                                                   if typing.get_origin(inner[0]) is list else "")
        elif "gt" in meta or "ge" in meta or "le" in meta:
            text += f"; in {_range_text(meta)}"
        text += f" (default: {defaults[name]})"
        flag = {"help": text, "nargs": "?", "const": True} if inner[0] is bool else {"help": text}
        rows.append((name, typing.Optional[inner[0]], dataclasses.field(default=None, metadata=flag)))
    flags = dataclasses.make_dataclass("ScoringFlags", rows)
    flags._argument_group_name = _SCORING_GROUP
    return flags


def _config_from_args(args) -> dict[str, Any]:
    """The settings the user named: the --config file's fields, then the flags given (a flag wins over the file).

    Only named settings, each checked against its field (type, range, choices) before any model loads: they are
    applied over the defaults (--policy) or over a --scorer's saved config, and every other setting keeps its value
    there. A bad setting or an unreadable --config is a usage error (exit 2)."""
    if getattr(args, "_named_settings", None) is not None:  # read (and checked) once per command
        return dict(args._named_settings)
    from .config import SCORING_FIELDS, ConfigError, check_settings, decode_escapes, read_config_file, scoring_settings

    try:  # a training run's file may also hold the callback's settings: they change no score and are left out
        settings = scoring_settings(read_config_file(args.config)) if args.config is not None else {}
        flags = {name: getattr(args, name) for name in SCORING_FIELDS if getattr(args, name, None) is not None}
        if "step_separator" in flags:
            flags["step_separator"] = decode_escapes(flags["step_separator"], label="--step-separator")
        if "baselines" in flags:
            flags["baselines"] = [b.strip() for item in flags["baselines"] for b in item.split(",") if b.strip()]
        settings.update(check_settings(flags, source=None, labels={k: "--" + k.replace("_", "-") for k in flags}))
    except ConfigError as e:
        raise UsageError(str(e)) from None
    except OSError as e:
        raise UsageError(f"--config {args.config}: cannot read: {e.strerror or e}") from None
    args._named_settings = dict(settings)
    return settings


def _device(spec: str | None) -> str:
    """--device checked before any model loads: a torch device type this machine has (else a usage error)."""
    import torch

    processes = _Processes()
    if spec is None:
        if os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes"):
            return "cpu"
        spec = "cuda" if torch.cuda.is_available() else "cpu"
    if spec == "cuda" and processes.world > 1:  # one GPU per process of a torchrun / accelerate launch
        spec = f"cuda:{processes.local_rank}"
    try:
        dev = torch.device(spec)
    except (RuntimeError, ValueError, TypeError):
        raise UsageError(f"--device {spec!r}: not a torch device (e.g. cpu, cuda, cuda:1, mps)") from None
    if dev.type != "cpu":
        backend = getattr(torch, dev.type, None)  # torch.cuda, torch.mps, torch.xpu, ...
        available = getattr(backend, "is_available", None)
        if not callable(available) or not available():
            raise UsageError(f"--device {spec}: no {dev.type} device is available on this machine")
        count = getattr(backend, "device_count", None)
        if dev.index is not None and callable(count) and dev.index >= count():
            raise UsageError(f"--device {spec}: this machine has {count()} {dev.type} device(s)")
    return spec


def _load_scorer(args, baselines: list[str] | None = None, needed: dict[str, Any] | None = None):
    import torch

    from .config import ConfigError, ScoringConfig
    from .scorer import ProgressAdvantageScorer

    settings = _config_from_args(args)
    if baselines is not None:
        settings["baselines"] = baselines
    settings.update(needed or {})  # what the input needs (see _input_settings)
    dtype = getattr(torch, args.dtype) if args.dtype else None
    loading = _loading_options(args, dtype)
    device = None if "device_map" in loading else _device(args.device)

    def configured(saved: ScoringConfig | None) -> ScoringConfig:
        source = args.config or "command line"
        try:  # the named settings over the defaults or over the saved config (cross-field rules checked here)
            return (ScoringConfig.from_settings(settings, source=source) if saved is None
                    else saved.merged(settings, source=source))
        except ConfigError as e:
            raise UsageError(str(e)) from None

    if args.scorer:
        if args.policy:  # --reference with --scorer: the folder of a linked reference, verified against its hashes
            raise UsageError("give either --scorer (with --reference only for a linked reference) or --policy, "
                             "not both")
        scorer = ProgressAdvantageScorer.from_pretrained(args.scorer, reference=args.reference, device=device,
                                                         dtype=dtype, trust_remote_code=args.trust_remote_code)
        config = configured(scorer.config)
        if config == scorer.config:
            return scorer
        rebuilt = ProgressAdvantageScorer(scorer.policy, scorer.reference, scorer.tokenizer, scorer.reference_tokenizer,
                                          config, scorer.provenance)
        rebuilt.digest = scorer.digest
        return rebuilt
    if not args.policy:
        raise UsageError("--policy (and usually --reference) or --scorer is required")
    config = configured(None)
    return ProgressAdvantageScorer.from_models(args.policy, args.reference, config=config, device=device,
                                               dtype=dtype, trust_remote_code=args.trust_remote_code, **loading)


_LOADING_FLAGS = ("device_map", "attn_implementation", "revision", "reference_revision", "reference_alpha",
                  "load_in_4bit", "load_in_8bit")


def _loading_options(args, dtype) -> dict[str, Any]:
    """The ``from_pretrained`` options of the loading flags, for :meth:`ProgressAdvantageScorer.from_models`; checked
    before any model loads (a bad or unusable one is a usage error)."""
    given = [f"--{name.replace('_', '-')}" for name in _LOADING_FLAGS
             if getattr(args, name, None) is not None and getattr(args, name) is not False]
    if given and args.scorer:
        raise UsageError(f"{', '.join(given)}: apply to --policy/--reference; a --scorer folder is loaded as it was "
                         f"saved (--device and --dtype apply)")
    options: dict[str, Any] = {}
    if args.device_map:
        if args.device is not None:
            raise UsageError("give either --device or --device-map, not both")
        options["device_map"] = args.device_map
        if args.device_map.lstrip().startswith("{"):
            try:
                options["device_map"] = json.loads(args.device_map)
            except ValueError as e:
                raise UsageError(f"--device-map: not a JSON object ({e})") from None
    for name in ("attn_implementation", "revision", "reference_revision"):
        if getattr(args, name):
            options[name] = getattr(args, name)
    if getattr(args, "reference_alpha", None) is not None:
        if not args.reference:
            raise UsageError("--reference-alpha blends --reference with --policy: give --reference")
        options["reference_alpha"] = args.reference_alpha
    if args.load_in_4bit or args.load_in_8bit:
        import importlib.util

        flag = "--load-in-4bit" if args.load_in_4bit else "--load-in-8bit"
        if importlib.util.find_spec("bitsandbytes") is None:
            raise UsageError(f"{flag} needs the bitsandbytes package, which is not installed: pip install "
                             f"bitsandbytes")
        options["quantization_config"] = (
            {"load_in_4bit": True, **({"bnb_4bit_compute_dtype": dtype} if dtype is not None else {})}
            if args.load_in_4bit else {"load_in_8bit": True})
    return options


def _trajectories(args) -> Iterator:
    from .formats import iter_trajectories

    return iter_trajectories(args.input, args.format, limit=args.limit)


PROGRESS_EVERY = 100  # trajectories between two progress lines when stderr is not a terminal


def _duration(seconds: float) -> str:
    """``45s``, ``1m50s``, ``2h05m``."""
    s = max(0, round(seconds))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


class _ProgressLines:
    """Progress for a stderr that is not a terminal (a batch job's log): a plain line every ``every`` trajectories,
    ``scored 640/2000 (12.3/s, ETA 1m50s)`` (``scored 640 (12.3/s)`` when the total is not known)."""

    def __init__(self, total: int | None, initial: int = 0, every: int | None = None, file=None, clock=None):
        import time

        self.total, self.every, self.file = total, max(1, every or PROGRESS_EVERY), file or sys.stderr
        self.clock = clock or time.monotonic
        self.n = self.initial = initial
        self.start = self.clock()

    def update(self, n: int = 1) -> None:
        before, self.n = self.n, self.n + n
        if self.n // self.every > before // self.every:
            rate = (self.n - self.initial) / max(self.clock() - self.start, 1e-9)
            if self.total is None:
                line = f"scored {self.n} ({rate:.1f}/s)"
            else:
                line = f"scored {self.n}/{self.total} ({rate:.1f}/s, ETA {_duration((self.total - self.n) / rate)})"
            print(line, file=self.file, flush=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        pass


def _progress_bar(total: int | None, initial: int = 0, desc: str = "scoring"):
    """A tqdm bar with total, rate and ETA on a terminal; else :class:`_ProgressLines` (both have ``update(n)``)."""
    if getattr(sys.stderr, "isatty", lambda: False)():
        from tqdm.auto import tqdm

        return tqdm(total=total, initial=initial, desc=desc, unit="traj", file=sys.stderr)
    return _ProgressLines(total, initial=initial)


def _progress(iterable, args, desc: str, total: int | None = None, initial: int = 0):
    """``iterable`` with progress on stderr (see :func:`_progress_bar`); ``total``: the trajectories the run will
    have scored when it ends, ``initial`` of them already done (``--resume``)."""
    if args.no_progress:
        yield from iterable
        return
    with _progress_bar(total, initial, desc) as bar:
        for item in iterable:
            yield item
            bar.update(1)


def _input_total(args) -> int | None:
    """How many trajectories ``--input`` holds (capped by ``--limit``), when a regular ``.jsonl`` file of one
    trajectory per line tells it by counting its non-blank lines; else ``None`` (a folder, a stepwise file, a pipe)."""
    from .formats.records import row_kind

    path = args.input
    if args.format not in ("auto", "jsonl", "trl") or not path.endswith(".jsonl") or not os.path.isfile(path):
        return None
    try:
        with open(path, "rb") as f:
            lines = (line for line in f if line.strip())
            first = next(lines, None)
            if first is None:
                return 0
            if args.format == "auto" and row_kind(json.loads(first)) not in ("jsonl", "trl"):
                return None
            n = 1 + sum(1 for _ in lines)
    except (OSError, ValueError):  # unreadable or malformed: reading the input reports it, with record and line
        return None
    return min(n, args.limit) if args.limit is not None else n


def _output(args, command: str, **kw) -> OutputFile:
    """The ``--output`` of ``command``, checked (and locked) before any model loads; see :mod:`progadv_trl.outputs`."""
    reads = [(f"--{name}", getattr(args, name, None)) for name in ("input", "config", "policy", "reference", "scorer")]
    return OutputFile(args.output, command=command, inputs=reads, input_dirs=[args.input],
                      overwrite=args.overwrite, resume=getattr(args, "resume", False), **kw)


def _checked(trajectories: Iterator) -> Iterator:
    """Read the first trajectory now: a missing, misnamed or malformed input fails before the models load and
    before the output is touched."""
    first = next(trajectories, None)
    return trajectories if first is None else itertools.chain([first], trajectories)


def _input_settings(args, trajectories: Iterator) -> tuple[Iterator, dict[str, Any]]:
    """The trajectories (first one read) and the settings their input needs: TRL stepwise rows are scored one step
    per completion element, with the ``step_separator`` the loader joined them with (a different --step-separator
    or --config value is a usage error)."""
    from .formats import stepwise_separator

    first = next(trajectories, None)
    if first is None:
        return trajectories, {}
    trajectories = itertools.chain([first], trajectories)
    sep = stepwise_separator(first)
    if sep is None:
        return trajectories, {}
    given = _config_from_args(args).get("step_separator")
    if given is not None and given != sep:
        raise UsageError(f"--input holds TRL stepwise rows, scored one step per completion with step_separator "
                         f"{sep!r}; the settings give {given!r}")
    return trajectories, {"step_separator": sep}


def _model_ids(args) -> dict[str, str]:
    from .outputs import model_fingerprint

    return {name: model_fingerprint(path) for name in ("policy", "reference", "scorer")
            if (path := getattr(args, name, None))}


# ---------------------------------------------------------------------------------------------------- processes
def _failure(e: BaseException) -> tuple[int, str] | None:
    """The exit code and message of an error the CLI reports in a sentence; ``None`` for any other (a bug: it
    propagates with its traceback)."""
    if isinstance(e, ProgadvDataError):
        return EXIT_DATA, f"progadv: bad data: {e}"
    if isinstance(e, (UsageError, ConfigError)):
        return EXIT_USAGE, f"progadv: {e}"
    if isinstance(e, (ValueError, FileNotFoundError, OSError)):
        return EXIT_USAGE, f"progadv: {type(e).__name__}: {e}"
    return None


class _Stopped(Exception):
    """A process of a multi-process run failed: every process ends with its exit code; rank 0 prints its message."""

    def __init__(self, code: int, message: str, quiet: bool):
        super().__init__(message)
        self.code, self.quiet = code, quiet


def _env_int(name: str, default: int) -> int:
    try:
        return int(os.environ.get(name) or default)
    except ValueError:
        raise UsageError(f"the environment variable {name}={os.environ[name]!r} is not an integer") from None


class _Processes:
    """The processes of a ``torchrun`` / ``accelerate launch`` run (``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``).

    They work in rounds (:meth:`round`): each process does its part, rank 0 receives every part, and every process
    learns the outcome, so that an error in any process ends all of them with its message instead of leaving the
    others waiting."""

    def __init__(self):
        self.world, self.rank = _env_int("WORLD_SIZE", 1), _env_int("RANK", 0)
        self.local_rank = _env_int("LOCAL_RANK", self.rank)
        self._started = False
        self._error: BaseException | None = None

    def start(self, cuda: bool) -> None:
        """Join the process group (``env://``): nccl when the models are on CUDA, else gloo."""
        import torch
        import torch.distributed as dist

        if dist.is_initialized():
            return
        if cuda:
            torch.cuda.set_device(self.local_rank)
        dist.init_process_group("nccl" if cuda else "gloo")
        self._started = True

    def stop(self) -> None:
        if self._started:
            import torch.distributed as dist

            dist.destroy_process_group()
            self._started = False

    def _attempt(self, fn, *a):
        try:
            return ("ok", fn(*a))
        except Exception as e:  # reported to every process by the round, then raised
            self._error = e
            code, message = _failure(e) or (EXIT_DATA, f"progadv: {type(e).__name__}: {e}")
            return ("error", code, message, _failure(e) is not None)

    def round(self, work, at_root=None):
        """``work()`` in every process; rank 0 receives their values (rank order) and runs ``at_root(values)``.
        Every process returns at_root's value; if any process failed, every process raises the first failure (rank
        order)."""
        import torch.distributed as dist

        mine = self._attempt(work)
        parts = [None] * self.world if self.rank == 0 else None
        dist.gather_object(mine, parts, dst=0)
        verdict = None
        if self.rank == 0:
            origin = next((r for r, p in enumerate(parts) if p[0] == "error"), None)
            if origin is None:
                verdict = self._attempt(at_root, [p[1] for p in parts]) if at_root else ("ok", None)
                origin = 0
            else:
                verdict = parts[origin]
            verdict = (*verdict, origin) if verdict[0] == "error" else verdict
        box = [verdict]
        dist.broadcast_object_list(box, src=0)
        verdict = box[0]
        if verdict[0] == "ok":
            return verdict[1]
        _, code, message, known, origin = verdict
        if origin == self.rank and (self.rank == 0 or not known):
            raise self._error  # this process's own error: its message, or the traceback of a bug
        if origin != 0:
            message += f" (in process {origin} of {self.world})"
        raise _Stopped(code, message, quiet=self.rank != 0)


def _score_in_processes(args, processes: _Processes) -> int:
    """``score`` in several processes. Every process reads the whole input (so a bad record stops all of them at
    the same place) in windows of ``world * 16 * batch_size`` records and scores every ``world``-th one; the shares
    are padded to the same length with a repeated record whose result is dropped, so every process does the same
    work. Rank 0 receives each window's lines and alone writes the output, in input order, with the guarantees of a
    single process (lock, settings record, ``--resume``)."""
    import torch

    if args.device_map:
        cuda = torch.cuda.is_available() and os.environ.get("ACCELERATE_USE_CPU", "") == ""
    else:
        cuda = torch.device(_device(args.device)).type == "cuda"
    processes.start(cuda)
    rank, world = processes.rank, processes.world
    try:
        with contextlib.ExitStack() as stack:
            out = _output(args, "score", record_settings=True)
            run, about = _run_settings(args)

            def open_output():  # rank 0 checks, locks and (with --resume) reads the output
                if rank == 0:
                    stack.enter_context(out)
                    out.expect("run", run, about=about)
                return out.done_records

            done = processes.round(open_output, lambda values: values[0])
            if rank:
                out.follow(done)

            loaded = {}

            def load():  # every process: the first new record read (and the --resume prefix checked), models loaded
                loaded["trajs"], needed = _input_settings(
                    args, out.skip_done(_trajectories(args), args.input, args.limit))
                loaded["scorer"] = scorer = _load_scorer(args, needed=needed)
                if rank == 0:
                    out.expect("config", scorer.config.to_dict())

            processes.round(load)
            trajs, scorer = loaded["trajs"], loaded["scorer"]
            with_parts = scorer.config.step_separator is not None
            windows = _windows(trajs, world * 16 * scorer.config.batch_size)
            bar = None
            if rank == 0 and not args.no_progress:
                bar = stack.enter_context(_progress_bar(_input_total(args), len(out.done_records)))

            def score_share():
                window = next(windows, None)
                if window is None:
                    return None
                digests = [out.record_hashes.pop(str(t.id)) for t in window]
                mine, share = window[rank::world], -(-len(window) // world)
                results = scorer.score(mine + window[:1] * (share - len(mine)), details=args.details)
                lines = []
                for res, digest in zip(results[:len(mine)], digests[rank::world]):
                    row = res.to_dict(scorer.config.baselines, with_parts)
                    row["input_sha256"] = digest
                    lines.append(_dumps(row))
                return len(window), lines

            def write(shares) -> bool:
                if all(s is None for s in shares):
                    return False
                if any(s is None or s[0] != shares[0][0] for s in shares):
                    raise ProgadvDataError("the processes read different records (was the input changed during the "
                                           "run?); the output holds the windows written before", source=args.input)
                for i in range(shares[0][0]):
                    out.write_line(shares[i % world][1][i // world])
                if bar is not None:
                    bar.update(shares[0][0])
                return True

            while processes.round(score_share, write):
                pass
            processes.round(lambda: None, lambda _: out.finish())
    finally:
        processes.stop()
    if rank == 0:
        skip = len(out.done_records)
        print(f"scored {out.written} trajectories in {world} processes -> {args.output}"
              + (f" (skipped {skip} already there)" if skip else ""), file=sys.stderr)
    return EXIT_OK


def _windows(items: Iterator, size: int) -> Iterator[list]:
    """Consecutive lists of ``size`` items (the last one shorter)."""
    while window := list(itertools.islice(items, size)):
        yield window


# ---------------------------------------------------------------------------------------------------- commands
def _run_settings(args) -> tuple[dict[str, Any], dict[str, Any]]:
    """The ``run`` settings of ``score`` (compared on ``--resume``) and what is only recorded beside them."""
    run = {"details": bool(args.details), "dtype": args.dtype, "format": args.format, "models": _model_ids(args)}
    # loading options that change scores, recorded only when given: outputs written without them still resume
    bits = "4bit" if args.load_in_4bit else "8bit" if args.load_in_8bit else None
    for key, value in (("quantization", bits), ("revision", args.revision),
                       ("reference_revision", args.reference_revision)):
        if value:
            run[key] = value
    if getattr(args, "reference_alpha", None) is not None:
        run["reference_alpha"] = args.reference_alpha
    about = {"models": {k: getattr(args, k) for k in ("policy", "reference", "scorer")}, "limit": args.limit,
             "input": os.path.abspath(args.input)}
    return run, about


def cmd_score(args) -> int:
    processes = _Processes()
    if processes.world > 1:
        return _score_in_processes(args, processes)
    with _output(args, "score", record_settings=True) as out:
        run, about = _run_settings(args)
        out.expect("run", run, about=about)
        # the records already scored are checked (same ids, order and content) while the first new one is read
        trajs, needed = _input_settings(args, out.skip_done(_trajectories(args), args.input, args.limit))
        scorer = _load_scorer(args, needed=needed)
        out.expect("config", scorer.config.to_dict())
        with_parts = scorer.config.step_separator is not None
        for res in _progress(scorer.iter_score(trajs, details=args.details), args, "scoring",
                             total=_input_total(args), initial=len(out.done_records)):
            row = res.to_dict(scorer.config.baselines, with_parts)
            row["input_sha256"] = out.record_hashes.pop(str(res.id))
            out.write_line(_dumps(row))
        out.finish()
    skip = len(out.done_records)
    print(f"scored {out.written} trajectories -> {args.output}" + (f" (skipped {skip} already there)" if skip else ""),
          file=sys.stderr)
    return EXIT_OK


def cmd_rank(args) -> int:
    from .baselines import BASELINES
    from .trajectory_scores import METHOD

    if args.by != METHOD and args.by not in BASELINES:
        raise UsageError(f"--by {args.by!r}: expected {METHOD} or one of {', '.join(BASELINES)}")
    with _output(args, "rank", atomic=True) as out:
        trajs = list(_trajectories(args))  # the whole input is read (and validated) before the models load
        scorer = _load_scorer(args, [] if args.by == METHOD else [args.by])
        results = list(_progress(scorer.iter_score(trajs), args, "scoring", total=len(trajs)))
        by_id = {r.id: t for r, t in zip(results, trajs)}
        chosen = scorer.best_of_n(results, using=args.by)
        sizes = Counter(r.group for r in results if r.group is not None)
        lines = []
        for group, res in chosen.items():
            # n: the size of the group best_of_n chose from; a trajectory without a group is a group of its own
            n = sizes[res.group] if res.group is not None else 1
            row = {"group": res.group, "id": res.id, "score": res.score_of(args.by),
                   "by": args.by, "n": n, "reward": res.reward,
                   "trajectory": by_id[res.id].to_dict()}
            lines.append(_dumps(row) + "\n")
        out.write_all("".join(lines))
    print(f"chose {len(chosen)} of {len(results)} trajectories -> {args.output}", file=sys.stderr)
    return EXIT_OK


def cmd_attribute(args) -> int:
    from .formats import AgentAttribution
    from .trajectory_scores import METHOD

    agents = AgentAttribution()
    step_hits = n_step = 0
    with _output(args, "attribute") as out:
        trajs = _checked(agents.remember(_trajectories(args)))
        scorer = _load_scorer(args)
        for res in _progress(scorer.iter_score(trajs), args, "scoring", total=_input_total(args)):
            pred = res.predicted_mistake(scorer.config.attribution, scorer.config.attribution_threshold)
            predicted_agent, mistake_agent = agents.predict(res.id, pred)
            row = {"id": res.id, "predicted_step": pred, "predicted_agent": predicted_agent,
                   "mistake_step": res.mistake_step, "mistake_agent": mistake_agent,
                   "action_messages": res.action_messages, "step_values": res.action_values[METHOD]}
            if res.mistake_step is not None:
                n_step, step_hits = n_step + 1, step_hits + (pred == res.mistake_step)
            out.write_line(_dumps(row))
        out.finish()
    print(f"attributed {out.written} trajectories -> {args.output}", file=sys.stderr)
    if n_step:
        print(f"step-level accuracy {step_hits / n_step:.3f} ({step_hits}/{n_step})", file=sys.stderr)
    if agents.labelled:
        print(f"agent-level accuracy {agents.hits / agents.labelled:.3f} ({agents.hits}/{agents.labelled})",
              file=sys.stderr)
    return EXIT_OK


def cmd_evaluate(args) -> int:
    from .baselines import BASELINES
    from .metrics import format_table

    methods = _config_from_args(args).get("baselines") or ["all"]  # evaluate compares all unless named
    methods = list(BASELINES) if "all" in methods else methods
    with _output(args, "evaluate", atomic=True) if args.output else contextlib.nullcontext() as out:
        trajs, needed = _input_settings(args, _trajectories(args))
        scorer = _load_scorer(args, methods, needed)
        results = list(_progress(scorer.iter_score(trajs), args, "scoring", total=_input_total(args)))
        table = scorer.evaluate(results, methods)
        print(format_table(table))
        if out is not None:
            out.write_all(_dumps({"n": len(results), "config": scorer.config.to_dict(), "table": table}) + "\n")
    return EXIT_OK


def cmd_train(args) -> int:
    from .train import train_from_config

    overrides = {k: v for k, v in (("output_dir", args.output_dir), ("max_steps", args.max_steps)) if v is not None}
    trainer = train_from_config(args.config, overrides)
    print(f"history: {trainer.args.output_dir}/progadv-history.jsonl   scorer: {trainer.args.output_dir}/_progadv/scorer",
          file=sys.stderr)
    return EXIT_OK


def cmd_demo(args) -> int:
    from .envs.demo import run_demo

    run_demo(args.output_dir, config_path=args.config, quick=args.quick)
    return EXIT_OK


def cmd_env(args) -> int:
    import platform

    import torch

    from . import __version__

    rows = {"progadv-trl": __version__, "python": platform.python_version(), "platform": platform.platform(),
            "torch": torch.__version__, "cuda": torch.cuda.is_available(), "threads": torch.get_num_threads()}
    for mod in ("transformers", "trl", "accelerate", "peft", "datasets", "triton"):
        try:
            rows[mod] = __import__(mod).__version__
        except ImportError:
            rows[mod] = "not installed"
    for k, v in rows.items():
        print(f"- {k}: {v}")
    return EXIT_OK


def cmd_view(args) -> int:
    from .formats import load_trajectories
    from .viewer import match_scores, read_scores, render_view

    reads = [("--scores", args.scores), ("--input", args.input), ("--tokenizer", args.tokenizer)]
    with OutputFile(args.output, command="view", inputs=reads, input_dirs=[args.input],
                    overwrite=args.overwrite, atomic=True) as out:
        scores, config = read_scores(args.scores)
        pairs = match_scores(load_trajectories(args.input, args.format), scores, scores_source=args.scores,
                             input_source=args.input)
        token_text = None
        if args.tokenizer:
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
            token_text = lambda i: tokenizer.decode([i])  # noqa: E731
        out.write_all(render_view(pairs, config=config, token_text=token_text,
                                  title=f"progadv view: {os.path.basename(args.scores)}",
                                  sources={"scores": args.scores, "input": args.input}))
    print(f"{len(pairs)} trajectories -> {args.output}", file=sys.stderr)
    return EXIT_OK


COMMANDS = {"score": cmd_score, "rank": cmd_rank, "attribute": cmd_attribute, "evaluate": cmd_evaluate,
            "train": cmd_train, "demo": cmd_demo, "env": cmd_env, "view": cmd_view}


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    args = build_parser().parse_args(argv)
    from transformers.utils import logging as hf_logging

    # transformers' own bars ("Loading weights", one per model) off; the hub's download bars stay on
    hf_logging.set_tqdm_hook(lambda factory, bar_args, bar_kwargs: hf_logging.EmptyTqdm(*bar_args, **bar_kwargs))
    try:
        if args.command in ("rank", "attribute", "evaluate") and _Processes().world > 1:
            raise UsageError(f"`progadv {args.command}` runs in one process; of the scoring commands only `progadv "
                             f"score` shares its work among the processes of torchrun / accelerate launch")
        return COMMANDS[args.command](args)
    except _Stopped as e:  # another process failed; rank 0 says why
        if not e.quiet:
            print(e, file=sys.stderr)
        return e.code
    except Exception as e:
        failure = _failure(e)
        if failure is None:
            raise
        print(failure[1], file=sys.stderr)
        return failure[0]
    except KeyboardInterrupt as e:  # Ctrl-C: the output keeps its complete lines and its lock is released
        print(f"progadv: {e or 'interrupted'}", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
