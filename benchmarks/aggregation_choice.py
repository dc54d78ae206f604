"""Which token/step aggregation to default to: every combination, scored on the demo's TRAINING trajectories.

    python examples/flight_demo.py --output-dir flight-demo && python benchmarks/aggregation_choice.py --demo-dir flight-demo

Scores are computed once (per-token log-probs, `details=True`) and re-aggregated for each combination, so the table
costs one scoring pass. The training split is used so that the choice does not peek at the demo's held-out table.
"""

import argparse
import itertools
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from progadv_trl import ProgressAdvantageScorer, load_trajectories  # noqa: E402
from progadv_trl.advantage import (STEP_AGGREGATIONS, TOKEN_AGGREGATIONS, cumulative, step_advantages,  # noqa: E402
                                   trajectory_aggregate)
from progadv_trl.metrics import evaluate_methods, format_table  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--demo-dir", default="flight-demo")
    p.add_argument("--split", default="train", choices=["train", "heldout"])
    args = p.parse_args()
    trajs = load_trajectories(os.path.join(args.demo_dir, f"trajectories-{args.split}.jsonl"))
    scorer = ProgressAdvantageScorer.from_models(os.path.join(args.demo_dir, "policy"),
                                                 os.path.join(args.demo_dir, "reference"))
    results = scorer.score(trajs, details=True)
    methods = {}
    for tok_agg, step_agg, cum in itertools.product(TOKEN_AGGREGATIONS, STEP_AGGREGATIONS, (False, True)):
        scores, steps = [], []
        for r in results:
            t = r.tokens
            lp = torch.tensor([float("nan") if v is None else v for v in t["policy_logprob"]], dtype=torch.float64)
            lr = torch.tensor([float("nan") if v is None else v for v in t["reference_logprob"]], dtype=torch.float64)
            idx = torch.tensor(t["step_index"])
            idx = torch.where(torch.isnan(lp), torch.full_like(idx, -1), idx)
            adv = step_advantages(lp, lr, idx, len(r.steps), token_agg=tok_agg)
            scores.append(trajectory_aggregate(cumulative(adv) if cum else adv, step_agg))
            steps.append(adv)
        methods[f"{tok_agg}/{step_agg}{'/cumulative' if cum else ''}"] = {"scores": scores, "step_values": steps}
    mistakes = [r.action_messages.index(r.mistake_step) if r.mistake_step is not None else None for r in results]
    table = evaluate_methods(methods, success=[r.success for r in results], groups=[r.group for r in results],
                             mistake_steps=mistakes, attribution={m: "running_sum" for m in methods})
    ranked = dict(sorted(table.items(), key=lambda kv: -kv[1]["auroc"]))
    print(f"{len(results)} {args.split} trajectories, progress advantage under every aggregation (sorted by AUROC)")
    print(format_table(ranked, ["auroc", "spearman", "best_of_n", "attribution_accuracy"]))


if __name__ == "__main__":
    main()
