"""The monitor on DeepSpeed ZeRO-3 partitioned models, two CPU processes (run by tests/test_zero3.py).

DS_ACCELERATOR=cpu torchrun --nproc_per_node 2 tests/scripts/zero3_monitor.py POLICY_DIR REFERENCE_DIR HELDOUT OUT_DIR

Both models are partitioned by ``deepspeed.initialize`` with a stage-3 config (gloo, fp32): the policy with an
optimizer, as a trainer holds it, and passed as the bare module (what ``Trainer.model`` is under DeepSpeed); the
reference without one and passed as its engine (what TRL's ``prepare_deepspeed`` makes of ``ref_model``). Rank 0
writes the metrics of two evaluations and every rank's forward count to OUT_DIR/result.json, and the scorer exported
by all ranks together to OUT_DIR/scorer.
"""

import json
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("DS_ACCELERATOR", "cpu")

import deepspeed  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from progadv_trl import ProgressAdvantageConfig  # noqa: E402
from progadv_trl.formats import load_trajectories  # noqa: E402
from progadv_trl.monitor import ProgressAdvantageMonitor  # noqa: E402

CONFIG = dict(export=False, batch_size=4, log_baselines=True)


def ds_config(world: int) -> dict:
    return {"train_micro_batch_size_per_gpu": 1, "train_batch_size": world, "gradient_accumulation_steps": 1,
            "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
            "zero_allow_untested_optimizer": True, "steps_per_print": 10**9}


def partitioned(path, with_optimizer: bool, counter):
    model = AutoModelForCausalLM.from_pretrained(path)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0) if with_optimizer else None
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config(dist.get_world_size()))
    engine.module.register_forward_pre_hook(lambda *a: counter.__setitem__(0, counter[0] + 1))
    return engine


def main(policy_dir, reference_dir, heldout, out_dir):
    torch.set_num_threads(1)
    deepspeed.init_distributed(dist_backend="gloo")
    calls = [0]
    policy = partitioned(policy_dir, True, calls).module
    reference = partitioned(reference_dir, False, calls)
    reference.eval()
    partitioned_head = tuple(policy.get_output_embeddings().weight.shape)
    monitor = ProgressAdvantageMonitor(reference, AutoTokenizer.from_pretrained(policy_dir),
                                       ProgressAdvantageConfig(**CONFIG), heldout=load_trajectories(heldout))
    metrics = [monitor.evaluate(policy, step) for step in (0, 1)]
    counts = [None] * dist.get_world_size()
    dist.all_gather_object(counts, calls[0])
    if dist.get_rank() == 0:
        with open(os.path.join(out_dir, "result.json"), "w", encoding="utf-8") as f:
            json.dump({"metrics": metrics, "forwards": counts, "head_shape": partitioned_head}, f)
    monitor.export(policy, os.path.join(out_dir, "scorer"))
    print(f"rank {dist.get_rank()} of {dist.get_world_size()} done", flush=True)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:5])
