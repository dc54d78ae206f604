"""Real GRPO on two CPU processes with the callback attached (run by tests/test_distributed.py).

ACCELERATE_USE_CPU=1 torchrun --nproc_per_node 2 tests/scripts/grpo_two_process.py MODEL_DIR OUTPUT_DIR HELDOUT
"""

import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch.distributed as dist  # noqa: E402
from datasets import Dataset  # noqa: E402
from trl import GRPOConfig, GRPOTrainer  # noqa: E402

from progadv_trl import ProgressAdvantageCallback, ProgressAdvantageConfig  # noqa: E402


def reward_even_length(completions, **kwargs):
    return [float(len(c[0]["content"]) % 2 == 0) for c in completions]


def main(model_dir, output_dir, heldout):
    ds = Dataset.from_list([{"prompt": [{"role": "user", "content": f"What is {i} + {i}?"}]} for i in range(32)])
    args = GRPOConfig(output_dir=output_dir, per_device_train_batch_size=4, num_generations=4,
                      max_completion_length=8, max_steps=2, logging_steps=1, use_cpu=True, bf16=False,
                      report_to="none", save_strategy="no", learning_rate=5e-3, seed=0, beta=0.04)
    trainer = GRPOTrainer(model=model_dir, reward_funcs=reward_even_length, args=args, train_dataset=ds)
    trainer.add_callback(ProgressAdvantageCallback(trainer=trainer, config=ProgressAdvantageConfig(
        heldout=heldout, log_baselines=False)))
    trainer.train()
    print(f"rank {dist.get_rank()} of {dist.get_world_size()} done", flush=True)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:4])
