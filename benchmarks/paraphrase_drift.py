"""Where a policy's KL from the reference goes on the number-line task: the choice of ACTION (which matters) or of
the SPELLING of an action ("right", "move right", "go right", ... : value-irrelevant, so the KL-optimal policy keeps
the reference's preferences among them).

    progadv demo --output-dir progadv-demo          # once, then:
    python benchmarks/paraphrase_drift.py --demo-dir progadv-demo progadv-demo/grpo-beta0.04/checkpoints/step-300

For the reference and each policy folder given, samples 16 episodes of every task (temperature 1, seed 0) and prints
the reply-string frequencies and, per turn, the sampled KL of the spelling given the action,
``sum_y q(y | a) log(q(y | a) / p_ref(y | a))`` with ``q``/``p_ref`` the policy's/reference's spelling frequencies
within each action (pooled over states), and the same per episode (times the mean number of turns).
"""

import argparse
import os
import random
from collections import Counter
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def frequencies(model, codec, env, tasks, seed: int) -> tuple[Counter, int]:
    import torch

    from progadv_trl.envs.sampling import run_episodes

    eps = run_episodes(model, codec, tasks, temperature=1.0, generator=torch.Generator().manual_seed(seed),
                       rng=random.Random(seed))
    return Counter(None if r is None else env.replies[r] for e in eps for r in e.replies), len(eps)


def spelling_kl(q: Counter, p: Counter, env) -> float:
    """Sampled KL of the spelling given the action, averaged over the policy's valid turns."""
    import math

    total, n_valid = 0.0, sum(c for y, c in q.items() if y is not None)
    for action in set(env.reply_action):
        spellings = [y for y, a in zip(env.replies, env.reply_action) if a == action]
        qa, pa = sum(q[y] for y in spellings), sum(p[y] for y in spellings)
        for y in spellings:
            if q[y] and qa:
                p_y = max(p[y], 0.5) / pa  # a spelling the reference never sampled: half a count
                total += q[y] / n_valid * math.log((q[y] / qa) / p_y)
    return total


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("policies", nargs="+", help="policy checkpoint folders")
    parser.add_argument("--demo-dir", default="progadv-demo", help="the demo's output folder (its cache holds the "
                        "reference)")
    parser.add_argument("--episodes-per-task", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from progadv_trl.envs.codec import ChatCodec
    from progadv_trl.envs.demo_config import DemoConfig
    from progadv_trl.envs.number_line import NumberLineEnv

    torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))
    cfg = DemoConfig()
    env = NumberLineEnv(**cfg.env)
    ref_dir = Path(args.demo_dir) / "cache" / f"reference-{cfg.reference_key()}"
    tok = AutoTokenizer.from_pretrained(str(ref_dir))
    codec = ChatCodec(tok, env)
    tasks = [t for t in env.tasks() for _ in range(args.episodes_per_task)]
    ref_counts = None
    for path in [ref_dir, *args.policies]:
        model = AutoModelForCausalLM.from_pretrained(str(path)).eval()
        counts, n_eps = frequencies(model, codec, env, tasks, args.seed)
        ref_counts = ref_counts or counts
        n = sum(counts.values())
        freq = ", ".join(f"{y or 'invalid'} {counts[y] / n:.3f}" for y in [*env.replies, None] if counts[y])
        kl = spelling_kl(counts, ref_counts, env)
        print(f"{path}\n  turns/episode {n / n_eps:.2f}; spelling KL {kl:.3f} nats/turn, "
              f"{kl * n / n_eps:.3f} nats/episode\n  {freq}", flush=True)


if __name__ == "__main__":
    main()
