"""Held-out prompts on two CPU processes (run by tests/test_heldout_generation.py): each rank records the held-out
prompts its reward function saw, and the rollouts it got back.

ACCELERATE_USE_CPU=1 torchrun --nproc_per_node 2 tests/scripts/heldout_two_process.py MODEL_DIR OUTPUT_DIR
"""

import json
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from datasets import Dataset  # noqa: E402
from trl import GRPOConfig, GRPOTrainer  # noqa: E402

from progadv_trl import ProgressAdvantageCallback, ProgressAdvantageConfig  # noqa: E402
from progadv_trl.rollouts import sample_rollouts  # noqa: E402

torch.set_num_threads(1)
REWARDED = []


def reward_even_length(prompts, completions, split, **kwargs):
    REWARDED.extend(p[-1]["content"] for p, s in zip(prompts, split) if s == "heldout")
    return [float(len(c[0]["content"]) % 2 == 0) for c in completions]


def main(model_dir, out):
    ds = Dataset.from_list([{"prompt": [{"role": "user", "content": f"What is {i} + {i}?"}], "split": "train"}
                            for i in range(16)])
    prompts = [{"prompt": [{"role": "user", "content": f"Add {i} and {i}."}], "split": "heldout"} for i in range(3)]
    args = GRPOConfig(output_dir=str(Path(out) / "run"), per_device_train_batch_size=2, num_generations=2,
                      max_completion_length=6, max_steps=1, logging_steps=1, use_cpu=True, bf16=False,
                      report_to="none", save_strategy="no", learning_rate=5e-3, seed=0, beta=0.04)
    trainer = GRPOTrainer(model=model_dir, reward_funcs=reward_even_length, args=args, train_dataset=ds)
    trainer.add_callback(ProgressAdvantageCallback(trainer=trainer, config=ProgressAdvantageConfig(
        heldout_prompts=prompts, log_baselines=False, export=False)))
    trainer.train()
    REWARDED.clear()
    rollouts = sample_rollouts(trainer, prompts, 2, seed=0, tag="x")
    rank = dist.get_rank()
    record = {"rewarded": REWARDED, "rollouts": [(t.id, t.messages[-2].content, t.messages[-1].content, t.reward)
                                                 for t in rollouts]}
    (Path(out) / f"rank{rank}.json").write_text(json.dumps(record), encoding="utf-8")
    print(f"rank {rank} of {dist.get_world_size()} done", flush=True)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:3])
