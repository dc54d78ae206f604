"""The examples and the YAML recipe run as documented (shortened)."""

import json
import runpy
import sys
from pathlib import Path

import pytest
import yaml

from progadv_trl.cli import main

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_progadv_train_from_yaml(tmp_path):
    assert main(["train", "--config", "grpo_tiny", "--output-dir", str(tmp_path),  # the packaged config, by name
                 "--max-steps", "2"]) == 0
    hist = [json.loads(x) for x in (tmp_path / "progadv-history.jsonl").read_text().splitlines()]
    assert [h["step"] for h in hist] == [0, 2]
    assert (tmp_path / "_progadv" / "scorer" / "progadv_config.json").exists()


@pytest.mark.slow
def test_ppo_custom_loop_example(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["ppo_custom_loop.py", "--output-dir", str(tmp_path), "--steps", "2"])
    runpy.run_path(str(ROOT / "examples" / "ppo_custom_loop.py"), run_name="__main__")
    out = capsys.readouterr().out
    assert "step 0: AUROC" in out and "step 2: AUROC" in out
    hist = [json.loads(x) for x in (tmp_path / "progadv-history.jsonl").read_text().splitlines()]
    assert hist[-1]["progadv/kl/mean"] > 0


@pytest.mark.parametrize("config", ["score_default.yaml", "authors_compat.yaml"])
def test_scoring_configs_parse(config):
    from progadv_trl import ProgressAdvantageConfig

    path = ROOT / "progadv_trl" / "configs" / config
    written = yaml.safe_load(path.read_text())["progadv"]
    cfg = ProgressAdvantageConfig.from_file(path)
    assert written and {key: getattr(cfg, key) for key in written} == written  # every value the file sets is used
