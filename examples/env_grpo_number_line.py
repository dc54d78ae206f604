"""Progress advantage against the EXACT optimal advantage, on an agent task trained with TRL's GRPO on CPU.

Run (from the repository root; a few minutes on 2 CPU cores):

    python examples/env_grpo_number_line.py --output-dir runs/env-number-line

What it does:

1. trains the reference: a tiny Qwen2 fine-tuned on imperfect demonstrations of the number-line task (often wrong,
   biased toward "left", paraphrases with frequencies 70/20/8/2%);
2. solves the task exactly: dynamic programming over the tree of histories with the reference's reply
   probabilities gives ``A*(h, y) = Q*(h, y) - V*(h)`` of the KL-regularised optimum for every step;
3. runs GRPO from the reference (``beta``, ``loss_type``, ``temperature`` as given) through a ``rollout_func``;
4. samples held-out episodes (groups of 8 per task) before and after, scores them with
   ``ProgressAdvantageScorer`` (token aggregation "sum": a step's advantage is ``beta * log(pi(y|h) / pi_ref(y|h))``)
   and prints success rates, the KL to the reference, and the Spearman correlation of per-step scores with the
   exact ``A*`` (beside the policy's own log-prob, which mixes in the reference's value-irrelevant prior).

Everything is written under ``--output-dir`` (``reference/``, ``policy/``, ``heldout.jsonl``, ``summary.json``).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from scipy.stats import spearmanr  # noqa: E402


def step_rows(trajectories, results, beta: float) -> dict[str, np.ndarray]:
    """Per step: exact A*, the scorer's advantage, log P_ref (exact, from the DP) and log pi = ratio + log P_ref."""
    rows = {"exact": [], "advantage": [], "ref_logprob": [], "live": [], "success_gap": []}
    for traj, res in zip(trajectories, results):
        by_message = {s.message_index: s.advantage for s in res.steps}
        for k, m in enumerate(traj.steps):
            ref_lp = traj.metadata["reference_logprob"][k]
            if ref_lp is None:  # invalid reply or no success possible: P_ref was not queried
                ref_lp = float("nan")
            rows["exact"].append(traj.metadata["exact_advantage"][k])
            rows["advantage"].append(by_message[m])
            rows["ref_logprob"].append(ref_lp)
            rows["success_gap"].append(traj.metadata["optimal_success_advantage"][k])
            # success still possible and a valid reply: where P_ref(y|h) is known and A* is informative
            rows["live"].append(traj.metadata["exact_value"][k] > 0 and traj.metadata["replies"][k] is not None)
    out = {k: np.asarray(v, dtype=float) for k, v in rows.items()}
    out["live"] = out["live"].astype(bool)
    out["policy_logprob"] = out["advantage"] / beta + out["ref_logprob"]
    return out


def auroc_good_step(score, gap, margin: float = 0.1) -> float:
    """AUROC of a step score for telling good actions from bad ones (losing > margin of success probability)."""
    from sklearn.metrics import roc_auc_score

    good = gap >= -margin
    return float(roc_auc_score(good, score)) if 0 < good.sum() < len(good) else float("nan")


def spearman(a, b) -> float:
    ok = np.isfinite(a) & np.isfinite(b)
    return float(spearmanr(a[ok], b[ok]).statistic) if ok.sum() > 2 else float("nan")


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--output-dir", default="runs/env-number-line")
    p.add_argument("--beta", type=float, default=0.04)
    p.add_argument("--loss-type", default="grpo")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--steps", type=int, default=100, help="GRPO steps (64 episodes each)")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--reference-steps", type=int, default=900, help="SFT steps of the reference")
    p.add_argument("--n-eval", type=int, default=512, help="held-out episodes before and after (groups of 8)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from progadv_trl import ProgressAdvantageScorer, save_trajectories
    from progadv_trl.envs import (ChatCodec, ExactSolver, LMReplyOracle, NumberLineEnv, sample_episodes,
                                  train_grpo, train_reference)
    from progadv_trl.metrics import format_table

    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    env, t0, timings = NumberLineEnv(), time.time(), {}
    # exact A* is defined with the trainer's beta; a beta-0 run is read with beta = 1 (raw log-ratio)
    beta = args.beta if args.beta > 0 else 1.0

    ref_dir = out / "reference"
    if not (ref_dir / "model.safetensors").exists():
        train_reference(ref_dir, env, steps=args.reference_steps, seed=args.seed)
    timings["reference_s"] = round(time.time() - t0, 1)
    tok = AutoTokenizer.from_pretrained(str(ref_dir))
    reference = AutoModelForCausalLM.from_pretrained(str(ref_dir)).eval()
    print(f"[1/4] reference: {ref_dir} ({timings['reference_s']}s)")

    t = time.time()
    solver = ExactSolver(env, LMReplyOracle(reference, ChatCodec(tok, env), args.temperature), beta)
    sols = [solver(task) for task in env.tasks()]
    timings["exact_dp_s"] = round(time.time() - t, 1)
    exact = {"queried_histories": sum(len(s.logp) for s in sols),
             "success_reference": float(np.mean([s.success_reference for s in sols])),
             "success_kl_optimal": float(np.mean([s.success_soft for s in sols])),
             "success_optimal": float(np.mean([s.success_optimal for s in sols]))}
    print(f"[2/4] exact DP over {exact['queried_histories']} histories of {len(sols)} tasks "
          f"({timings['exact_dp_s']}s); mean success over tasks: reference {exact['success_reference']:.3f}, "
          f"KL-optimal (beta={beta}) {exact['success_kl_optimal']:.3f}, optimal {exact['success_optimal']:.3f}")

    before = sample_episodes(reference, tok, env, args.n_eval, args.temperature, seed=10_000 + args.seed,
                             solver=solver)
    t = time.time()
    trainer = train_grpo(ref_dir, out / "policy", env=env, beta=args.beta, loss_type=args.loss_type,
                         max_steps=args.steps, learning_rate=args.lr, temperature=args.temperature, seed=args.seed)
    timings["grpo_s"] = round(time.time() - t, 1)
    timings["grpo_s_per_step"] = round(timings["grpo_s"] / args.steps, 3)
    logs = [r for r in trainer.state.log_history if "loss" in r]
    kl_log = [r["kl"] for r in logs if "kl" in r]
    print(f"[3/4] GRPO: {args.steps} steps in {timings['grpo_s']}s ({timings['grpo_s_per_step']}s/step); "
          f"train reward {logs[0]['reward']:.3f} -> {np.mean([r['reward'] for r in logs[-10:]]):.3f}"
          + (f"; TRL kl (last 10 steps) {np.mean(kl_log[-10:]):.3f}" if kl_log else ""))

    policy = AutoModelForCausalLM.from_pretrained(str(out / "policy")).eval()
    after = sample_episodes(policy, tok, env, args.n_eval, args.temperature, seed=20_000 + args.seed, solver=solver)
    save_trajectories(out / "heldout.jsonl", after)
    scorer = ProgressAdvantageScorer.from_models(out / "policy", ref_dir, beta=beta, temperature=args.temperature,
                                                 token_agg="sum", baselines=["all"])
    results = scorer.score(after)
    rows = step_rows(after, results, beta)
    live = rows["live"]
    success = lambda trajs: float(np.mean([tr.reward for tr in trajs]))  # noqa: E731
    summary = {
        "args": vars(args), "timings": timings, "exact": exact,
        "success_before": success(before), "success_after": success(after),
        "kl_per_episode": float(np.mean([sum(s.advantage for s in r.steps) / beta for r in results])),
        "n_steps": int(len(rows["exact"])), "n_live_steps": int(live.sum()),
        "spearman_progress_advantage": spearman(rows["advantage"], rows["exact"]),
        "spearman_progress_advantage_live": spearman(rows["advantage"][live], rows["exact"][live]),
        "spearman_policy_logprob_live": spearman(rows["policy_logprob"][live], rows["exact"][live]),
        "spearman_reference_logprob_live": spearman(rows["ref_logprob"][live], rows["exact"][live]),
        "auroc_good_step_progress_advantage": auroc_good_step(rows["advantage"][live], rows["success_gap"][live]),
        "auroc_good_step_policy_logprob": auroc_good_step(rows["policy_logprob"][live], rows["success_gap"][live]),
        "mean_abs_error_live": float(np.mean(np.abs(rows["advantage"][live] - rows["exact"][live]))),
        "table": scorer.evaluate(results),
    }
    print(f"[4/4] held-out success at T={args.temperature}: before {summary['success_before']:.3f}, after "
          f"{summary['success_after']:.3f}; KL(policy || reference) per episode {summary['kl_per_episode']:.3f}\n")
    print(f"per-step Spearman with exact A* ({summary['n_steps']} steps, {summary['n_live_steps']} where success is "
          f"still possible):")
    print(f"  progress advantage, all steps  {summary['spearman_progress_advantage']:.3f}")
    print(f"  progress advantage, live steps {summary['spearman_progress_advantage_live']:.3f}"
          f"   (mean |beta*log-ratio - A*| {summary['mean_abs_error_live']:.3f})")
    print(f"  policy log-prob,   live steps  {summary['spearman_policy_logprob_live']:.3f}")
    print(f"  reference log-prob, live steps {summary['spearman_reference_logprob_live']:.3f}")
    print(f"good vs bad actions (live steps, AUROC): progress advantage "
          f"{summary['auroc_good_step_progress_advantage']:.3f}, policy log-prob "
          f"{summary['auroc_good_step_policy_logprob']:.3f}\n")
    print(format_table(summary["table"], ["auroc", "spearman", "best_of_n", "mean_success", "oracle",
                                          "attribution_accuracy", "attribution_mae"]))
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=float), encoding="utf-8")
    return summary


if __name__ == "__main__":
    main()
