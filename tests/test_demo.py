"""``progadv demo``: the configs parse to the built-in settings, and a tiny run writes every report file."""

import json
from pathlib import Path

import pytest

from progadv_trl.envs.demo_config import DemoConfig, RunConfig

ROOT = Path(__file__).resolve().parents[1]


def test_yaml_configs_equal_builtin_settings():
    assert DemoConfig.from_yaml(ROOT / "progadv_trl" / "configs" / "demo.yaml") == DemoConfig()
    assert DemoConfig.from_yaml(ROOT / "progadv_trl" / "configs" / "demo_quick.yaml") == DemoConfig.quick()
    run = DemoConfig().runs[1]
    assert run.beta == 0 and run.score_beta == 1.0 and run.exact_beta == 0.04 and run.checkpoints[-1] == run.steps


def test_beta0_run_needs_exact_beta():
    import pytest

    with pytest.raises(ValueError, match="exact_beta"):
        RunConfig("x", beta=0.0)


def tiny_config() -> DemoConfig:
    """Smaller than --quick: every phase, seconds each."""
    return DemoConfig(env={"size": 3, "max_turns": 2, "slip": 0.2, "max_distance": 1},
                      reference={"steps": 20, "n_demos": 100}, callback_episodes=16, eval_episodes=16,
                      runs=[RunConfig("grpo", beta=0.04, steps=2, eval_steps=1, checkpoints=[1], prompts_per_step=2,
                                      num_generations=4),
                            RunConfig("dapo", beta=0.0, loss_type="dapo", steps=1, eval_steps=1, prompts_per_step=2,
                                      num_generations=4, exact_beta=0.04)],
                      plot_episodes=1, bootstrap=20)


@pytest.mark.slow
def test_demo_writes_the_report(tmp_path, capsys):
    from progadv_trl.baselines import BASELINES
    from progadv_trl.envs.demo import run_demo

    metrics = run_demo(tmp_path, config=tiny_config())
    report = tmp_path / "report"
    for name in ("metrics.json", "table.md", "drift.md"):
        assert (report / name).is_file(), name
    table = (report / "table.md").read_text()
    for row in ("progress advantage", *BASELINES, "exact A* (ceiling)", "oracle, unregularised"):
        assert row in table, row
    assert "Targets:" in table and "report:" in capsys.readouterr().out
    saved = json.loads((report / "metrics.json").read_text())
    assert set(saved["runs"]) == {"grpo", "dapo"} == set(metrics["runs"])
    assert [c["step"] for c in saved["runs"]["grpo"]["checkpoints"]] == [1, 2]
    assert saved["runs"]["dapo"]["score_beta"] == 1.0
    assert [h["step"] for h in saved["runs"]["grpo"]["callback_history"]] == [0, 1, 2]
    assert (tmp_path / "grpo" / "_progadv" / "scorer").is_dir()
    final = saved["runs"]["grpo"]["final"]  # 95% bootstrap intervals over groups, around the estimate
    for col in ("mean_success", "oracle"):
        lo, hi = final["intervals"]["progress_advantage"][col]
        assert lo <= final["table"]["progress_advantage"][col] <= hi
    assert all("interval" in c for c in saved["runs"]["grpo"]["targets"]) and "[" in table
    drift = (report / "drift.md").read_text()
    assert "| grpo | 1 |" in drift and "| dapo | 1 |" in drift
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return
    assert (report / "signal_vs_step.png").stat().st_size > 1000
    assert (report / "advantages_vs_exact.png").stat().st_size > 1000


@pytest.mark.slow
def test_demo_rerun_uses_the_cache(tmp_path):
    from progadv_trl.envs.demo import prepare_exact, prepare_reference
    from progadv_trl.envs.number_line import NumberLineEnv

    cfg = tiny_config()
    env = NumberLineEnv(**cfg.env)
    ref = prepare_reference(tmp_path, env, cfg)
    stamp = (ref / "model.safetensors").stat().st_mtime
    first = prepare_exact(tmp_path, env, ref, cfg)
    assert first.oracle.n_queried > 0
    assert prepare_reference(tmp_path, env, cfg) == ref and (ref / "model.safetensors").stat().st_mtime == stamp
    assert prepare_exact(tmp_path, env, ref, cfg).oracle.n_queried == 0


def test_committed_demo_tables_equal_their_committed_metrics():
    """docs/demo/table.md and drift.md are rendered from docs/demo/metrics.json (the run they report), nothing else:
    `python -m progadv_trl.envs.report docs/demo/metrics.json` regenerates them."""
    from pathlib import Path

    from progadv_trl.envs.report import render_tables

    docs = Path(__file__).resolve().parents[1] / "docs" / "demo"
    text, drift = render_tables(json.loads((docs / "metrics.json").read_text(encoding="utf-8")))
    assert text == (docs / "table.md").read_text(encoding="utf-8")
    assert drift == (docs / "drift.md").read_text(encoding="utf-8")
