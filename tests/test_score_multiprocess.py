"""``progadv score`` in two processes (torchrun, gloo on CPU): one output file equal to a single process's, exact
``--resume`` after a killed process, and a bad record ending every process with its message."""

import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from progadv_trl.cli import main
from progadv_trl.formats import save_trajectories

from conftest import many_trajectories

TORCHRUN = shutil.which("torchrun") or str(Path(sys.executable).with_name("torchrun"))
needs_torchrun = pytest.mark.skipif(not Path(TORCHRUN).exists(), reason="torchrun not installed")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(args: list[str], **popen) -> subprocess.Popen:
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "TRANSFORMERS_VERBOSITY": "error"}
    cmd = [TORCHRUN, "--nproc_per_node", "2", "--master_addr", "127.0.0.1", "--master_port", str(_free_port()),
           "-m", "progadv_trl.cli", *args]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen)


def _run2(args: list[str], timeout: float = 600) -> subprocess.CompletedProcess:
    proc = _torchrun(args)
    out, err = proc.communicate(timeout=timeout)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def _same(a, b, where: str = "") -> None:
    """Equal JSON values, floats to 1e-5 (NaN equal to NaN)."""
    if isinstance(a, float) or isinstance(b, float):
        assert isinstance(a, (int, float)) and isinstance(b, (int, float)), where
        assert (math.isnan(a) and math.isnan(b)) or abs(a - b) <= 1e-5, (where, a, b)
    elif isinstance(a, dict):
        assert isinstance(b, dict) and sorted(a) == sorted(b), where
        for k in a:
            _same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, list):
        assert isinstance(b, list) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _same(x, y, f"{where}[{i}]")
    else:
        assert a == b, (where, a, b)


def _rows(path: Path) -> list[dict]:
    text = path.read_text()
    assert text.endswith("\n")
    return [json.loads(line) for line in text.splitlines()]


def _assert_same_output(two: Path, one: Path) -> None:
    rows2, rows1 = _rows(two), _rows(one)
    assert [r["id"] for r in rows2] == [r["id"] for r in rows1]  # the same records, in input order, each once
    for r2, r1 in zip(rows2, rows1):
        _same(r2, r1, str(r1["id"]))


def _scoring_args(tiny_dir, data: Path, out: Path, batch: int) -> list[str]:
    return ["score", "--policy", str(tiny_dir / "policy"), "--reference", str(tiny_dir / "reference"),
            "--input", str(data), "--output", str(out), "--batch-size", str(batch), "--no-progress", "--details"]


@pytest.mark.slow
@needs_torchrun
def test_two_processes_write_one_file_equal_to_one_process(tiny_dir, tmp_path):
    data = tmp_path / "in.jsonl"
    save_trajectories(data, many_trajectories(37))  # windows of 2 * 16 * 2 = 64: one window, shares padded 19/18
    one, two = tmp_path / "one.jsonl", tmp_path / "two.jsonl"
    assert main(_scoring_args(tiny_dir, data, one, 2)) == 0
    proc = _run2(_scoring_args(tiny_dir, data, two, 2))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "scored 37 trajectories in 2 processes" in proc.stderr
    _assert_same_output(two, one)
    sidecar = json.loads((tmp_path / "two.jsonl.progadv.json").read_text())
    assert sidecar["command"] == "score" and sidecar["settings"]["run"]["details"] is True
    assert not (tmp_path / ".two.jsonl.lock").exists()
    # the two-process file continues with one process (and the other way round): same settings, same records
    assert main(_scoring_args(tiny_dir, data, two, 2) + ["--resume"]) == 0
    assert len(_rows(two)) == 37


def _workers(parent: int) -> dict[int, int]:
    """rank -> pid of torchrun's worker processes."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            env = (entry / "environ").read_bytes().split(b"\0") if ppid == parent else []
        except (OSError, IndexError, ValueError):
            continue
        for var in env:
            if var.startswith(b"RANK="):
                found[int(var[5:])] = int(entry.name)
    return found


@pytest.mark.slow
@needs_torchrun
def test_killed_process_then_resume_in_two_processes_equals_one_uninterrupted_run(tiny_dir, tmp_path):
    n = 160
    data = tmp_path / "in.jsonl"
    save_trajectories(data, many_trajectories(n))  # windows of 2 * 16 * 1 = 32 records
    one, two = tmp_path / "one.jsonl", tmp_path / "two.jsonl"
    args = _scoring_args(tiny_dir, data, two, 1)
    proc = _torchrun(args)
    t0 = time.time()
    while not (two.exists() and two.read_text().count("\n") >= 32):
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.time() - t0 < 600
        time.sleep(0.01)
    os.kill(_workers(proc.pid)[1], signal.SIGKILL)  # rank 1 dies; torchrun ends rank 0
    _, err = proc.communicate(timeout=300)
    assert proc.returncode != 0
    written = two.read_text()
    assert 32 <= written.count("\n") < n, "the run was not interrupted mid-way"
    for line in written.splitlines()[:-1]:  # whole lines (the last may be cut)
        json.loads(line)
    proc = _run2(args + ["--resume"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "skipped" in proc.stderr
    assert main(_scoring_args(tiny_dir, data, one, 1)) == 0
    _assert_same_output(two, one)


@pytest.mark.slow
@needs_torchrun
def test_a_bad_record_ends_every_process_with_its_message(tiny_dir, tmp_path):
    data = tmp_path / "in.jsonl"
    save_trajectories(data, many_trajectories(70))
    lines = data.read_text().splitlines()
    bad = json.loads(lines[66])
    bad["messages"] = "not a list"
    lines[66] = json.dumps(bad)
    data.write_text("\n".join(lines) + "\n")
    out = tmp_path / "out.jsonl"
    t0 = time.time()
    proc = _run2(_scoring_args(tiny_dir, data, out, 1), timeout=900)
    assert proc.returncode != 0
    assert "bad data" in proc.stderr and "record 67" in proc.stderr and "messages" in proc.stderr, proc.stderr[-3000:]
    assert proc.stderr.count("progadv: bad data") == 1  # said once (by rank 0), not once per process
    # the windows before the bad one were written, in order
    assert [r["id"] for r in _rows(out)] == [f"t{i}" for i in range(64)]
    assert time.time() - t0 < 900


def test_rank_attribute_and_evaluate_refuse_several_processes(tiny_dir, data, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    for command in ("rank", "attribute", "evaluate"):
        args = [command, "--policy", str(tiny_dir / "policy"), "--reference", str(tiny_dir / "reference"),
                "--input", str(data), "--output", str(tmp_path / f"{command}.out")]
        assert main(args) == 2
        assert "runs in one process" in capsys.readouterr().err
        assert not (tmp_path / f"{command}.out").exists()
