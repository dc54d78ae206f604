"""The monitor on FSDP2-sharded models, two CPU processes (run by tests/test_fsdp.py).

torchrun --nproc_per_node 2 tests/scripts/fsdp_monitor.py POLICY_DIR REFERENCE_DIR HELDOUT OUT_DIR

Policy and reference are sharded per decoder layer and at the root (``fully_shard`` on a CPU mesh, gloo); rank 0
writes the metrics of two evaluations and every rank's forward count to OUT_DIR/result.json, and the scorer exported
by all ranks together to OUT_DIR/scorer.
"""

import json
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from torch.distributed.device_mesh import init_device_mesh  # noqa: E402
from torch.distributed.fsdp import fully_shard  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from progadv_trl import ProgressAdvantageConfig  # noqa: E402
from progadv_trl.formats import load_trajectories  # noqa: E402
from progadv_trl.monitor import ProgressAdvantageMonitor  # noqa: E402

CONFIG = dict(export=False, batch_size=4, log_baselines=True)


def sharded(path, mesh, counter):
    model = AutoModelForCausalLM.from_pretrained(path)
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    model.register_forward_pre_hook(lambda *a: counter.__setitem__(0, counter[0] + 1))
    return model


def main(policy_dir, reference_dir, heldout, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    calls = [0]
    policy, reference = sharded(policy_dir, mesh, calls), sharded(reference_dir, mesh, calls)
    monitor = ProgressAdvantageMonitor(reference, AutoTokenizer.from_pretrained(policy_dir),
                                       ProgressAdvantageConfig(**CONFIG), heldout=load_trajectories(heldout))
    metrics = [monitor.evaluate(policy, step) for step in (0, 1)]
    counts = [None] * dist.get_world_size()
    dist.all_gather_object(counts, calls[0])
    monitor.export(policy, os.path.join(out_dir, "scorer"))
    if dist.get_rank() == 0:
        with open(os.path.join(out_dir, "result.json"), "w", encoding="utf-8") as f:
            json.dump({"metrics": metrics, "forwards": counts}, f)
    print(f"rank {dist.get_rank()} of {dist.get_world_size()} done", flush=True)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:5])
