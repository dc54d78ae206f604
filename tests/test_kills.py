"""Kills at random moments: scoring output keeps only whole lines, and an export is always loadable."""

import json
import os
import random
import signal
import time

import pytest

from progadv_trl import ProgressAdvantageScorer
from progadv_trl.cli import main
from progadv_trl.loaders import save_trajectories

from conftest import sample_trajectories

KILLS = 10


def _fork(fn):
    pid = os.fork()
    if pid == 0:  # child
        try:
            fn()
        finally:
            os._exit(0)
    return pid


def _kill_after(pid, delay):
    time.sleep(delay)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)


def test_killed_scoring_leaves_whole_lines_and_resume_completes(tiny_dir, tmp_path):
    trajs = []
    for i in range(40):
        t = sample_trajectories()[i % 4]
        t.id = f"t{i}"
        trajs.append(t)
    data = tmp_path / "in.jsonl"
    save_trajectories(data, trajs)
    out = tmp_path / "out.jsonl"
    args = ["score", "--policy", str(tiny_dir / "policy"), "--reference", str(tiny_dir / "reference"),
            "--input", str(data), "--output", str(out), "--batch-size", "1", "--no-progress", "--details"]
    rng = random.Random(0)
    for k in range(KILLS):
        pid = _fork(lambda: main(args + (["--resume"] if k else [])))
        _kill_after(pid, rng.uniform(0.05, 1.5))
        lines = out.read_text().split("\n") if out.exists() else []
        for line in lines[:-1]:  # every complete line is valid JSON; the last may be cut
            json.loads(line)
    assert main(args + ["--resume"]) == 0
    ids = [json.loads(x)["id"] for x in out.read_text().splitlines()]
    assert ids == [f"t{i}" for i in range(40)]  # each once, in order


def test_killed_export_keeps_a_loadable_scorer(tiny_dir, tmp_path):
    scorer = ProgressAdvantageScorer.from_models(tiny_dir / "policy", tiny_dir / "reference")
    target = tmp_path / "scorer"
    scorer.save_pretrained(target)
    expected = [r.score for r in scorer.score(sample_trajectories())]
    rng = random.Random(1)

    def save_forever():
        while True:
            scorer.save_pretrained(target)

    for _ in range(KILLS):
        pid = _fork(save_forever)
        _kill_after(pid, rng.uniform(0.01, 0.5))
        loaded = ProgressAdvantageScorer.from_pretrained(target)
        assert [r.score for r in loaded.score(sample_trajectories())] == pytest.approx(expected, abs=1e-6)
    scorer.save_pretrained(target)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["scorer"]
