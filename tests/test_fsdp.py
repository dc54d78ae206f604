"""Scoring FSDP2-sharded models: equal work per rank (pure helpers) and two CPU processes (torchrun + gloo) whose
metrics and export equal one unsharded process's."""

import dataclasses
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from progadv_trl.distributed import merge_in_order, split_evenly
from progadv_trl.models import ModelView
from progadv_trl.rendering import TokenizedTrajectory
from progadv_trl.token_statistics import compute_token_stats

from conftest import many_trajectories

SCRIPT = Path(__file__).parent / "scripts" / "fsdp_monitor.py"
TORCHRUN = shutil.which("torchrun") or str(Path(sys.executable).with_name("torchrun"))


@pytest.mark.parametrize("n,world", [(13, 2), (3, 4), (8, 4), (1, 3), (0, 2), (7, 1)])
def test_split_evenly_gives_every_rank_the_same_length_and_merge_restores_the_order(n, world):
    items = list(range(n))
    shards = [split_evenly(items, rank, world) for rank in range(world)]
    assert len({len(shard) for shard, _ in shards}) == 1  # the same number of forwards on every rank
    assert sum(n_real for _, n_real in shards) == n
    for shard, n_real in shards:
        assert all(x in items for x in shard)  # padding repeats an item, never invents one
    assert merge_in_order([shard[:n_real] for shard, n_real in shards]) == items


def test_merge_refuses_shares_that_do_not_fit():
    with pytest.raises(ValueError, match="rank 0 returned 1 results; its share of 4 over 2 ranks is 2"):
        merge_in_order([[0], [1, 3, 5]])
    with pytest.raises(ValueError, match="not in a world"):
        split_evenly([1, 2], 2, 2)


class CountingView(ModelView):
    calls = 0

    def hidden_states(self, input_ids, attention_mask, shared_prefix=0):
        CountingView.calls += 1
        return super().hidden_states(input_ids, attention_mask, shared_prefix)


def test_forward_count_depends_only_on_the_number_of_trajectories(tiny_dir):
    """A batch with nothing to score still runs its forwards: ranks holding as many trajectories stay in step."""
    from transformers import AutoModelForCausalLM

    policy = CountingView(AutoModelForCausalLM.from_pretrained(tiny_dir / "policy"))
    reference = CountingView(AutoModelForCausalLM.from_pretrained(tiny_dir / "reference"))
    scored = TokenizedTrajectory(list(range(3, 12)), [-1, -1, -1, 0, 0, 0, 1, 1, 1], [(1, 0), (3, 0)])
    context_only = TokenizedTrajectory(list(range(3, 8)), [-1] * 5, [])
    counts = []
    for toks in ([scored] * 4, [scored, scored, context_only, context_only]):
        CountingView.calls = 0
        stats = compute_token_stats(policy, reference, toks, batch_size=2, share_prefix=False)
        counts.append(CountingView.calls)
        assert torch.isnan(stats[-1]["logprob"]).all() == (toks[-1] is context_only)
    assert counts == [4, 4]  # 2 batches x 2 models, whatever the data


def _distinct_heldout(n: int):
    """``n`` held-out rollouts with distinct texts (no tied scores, whose order float noise could flip)."""
    trajs = many_trajectories(n)
    for i, t in enumerate(trajs):
        last = t.messages[-1]
        t.messages[-1] = dataclasses.replace(last, content=f"{last.content} Note {i}: {'ok ' * (i % 5)}")
        t.group = f"g{i % 5}"
    return trajs


def run_two_processes(script: Path, tiny_dir, tmp_path, n: int, *, port: int, env: dict | None = None,
                      timeout: int = 600) -> dict:
    """``torchrun`` 2 CPU processes of ``script`` on ``n`` distinct held-out rollouts; its ``result.json``, after
    checking that both ranks ran the same number of forwards."""
    from progadv_trl.formats import save_trajectories

    heldout = tmp_path / "heldout.jsonl"
    save_trajectories(heldout, _distinct_heldout(n))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", **(env or {})}
    proc = subprocess.run([TORCHRUN, "--nproc_per_node", "2", "--master_port", str(port), str(script),
                           str(tiny_dir / "policy"), str(tiny_dir / "reference"), str(heldout), str(tmp_path)],
                          env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads((tmp_path / "result.json").read_text())
    assert out["forwards"][0] == out["forwards"][1] > 0
    return out


def assert_equal_to_one_process(out: dict, tiny_dir, tmp_path, config: dict, n: int):
    """The sharded run's metrics (``out["metrics"]``, one dict per evaluation) equal one unsharded process's on the
    same ``n`` held-out rollouts to 1e-5, and the scorer it exported to ``tmp_path / "scorer"`` holds the whole
    weights. Returns the unsharded models."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from progadv_trl import ProgressAdvantageConfig
    from progadv_trl.monitor import ProgressAdvantageMonitor

    policy = AutoModelForCausalLM.from_pretrained(tiny_dir / "policy")
    reference = AutoModelForCausalLM.from_pretrained(tiny_dir / "reference")
    monitor = ProgressAdvantageMonitor(reference, AutoTokenizer.from_pretrained(tiny_dir / "policy"),
                                       ProgressAdvantageConfig(**config), heldout=_distinct_heldout(n))
    for step, sharded in enumerate(out["metrics"]):
        single = monitor.evaluate(policy, step)
        assert set(single) == set(sharded)
        assert sharded["progadv/n_trajectories"] == n
        for key, value in single.items():
            if key == "progadv/seconds":
                continue
            if isinstance(value, float) and math.isnan(value):
                assert sharded[key] is None or math.isnan(sharded[key]), key
            else:
                assert sharded[key] == pytest.approx(value, abs=1e-5), key
    exported = {}
    for part, source in (("policy", policy), ("reference", reference)):
        saved = exported[part] = load_file(tmp_path / "scorer" / part / "model.safetensors")
        for name, tensor in source.state_dict().items():
            if name in saved:
                assert torch.equal(saved[name], tensor), (part, name)
        assert "model.layers.1.mlp.down_proj.weight" in saved
    return policy, reference, exported


@pytest.mark.slow
def test_fsdp2_two_processes_equal_one_unsharded_process(tiny_dir, tmp_path):
    """Policy and reference sharded per layer + root on 2 gloo CPU processes, 13 held-out rollouts (odd: one rank
    repeats an item): both evaluations' metrics equal one unsharded process's to 1e-5, both ranks run the same
    number of forwards, and the scorer exported by all ranks holds the whole weights."""
    sys.path.insert(0, str(SCRIPT.parent))
    from fsdp_monitor import CONFIG

    out = run_two_processes(SCRIPT, tiny_dir, tmp_path, 13, port=29541)
    assert_equal_to_one_process(out, tiny_dir, tmp_path, CONFIG, 13)
