"""Bytes the callback writes to disk per evaluation, for each ``best_export`` setting.

    python benchmarks/bench_export_bytes.py            # about 1 minute on 2 CPU cores

Runs a short GRPO (tiny local model, beta 0, so the callback also writes its snapshot reference once) with the
callback evaluating at every step, and reads this process's written bytes (``wchar`` of ``/proc/self/io``) before and
after each evaluation. ``every_best`` writes a whole scorer (policy and reference weights) at each new best;
``end`` keeps the best policy's trainable weights in memory and writes ``scorer-best`` once, at train end.
Linux only (``/proc``).
"""

import argparse
import os
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _written() -> int:
    with open("/proc/self/io") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("wchar:"))


def run(mode: str, model_dir: str, work: str, steps: int) -> dict:
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    from progadv_trl import ProgressAdvantageCallback, ProgressAdvantageConfig
    from progadv_trl.data import Message, Trajectory

    class Watched(ProgressAdvantageCallback):
        def _evaluate(self, state):
            before = _written()
            metrics = super()._evaluate(state)
            per_eval.append(_written() - before)
            return metrics

        def on_train_end(self, args, state, control, **kwargs):
            before = _written()
            super().on_train_end(args, state, control, **kwargs)
            at_end.append(_written() - before)

    per_eval, at_end = [], []
    heldout = [Trajectory(id=f"h{i}", group=f"g{i // 4}", reward=float(i % 2),
                          messages=[Message("user", f"What is {i} + {i}?"), Message("assistant", f"It is {2 * i + i % 3}.")])
               for i in range(16)]
    data = Dataset.from_list([{"prompt": [{"role": "user", "content": f"What is {i} + {i}?"}]} for i in range(32)])
    args = GRPOConfig(output_dir=os.path.join(work, mode), per_device_train_batch_size=4, num_generations=4,
                      max_completion_length=8, max_steps=steps, logging_steps=1, use_cpu=True, report_to="none",
                      save_strategy="no", learning_rate=5e-2, beta=0.0, seed=0)
    trainer = GRPOTrainer(model=model_dir, args=args, train_dataset=data,
                          reward_funcs=lambda completions, **kw: [float(len(c[0]["content"]) % 2 == 0) for c in completions])
    cb = Watched(trainer=trainer, config=ProgressAdvantageConfig(heldout=heldout, eval_steps=1, best_export=mode,
                                                                  log_baselines=False))
    trainer.add_callback(cb)
    t0 = time.perf_counter()
    trainer.train()
    during = per_eval[1:]  # the first evaluation (train begin) is not a "new best" (policy == reference)
    return {"mode": mode, "evaluations": len(per_eval), "mean_bytes_per_eval": sum(during) / len(during), "max_bytes_per_eval": max(during),
        "bytes_at_train_end": at_end[0], "seconds": time.perf_counter() - t0}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=6)
    args = p.parse_args()
    from progadv_trl.tiny import build_model, build_tokenizer

    with tempfile.TemporaryDirectory() as work:
        model_dir = os.path.join(work, "base")
        build_model(build_tokenizer(), model_dir, seed=0)
        rows = [run(mode, model_dir, work, args.steps) for mode in ("every_best", "end")]
    print(f"\n{args.steps} GRPO steps, an evaluation at every step (tiny model)\n")
    print("| best_export | bytes written per evaluation (mean) | max | at train end |")
    print("|---|---:|---:|---:|")
    for r in rows:
        print(f"| {r['mode']} | {r['mean_bytes_per_eval']:,.0f} | {r['max_bytes_per_eval']:,} | "
              f"{r['bytes_at_train_end']:,} |")


if __name__ == "__main__":
    main()
