"""Two CPU processes (torchrun + gloo): held-out rollouts sharded and gathered, metrics equal one process's."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from progadv_trl import ProgressAdvantageConfig, ProgressAdvantageScorer
from progadv_trl.formats import save_trajectories
from progadv_trl.monitor import ProgressAdvantageMonitor
from progadv_trl.tiny import build_model, build_tokenizer

from conftest import sample_trajectories

SCRIPT = Path(__file__).parent / "scripts" / "grpo_two_process.py"


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("torchrun") is None and not Path(sys.executable).with_name("torchrun").exists(),
                    reason="torchrun not installed")
def test_two_process_grpo_matches_single_process_metrics(tmp_path):
    tok = build_tokenizer()
    build_model(tok, tmp_path / "base", seed=0)
    trajs = sample_trajectories() * 1
    heldout = tmp_path / "heldout.jsonl"
    save_trajectories(heldout, trajs[:3] + [t for t in trajs[3:]])
    torchrun = shutil.which("torchrun") or str(Path(sys.executable).with_name("torchrun"))
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([torchrun, "--nproc_per_node", "2", "--master_port", "29533", str(SCRIPT),
                           str(tmp_path / "base"), str(tmp_path / "out"), str(heldout)],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "rank 0 of 2 done" in proc.stdout and "rank 1 of 2 done" in proc.stdout
    lines = (tmp_path / "out" / "progadv-history.jsonl").read_text().splitlines()
    history = [json.loads(x) for x in lines]
    assert [h["step"] for h in history] == [0, 1, 2]  # written once (rank 0), not once per rank
    assert history[-1]["progadv/n_trajectories"] == 4
    # the same final policy and reference, evaluated in this single process
    scorer = ProgressAdvantageScorer.from_pretrained(tmp_path / "out" / "_progadv" / "scorer")
    monitor = ProgressAdvantageMonitor(scorer.reference, scorer.tokenizer,
                                       ProgressAdvantageConfig(log_baselines=False, export=False),
                                       heldout=sample_trajectories())
    single = monitor.evaluate(scorer.policy, 2, temperature=history[-1]["temperature"], beta=history[-1]["beta"])
    for key in ("progadv/auroc", "progadv/kl/mean", "progadv/kl/max", "progadv/log_ratio/mean",
                "progadv/score/mean", "progadv/attribution_accuracy"):
        assert single[key] == pytest.approx(history[-1][key], abs=1e-5), key
