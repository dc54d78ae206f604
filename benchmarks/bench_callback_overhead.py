"""The callback's share of a GRPO run's wall time, at its default interval (the trainer's logging_steps).

    python benchmarks/bench_callback_overhead.py                      # about 3-5 minutes on 2 CPU cores
    python benchmarks/bench_callback_overhead.py --reference-dir progadv-demo/reference --steps 40

Runs the number-line agent GRPO (``progadv_trl.envs.training.train_grpo``, rollout_func, 64 episodes per step) twice
from the same reference, once bare and once with ``ProgressAdvantageCallback`` scoring a fixed held-out set of
``--heldout`` labelled episodes at train begin, every ``--logging-steps`` steps and at the end; prints both wall
times and the callback's share (its own ``progadv/seconds`` summed, and the difference of the two runs).
"""

import argparse
import json
import os
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--reference-dir", default=None, help="a trained number-line reference (default: train one)")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--logging-steps", type=int, default=10)
    p.add_argument("--heldout", type=int, default=64)
    args = p.parse_args()

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from progadv_trl import ProgressAdvantageCallback, ProgressAdvantageConfig
    from progadv_trl.envs.number_line import NumberLineEnv
    from progadv_trl.envs.pretrain import train_reference
    from progadv_trl.envs.sampling import sample_episodes
    from progadv_trl.envs.training import train_grpo

    work = tempfile.mkdtemp(prefix="bench-callback-")
    ref = args.reference_dir or str(train_reference(os.path.join(work, "reference"), steps=300))
    env = NumberLineEnv()
    tok = AutoTokenizer.from_pretrained(ref)
    heldout = sample_episodes(AutoModelForCausalLM.from_pretrained(ref), tok, env, args.heldout, seed=123)
    times = {}
    for name in ("bare", "with callback"):
        trainer = train_grpo(ref, os.path.join(work, name.replace(" ", "-")), max_steps=args.steps, train=False,
                             logging_steps=args.logging_steps, env=env)
        if name != "bare":
            trainer.add_callback(ProgressAdvantageCallback(trainer=trainer, config=ProgressAdvantageConfig(
                heldout=heldout, export=False)))
        torch.manual_seed(0)
        t = time.perf_counter()
        trainer.train()
        times[name] = time.perf_counter() - t
    hist = [json.loads(x) for x in open(os.path.join(work, "with-callback", "progadv-history.jsonl"))]
    own = sum(h["progadv/seconds"] for h in hist)
    print(f"GRPO {args.steps} steps x 64 episodes, callback every {args.logging_steps} steps "
          f"({len(hist)} evaluations of {args.heldout} held-out episodes), torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads\n")
    print("| run | wall s | callback s (its own timer) | callback share |")
    print("|---|---|---|---|")
    print(f"| bare | {times['bare']:.1f} | - | - |")
    print(f"| with callback | {times['with callback']:.1f} | {own:.1f} | {own / times['with callback']:.1%} |")
    print(f"\ndifference of the two runs: {(times['with callback'] - times['bare']) / times['with callback']:.1%} "
          "(noisier: includes run-to-run variation)")


if __name__ == "__main__":
    main()
