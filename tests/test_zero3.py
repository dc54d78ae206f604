"""Scoring DeepSpeed ZeRO-3 partitioned models: two CPU processes (torchrun + gloo, ``DS_ACCELERATOR=cpu``) whose
metrics and export equal one unsharded process's."""

import sys
from pathlib import Path

import pytest
import torch

from test_fsdp import assert_equal_to_one_process, run_two_processes

SCRIPT = Path(__file__).parent / "scripts" / "zero3_monitor.py"


@pytest.mark.slow
def test_zero3_two_processes_equal_one_unsharded_process(tiny_dir, tmp_path):
    """Policy (with an optimizer, passed as the bare module) and reference (no optimizer, passed as its engine)
    partitioned by ``deepspeed.initialize`` at stage 3 on 2 gloo CPU processes, 5 held-out rollouts (odd: one rank
    repeats an item): both evaluations' metrics, weight drift included, equal one unsharded process's to 1e-5, both
    ranks run the same number of forwards, and the scorer exported by all ranks holds the whole weights, the tied
    head included."""
    pytest.importorskip("deepspeed")
    sys.path.insert(0, str(SCRIPT.parent))
    from zero3_monitor import CONFIG

    out = run_two_processes(SCRIPT, tiny_dir, tmp_path, 5, port=29543, env={"DS_ACCELERATOR": "cpu"}, timeout=900)
    assert out["head_shape"] == [0]  # the head really was partitioned: this rank held none of it

    assert all(m["progadv/weight_drift"] > 0 for m in out["metrics"])
    policy, reference, exported = assert_equal_to_one_process(out, tiny_dir, tmp_path, CONFIG, 5)
    for part, source in (("policy", policy), ("reference", reference)):  # the tied head was gathered too
        assert torch.equal(exported[part]["model.embed_tokens.weight"], source.get_output_embeddings().weight)
