"""Sharded set-ups the scorer cannot read yet are refused by name, before any forward (never a hang or a wrong
number); whole-parameter set-ups pass."""

import os
import subprocess
import sys
import textwrap
from types import SimpleNamespace

import pytest

from progadv_trl.sharding import UnsupportedSetupError, check_supported, sharding_of
from progadv_trl.tiny import build_model, build_tokenizer


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("shard") / "m"
    build_model(build_tokenizer(), root, seed=0)
    return root


def _trainer(fsdp=None, zero_stage=None):
    ds = None if zero_stage is None else SimpleNamespace(zero_stage=zero_stage)
    return SimpleNamespace(accelerator=SimpleNamespace(state=SimpleNamespace(fsdp_plugin=fsdp, deepspeed_plugin=ds)))


def test_whole_parameters_pass(tiny):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny)
    assert sharding_of(model) is None
    check_supported(model, model, trainer=_trainer())
    check_supported(model, trainer=_trainer(zero_stage=2))  # ZeRO-2 keeps whole parameters on every rank


@pytest.mark.parametrize("trainer,name", [(_trainer(fsdp=object()), "FSDP"), (_trainer(zero_stage=3), "ZeRO-3")])
def test_accelerator_plugins_are_refused(tiny, trainer, name):
    with pytest.raises(UnsupportedSetupError, match=name):
        check_supported(None, trainer=trainer)


def test_zero3_partitioned_parameter_is_refused(tiny):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny)
    next(model.parameters()).ds_id = 0  # what deepspeed.zero.Init leaves on each parameter
    assert sharding_of(model) == "zero3"
    with pytest.raises(UnsupportedSetupError, match="ZeRO-3"):
        check_supported(None, model)


def test_fsdp2_sharded_model_is_refused_by_the_monitor(tiny, tmp_path):
    """fully_shard on a 1-process gloo CPU mesh: the monitor refuses before its first forward."""
    script = textwrap.dedent(f"""
        import torch, torch.distributed as dist
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard
        from transformers import AutoModelForCausalLM, AutoTokenizer
        from progadv_trl import ProgressAdvantageConfig
        from progadv_trl.monitor import ProgressAdvantageMonitor
        from progadv_trl.sharding import UnsupportedSetupError
        from progadv_trl.data import Message, Trajectory
        dist.init_process_group("gloo", init_method="tcp://127.0.0.1:29561", rank=0, world_size=1)
        mesh = init_device_mesh("cpu", (1,))
        policy = AutoModelForCausalLM.from_pretrained({str(tiny)!r})
        reference = AutoModelForCausalLM.from_pretrained({str(tiny)!r})
        for layer in policy.model.layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(policy, mesh=mesh)
        heldout = [Trajectory(id="a", reward=1.0, messages=[Message("user", "hi"), Message("assistant", "hello")])]
        monitor = ProgressAdvantageMonitor(reference, AutoTokenizer.from_pretrained({str(tiny)!r}),
                                           ProgressAdvantageConfig(export=False), heldout=heldout)
        try:
            monitor.evaluate(policy, 0)
        except UnsupportedSetupError as e:
            print("REFUSED:", e)
        dist.destroy_process_group()
    """)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "REFUSED:" in proc.stdout and "FSDP" in proc.stdout
