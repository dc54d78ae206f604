"""The ``progadv`` command: ``score``, ``rank``, ``attribute``, ``evaluate``, ``train``, ``demo``, ``env``.

Exit codes: 0 success, 2 bad usage (arguments, config, an --output that would destroy an input or earlier results),
1 bad data (the message names file, record and field), 130 interrupted (Ctrl-C).
Results are streamed: every line already written stays a valid JSON line, and ``--resume`` continues after the last
one. Outputs are checked, locked and written by :class:`progadv_trl.outputs.OutputFile` (see that module).
"""

from __future__ import annotations

import argparse
import contextlib
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


def _add_model_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("models")
    g.add_argument("--policy", help="policy checkpoint folder (or PEFT adapter folder)")
    g.add_argument("--reference", help="reference checkpoint folder (default for an adapter: its base); with "
                   "--scorer, the folder of a reference the scorer links to (verified against its recorded hashes)")
    g.add_argument("--scorer", help="a scorer folder saved by save_pretrained / the callback (instead of the models)")
    g.add_argument("--device", default=None, help="torch device, e.g. cpu, cuda, cuda:1 (default: cuda if available, "
                   "else cpu); checked before any model loads")
    g.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"], help="model weights dtype")
    g.add_argument("--trust-remote-code", action="store_true", help="allow model code from the checkpoint")
    s = p.add_argument_group("scoring")
    s.add_argument("--config", help="YAML/JSON file with ProgressAdvantageConfig fields (under 'progadv:' or top). "
                   "Only the fields it names change (over the defaults, or over a --scorer's saved settings); flags "
                   "override the file, again only those given")
    s.add_argument("--beta", type=float, help="scale of the log-ratio, in (0, 1e6]")
    s.add_argument("--temperature", type=float, help="the trainer's sampling temperature, in [0.01, 100]")
    s.add_argument("--token-agg", choices=["sum", "mean", "last", "min", "max"])
    s.add_argument("--step-agg", choices=["mean", "sum", "last", "min", "max", "bottom10"])
    s.add_argument("--cumulative", action=argparse.BooleanOptionalAction, default=None,
                   help="aggregate running sums (ImplicitPRM); --no-cumulative turns it off")
    s.add_argument("--compat", choices=["authors"], help="reproduce the paper code's conventions")
    s.add_argument("--rendering", choices=["chat_template", "plain"])
    s.add_argument("--step-separator", help="split each action into steps at this separator; backslash escapes "
                   "(\\n, \\t, \\\\, \\u2192) are decoded, any other text (e.g. §) is used as typed")
    s.add_argument("--max-length", type=int)
    s.add_argument("--batch-size", type=int)
    s.add_argument("--backend", choices=["auto", "torch", "triton"],
                   help="fused-kernel backend: torch (validated), triton (CUDA, opt-in); auto = torch today")
    s.add_argument("--baselines", help="comma-separated baseline names, or 'all'")
    s.add_argument("--attribution", choices=["running_sum", "step", "threshold"])
    s.add_argument("--attribution-threshold", type=float)
    s.add_argument("--success-threshold", type=float)
    d = p.add_argument_group("data")
    d.add_argument("--input", required=True, help="trajectories: JSONL, TRL dataset JSONL, tau2 JSON, Who&When dir")
    d.add_argument("--format", default="auto", choices=["auto", "jsonl", "trl", "tau2", "whowhen", "dataset"])
    d.add_argument("--limit", type=_count, help="score only the first N trajectories (N >= 0)")
    d.add_argument("--no-progress", action="store_true", help="no progress bar")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="progadv", description="Step-level progress advantage from a policy and "
                                     "its reference: score, rank, attribute, evaluate.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("score", help="score trajectories step by step (JSONL out, one line per trajectory)")
    _add_model_args(p)
    p.add_argument("--output", required=True, help="output JSONL")
    p.add_argument("--details", action="store_true", help="add per-token ids, step index and log-probs")
    once = p.add_mutually_exclusive_group()
    once.add_argument("--resume", action="store_true", help="continue --output: score only the ids not in it yet "
                      "(refused if it was written with other settings or another input)")
    once.add_argument("--overwrite", action="store_true", help="replace an existing --output")
    p = sub.add_parser("rank", help="best-of-N: write the chosen trajectory of each group")
    _add_model_args(p)
    p.add_argument("--output", required=True)
    p.add_argument("--overwrite", action="store_true", help="replace an existing --output")
    p.add_argument("--by", default="progress_advantage", help="progress_advantage or a baseline name")
    p = sub.add_parser("attribute", help="failure attribution: the predicted decisive-error step per trajectory")
    _add_model_args(p)
    p.add_argument("--output", required=True)
    p.add_argument("--overwrite", action="store_true", help="replace an existing --output")
    p = sub.add_parser("evaluate", help="metric table for progress advantage and the baselines")
    _add_model_args(p)
    p.add_argument("--output", help="write the table as JSON here")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --output")
    p.add_argument("--methods", default="all", help="baselines to compare (comma-separated or 'all')")
    p = sub.add_parser("train", help="a GRPO/RLOO run from YAML with the progadv callback attached")
    p.add_argument("--config", required=True, help="run YAML (see configs/grpo_tiny.yaml)")
    p.add_argument("--output-dir", help="override args.output_dir")
    p.add_argument("--max-steps", type=int, help="override args.max_steps")
    p = sub.add_parser("demo", help="the built-in demo: GRPO on an agent task with exact optimal advantages, the "
                       "callback attached, a report of progress advantage against the baselines")
    p.add_argument("--output-dir", default="progadv-demo", help="where models, caches and the report go")
    p.add_argument("--config", help="demo YAML (default: the settings of configs/demo.yaml)")
    p.add_argument("--quick", action="store_true", help="the smoke-test settings of configs/demo_quick.yaml")
    sub.add_parser("env", help="print versions and devices (for bug reports)")
    return parser


# The config fields the scoring flags set: each as --<field with dashes>.
_FLAG_FIELDS = ("beta", "temperature", "token_agg", "step_agg", "cumulative", "compat", "rendering", "step_separator",
                "max_length", "batch_size", "backend", "baselines", "attribution", "attribution_threshold",
                "success_threshold")


def _config_from_args(args) -> dict[str, Any]:
    """The settings the user named: the --config file's fields, then the flags given (a flag wins over the file).

    Only named settings, each checked against its field (type, range, choices) before any model loads: they are
    applied over the defaults (--policy) or over a --scorer's saved config, and every other setting keeps its value
    there. A bad setting or an unreadable --config is a usage error (exit 2)."""
    from .config import ConfigError, check_settings, decode_escapes, read_config_file

    try:
        settings = read_config_file(args.config) if args.config is not None else {}
        flags = {name: getattr(args, name) for name in _FLAG_FIELDS if getattr(args, name, None) is not None}
        if "step_separator" in flags:
            flags["step_separator"] = decode_escapes(flags["step_separator"], label="--step-separator")
        if "baselines" in flags:
            flags["baselines"] = [b.strip() for b in flags["baselines"].split(",") if b.strip()]
        settings.update(check_settings(flags, source=None, labels={k: "--" + k.replace("_", "-") for k in flags}))
    except ConfigError as e:
        raise UsageError(str(e)) from None
    except OSError as e:
        raise UsageError(f"--config {args.config}: cannot read: {e.strerror or e}") from None
    return settings


def _device(spec: str | None) -> str:
    """--device checked before any model loads: a torch device type this machine has (else a usage error)."""
    import torch

    if spec is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
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


def _load_scorer(args, baselines: list[str] | None = None):
    import torch

    from .config import ConfigError, ProgressAdvantageConfig
    from .scorer import ProgressAdvantageScorer

    settings = _config_from_args(args)
    if baselines is not None:
        settings["baselines"] = baselines
    dtype = getattr(torch, args.dtype) if args.dtype else None
    device = _device(args.device)

    def configured(saved: ProgressAdvantageConfig | None) -> ProgressAdvantageConfig:
        source = args.config or "command line"
        try:  # the named settings over the defaults or over the saved config (cross-field rules checked here)
            return (ProgressAdvantageConfig.from_settings(settings, source=source) if saved is None
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
                                               dtype=dtype, trust_remote_code=args.trust_remote_code)


def _trajectories(args) -> Iterator:
    from .loaders import iter_trajectories

    return iter_trajectories(args.input, args.format, limit=args.limit)


def _progress(iterable, args, desc: str):
    if args.no_progress:
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, desc=desc, unit="traj", file=sys.stderr, disable=None)


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


def _model_ids(args) -> dict[str, str]:
    from .outputs import model_fingerprint

    return {name: model_fingerprint(path) for name in ("policy", "reference", "scorer")
            if (path := getattr(args, name, None))}


# ---------------------------------------------------------------------------------------------------- commands
def cmd_score(args) -> int:
    with _output(args, "score", record_settings=True) as out:
        out.expect("run", {"details": bool(args.details), "dtype": args.dtype, "format": args.format,
                           "models": _model_ids(args)},
                   about={"models": {k: getattr(args, k) for k in ("policy", "reference", "scorer")},
                          "limit": args.limit, "input": os.path.abspath(args.input)})
        # the records already scored are checked (same ids, order and content) while the first new one is read
        trajs = _checked(out.skip_done(_trajectories(args), args.input, args.limit))
        scorer = _load_scorer(args)
        out.expect("config", scorer.config.to_dict())
        with_parts = scorer.config.step_separator is not None
        for res in _progress(scorer.iter_score(trajs, details=args.details), args, "scoring"):
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
    from .results import METHOD

    if args.by != METHOD and args.by not in BASELINES:
        raise UsageError(f"--by {args.by!r}: expected {METHOD} or one of {', '.join(BASELINES)}")
    with _output(args, "rank", atomic=True) as out:
        trajs = list(_trajectories(args))  # the whole input is read (and validated) before the models load
        scorer = _load_scorer(args, [] if args.by == METHOD else [args.by])
        results = list(_progress(scorer.iter_score(trajs), args, "scoring"))
        by_id = {r.id: t for r, t in zip(results, trajs)}
        chosen = scorer.best_of_n(results, using=args.by)
        sizes = Counter(r.group for r in results if r.group is not None)
        lines = []
        for group, res in chosen.items():
            # n: the size of the group best_of_n chose from; a trajectory without a group is a group of its own
            n = sizes[res.group] if res.group is not None else 1
            row = {"group": res.group, "id": res.id, "score": res.score if args.by == METHOD else res.baselines[args.by],
                   "by": args.by, "n": n, "reward": res.reward,
                   "trajectory": by_id[res.id].to_dict()}
            lines.append(_dumps(row) + "\n")
        out.write_all("".join(lines))
    print(f"chose {len(chosen)} of {len(results)} trajectories -> {args.output}", file=sys.stderr)
    return EXIT_OK


def cmd_attribute(args) -> int:
    from .loaders import whowhen_agent
    from .results import METHOD

    speakers: dict[str, tuple[list[str], Any]] = {}

    def remember(trajectories):
        for t in trajectories:
            speakers[str(t.id)] = ([whowhen_agent(m) for m in t.messages], t.metadata.get("mistake_agent"))
            yield t

    step_hits = agent_hits = n_step = n_agent = 0
    with _output(args, "attribute") as out:
        trajs = _checked(remember(_trajectories(args)))
        scorer = _load_scorer(args)
        for res in _progress(scorer.iter_score(trajs), args, "scoring"):
            agents, mistake_agent = speakers.pop(str(res.id))
            pred = res.predicted_mistake(scorer.config.attribution, scorer.config.attribution_threshold)
            row = {"id": res.id, "predicted_step": pred, "predicted_agent": agents[pred],
                   "mistake_step": res.mistake_step, "mistake_agent": mistake_agent,
                   "action_messages": res.action_messages, "step_values": res.action_values[METHOD]}
            if res.mistake_step is not None:
                n_step, step_hits = n_step + 1, step_hits + (pred == res.mistake_step)
            if mistake_agent is not None:
                n_agent, agent_hits = n_agent + 1, agent_hits + (agents[pred] == mistake_agent)
            out.write_line(_dumps(row))
        out.finish()
    print(f"attributed {out.written} trajectories -> {args.output}", file=sys.stderr)
    if n_step:
        print(f"step-level accuracy {step_hits / n_step:.3f} ({step_hits}/{n_step})", file=sys.stderr)
    if n_agent:
        print(f"agent-level accuracy {agent_hits / n_agent:.3f} ({agent_hits}/{n_agent})", file=sys.stderr)
    return EXIT_OK


def cmd_evaluate(args) -> int:
    from .baselines import BASELINES
    from .metrics import format_table

    methods = list(BASELINES) if args.methods == "all" else [m for m in args.methods.split(",") if m]
    unknown = [m for m in methods if m not in BASELINES]
    if unknown:
        raise UsageError(f"--methods: unknown {unknown}; known: {', '.join(BASELINES)}")
    with _output(args, "evaluate", atomic=True) if args.output else contextlib.nullcontext() as out:
        trajs = _checked(_trajectories(args))
        scorer = _load_scorer(args, methods)
        results = list(_progress(scorer.iter_score(trajs), args, "scoring"))
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


COMMANDS = {"score": cmd_score, "rank": cmd_rank, "attribute": cmd_attribute, "evaluate": cmd_evaluate,
            "train": cmd_train, "demo": cmd_demo, "env": cmd_env}


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    args = build_parser().parse_args(argv)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    try:
        return COMMANDS[args.command](args)
    except ProgadvDataError as e:
        print(f"progadv: bad data: {e}", file=sys.stderr)
        return EXIT_DATA
    except (UsageError, ConfigError) as e:
        print(f"progadv: {e}", file=sys.stderr)
        return EXIT_USAGE
    except (ValueError, FileNotFoundError, OSError) as e:
        print(f"progadv: {type(e).__name__}: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt as e:  # Ctrl-C: the output keeps its complete lines and its lock is released
        print(f"progadv: {e or 'interrupted'}", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
