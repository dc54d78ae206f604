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
                      reference_episodes=32, reference_candidates=["alpha:-1", "previous:1"], reward_models=[16],
                      reward_model_steps=2,
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
    grpo = saved["runs"]["grpo"]
    # reference episodes split by group: the tables report the test half, choices are made on the validation half
    halves = grpo["final_on_reference"]["n_episodes"], grpo["final_on_reference_validation"]["n_episodes"]
    assert sum(halves) == 32 and min(halves) > 0
    assert grpo["attribution_rules"]["chosen"] in grpo["attribution_rules"]["validation"]["progress_advantage"]
    assert set(grpo["reference_candidates"]["candidates"]) == {"initial", "alpha:-1", "previous:1"}
    assert grpo["reference_candidates"]["chosen"] in grpo["reference_candidates"]["candidates"]
    assert set(grpo["reward_models"]) == {"orm@16", "prm@16"} and grpo["reward_models"]["orm@16"]["max_steps"] == 2
    for row in ("orm@16", "prm@16"):
        assert row in final["table"] and row in grpo["final_on_reference"]["table"]
    assert "Candidate references" in table and "Attribution rules" in table
    from progadv_trl.envs.report import settings_table

    settings = settings_table(saved)
    rows = [line.split(" | ")[0] for line in settings.splitlines()[2:]]
    assert rows == ["| grpo", "| grpo", "| dapo"]
    # a second run with the same settings reuses the trained runs (nothing is trained again)
    stamp = (tmp_path / "grpo" / "_progadv" / "scorer").stat().st_mtime
    run_demo(tmp_path, config=tiny_config())
    assert "reused: trained earlier" in capsys.readouterr().out
    assert (tmp_path / "grpo" / "_progadv" / "scorer").stat().st_mtime == stamp
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


def test_a_finished_run_is_reused_only_with_the_same_settings(tmp_path):
    from progadv_trl.envs.demo import mark_trained, trained_run

    cfg = tiny_config()
    run = cfg.runs[0]
    folder = tmp_path / run.name
    for part in ("_progadv/scorer", "checkpoints/step-1", "checkpoints/step-2"):
        (folder / part).mkdir(parents=True)
    (folder / "progadv-history.jsonl").write_text("{}\n")
    assert trained_run(folder, cfg.run_key(run), run.checkpoints) is None  # never marked: trained again
    mark_trained(folder, cfg.run_key(run), [{"step": 1, "reward": 0.5}])
    assert trained_run(folder, cfg.run_key(run), run.checkpoints) == [{"step": 1, "reward": 0.5}]
    changed = DemoConfig(**{**cfg.to_dict(), "runs": [{**cfg.to_dict()["runs"][0], "scale_rewards": "none"}]})
    assert trained_run(folder, changed.run_key(changed.runs[0]), run.checkpoints) is None
    assert trained_run(folder, cfg.run_key(run), [1, 2, 3]) is None  # a checkpoint asked for was not saved
    renamed = DemoConfig(**{**cfg.to_dict(), "seed": 1})
    assert trained_run(folder, renamed.run_key(renamed.runs[0]), run.checkpoints) is None


def test_committed_demo_tables_equal_their_committed_metrics():
    """docs/demo/table.md and drift.md are rendered from docs/demo/metrics.json (the run they report), nothing else:
    `python -m progadv_trl.envs.report docs/demo/metrics.json` regenerates them; likewise docs/repair/."""
    from pathlib import Path

    from progadv_trl.envs.report import render_tables

    root = Path(__file__).resolve().parents[1] / "docs"
    for docs in (root / "demo", root / "repair"):
        text, drift = render_tables(json.loads((docs / "metrics.json").read_text(encoding="utf-8")))
        assert text == (docs / "table.md").read_text(encoding="utf-8"), docs
        assert drift == (docs / "drift.md").read_text(encoding="utf-8"), docs
