"""The ``progadv`` command end to end: outputs, exit codes, streaming and resume."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from progadv_trl.cli import main

from conftest import cli_models, sample_trajectories


_models = cli_models


def test_score_details_recompute(tiny_dir, data, tmp_path):
    out = tmp_path / "out.jsonl"
    rc = main(["score", *_models(tiny_dir), "--input", str(data), "--output", str(out), "--details",
               "--baselines", "self_certainty,deepconf_mean", "--beta", "0.1"])
    assert rc == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in rows] == ["a", "b", "c", "d"]
    policy = AutoModelForCausalLM.from_pretrained(tiny_dir / "policy").double()
    for r in rows:
        assert set(r["baselines"]) == {"self_certainty", "deepconf_mean"} and r["truncated"] is None
        ids = r["tokens"]["input_ids"]
        with torch.no_grad():
            logp = torch.log_softmax(policy(input_ids=torch.tensor([ids])).logits[0, :-1], -1)
        naive = logp.gather(-1, torch.tensor(ids[1:])[:, None]).squeeze(-1)
        got = r["tokens"]["policy_logprob"]
        assert got[0] is None
        assert max(abs(a - b) for a, b in zip(got[1:], naive.tolist())) < 1e-4
        # each step's advantage is its aggregation (sum by default) of the reported numbers
        for s_i, step in enumerate(r["steps"]):
            pos = [t for t, s in enumerate(r["tokens"]["step_index"]) if s == s_i]
            adv = 0.1 * sum(r["tokens"]["policy_logprob"][t] - r["tokens"]["reference_logprob"][t] for t in pos)
            assert step["advantage"] == pytest.approx(adv, abs=1e-5) and step["n_tokens"] == len(pos)


def test_same_scores_from_python_and_cli_and_exported_scorer(tiny_dir, data, tmp_path):
    from progadv_trl import ProgressAdvantageScorer

    scorer = ProgressAdvantageScorer.from_models(tiny_dir / "policy", tiny_dir / "reference")
    py = [r.score for r in scorer.score(sample_trajectories())]
    scorer.save_pretrained(tmp_path / "scorer")
    for args in (_models(tiny_dir), ["--scorer", str(tmp_path / "scorer"), "--no-progress"]):
        out = tmp_path / "o.jsonl"
        assert main(["score", *args, "--input", str(data), "--output", str(out), "--overwrite"]) == 0
        cli = [json.loads(x)["score"] for x in out.read_text().splitlines()]
        assert cli == pytest.approx(py, abs=1e-6)


def test_rank_attribute_evaluate(tiny_dir, data, tmp_path, capsys):
    assert main(["rank", *_models(tiny_dir), "--input", str(data), "--output", str(tmp_path / "r.jsonl")]) == 0
    ranked = [json.loads(x) for x in (tmp_path / "r.jsonl").read_text().splitlines()]
    assert sorted(r["group"] for r in ranked) == ["g1", "g2"] and all(r["n"] == 2 for r in ranked)
    assert main(["attribute", *_models(tiny_dir), "--input", str(data), "--output", str(tmp_path / "a.jsonl")]) == 0
    attr = [json.loads(x) for x in (tmp_path / "a.jsonl").read_text().splitlines()]
    assert [a["mistake_step"] for a in attr] == [None, 1, None, 1]
    assert all(a["predicted_step"] in a["action_messages"] for a in attr)
    capsys.readouterr()
    assert main(["evaluate", *_models(tiny_dir), "--input", str(data), "--output", str(tmp_path / "m.json")]) == 0
    printed = capsys.readouterr().out
    assert "progress_advantage" in printed and "self_certainty" in printed
    table = json.loads((tmp_path / "m.json").read_text())["table"]
    assert table["progress_advantage"]["n_success_labelled"] == 4
    assert main(["evaluate", *_models(tiny_dir), "--input", str(data), "--baselines", "all"]) == 0  # "all" expanded
    assert "neg_entropy" in capsys.readouterr().out


def test_bad_data_exit_1_names_file_line_field(tiny_dir, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    good = json.dumps(sample_trajectories()[0].to_dict())
    bad.write_text(good + "\n" + '{"id": "x", "messages": [{"role": "robot", "content": "hi"}]}\n')
    out = tmp_path / "out.jsonl"
    rc = main(["score", *_models(tiny_dir), "--input", str(bad), "--output", str(out), "--batch-size", "1"])
    err = capsys.readouterr().err
    assert rc == 1 and "bad.jsonl" in err and "line 2" in err and "messages[0].role" in err
    bad.write_text(good + "\n{not json\n")
    assert main(["score", *_models(tiny_dir), "--input", str(bad), "--output", str(out)]) == 1


def test_results_written_before_an_error_stay_valid(tiny_dir, tmp_path):
    from progadv_trl.cli import main as cli_main

    bad = tmp_path / "bad.jsonl"
    lines = []
    for i in range(20):
        d = sample_trajectories()[i % 4].to_dict()
        d["id"] = f"t{i}"
        lines.append(json.dumps(d))
    bad.write_text("\n".join(lines) + "\n{oops\n")
    out = tmp_path / "out.jsonl"
    rc = cli_main(["score", *_models(tiny_dir), "--input", str(bad), "--output", str(out), "--batch-size", "1"])
    assert rc == 1
    written = [json.loads(x) for x in out.read_text().splitlines()]
    assert [w["id"] for w in written] == [f"t{i}" for i in range(len(written))]


def test_resume_skips_written_ids_and_repairs_partial_line(tiny_dir, data, tmp_path):
    out = tmp_path / "out.jsonl"
    assert main(["score", *_models(tiny_dir), "--input", str(data), "--output", str(out)]) == 0
    full = out.read_text().splitlines()
    out.write_text(full[0] + "\n" + full[1][:10])  # killed mid-line
    assert main(["score", *_models(tiny_dir), "--input", str(data), "--output", str(out), "--resume"]) == 0
    again = out.read_text().splitlines()
    assert [json.loads(x)["id"] for x in again] == ["a", "b", "c", "d"]
    scores = [json.loads(x)["score"] for x in full]
    assert [json.loads(x)["score"] for x in again] == pytest.approx(scores, abs=1e-5)  # other batches: 1e-5


def test_bad_usage_exit_2(tiny_dir, data, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["score", "--input", str(data)])  # --output missing
    assert e.value.code == 2
    assert main(["score", "--input", str(data), "--output", str(tmp_path / "o"), "--no-progress"]) == 2
    assert main(["score", *_models(tiny_dir), "--input", str(data), "--output", str(tmp_path / "o"),
                 "--token-agg", "sum", "--beta", "-1"]) == 2
    assert "beta" in capsys.readouterr().err


def test_env(capsys):
    assert main(["env"]) == 0
    assert "trl" in capsys.readouterr().out


def test_attribute_on_who_and_when_reports_step_and_agent_accuracy(tiny_dir, tmp_path, capsys):
    from conftest import SHARED_DATA

    ww = SHARED_DATA / "who_and_when" / "Hand-Crafted"
    if not ww.is_dir():
        pytest.skip("shared/data/who_and_when not present")
    out = tmp_path / "ww.jsonl"
    assert main(["attribute", *_models(tiny_dir), "--input", str(ww), "--output", str(out), "--limit", "3",
                 "--rendering", "plain", "--max-length", "512"]) == 0
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert len(rows) == 3 and all(r["mistake_step"] in r["action_messages"] for r in rows)
    assert all(r["predicted_agent"] and r["mistake_agent"] for r in rows)
    err = capsys.readouterr().err
    assert "step-level accuracy" in err and "agent-level accuracy" in err


@pytest.mark.parametrize("command", ["score", "rank", "attribute", "evaluate"])
def test_every_scoring_field_has_one_flag_with_its_help(command, capsys):
    import dataclasses

    from progadv_trl.cli import build_parser
    from progadv_trl.config import SCORING_FIELDS, ScoringConfig

    sub = next(a for a in build_parser()._subparsers._group_actions[0].choices.items() if a[0] == command)[1]
    by_dest = {}
    for action in sub._actions:
        by_dest.setdefault(action.dest, []).append(action)
    helps = {f.name: f.metadata["help"].rstrip(".") for f in dataclasses.fields(ScoringConfig)}
    for name in SCORING_FIELDS:
        main_flags = [a for a in by_dest[name] if not any(o.startswith("--no-") for o in a.option_strings)]
        assert len(main_flags) == 1, name  # one flag (with its - and _ spellings), one help text
        assert f"--{name.replace('_', '-')}" in main_flags[0].option_strings
        assert main_flags[0].help.startswith(helps[name]) and main_flags[0].default is None
    # nothing but the scoring fields (and the non-scoring options the command defines) set config fields
    assert not {d for d in by_dest if d in {f.name for f in dataclasses.fields(ScoringConfig)}} - set(SCORING_FIELDS)


def test_flags_and_config_file_merge_by_the_keys_they_name(tiny_dir, data, tmp_path):
    cfg = tmp_path / "run.yaml"  # a training run's file: its callback settings change no score and are left out
    cfg.write_text("progadv:\n  beta: 0.25\n  baselines: [random]\n  eval_steps: 4\n  top_k: 3\n")
    out = tmp_path / "t.json"
    rc = main(["evaluate", *_models(tiny_dir), "--input", str(data), "--output", str(out), "--config", str(cfg),
               "--top-k", "5", "--baselines", "self_certainty", "neg_entropy", "--cumulative"])
    assert rc == 0
    config = json.loads(out.read_text())["config"]
    assert (config["beta"], config["top_k"], config["baselines"], config["cumulative"]) == (
        0.25, 5, ["self_certainty", "neg_entropy"], True)
    assert "eval_steps" not in config
