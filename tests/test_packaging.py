"""An installed package (not just a source checkout) holds its configs, py.typed and LICENSE; ``--config NAME`` finds
the packaged file; matplotlib is optional; ``progadv score`` reports progress with a total in a batch job's log."""

import ast
import io
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from progadv_trl import cli
from progadv_trl.cli import main
from progadv_trl.configs import packaged, resolve

from conftest import sample_trajectories

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ["authors_compat", "demo", "demo_quick", "demo_repair", "demo_repair_quick", "demo_settings", "grpo_tiny",
           "score_default"]


def _run(cmd, **kw):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, capture_output=True, text=True, env={**env, **kw.pop("env", {})}, **kw)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


# ------------------------------------------------------------------------------------------------ the wheel
@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """A wheel built from a copy of the sources (the checkout is left as it is)."""
    src, out = tmp_path_factory.mktemp("src"), tmp_path_factory.mktemp("wheel")
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(ROOT / name, src / name)
    shutil.copytree(ROOT / "progadv_trl", src / "progadv_trl", ignore=shutil.ignore_patterns("__pycache__"))
    _run([sys.executable, "-m", "pip", "wheel", str(src), "--no-deps", "--no-build-isolation", "--no-index",
          "-q", "-w", str(out)])
    (path,) = out.glob("progadv_trl-*.whl")
    return path


@pytest.mark.slow
def test_the_wheel_holds_configs_py_typed_and_license(wheel):
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        (meta,) = [n for n in names if n.endswith(".dist-info/METADATA")]
        metadata = z.read(meta).decode()
        (lic,) = [n for n in names if n.endswith(".dist-info/licenses/LICENSE")]
        license_text = z.read(lic)
    assert {f"progadv_trl/configs/{c}.yaml" for c in CONFIGS} <= names
    assert sorted(n for n in names if n.endswith(".yaml")) == sorted(
        f"progadv_trl/configs/{p.name}" for p in (ROOT / "progadv_trl" / "configs").glob("*.yaml"))
    assert "progadv_trl/py.typed" in names and "progadv_trl/configs/__init__.py" in names
    assert license_text == (ROOT / "LICENSE").read_bytes() and b"Apache License" in license_text
    assert "License-Expression: Apache-2.0" in metadata and "License-File: LICENSE" in metadata
    requires = [line for line in metadata.splitlines() if line.startswith("Requires-Dist: ")]
    assert "Requires-Dist: trl<2,>=1.16" in requires and "Requires-Dist: transformers<6,>=5.24" in requires
    assert [r for r in requires if "matplotlib" in r] == [
        'Requires-Dist: matplotlib<4,>=3.8; extra == "plots"', 'Requires-Dist: matplotlib<4,>=3.8; extra == "test"']


@pytest.mark.slow
def test_an_installed_wheel_finds_its_configs_by_name(wheel, tmp_path):
    """Unpacked outside the checkout (a pure-Python wheel installs by unzipping), run from an unrelated folder."""
    site = tmp_path / "site"
    with zipfile.ZipFile(wheel) as z:
        z.extractall(site)
    code = ("import progadv_trl, sys; from progadv_trl.cli import build_parser; "
            "a = build_parser().parse_args(['train', '--config', 'grpo_tiny', '--max-steps', '1']); "
            "print(progadv_trl.__file__); print(a.config); print(a.max_steps)")
    work = tmp_path / "work"
    work.mkdir()
    out = _run([sys.executable, "-c", code], cwd=work, env={"PYTHONPATH": str(site)}).splitlines()
    assert out[0] == str(site / "progadv_trl" / "__init__.py")
    assert out[1:] == [str(site / "progadv_trl" / "configs" / "grpo_tiny.yaml"), "1"]


# ------------------------------------------------------------------------------------------- --config NAME
def test_a_bare_name_resolves_to_the_packaged_config(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert sorted(packaged()) == CONFIGS
    here = ROOT / "progadv_trl" / "configs"
    assert resolve("grpo_tiny") == here / "grpo_tiny.yaml" == resolve("grpo_tiny.yaml")
    mine = tmp_path / "grpo_tiny.yaml"  # a file of that name in the current folder comes first
    mine.write_text("model_name_or_path: tiny\n")
    assert resolve("grpo_tiny.yaml") == Path("grpo_tiny.yaml") and resolve(str(mine)) == mine
    assert resolve("grpo_tiny") == here / "grpo_tiny.yaml"
    with pytest.raises(FileNotFoundError, match=r"'nope': no such file, and no packaged config of that name "
                                                r"\(packaged configs: authors_compat, demo, demo_quick"):
        resolve("nope")
    with pytest.raises(FileNotFoundError, match=r"'sub/grpo_tiny.yaml': no such file \(packaged"):
        resolve("sub/grpo_tiny.yaml")


def test_every_command_takes_a_packaged_config_name(tmp_path, capsys):
    parser = cli.build_parser()
    here = ROOT / "progadv_trl" / "configs"
    args = parser.parse_args(["train", "--config", "grpo_tiny", "--max-steps", "1"])
    assert (args.config, args.max_steps) == (str(here / "grpo_tiny.yaml"), 1)
    assert parser.parse_args(["demo", "--config", "demo_quick"]).config == str(here / "demo_quick.yaml")
    args = parser.parse_args(["score", "--policy", "p", "--input", "x.jsonl", "--output", "o.jsonl",
                              "--config", "score_default"])
    assert args.config == str(here / "score_default.yaml")
    with pytest.raises(SystemExit) as e:
        main(["train", "--config", "no_such_config"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "argument --config: 'no_such_config': no such file" in err and "grpo_tiny" in err


def test_the_loaders_take_a_packaged_config_name():
    from progadv_trl.envs.demo import load_config
    from progadv_trl.envs.demo_config import DemoConfig
    from progadv_trl.train import load_run_config

    assert load_config("demo_quick") == DemoConfig.quick() and load_config("demo") == DemoConfig()
    assert load_run_config("grpo_tiny")["args"]["output_dir"] == "runs/grpo-tiny"


def test_each_config_header_shows_its_command():
    for name, path in packaged().items():
        commands = [line.split("#")[1].split()
                    for line in path.read_text().splitlines() if line.startswith("#") and "progadv " in line]
        shown = [" ".join(words) + " " for words in commands if words[:1] == ["progadv"]]
        assert any(f" --config {name} " in line for line in shown), name


# ------------------------------------------------------------------------------------ matplotlib is optional
@pytest.fixture
def no_matplotlib(monkeypatch):
    """``import matplotlib`` fails as it does where the ``plots`` extra is not installed."""
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)


def test_without_matplotlib_the_demo_stops_at_once_naming_the_extra(no_matplotlib, tmp_path, capsys):
    from progadv_trl.envs.report import MissingExtra, require_matplotlib, write_plots

    with pytest.raises(ImportError, match=r'pip install "progadv-trl\[plots\]"'):
        require_matplotlib()
    with pytest.raises(MissingExtra, match=r"plots need matplotlib"):
        write_plots(tmp_path, None, {})
    assert main(["demo", "--quick", "--output-dir", str(tmp_path / "demo")]) == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1] == ("progadv: the demo's plots need matplotlib, which is not installed: "
                                            'pip install "progadv-trl[plots]"')
    assert not (tmp_path / "demo").exists()  # nothing was trained first


def test_matplotlib_is_imported_only_inside_functions():
    """So that importing any module of the package works without the ``plots`` extra."""
    at_module_level = []
    for path in sorted((ROOT / "progadv_trl").rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        nodes = [n for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom))]
        inside = {id(n) for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
                  for n in ast.walk(f)}
        for n in nodes:
            names = [a.name for a in n.names] if isinstance(n, ast.Import) else [n.module or ""]
            if any(m.split(".")[0] == "matplotlib" for m in names) and id(n) not in inside:
                at_module_level.append(f"{path.relative_to(ROOT)}:{n.lineno}")
    assert at_module_level == []


# ------------------------------------------------------------------------------------ progress of `score`
class _Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def test_progress_lines_show_count_total_rate_and_eta():
    clock, out = _Clock(), io.StringIO()
    lines = cli._ProgressLines(2000, every=320, file=out, clock=clock)
    for _ in range(700):
        clock.now += 0.08
        lines.update(1)
    assert out.getvalue().splitlines() == ["scored 320/2000 (12.5/s, ETA 2m14s)", "scored 640/2000 (12.5/s, ETA 1m49s)"]


def test_progress_lines_after_resume_and_without_a_total():
    clock, out = _Clock(), io.StringIO()
    lines = cli._ProgressLines(2000, initial=1600, every=100, file=out, clock=clock)
    clock.now += 20.0
    lines.update(150)  # 150 new ones in 20 s; 250 left
    clock, out2 = _Clock(), io.StringIO()
    unknown = cli._ProgressLines(None, every=2, file=out2, clock=clock)
    clock.now += 2.0
    unknown.update(5)
    assert out.getvalue() == "scored 1750/2000 (7.5/s, ETA 33s)\n" and out2.getvalue() == "scored 5 (2.5/s)\n"
    assert [cli._duration(s) for s in (0.4, 59.6, 110, 3600 + 125)] == ["0s", "1m00s", "1m50s", "1h02m"]


def test_input_total_counts_one_trajectory_per_line(tmp_path):
    from progadv_trl.formats import save_trajectories

    data = tmp_path / "in.jsonl"
    save_trajectories(data, sample_trajectories())
    data.write_text(data.read_text() + "\n\n")

    def total(input=data, more=()):
        return cli._input_total(cli.build_parser().parse_args(
            ["score", "--policy", "p", "--output", "o.jsonl", "--input", str(input), *more]))

    stepwise = tmp_path / "steps.jsonl"
    stepwise.write_text(json.dumps({"prompt": "p", "completions": ["a", "b"], "labels": [True, False]}) + "\n")
    fifo = tmp_path / "pipe.jsonl"
    os.mkfifo(fifo)
    assert total() == 4 and total(more=["--limit", "3"]) == 3 and total(more=["--format", "trl"]) == 4
    assert total(input=stepwise) is None and total(input=fifo) is None and total(input=tmp_path) is None


def test_score_writes_plain_progress_lines_when_stderr_is_not_a_terminal(tiny_dir, tmp_path, monkeypatch, capsys):
    from conftest import many_trajectories
    from progadv_trl.formats import save_trajectories

    data, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    save_trajectories(data, many_trajectories(5))
    monkeypatch.setattr(cli, "PROGRESS_EVERY", 2)
    assert not sys.stderr.isatty()
    assert main(["score", "--policy", str(tiny_dir / "policy"), "--reference", str(tiny_dir / "reference"),
                 "--input", str(data), "--output", str(out)]) == 0
    lines = capsys.readouterr().err.splitlines()
    progress = [line for line in lines if "scored 2/5" in line or "scored 4/5" in line]
    assert [line.split(" (")[0] for line in progress] == ["scored 2/5", "scored 4/5"], lines
    assert all(line.endswith(")") and "/s, ETA " in line for line in progress)  # plain lines, no bar


def test_on_a_terminal_the_bar_has_the_total(monkeypatch):
    class Terminal(io.StringIO):
        def isatty(self):
            return True

    monkeypatch.setattr(sys, "stderr", Terminal())
    bar = cli._progress_bar(5)
    bar.update(2)
    bar.close()
    assert not isinstance(bar, cli._ProgressLines) and bar.total == 5 and "2/5" in sys.stderr.getvalue()
    monkeypatch.setattr(sys, "stderr", io.StringIO())
    assert isinstance(cli._progress_bar(5), cli._ProgressLines)


def test_the_cli_leaves_the_hub_download_bars_on(capsys):
    from huggingface_hub.utils import are_progress_bars_disabled

    assert main(["env"]) == 0
    assert not are_progress_bars_disabled()
