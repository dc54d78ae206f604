"""Progress advantage against trained reward models (ORM and PRM) with a learning curve over labelled episodes.

    python benchmarks/trained_reward_models.py --demo-dir /tmp/demo-run --run grpo-beta0.04 [--sizes 64 256 1024]
        [--threads 2] [--output trained_reward_models.json]

Reads a finished ``progadv demo`` run (seed from its config): the reference checkpoint and the exact DP's cached
reply probabilities (``cache/``) and the run's exported scorer (``<run>/_progadv/scorer``). Training data: episodes
the reference samples with seed ``seed + 40000`` (disjoint from the demo's 10000/20000/30000 seeds), labelled with the
exact values at the run's ``exact_beta``; the first ``n`` of them (whole groups of 8) train the ``@n`` models, with
the same budget whatever ``n`` (:class:`~progadv_trl.envs.reward_models.RewardModelConfig`). Evaluation: the demo's
reference episodes (``eval_episodes`` at seed ``seed + 30000``, the "on reference episodes" table), scored by the
exported scorer, with the ORM and PRM rows added by
:func:`~progadv_trl.envs.reward_models.add_reward_model_rows` and the table of
:func:`~progadv_trl.envs.evaluation.evaluate_episodes`.
"""

import argparse
import json
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch  # noqa: E402

COLUMNS = ("auroc", "best_of_n", "attribution_accuracy", "spearman_exact", "spearman_exact_live")


def visible_outcome(traj, env) -> float:
    """P(success) read off what an ORM sees, no labels: an early end after a valid reply is a success; at the turn
    budget, a last move toward a goal one step away succeeds unless it slips."""
    replies, positions, task = traj.metadata["replies"], traj.metadata["positions"], traj.metadata["task"]
    if replies[-1] is None:
        return 0.0
    if len(replies) < env.max_turns:
        return 1.0
    before = positions[-2] if len(positions) > 1 else task["start"]
    toward = (env.reply_action[replies[-1]] == 1) == (task["goal"] > before)
    return 1.0 - env.slip if toward and abs(task["goal"] - before) == 1 else 0.0


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--demo-dir", default="progadv-demo")
    p.add_argument("--run", default="grpo-beta0.04")
    p.add_argument("--sizes", type=int, nargs="+", default=[64, 256, 1024])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--output", default=None, help="write the table and the models' info here (JSON)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from progadv_trl import ProgressAdvantageScorer
    from progadv_trl.envs.codec import ChatCodec
    from progadv_trl.envs.demo import ExactLabels
    from progadv_trl.envs.demo_config import DemoConfig
    from progadv_trl.envs.evaluation import evaluate_episodes
    from progadv_trl.envs.number_line import NumberLineEnv
    from progadv_trl.envs.oracle import CachedOracle, LMReplyOracle
    from progadv_trl.envs.reward_models import add_reward_model_rows, train_orm, train_prm
    from progadv_trl.envs.sampling import sample_episodes
    from progadv_trl.metrics import auroc, best_of_n

    demo = Path(args.demo_dir)
    metrics = json.loads((demo / "report" / "metrics.json").read_text(encoding="utf-8"))
    cfg = DemoConfig(**metrics["config"])
    run = next(r for r in cfg.runs if r.name == args.run)
    env = NumberLineEnv(**cfg.env)
    ref_dir = demo / "cache" / f"reference-{cfg.reference_key()}"
    tok = AutoTokenizer.from_pretrained(str(ref_dir))
    reference = AutoModelForCausalLM.from_pretrained(str(ref_dir)).eval()
    oracle = CachedOracle.load(demo / "cache" / f"oracle-{cfg.oracle_key()}.pkl",
                               LMReplyOracle(reference, ChatCodec(tok, env), cfg.temperature))
    solver = ExactLabels(env, oracle).solver(run.exact_beta)

    t0 = time.time()
    train = sample_episodes(reference, tok, env, max(args.sizes), cfg.temperature, seed=cfg.seed + 40_000,
                            solver=solver, group_size=cfg.group_size)
    episodes = sample_episodes(reference, tok, env, cfg.eval_episodes, cfg.temperature, seed=cfg.seed + 30_000,
                               solver=solver, group_size=cfg.group_size)
    results = ProgressAdvantageScorer.from_pretrained(demo / args.run / "_progadv" / "scorer").score(episodes)
    print(f"episodes sampled and scored ({time.time() - t0:.0f}s); training success "
          f"{sum(t.success() for t in train) / len(train):.3f}")

    models, info = {}, {}
    for n in args.sizes:
        for kind, fit in (("orm", train_orm), ("prm", train_prm)):
            name = f"{kind}@{n}"
            models[name] = fit(ref_dir, train[:n])
            info[name] = models[name].info
            i = info[name]
            print(f"{name}: {i['n_examples']} {i['example']}s, {i['epochs']:.1f} epochs, {i['seconds']:.1f}s "
                  f"({i['cpu_seconds']:.1f} CPU s), final loss {i['final_loss']:.4f}", flush=True)
    add_reward_model_rows(episodes, results, models)
    evaluation = evaluate_episodes(episodes, results)
    rows = ["progress_advantage", *models, "exact_advantage", "oracle_success_gap"]
    print(f"\n{evaluation['n_episodes']} reference episodes (seed {cfg.seed + 30_000}), success "
          f"{evaluation['success']:.3f}, {evaluation['n_attribution_labelled']} failures with a labelled mistake\n")
    print("| method | " + " | ".join(COLUMNS) + " | train seconds (CPU seconds) |")
    print("|---" * (len(COLUMNS) + 2) + "|")
    for name in rows:
        row = evaluation["table"][name]
        secs = f"{info[name]['seconds']:.1f} ({info[name]['cpu_seconds']:.1f})" if name in info else ""
        print(f"| {name} | " + " | ".join(f"{row[c]:.3f}" for c in COLUMNS) + f" | {secs} |")
    success, groups = [t.success() for t in episodes], [t.group for t in episodes]
    rule = [visible_outcome(t, env) for t in episodes]
    visible = {"auroc": auroc(rule, success), "best_of_n": best_of_n(rule, groups, success)["best_of_n"]}
    print(f"\nlabel-free rule on what the ORM reads (episode length, last reply, last position): AUROC "
          f"{visible['auroc']:.3f}, best-of-{cfg.group_size} {visible['best_of_n']:.3f}")
    if args.output:
        out = {"table": {n: evaluation["table"][n] for n in rows}, "models": info, "threads": args.threads,
               "visible_outcome_rule": visible,
               **{k: v for k, v in evaluation.items() if k != "table"}}
        Path(args.output).write_text(json.dumps(out, indent=2, default=float), encoding="utf-8")


if __name__ == "__main__":
    main()
