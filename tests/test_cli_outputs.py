"""Output files of the ``progadv`` commands (progadv_trl/outputs.py): inputs and earlier results are never destroyed.

The first group are the reported cases (issue numbers in the names' comments); the second are careless and hostile
uses. Most refusals happen before any model loads: those tests replace ``_load_scorer`` with a trap.
"""

import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

import progadv_trl
from progadv_trl import cli
from progadv_trl.cli import main
from progadv_trl.data import Message
from progadv_trl.formats import save_trajectories

from conftest import cli_models, many_trajectories, sample_trajectories

COMMANDS = ["score", "rank", "attribute", "evaluate"]


@pytest.fixture
def no_models(monkeypatch):
    """Loading a model fails the test: the command must have stopped before."""

    def trap(*a, **k):
        raise AssertionError("the models were loaded before the output was checked")

    monkeypatch.setattr(cli, "_load_scorer", trap)


_models = cli_models


def _ids(path):
    return [json.loads(x)["id"] for x in Path(path).read_text().splitlines()]


_many = many_trajectories


def _score(tiny_dir, data, out, *extra):
    return main(["score", *_models(tiny_dir), "--input", str(data), "--output", str(out), *extra])


def _lock_of(out):
    return Path(out).parent / f".{Path(out).name}.lock"


# ------------------------------------------------------------------------------------------ issue 2: output == input
@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("how", ["same path", "symlink", "hardlink", "other spelling"])
def test_output_that_is_the_input_is_refused_and_input_kept(tiny_dir, data, tmp_path, command, how, capsys):
    before = data.read_bytes()
    out = {"same path": data, "other spelling": tmp_path / "sub" / ".." / data.name}.get(how, tmp_path / "link.jsonl")
    if how == "symlink":
        out.symlink_to(data)
    elif how == "hardlink":
        os.link(data, out)
    elif how == "other spelling":
        (tmp_path / "sub").mkdir()
    rc = main([command, *_models(tiny_dir), "--input", str(data), "--output", str(out)])  # also with --overwrite
    assert rc == 2 and "same file as --input" in capsys.readouterr().err
    assert main([command, *_models(tiny_dir), "--input", str(data), "--output", str(out), "--overwrite"]) == 2
    assert data.read_bytes() == before


# ------------------------------------------------------------------------------------------ issue 3: never truncate early
@pytest.mark.parametrize("bad", [["--input", "typo.jsnol"], ["--limit", "-1"], ["--input", "first_bad.jsonl"]])
@pytest.mark.parametrize("flag", [[], ["--overwrite"]])
def test_failing_input_keeps_the_existing_output(tiny_dir, data, tmp_path, bad, flag, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "first_bad.jsonl").write_text('{"id": "x", "messages": [{"role": "robot", "content": "hi"}]}\n')
    prev = tmp_path / "prev.jsonl"
    prev.write_text('{"id": "earlier", "score": 1.0}\n')
    args = ["score", *_models(tiny_dir), "--input", str(data), "--output", str(prev), *flag]
    if bad[0] == "--input":
        args[args.index("--input") + 1] = bad[1]
    else:
        args += bad
    try:
        rc = main(args)
    except SystemExit as e:  # an argument error
        rc = e.code
    assert rc != 0
    assert prev.read_text() == '{"id": "earlier", "score": 1.0}\n'


def test_existing_output_needs_overwrite_or_resume(tiny_dir, data, tmp_path, capsys, monkeypatch):
    out = tmp_path / "out.jsonl"
    out.write_text('{"id": "earlier"}\n')
    with monkeypatch.context() as m:
        m.setattr(cli, "_load_scorer", lambda *a, **k: pytest.fail("models loaded"))
        for command in COMMANDS:
            assert main([command, *_models(tiny_dir), "--input", str(data), "--output", str(out)]) == 2
            err = capsys.readouterr().err
            assert "already exists" in err and "--overwrite" in err
            assert ("--resume" in err) == (command == "score")
    assert out.read_text() == '{"id": "earlier"}\n'
    assert _score(tiny_dir, data, out, "--overwrite") == 0 and _ids(out) == ["a", "b", "c", "d"]


# ------------------------------------------------------------------------------------------ issues 4, 5: resume reads
def test_resume_keeps_a_complete_last_line_without_newline(tiny_dir, data, tmp_path):  # issue 4
    out = tmp_path / "out.jsonl"
    assert _score(tiny_dir, data, out) == 0
    full = out.read_text().splitlines()
    out.write_text(full[0] + "\n" + full[1])  # complete JSON, newline missing
    assert _score(tiny_dir, data, out, "--resume") == 0
    assert _ids(out) == ["a", "b", "c", "d"]
    assert out.read_text().splitlines()[:2] == full[:2]


def test_resume_refuses_records_without_id_and_changes_nothing(tiny_dir, data, tmp_path, capsys):  # issue 5
    out = tmp_path / "other.jsonl"
    out.write_text('{"x": 1}\n{"x": 2}\n')
    assert _score(tiny_dir, data, out, "--resume") == 1
    err = capsys.readouterr().err
    assert "other.jsonl" in err and "line 1" in err and "'id'" in err
    assert out.read_text() == '{"x": 1}\n{"x": 2}\n'


@pytest.mark.parametrize("line", ['["a", "b"]', '"just a string"', "42", "null", '{"id": null}', '{"id": ["a"]}'])
def test_resume_line_that_is_not_a_result_is_a_clear_error(tiny_dir, data, tmp_path, line, capsys):
    out = tmp_path / "out.jsonl"
    out.write_text('{"id": "a"}\n' + line + "\n")
    assert _score(tiny_dir, data, out, "--resume") == 1
    err = capsys.readouterr().err
    assert "out.jsonl" in err and "line 2" in err and "Traceback" not in err
    assert out.read_text() == '{"id": "a"}\n' + line + "\n"


# ------------------------------------------------------------------------------------------ issue 6: two writers
def _fork_main(args, slow=0.0, stderr=None):
    pid = os.fork()
    if pid == 0:  # child
        rc = 99
        try:
            torch.set_num_threads(1)  # the parent's OpenMP pool does not survive fork: a parallel region would hang
            if stderr:
                fd = os.open(stderr, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
                os.dup2(fd, 2)
            if slow:
                fast = cli._progress

                def slowly(iterable, a, desc, **kw):
                    for x in fast(iterable, a, desc, **kw):
                        time.sleep(slow)
                        yield x

                cli._progress = slowly
            rc = main(args)
        finally:
            os._exit(rc)
    return pid


def _wait_lines(path, n, pid, timeout=120):
    t0 = time.time()
    while time.time() - t0 < timeout:
        if path.exists() and path.read_text().count("\n") >= n:
            return
        assert os.waitpid(pid, os.WNOHANG) == (0, 0), "the child ended early"
        time.sleep(0.02)
    raise AssertionError("no output")


def test_second_writer_is_refused_naming_the_holder_and_resume_keeps_each_id_once(tiny_dir, tmp_path, capsys):
    data = tmp_path / "in.jsonl"
    save_trajectories(data, _many(12))
    out = tmp_path / "out.jsonl"
    args = ["score", *_models(tiny_dir), "--input", str(data), "--output", str(out), "--batch-size", "1"]
    pid = _fork_main(args, slow=0.15)
    try:
        _wait_lines(out, 1, pid)
        for extra in (["--resume"], ["--overwrite"], []):
            assert main(args + extra) == 2
            err = capsys.readouterr().err
            assert "in use by another progadv run" in err and f"pid {pid} on {socket.gethostname()}" in err
    finally:
        _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert _ids(out) == [f"t{i}" for i in range(12)]
    assert not _lock_of(out).exists()


def test_resume_keeps_each_id_once_when_the_output_holds_duplicates(tiny_dir, data, tmp_path, capsys):  # issue 6
    out = tmp_path / "out.jsonl"
    assert _score(tiny_dir, data, out, "--limit", "2") == 0
    lines = out.read_text().splitlines()
    out.write_text("\n".join([lines[0], lines[1], lines[0], lines[1]]) + "\n")  # two runs at once, old version
    assert _score(tiny_dir, data, out, "--resume") == 0
    assert _ids(out) == ["a", "b", "c", "d"]
    assert out.read_text().splitlines()[:2] == lines
    assert "duplicate" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------ issue 7: other settings
@pytest.mark.parametrize("change,key", [(["--beta", "0.3"], "config.beta"), (["--details"], "run.details"),
                                        (["--step-agg", "min"], "config.step_agg"),
                                        (["--reference", "POLICY"], "run.models.reference"),
                                        (["--input", "OTHER"], "changed since it was scored")])
def test_resume_refuses_other_settings_or_input_naming_them(tiny_dir, data, tmp_path, change, key, capsys):
    out = tmp_path / "out.jsonl"
    assert _score(tiny_dir, data, out, "--limit", "2") == 0
    before = out.read_bytes()
    other = tmp_path / "other.jsonl"
    trajs = sample_trajectories()
    trajs[0].messages[-1] = Message("assistant", "Something else entirely.")
    save_trajectories(other, trajs)
    args = ["score", *_models(tiny_dir), "--input", str(data), "--output", str(out), "--resume"]
    for flag, value in zip(change[::2], change[1::2] or [None]):
        value = {"POLICY": str(tiny_dir / "policy"), "OTHER": str(other)}.get(value, value)
        if flag in args:
            args[args.index(flag) + 1] = value
        else:
            args += [flag] + ([value] if value is not None else [])
    assert main(args) == 2
    err = capsys.readouterr().err
    assert key in err and "Nothing was changed" in err
    assert out.read_bytes() == before


# ------------------------------------------------------------------------------------------ issue 8: outputs first
@pytest.mark.parametrize("command", COMMANDS)
def test_missing_output_folder_fails_before_the_models_load(tiny_dir, data, tmp_path, command, no_models, capsys):
    out = tmp_path / "missing_dir" / "x.json"
    assert main([command, *_models(tiny_dir), "--input", str(data), "--output", str(out)]) == 2
    assert "does not exist" in capsys.readouterr().err and not out.parent.exists()


@pytest.mark.slow
def test_resume_on_a_pipe_is_refused_instead_of_hanging(tiny_dir, data):  # `--output /dev/stdout --resume | wc -l`
    env = {**os.environ, "PYTHONPATH": str(Path(progadv_trl.__file__).resolve().parents[1])}
    p = subprocess.run([sys.executable, "-m", "progadv_trl.cli", "score", *_models(tiny_dir), "--input", str(data),
                        "--output", "/dev/stdout", "--resume"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                       env=env, timeout=300)
    assert p.returncode == 2 and b"--resume needs a regular file" in p.stderr and p.stdout == b""


# ------------------------------------------------------------------------------------------ careless and hostile uses
def test_output_is_a_folder(tiny_dir, data, tmp_path, no_models, capsys):
    for command in COMMANDS:
        assert main([command, *_models(tiny_dir), "--input", str(data), "--output", str(tmp_path)]) == 2
        assert "is a folder" in capsys.readouterr().err


def test_output_with_a_trailing_slash_or_empty(tiny_dir, data, tmp_path, no_models, capsys):
    for out in (str(tmp_path / "new") + "/", "", str(tmp_path / "new") + "/."):
        assert _score(tiny_dir, data, out) == 2
        assert "folder" in capsys.readouterr().err or out == ""
    assert not (tmp_path / "new").exists()


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_output_in_a_read_only_folder(tiny_dir, data, tmp_path, no_models, capsys):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        assert _score(tiny_dir, data, ro / "out.jsonl") == 2
        assert "not writable" in capsys.readouterr().err
    finally:
        ro.chmod(0o755)


def test_output_folder_not_writable_or_not_a_folder(tiny_dir, data, tmp_path, no_models, capsys, monkeypatch):
    (tmp_path / "file").write_text("x")
    assert _score(tiny_dir, data, tmp_path / "file" / "out.jsonl") == 2  # a path through a file
    assert "is a file, not a folder" in capsys.readouterr().err
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: False if os.fspath(p) == str(tmp_path) else real_access(p, mode))
    assert _score(tiny_dir, data, tmp_path / "out.jsonl") == 2  # what a non-root user gets in a read-only folder
    assert "not writable" in capsys.readouterr().err


def test_output_dev_null_streams_and_replaces_nothing(tiny_dir, data):
    assert _score(tiny_dir, data, "/dev/null") == 0
    assert main(["evaluate", *_models(tiny_dir), "--input", str(data), "--output", "/dev/null"]) == 0
    assert Path("/dev/null").is_char_device()
    assert _score(tiny_dir, data, "/dev/null", "--resume") == 2


def test_overwrite_and_resume_together_is_bad_usage(tiny_dir, data, tmp_path):
    with pytest.raises(SystemExit) as e:
        _score(tiny_dir, data, tmp_path / "o.jsonl", "--overwrite", "--resume")
    assert e.value.code == 2


def test_resume_after_the_input_grew_scores_only_the_new_records(tiny_dir, tmp_path, capsys):
    data = tmp_path / "in.jsonl"
    save_trajectories(data, _many(3))
    out = tmp_path / "out.jsonl"
    assert _score(tiny_dir, data, out) == 0
    first = out.read_text()
    save_trajectories(data, _many(5))  # same three records, two appended
    assert _score(tiny_dir, data, out, "--resume") == 0
    assert _ids(out) == [f"t{i}" for i in range(5)] and out.read_text().startswith(first)
    data.write_text(data.read_text().replace("t4", "t9"))  # a record already scored changed: refused
    assert _score(tiny_dir, data, out, "--resume") == 2 and "another input" in capsys.readouterr().err


def test_resume_with_the_input_given_by_another_path_or_copy(tiny_dir, data, tmp_path, monkeypatch):
    out = tmp_path / "out.jsonl"
    assert _score(tiny_dir, data, out, "--limit", "2") == 0
    (tmp_path / "sub").mkdir()
    monkeypatch.chdir(tmp_path / "sub")
    assert _score(tiny_dir, "../in.jsonl", "../out.jsonl", "--resume", "--limit", "3") == 0
    copy = tmp_path / "copy.jsonl"
    copy.write_bytes(data.read_bytes())
    assert _score(tiny_dir, copy, out, "--resume") == 0
    assert _ids(out) == ["a", "b", "c", "d"]


def test_resume_with_only_execution_settings_changed(tiny_dir, data, tmp_path):
    out = tmp_path / "out.jsonl"
    assert _score(tiny_dir, data, out, "--limit", "2") == 0
    assert _score(tiny_dir, data, out, "--resume", "--batch-size", "3", "--backend", "torch") == 0
    assert _ids(out) == ["a", "b", "c", "d"]


def test_lock_left_by_a_killed_run_does_not_block(tiny_dir, data, tmp_path):
    out = tmp_path / "out.jsonl"
    lock = _lock_of(out)
    lock.write_text(json.dumps({"pid": 999999, "host": "gone", "command": "progadv score", "started": "x"}))
    assert _score(tiny_dir, data, out) == 0 and _ids(out) == ["a", "b", "c", "d"]
    assert not lock.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl", "out.jsonl", "out.jsonl.progadv.json"]


def test_lock_held_in_this_process_names_the_holder(tiny_dir, data, tmp_path, capsys):
    from progadv_trl.outputs import OutputFile

    out = tmp_path / "out.jsonl"
    with OutputFile(out, command="score"):
        assert _score(tiny_dir, data, out, "--resume") == 2
        assert f"pid {os.getpid()}" in capsys.readouterr().err
    assert _score(tiny_dir, data, out, "--resume") == 0


def test_output_fifo(tiny_dir, data, tmp_path):
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    assert _score(tiny_dir, data, fifo, "--resume") == 2  # at once: reading a FIFO back would block
    got = []
    reader = threading.Thread(target=lambda: got.append(fifo.read_text()))
    reader.start()
    assert _score(tiny_dir, data, fifo) == 0
    reader.join(60)
    assert [json.loads(x)["id"] for x in got[0].splitlines()] == ["a", "b", "c", "d"]


def test_output_equal_to_the_config_or_a_model_file(tiny_dir, data, tmp_path, no_models, capsys):
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text("beta: 0.1\n")
    assert _score(tiny_dir, data, cfg, "--config", str(cfg), "--overwrite") == 2
    assert "same file as --config" in capsys.readouterr().err and cfg.read_text() == "beta: 0.1\n"
    target = tiny_dir / "policy" / "config.json"
    before = target.read_bytes()
    assert main(["rank", *_models(tiny_dir), "--input", str(data), "--output", str(target), "--overwrite"]) == 2
    assert "same file as --policy" in capsys.readouterr().err and target.read_bytes() == before


def test_output_inside_an_input_folder(tiny_dir, tmp_path, no_models, capsys):
    folder = tmp_path / "ww"
    folder.mkdir()
    (folder / "1.json").write_text('{"history": []}')
    for out in (folder / "1.json", folder / "new.jsonl"):
        assert main(["attribute", *_models(tiny_dir), "--input", str(folder), "--output", str(out),
                     "--overwrite"]) == 2
        err = capsys.readouterr().err
        assert "same file as --input" in err or "inside the --input folder" in err
    assert sorted(p.name for p in folder.iterdir()) == ["1.json"] and (folder / "1.json").read_text() == '{"history": []}'


def test_input_named_like_the_settings_record_of_the_output(tiny_dir, tmp_path, no_models, capsys):
    data = tmp_path / "out.jsonl.progadv.json"
    data.write_text("{}")
    assert _score(tiny_dir, data, tmp_path / "out.jsonl") == 2
    assert "companion file" in capsys.readouterr().err and data.read_text() == "{}"


def test_symlinked_output_is_written_at_its_target(tiny_dir, data, tmp_path):
    target = tmp_path / "real" / "chosen.jsonl"
    target.parent.mkdir()
    link = tmp_path / "chosen.jsonl"
    link.symlink_to(target)
    assert main(["rank", *_models(tiny_dir), "--input", str(data), "--output", str(link)]) == 0
    assert link.is_symlink() and len(target.read_text().splitlines()) == 2
    assert main(["rank", *_models(tiny_dir), "--input", str(data), "--output", str(link), "--overwrite"]) == 0
    assert link.is_symlink() and sorted(p.name for p in target.parent.iterdir()) == ["chosen.jsonl"]


def test_resume_of_an_output_without_settings_record(tiny_dir, data, tmp_path, capsys):
    out = tmp_path / "out.jsonl"
    assert _score(tiny_dir, data, out, "--limit", "2") == 0
    # another command replaces it: its settings record goes, so --resume cannot mix the two
    assert main(["rank", *_models(tiny_dir), "--input", str(data), "--output", str(out), "--overwrite"]) == 0
    assert not Path(str(out) + ".progadv.json").exists()
    before = out.read_bytes()
    assert _score(tiny_dir, data, out, "--resume") == 2
    assert "no settings record" in capsys.readouterr().err and out.read_bytes() == before


def test_resume_with_a_damaged_middle_line_changes_nothing(tiny_dir, data, tmp_path, capsys):
    out = tmp_path / "out.jsonl"
    assert _score(tiny_dir, data, out, "--limit", "3") == 0
    lines = out.read_text().splitlines()
    out.write_text(lines[0] + "\n" + lines[1][:20] + "\n" + lines[2] + "\n")  # old code cut lines 2 and 3
    before = out.read_bytes()
    assert _score(tiny_dir, data, out, "--resume") == 1
    assert "line 2 is not valid JSON" in capsys.readouterr().err and out.read_bytes() == before


def test_resume_when_only_a_cut_line_is_there_starts_fresh(tiny_dir, data, tmp_path):
    out = tmp_path / "out.jsonl"
    assert _score(tiny_dir, data, out, "--limit", "1") == 0
    out.write_text(out.read_text()[:15])  # killed in the first line
    assert _score(tiny_dir, data, out, "--resume") == 0
    assert _ids(out) == ["a", "b", "c", "d"]


def test_resume_on_a_missing_or_empty_output_starts_fresh(tiny_dir, data, tmp_path):
    out = tmp_path / "out.jsonl"
    assert _score(tiny_dir, data, out, "--resume", "--limit", "1") == 0 and _ids(out) == ["a"]
    empty = tmp_path / "empty.jsonl"
    empty.touch()
    assert _score(tiny_dir, data, empty, "--limit", "1") == 0 and _ids(empty) == ["a"]  # nothing to lose: no flag


def test_symlink_loop_as_output(tiny_dir, data, tmp_path, no_models, capsys):
    loop = tmp_path / "loop"
    loop.symlink_to(loop)
    assert _score(tiny_dir, data, loop) == 2
    assert "loop" in capsys.readouterr().err


def test_interrupted_rank_keeps_the_old_output(tiny_dir, data, tmp_path, monkeypatch, capsys):
    out = tmp_path / "chosen.jsonl"
    out.write_text("old\n")

    def interrupted(iterable, args, desc, **kw):
        for i, x in enumerate(iterable):
            if i == 2:
                raise KeyboardInterrupt
            yield x

    monkeypatch.setattr(cli, "_progress", interrupted)
    assert main(["rank", *_models(tiny_dir), "--input", str(data), "--output", str(out), "--overwrite"]) == 130
    assert "not changed" in capsys.readouterr().err
    assert out.read_text() == "old\n" and sorted(p.name for p in tmp_path.iterdir()) == ["chosen.jsonl", "in.jsonl"]


def test_ctrl_c_while_the_models_load(tiny_dir, data, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out.jsonl"
    out.write_text('{"id": "earlier"}\n')

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "_load_scorer", interrupted)
    assert _score(tiny_dir, data, out, "--overwrite") == 130
    assert "was not changed" in capsys.readouterr().err and out.read_text() == '{"id": "earlier"}\n'
    assert not _lock_of(out).exists()


def test_evaluate_existing_output_refused_before_work_and_replaced_whole(tiny_dir, data, tmp_path, monkeypatch):
    out = tmp_path / "m.json"
    out.write_text("previous table\n")
    out.chmod(0o640)
    with monkeypatch.context() as m:
        m.setattr(cli, "_load_scorer", lambda *a, **k: pytest.fail("models loaded"))
        assert main(["evaluate", *_models(tiny_dir), "--input", str(data), "--output", str(out)]) == 2
    assert main(["evaluate", *_models(tiny_dir), "--input", str(data), "--output", str(out), "--overwrite"]) == 0
    assert json.loads(out.read_text())["n"] == 4 and (out.stat().st_mode & 0o777) == 0o640
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl", "m.json"]


def test_bad_record_after_some_results_keeps_them_and_resume_continues_once_it_is_fixed(tiny_dir, tmp_path, capsys):
    data = tmp_path / "in.jsonl"
    lines = [json.dumps(t.to_dict()) for t in _many(20)]
    data.write_text("\n".join(lines) + "\n{oops\n")
    out = tmp_path / "out.jsonl"
    assert _score(tiny_dir, data, out, "--batch-size", "1") == 1
    n = len(_ids(out))
    assert n > 0 and not _lock_of(out).exists()
    before = out.read_bytes()
    # the bad record was never scored: fixing it and resuming keeps every result already computed
    data.write_text("\n".join(lines) + "\n" + json.dumps(_many(21)[-1].to_dict()) + "\n")
    assert _score(tiny_dir, data, out, "--batch-size", "1", "--resume") == 0
    assert out.read_bytes().startswith(before) and _ids(out) == [f"t{i}" for i in range(21)]
    # a record already scored that changes is refused, naming it; nothing is changed
    edited = tmp_path / "edited.jsonl"
    edited.write_text(data.read_text().replace('"content": "', '"content": "edited ', 1))
    whole = out.read_bytes()
    capsys.readouterr()
    assert _score(tiny_dir, edited, out, "--batch-size", "1", "--resume") == 2
    assert "'t0'" in capsys.readouterr().err and out.read_bytes() == whole


def test_attribute_output_streams_and_refuses_resume_flag(tiny_dir, data, tmp_path):
    out = tmp_path / "a.jsonl"
    assert main(["attribute", *_models(tiny_dir), "--input", str(data), "--output", str(out)]) == 0
    assert _ids(out) == ["a", "b", "c", "d"] and not Path(str(out) + ".progadv.json").exists()
    with pytest.raises(SystemExit):
        main(["attribute", *_models(tiny_dir), "--input", str(data), "--output", str(out), "--resume"])


def test_resume_with_another_format_flag(tiny_dir, data, tmp_path, capsys):
    out = tmp_path / "out.jsonl"
    assert _score(tiny_dir, data, out, "--limit", "2") == 0
    assert _score(tiny_dir, data, out, "--resume", "--format", "jsonl") == 2
    assert "run.format" in capsys.readouterr().err and _ids(out) == ["a", "b"]


def test_file_name_too_long_for_the_companion_files(tiny_dir, data, tmp_path, no_models, capsys):
    out = tmp_path / ("x" * 246 + ".jsonl")  # a valid name (252 bytes), but not its lock or settings record
    assert _score(tiny_dir, data, out) == 2
    assert "too long" in capsys.readouterr().err and not out.exists()


def test_settings_record_path_taken_by_a_folder(tiny_dir, data, tmp_path, no_models, capsys):
    (tmp_path / "out.jsonl.progadv.json").mkdir()
    assert _score(tiny_dir, data, tmp_path / "out.jsonl") == 2
    assert "not a regular file" in capsys.readouterr().err and not (tmp_path / "out.jsonl").exists()
