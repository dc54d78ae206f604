"""Sharded set-ups the scorer cannot read (FSDP1) are refused by name before any forward (never a hang or a wrong
number); whole-parameter set-ups, FSDP2 and ZeRO-3 pass (FSDP2 scoring itself: tests/test_fsdp.py)."""

from types import SimpleNamespace

import pytest
import torch

from progadv_trl.sharding import UnsupportedSetupError, accelerator_sharding, check_supported, sharding_of
from progadv_trl.tiny import build_model, build_tokenizer


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("shard") / "m"
    build_model(build_tokenizer(), root, seed=0)
    return root


def _trainer(fsdp_version=None, zero_stage=None):
    fsdp = None if fsdp_version is None else SimpleNamespace(fsdp_version=fsdp_version)
    ds = None if zero_stage is None else SimpleNamespace(zero_stage=zero_stage)
    return SimpleNamespace(accelerator=SimpleNamespace(state=SimpleNamespace(fsdp_plugin=fsdp, deepspeed_plugin=ds)))


def test_whole_parameters_pass(tiny):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny)
    assert sharding_of(model) is None
    check_supported(model, model, trainer=_trainer())
    check_supported(model, trainer=_trainer(zero_stage=2))  # ZeRO-2 keeps whole parameters on every rank


@pytest.mark.parametrize("trainer,kind", [(_trainer(fsdp_version=2), "fsdp2"), (_trainer(zero_stage=3), "zero3"),
                                          (_trainer(zero_stage=2), None), (_trainer(fsdp_version=1), "fsdp1")])
def test_accelerator_plugins_are_named(trainer, kind):
    assert accelerator_sharding(trainer) == kind


@pytest.mark.parametrize("trainer", [_trainer(fsdp_version=2), _trainer(zero_stage=3)])
def test_fsdp2_and_zero3_plugins_pass(trainer):
    check_supported(None, trainer=trainer)


def test_fsdp1_plugin_is_refused_by_name():
    with pytest.raises(UnsupportedSetupError, match=r"FSDP1 \(the FullyShardedDataParallel wrapper.*fsdp_version=2"):
        check_supported(None, trainer=_trainer(fsdp_version=1))


def test_fsdp1_wrapped_model_is_refused_by_name(tiny):
    from transformers import AutoModelForCausalLM

    wrapper = type("FullyShardedDataParallel", (torch.nn.Module,), {})()  # what FSDP1 wraps modules in
    wrapper.module = AutoModelForCausalLM.from_pretrained(tiny)
    assert sharding_of(wrapper) == "fsdp1"
    with pytest.raises(UnsupportedSetupError, match="FSDP1"):
        check_supported(wrapper)


def test_zero3_partitioned_parameter_is_recognised_and_passes(tiny):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny)
    next(model.parameters()).ds_id = 0  # what deepspeed.zero.Init leaves on each parameter
    assert sharding_of(model) == "zero3"
    check_supported(None, model)
