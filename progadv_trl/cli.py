"""The ``progadv`` command: ``score``, ``rank``, ``attribute``, ``evaluate``, ``train``, ``demo``, ``env``.

Exit codes: 0 success, 2 bad usage (arguments, config), 1 bad data (the message names file, record and field).
Results are streamed: every line already written stays a valid JSON line, and ``--resume`` continues after the last
one.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any, Iterator

from .data import ProgadvDataError, json_ready

EXIT_OK, EXIT_DATA, EXIT_USAGE = 0, 1, 2


class UsageError(Exception):
    pass


def _json_default(o: Any):
    if hasattr(o, "item"):
        return o.item()
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def _dumps(obj: Any) -> str:
    return json.dumps(json_ready(obj), ensure_ascii=False, default=_json_default)


# ---------------------------------------------------------------------------------------------------- arguments
def _add_model_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("models")
    g.add_argument("--policy", help="policy checkpoint folder (or PEFT adapter folder)")
    g.add_argument("--reference", help="reference checkpoint folder (default for an adapter: its base)")
    g.add_argument("--scorer", help="a scorer folder saved by save_pretrained / the callback (instead of the models)")
    g.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    g.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"], help="model weights dtype")
    g.add_argument("--trust-remote-code", action="store_true", help="allow model code from the checkpoint")
    s = p.add_argument_group("scoring")
    s.add_argument("--config", help="YAML/JSON file with ProgressAdvantageConfig fields (under 'progadv:' or top)")
    s.add_argument("--beta", type=float)
    s.add_argument("--temperature", type=float)
    s.add_argument("--token-agg", choices=["sum", "mean", "last", "min", "max"])
    s.add_argument("--step-agg", choices=["mean", "sum", "last", "min", "max", "bottom10"])
    s.add_argument("--cumulative", action="store_true", default=None, help="aggregate running sums (ImplicitPRM)")
    s.add_argument("--compat", choices=["authors"], help="reproduce the paper code's conventions")
    s.add_argument("--rendering", choices=["chat_template", "plain"])
    s.add_argument("--step-separator", help="split each action into steps at this separator (escapes like \\n ok)")
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
    d.add_argument("--limit", type=int, help="score only the first N trajectories")
    d.add_argument("--no-progress", action="store_true", help="no progress bar")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="progadv", description="Step-level progress advantage from a policy and "
                                     "its reference: score, rank, attribute, evaluate.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("score", help="score trajectories step by step (JSONL out, one line per trajectory)")
    _add_model_args(p)
    p.add_argument("--output", required=True, help="output JSONL")
    p.add_argument("--details", action="store_true", help="add per-token ids, step index and log-probs")
    p.add_argument("--resume", action="store_true", help="append after the last id already in --output")
    p = sub.add_parser("rank", help="best-of-N: write the chosen trajectory of each group")
    _add_model_args(p)
    p.add_argument("--output", required=True)
    p.add_argument("--by", default="progress_advantage", help="progress_advantage or a baseline name")
    p = sub.add_parser("attribute", help="failure attribution: the predicted decisive-error step per trajectory")
    _add_model_args(p)
    p.add_argument("--output", required=True)
    p = sub.add_parser("evaluate", help="metric table for progress advantage and the baselines")
    _add_model_args(p)
    p.add_argument("--output", help="write the table as JSON here")
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


def _config_from_args(args):
    from .config import ProgressAdvantageConfig

    base = ProgressAdvantageConfig.from_file(args.config) if args.config else None
    overrides = {
        "beta": args.beta, "temperature": args.temperature, "token_agg": args.token_agg, "step_agg": args.step_agg,
        "cumulative": args.cumulative, "compat": args.compat, "rendering": args.rendering,
        "step_separator": (args.step_separator.encode().decode("unicode_escape")
                           if args.step_separator else None),
        "max_length": args.max_length, "batch_size": args.batch_size, "baselines": args.baselines,
        "backend": args.backend,
        "attribution": args.attribution, "attribution_threshold": args.attribution_threshold,
        "success_threshold": args.success_threshold,
    }
    return base, {k: v for k, v in overrides.items() if v is not None}


def _load_scorer(args, baselines: list[str] | None = None):
    import torch

    from .config import ProgressAdvantageConfig
    from .scorer import ProgressAdvantageScorer

    base, overrides = _config_from_args(args)
    if baselines is not None:
        overrides["baselines"] = baselines
    dtype = getattr(torch, args.dtype) if args.dtype else None
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.scorer:
        if args.policy or args.reference:
            raise UsageError("give either --scorer or --policy/--reference, not both")
        if base is not None:
            overrides = {**{k: v for k, v in base.to_dict().items() if k != "config_version"}, **overrides}
        return ProgressAdvantageScorer.from_pretrained(args.scorer, device=device, dtype=dtype,
                                                       trust_remote_code=args.trust_remote_code, **overrides)
    if not args.policy:
        raise UsageError("--policy (and usually --reference) or --scorer is required")
    config = base or ProgressAdvantageConfig()
    return ProgressAdvantageScorer.from_models(args.policy, args.reference, config=config, device=device,
                                               dtype=dtype, trust_remote_code=args.trust_remote_code, **overrides)


def _trajectories(args, skip_ids: set[str] | None = None) -> Iterator:
    from .loaders import iter_trajectories

    for traj in iter_trajectories(args.input, args.format, limit=args.limit):
        if skip_ids and str(traj.id) in skip_ids:
            continue
        yield traj


def _progress(iterable, args, desc: str):
    if args.no_progress:
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, desc=desc, unit="traj", file=sys.stderr, disable=None)


def _scored(args, scorer, skip_ids=None, details=False):
    return _progress(scorer.iter_score(_trajectories(args, skip_ids), details=details), args, "scoring")


def _append_line(fd: int, line: str) -> None:
    """One ``write`` per line on an O_APPEND descriptor: a kill leaves whole lines (at worst a cut last line,
    which ``--resume`` removes), never interleaved fragments."""
    data = (line + "\n").encode("utf-8")
    while data:
        data = data[os.write(fd, data):]


def _resume_ids(path: Path) -> set[str]:
    """Ids already in a JSONL output; a partial last line (killed mid-write) is cut off."""
    if not path.exists():
        return set()
    ids, good = set(), 0
    with open(path, "rb") as f:
        for raw in f:
            try:
                ids.add(str(json.loads(raw)["id"]))
            except (ValueError, KeyError):
                break
            if not raw.endswith(b"\n"):
                break
            good += len(raw)
    with open(path, "r+b") as f:
        f.truncate(good)
    return ids


# ---------------------------------------------------------------------------------------------------- commands
def cmd_score(args) -> int:
    scorer = _load_scorer(args)
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    skip = _resume_ids(out) if args.resume else set()
    with_parts = scorer.config.step_separator is not None
    n = 0
    fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_APPEND | (0 if args.resume else os.O_TRUNC), 0o644)
    try:
        for res in _scored(args, scorer, skip, details=args.details):
            _append_line(fd, _dumps(res.to_dict(scorer.config.baselines, with_parts)))
            n += 1
    finally:
        os.close(fd)
    print(f"scored {n} trajectories -> {out}" + (f" (skipped {len(skip)} already there)" if skip else ""),
          file=sys.stderr)
    return EXIT_OK


def cmd_rank(args) -> int:
    from .baselines import BASELINES
    from .results import METHOD

    scorer = _load_scorer(args, [] if args.by == METHOD else [args.by])

    if args.by != METHOD and args.by not in BASELINES:
        raise UsageError(f"--by {args.by!r}: expected {METHOD} or one of {', '.join(BASELINES)}")
    trajs = list(_trajectories(args))
    results = list(_progress(scorer.iter_score(trajs), args, "scoring"))
    by_id = {r.id: t for r, t in zip(results, trajs)}
    chosen = scorer.best_of_n(results, using=args.by)
    with open(args.output, "w", encoding="utf-8") as f:
        for group, res in chosen.items():
            row = {"group": res.group, "id": res.id, "score": res.score if args.by == METHOD else res.baselines[args.by],
                   "by": args.by, "n": sum(1 for r in results if r.group == res.group), "reward": res.reward,
                   "trajectory": by_id[res.id].to_dict()}
            f.write(_dumps(row) + "\n")
    print(f"chose {len(chosen)} of {len(results)} trajectories -> {args.output}", file=sys.stderr)
    return EXIT_OK


def cmd_attribute(args) -> int:
    scorer = _load_scorer(args)
    from .loaders import whowhen_agent
    from .results import METHOD

    speakers: dict[str, tuple[list[str], Any]] = {}

    def remember(trajectories):
        for t in trajectories:
            speakers[str(t.id)] = ([whowhen_agent(m) for m in t.messages], t.metadata.get("mistake_agent"))
            yield t

    n = step_hits = agent_hits = n_step = n_agent = 0
    with open(args.output, "w", encoding="utf-8") as f:
        for res in _progress(scorer.iter_score(remember(_trajectories(args))), args, "scoring"):
            agents, mistake_agent = speakers.pop(str(res.id))
            pred = res.predicted_mistake(scorer.config.attribution, scorer.config.attribution_threshold)
            row = {"id": res.id, "predicted_step": pred, "predicted_agent": agents[pred],
                   "mistake_step": res.mistake_step, "mistake_agent": mistake_agent,
                   "action_messages": res.action_messages, "step_values": res.action_values[METHOD]}
            if res.mistake_step is not None:
                n_step, step_hits = n_step + 1, step_hits + (pred == res.mistake_step)
            if mistake_agent is not None:
                n_agent, agent_hits = n_agent + 1, agent_hits + (agents[pred] == mistake_agent)
            f.write(_dumps(row) + "\n")
            f.flush()
            n += 1
    print(f"attributed {n} trajectories -> {args.output}", file=sys.stderr)
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
    scorer = _load_scorer(args, methods)
    results = list(_scored(args, scorer))
    table = scorer.evaluate(results, methods)
    print(format_table(table))
    if args.output:
        Path(args.output).write_text(_dumps({"n": len(results), "config": scorer.config.to_dict(),
                                             "table": table}) + "\n", encoding="utf-8")
    return EXIT_OK


def cmd_train(args) -> int:
    from .train import train_from_config

    overrides = {k: v for k, v in (("output_dir", args.output_dir), ("max_steps", args.max_steps)) if v is not None}
    trainer = train_from_config(args.config, overrides)
    print(f"history: {trainer.args.output_dir}/progadv-history.jsonl   scorer: {trainer.args.output_dir}/progadv-scorer",
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
    except UsageError as e:
        print(f"progadv: {e}", file=sys.stderr)
        return EXIT_USAGE
    except (ValueError, FileNotFoundError, OSError) as e:
        print(f"progadv: {type(e).__name__}: {e}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
