"""Kills at random moments: scoring output keeps only whole lines, and an export is always loadable."""

import json
import os
import random
import signal
import sys
import time

import pytest
import torch

from progadv_trl import ProgressAdvantageScorer
from progadv_trl.cli import main
from progadv_trl.formats import save_trajectories

from conftest import many_trajectories, sample_trajectories

pytestmark = pytest.mark.slow  # kill/resume loops in forked processes

KILLS = 10


def _fork(fn):
    pid = os.fork()
    if pid == 0:  # child
        try:
            torch.set_num_threads(1)  # the parent's OpenMP pool does not survive fork: a parallel region would hang
            fn()
        finally:
            os._exit(0)
    return pid


def _kill_after(pid, delay):
    time.sleep(delay)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)


def test_killed_scoring_leaves_whole_lines_and_resume_completes(tiny_dir, tmp_path):
    trajs = many_trajectories(40)
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


N_CTRL_C = 120


def test_ctrl_c_exits_130_with_whole_lines_no_lock_and_resume_continues(tiny_dir, tmp_path):
    from progadv_trl import cli

    trajs = many_trajectories(N_CTRL_C)  # many more than the parent needs to see: a slow parent cannot miss the run
    data = tmp_path / "in.jsonl"
    save_trajectories(data, trajs)
    out, err = tmp_path / "out.jsonl", tmp_path / "stderr.txt"
    args = ["score", "--policy", str(tiny_dir / "policy"), "--reference", str(tiny_dir / "reference"),
            "--input", str(data), "--output", str(out), "--batch-size", "1", "--no-progress", "--details"]

    def child():
        torch.set_num_threads(1)  # the parent's OpenMP pool does not survive fork
        # a shell's background job starts with SIGINT ignored, which the fork inherits: restore Python's Ctrl-C
        signal.signal(signal.SIGINT, signal.default_int_handler)
        sys.stderr = open(err, "w", buffering=1)
        fast = cli._progress

        def slowly(iterable, a, desc, **kw):  # so that Ctrl-C comes mid-run
            for x in fast(iterable, a, desc, **kw):
                time.sleep(0.1)
                yield x

        cli._progress = slowly
        rc = 99
        try:
            rc = main(args)
        finally:
            sys.stderr.flush()
            os._exit(rc)

    pid = os.fork()
    if pid == 0:
        child()
    t0 = time.time()
    while not (out.exists() and out.read_text().count("\n") >= 3):
        assert time.time() - t0 < 120 and os.waitpid(pid, os.WNOHANG) == (0, 0)
        time.sleep(0.01)
    os.kill(pid, signal.SIGINT)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 130
    text = out.read_text()
    n = text.count("\n")
    assert text.endswith("\n") and [json.loads(x)["id"] for x in text.splitlines()] == [f"t{i}" for i in range(n)]
    message = err.read_text()
    assert f"holds {n} complete lines" in message and "--resume" in message and "Traceback" not in message
    assert not (tmp_path / ".out.jsonl.lock").exists()
    assert main(args + ["--resume"]) == 0
    assert [json.loads(x)["id"] for x in out.read_text().splitlines()] == [f"t{i}" for i in range(N_CTRL_C)]
    assert out.read_text().startswith(text)


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
