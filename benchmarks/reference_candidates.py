"""Which reference to score the demo's final GRPO policy against: the initial one, weight-space blends, or an earlier
policy, on episodes sampled from the reference and labelled by the exact DP.

    progadv demo --output-dir progadv-demo     # once (seed 0), then:
    python benchmarks/reference_candidates.py --demo-dir progadv-demo --episodes 256 --seed 30000

Candidates for the policy ``checkpoints/step-<policy-step>`` of ``--run``: ``initial`` (the run's reference),
``alpha:a`` for each ``--alphas`` (``theta_ref + a * (theta - theta_ref)``, built by
``ProgressAdvantageScorer.from_models(..., reference_alpha=a)``) and ``previous`` (``checkpoints/step-<previous-step>``
as the reference). Columns: AUROC of the trajectory score for success, best-of-8 success, Spearman of step values
with the exact A* (defined against the INITIAL reference, so it is expected to drop for the others), attribution
accuracy of the decisive mistake (the scorer's configured rule). Add ``--json FILE`` to keep the numbers.
"""

import argparse
import json
import os
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

COLUMNS = ("auroc", "best_of_n", "spearman_exact", "spearman_exact_live", "attribution_accuracy")


def episodes(demo: Path, ref_dir: Path, n: int, seed: int, beta: float):
    """``n`` episodes of the reference in groups of the demo's size, labelled by the exact DP at ``beta``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from progadv_trl.envs.codec import ChatCodec
    from progadv_trl.envs.demo import ExactLabels
    from progadv_trl.envs.demo_config import DemoConfig
    from progadv_trl.envs.number_line import NumberLineEnv
    from progadv_trl.envs.oracle import CachedOracle, LMReplyOracle
    from progadv_trl.envs.sampling import sample_episodes

    cfg = DemoConfig()
    env = NumberLineEnv(**cfg.env)
    tok = AutoTokenizer.from_pretrained(str(ref_dir))
    model = AutoModelForCausalLM.from_pretrained(str(ref_dir)).eval()
    oracle_path = demo / "cache" / f"oracle-{cfg.oracle_key()}.pkl"
    oracle = CachedOracle.load(oracle_path, LMReplyOracle(model, ChatCodec(tok, env), cfg.temperature))
    solver = ExactLabels(env, oracle).solver(beta)
    return sample_episodes(model, tok, env, n, cfg.temperature, seed=seed, solver=solver,
                           group_size=cfg.group_size), cfg


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--demo-dir", default="progadv-demo")
    p.add_argument("--run", default="grpo-beta0.04")
    p.add_argument("--beta", type=float, default=0.04, help="the run's KL coefficient (scores and exact labels)")
    p.add_argument("--policy-step", type=int, default=300)
    p.add_argument("--previous-step", type=int, default=200)
    p.add_argument("--alphas", type=float, nargs="*", default=[-1.0, -0.5, 0.5])
    p.add_argument("--episodes", type=int, default=256)
    p.add_argument("--seed", type=int, default=30000)
    p.add_argument("--json", help="write the table here")
    args = p.parse_args()
    torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))

    from progadv_trl import ProgressAdvantageScorer
    from progadv_trl.envs.demo_config import DemoConfig
    from progadv_trl.envs.evaluation import evaluate_episodes
    from progadv_trl.trajectory_scores import METHOD

    demo = Path(args.demo_dir)
    ref_dir = demo / "cache" / f"reference-{DemoConfig().reference_key()}"
    ckpts = demo / args.run / "checkpoints"
    policy = ckpts / f"step-{args.policy_step}"
    t0 = time.perf_counter()
    trajs, cfg = episodes(demo, ref_dir, args.episodes, args.seed, args.beta)
    print(f"{len(trajs)} reference episodes (seed {args.seed}) in {time.perf_counter() - t0:.0f}s; "
          f"success {sum(t.success() for t in trajs) / len(trajs):.3f}")
    candidates = [("initial", {"reference": ref_dir})]
    candidates += [(f"alpha:{a:g}", {"reference": ref_dir, "reference_alpha": a}) for a in args.alphas]
    candidates += [(f"previous (step-{args.previous_step})", {"reference": ckpts / f"step-{args.previous_step}"})]
    table = {}
    for name, kwargs in candidates:
        scorer = ProgressAdvantageScorer.from_models(policy, beta=args.beta, temperature=cfg.temperature,
                                                     token_agg="sum", **kwargs)
        row = evaluate_episodes(trajs, scorer.score(trajs))["table"][METHOD]
        table[name] = {c: row.get(c) for c in COLUMNS}
    header = f"{'reference':<22}" + "".join(f"{c:>22}" for c in COLUMNS)
    print(f"policy {policy}\n{header}")
    for name, row in table.items():
        print(f"{name:<22}" + "".join(f"{row[c]:>22.3f}" for c in COLUMNS))
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "n": len(trajs), "table": table}, indent=2))


if __name__ == "__main__":
    main()
