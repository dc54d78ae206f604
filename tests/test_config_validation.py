"""Settings: one check for every config field (from YAML, JSON, flags and Python alike), merging by named keys
(``--config`` beside ``--scorer``), and clean one-line errors with the right exit code (1 bad data naming file, line
and field; 2 bad usage) instead of tracebacks or silently wrong results."""

from __future__ import annotations

import json
import shutil

import pytest

from progadv_trl import ProgressAdvantageConfig
from progadv_trl.cli import main
from progadv_trl.formats import save_trajectories

from conftest import cli_models, sample_trajectories

MSGS = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]


_models = cli_models


def _jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


def _rows(path):
    return [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines()]


def _cfg_file(tmp_path, text, name="c.yaml", encoding="utf-8"):
    path = tmp_path / name
    path.write_bytes(text.encode(encoding) if isinstance(text, str) else text)
    return path


def _cli(args, capsys):
    """Exit code and stderr of ``progadv`` (argparse's own errors exit through SystemExit)."""
    capsys.readouterr()
    try:
        rc = main(args)
    except SystemExit as e:
        rc = e.code
    return rc, capsys.readouterr().err


def _one_line(err: str) -> str:
    lines = [x for x in err.splitlines() if x.strip()]
    assert "Traceback" not in err, err
    return lines[-1]


# ============================================================================ 1. --config merges by named keys


def test_config_beside_scorer_keeps_the_exported_settings(tiny_dir, data, tmp_path, capsys):
    """Issue: a scorer saved with beta 0.5 and temperature 0.7, scored with a --config that sets only max_length,
    scored at beta 1.0 and temperature 1.0 (the file's defaults replaced the exported settings)."""
    from progadv_trl import ProgressAdvantageScorer

    scorer = ProgressAdvantageScorer.from_models(tiny_dir / "policy", tiny_dir / "reference", beta=0.5,
                                                 temperature=0.7, step_agg="sum")
    scorer.save_pretrained(tmp_path / "scorer")
    cfg = _cfg_file(tmp_path, "max_length: 512\n")
    out = tmp_path / "o.jsonl"
    rc, err = _cli(["score", "--scorer", str(tmp_path / "scorer"), "--no-progress", "--config", str(cfg),
                    "--input", str(data), "--output", str(out)], capsys)
    assert rc == 0, err
    rows = _rows(out)
    assert {(r["beta"], r["temperature"]) for r in rows} == {(0.5, 0.7)}
    direct = ProgressAdvantageScorer.from_pretrained(tmp_path / "scorer").score(sample_trajectories())
    assert [r["score"] for r in rows] == pytest.approx([d.score for d in direct], abs=1e-6)  # step_agg kept too
    # a flag overrides the file, again only the key it names
    out2 = tmp_path / "o2.jsonl"
    rc, err = _cli(["score", "--scorer", str(tmp_path / "scorer"), "--no-progress", "--config", str(cfg),
                    "--beta", "2", "--input", str(data), "--output", str(out2)], capsys)
    assert rc == 0, err
    assert {(r["beta"], r["temperature"]) for r in _rows(out2)} == {(2.0, 0.7)}


def test_config_with_policy_file_keys_over_defaults_flags_over_file(tiny_dir, data, tmp_path, capsys):
    cfg = _cfg_file(tmp_path, "progadv:\n  beta: 0.25\n  temperature: 0.5\n  cumulative: true\n")
    out = tmp_path / "o.jsonl"
    rc, err = _cli(["evaluate", *_models(tiny_dir), "--config", str(cfg), "--temperature", "0.8", "--no-cumulative",
                    "--input", str(data), "--output", str(out), "--baselines", "random"], capsys)
    assert rc == 0, err
    config = json.loads(out.read_text())["config"]
    assert (config["beta"], config["temperature"], config["cumulative"]) == (0.25, 0.8, False)
    assert config["max_length"] == ProgressAdvantageConfig().max_length  # unnamed: the default


def test_read_config_file_gives_only_the_named_keys(tmp_path):
    from progadv_trl.config import read_config_file

    cfg = _cfg_file(tmp_path, "progadv:\n  max_length: 512\n  compat: authors\n")
    assert read_config_file(cfg) == {"max_length": 512, "compat": "authors"}
    saved = ProgressAdvantageConfig(beta=0.5, temperature=0.7)
    merged = saved.merged(read_config_file(cfg))
    assert (merged.beta, merged.temperature, merged.max_length) == (0.5, 0.7, 512)
    assert (merged.token_agg, merged.rendering) == ("mean", "plain")  # compat's defaults follow it
    assert ProgressAdvantageConfig.from_file(cfg).token_agg == "mean"


# ============================================================================ 2. silent wrong results


@pytest.mark.parametrize("sep", ["§", "→", "\\u00a7"])
def test_non_ascii_step_separator_is_kept(tiny_dir, tmp_path, capsys, sep):
    """Issue: ``--step-separator §`` went through unicode_escape, was mangled and matched nothing: 1 step, not 3."""
    text = "first§second§third" if sep != "→" else "first→second→third"
    path = _jsonl(tmp_path / "sep.jsonl", [{"messages": [MSGS[0], {"role": "assistant", "content": text}]}])
    out = tmp_path / "o.jsonl"
    rc, err = _cli(["score", *_models(tiny_dir), "--input", str(path), "--output", str(out),
                    "--step-separator", sep], capsys)
    assert rc == 0, err
    assert [s["part"] for s in _rows(out)[0]["steps"]] == [0, 1, 2]


def test_escapes_are_still_decoded():
    from progadv_trl.config import decode_escapes

    assert decode_escapes("\\n\\n") == "\n\n"
    assert decode_escapes("a\\tb\\\\c") == "a\tb\\c"
    assert decode_escapes("§→ \\u2192 \\x41") == "§→ → A"
    assert decode_escapes("\\q") == "\\q"  # not an escape: kept as typed


TYPE_CASES = [
    # (case, yaml text, field) -- every one was accepted before, most with a silently wrong meaning
    ("bool-as-string", 'cumulative: "false"\n', "cumulative"),
    ("bool-as-int", "cumulative: 1\n", "cumulative"),
    ("int-as-float", "max_length: 1024.0\n", "max_length"),
    ("int-as-bool", "top_k: true\n", "top_k"),
    ("int-as-string", 'batch_size: "8"\n', "batch_size"),
    ("float-as-bool", "beta: true\n", "beta"),
    ("float-as-string", 'temperature: "0.7"\n', "temperature"),
    ("list-as-string", "baselines: self_certainty\n", "baselines"),
    ("list-of-ints", "baselines: [1, 2]\n", "baselines"),
    ("optional-float-as-string", 'attribution_threshold: "-0.5"\n', "attribution_threshold"),
    ("optional-int-as-bool", "chunk_size: false\n", "chunk_size"),
    ("optional-str-as-int", "step_separator: 5\n", "step_separator"),
    ("bool-as-string-in-json", '{"export": "false"}', "export"),
]


@pytest.mark.parametrize("case, text, field", TYPE_CASES, ids=[c[0] for c in TYPE_CASES])
def test_every_field_is_type_checked(tmp_path, case, text, field):
    """Issue: ``cumulative: "false"`` (a string) switched the option on."""
    cfg = _cfg_file(tmp_path, text, name="c.json" if case.endswith("json") else "c.yaml")
    with pytest.raises(ValueError) as info:
        ProgressAdvantageConfig.from_file(cfg)
    msg = str(info.value)
    assert cfg.name in msg and f"field '{field}'" in msg, msg


def test_python_construction_is_checked_the_same_way():
    with pytest.raises(ValueError, match="field 'cumulative'"):
        ProgressAdvantageConfig(cumulative="false")
    with pytest.raises(ValueError, match="field 'max_length'"):
        ProgressAdvantageConfig(max_length=4096.0)
    assert ProgressAdvantageConfig(beta=1).beta == 1.0  # an int is a fine float


NUMERIC_FLAGS = [
    ("--beta", "inf"), ("--beta", "1e308"), ("--beta", "nan"), ("--temperature", "inf"), ("--temperature", "0"),
    ("--success-threshold", "nan"), ("--success-threshold", "-inf"), ("--attribution-threshold", "inf"),
]


@pytest.mark.parametrize("flag, value", NUMERIC_FLAGS, ids=[f"{f}={v}" for f, v in NUMERIC_FLAGS])
def test_non_finite_and_out_of_range_flags_are_usage_errors(data, tmp_path, capsys, flag, value):
    """Issue: --beta inf/1e308 gave every score null, --temperature inf every score 0, --success-threshold nan every
    metric 0, all with exit 0. Checked before any model loads (no models needed here)."""
    rc, err = _cli(["score", "--policy", str(tmp_path / "no-such-model"), "--no-progress", "--input", str(data),
                    "--output", str(tmp_path / "o.jsonl"), f"{flag}={value}"], capsys)
    assert rc == 2 and flag in _one_line(err), err


@pytest.mark.parametrize("field, value", [("attribution_threshold", float("inf")), ("decay_margin", -0.1),
                                          ("decay_margin", float("nan")), ("success_threshold", float("inf")),
                                          ("beta", 2e6), ("temperature", 1e3)])
def test_numeric_fields_are_finite_and_in_range(field, value):
    with pytest.raises(ValueError, match=f"field '{field}'"):
        ProgressAdvantageConfig(**{field: value})


def test_rank_counts_a_trajectory_without_group_as_a_group_of_one(tiny_dir, tmp_path, capsys):
    """Issue: with ``group: null`` rank reported ``"n": 2`` for groups of one (it counted all the ungrouped)."""
    trajs = sample_trajectories()
    trajs[2].group = trajs[3].group = None
    path = tmp_path / "in.jsonl"
    save_trajectories(path, trajs)
    out = tmp_path / "r.jsonl"
    rc, err = _cli(["rank", *_models(tiny_dir), "--input", str(path), "--output", str(out)], capsys)
    assert rc == 0, err
    n = {r["id"]: r["n"] for r in _rows(out)}
    assert n.pop("c") == 1 and n.pop("d") == 1 and list(n.values()) == [2]


# ============================================================================ 3. clean errors, right exit codes


def test_lone_surrogate_in_content_is_bad_data(tiny_dir, tmp_path, capsys):
    path = tmp_path / "sur.jsonl"
    path.write_text(json.dumps({"messages": MSGS}) + "\n"
                    + '{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a\\ud800"}]}\n')
    rc, err = _cli(["score", *_models(tiny_dir), "--input", str(path), "--output", str(tmp_path / "o.jsonl")], capsys)
    line = _one_line(err)
    assert rc == 1 and "sur.jsonl" in line and "line 2" in line and "messages[1].content" in line, err


def test_huge_integer_reward_is_bad_data(tiny_dir, tmp_path, capsys):
    path = tmp_path / "big.jsonl"
    path.write_text('{"messages": %s, "reward": %s}\n' % (json.dumps(MSGS), "9" * 400))
    rc, err = _cli(["score", *_models(tiny_dir), "--input", str(path), "--output", str(tmp_path / "o.jsonl")], capsys)
    line = _one_line(err)
    assert rc == 1 and "big.jsonl" in line and "line 1" in line and "'reward'" in line, err


def test_deeply_nested_metadata_in_rank_is_bad_data(tiny_dir, tmp_path, capsys):
    deep: dict = {}
    cur = deep
    for _ in range(900):
        cur["x"] = {}
        cur = cur["x"]
    path = _jsonl(tmp_path / "deep.jsonl", [{"messages": MSGS, "metadata": deep}])
    rc, err = _cli(["rank", *_models(tiny_dir), "--input", str(path), "--output", str(tmp_path / "r.jsonl")], capsys)
    line = _one_line(err)
    assert rc == 1 and "deep.jsonl" in line and "line 1" in line and "metadata" in line, err


@pytest.mark.parametrize("device", ["cuda", "bogus", "cuda:99"])
def test_unusable_device_is_a_usage_error(tiny_dir, data, tmp_path, capsys, monkeypatch, device):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # the same on every machine
    rc, err = _cli(["score", *_models(tiny_dir), "--input", str(data), "--output", str(tmp_path / "o.jsonl"),
                    "--device", device], capsys)
    assert rc == 2 and "--device" in _one_line(err), err


@pytest.mark.parametrize("limit", ["-1", "abc", "1.5"])
def test_bad_limit_is_a_usage_error(data, tmp_path, capsys, limit):
    rc, err = _cli(["score", "--policy", str(tmp_path / "no-such-model"), "--input", str(data), "--output",
                    str(tmp_path / "o.jsonl"), "--limit", limit], capsys)
    assert rc == 2 and "--limit" in _one_line(err), err


def test_chat_template_failure_names_file_and_line(tiny_dir, tmp_path, capsys):
    policy = tmp_path / "policy"
    shutil.copytree(tiny_dir / "policy", policy)
    template = policy / "chat_template.jinja"
    template.write_text("{% for m in messages %}{% if 'BOOM' in m['content'] %}{{ raise_exception('no BOOM') }}"
                        "{% endif %}{% endfor %}" + template.read_text())
    path = _jsonl(tmp_path / "ct.jsonl", [{"messages": MSGS}, {"id": "x", "messages": [MSGS[0], {
        "role": "assistant", "content": "BOOM"}]}])
    rc, err = _cli(["score", "--policy", str(policy), "--reference", str(tiny_dir / "reference"), "--no-progress",
                    "--input", str(path), "--output", str(tmp_path / "o.jsonl"), "--batch-size", "1"], capsys)
    line = _one_line(err)
    assert rc == 1 and "ct.jsonl" in line and "line 2" in line and "no BOOM" in line, err


def test_action_the_template_cannot_render_names_file_and_line(tiny_dir, tmp_path, capsys):
    path = _jsonl(tmp_path / "ai.jsonl", [{"messages": MSGS}, {"messages": [
        {"role": "user", "content": "question"}, {"role": "assistant", "content": "answer"}], "action_indices": [0]}])
    rc, err = _cli(["score", *_models(tiny_dir), "--input", str(path), "--output", str(tmp_path / "o.jsonl")], capsys)
    line = _one_line(err)
    assert rc == 1 and "ai.jsonl" in line and "line 2" in line and "messages[0].content" in line, err


# ============================================================================ hostile and careless settings

HOSTILE_FILES = [
    # (case, file name, text, expected fragment of the one-line message)
    ("batch-size-zero", "c.yaml", "batch_size: 0\n", "field 'batch_size'"),
    ("max-length-1e9-yaml-text", "c.yaml", "max_length: 1e9\n", "YAML integer, without quotes: 1000000000"),
    ("max-length-float", "c.yaml", "max_length: 1.0e+9\n", "got float 1000000000.0"),
    ("baselines-comma-string", "c.yaml", 'baselines: "all,foo"\n', "write a list"),
    ("baselines-unknown-name", "c.yaml", "baselines: [self_certainty, foo]\n", "'foo'"),
    ("top-k-true", "c.yaml", "top_k: true\n", "field 'top_k'"),
    ("yaml-duplicate-keys", "c.yaml", "beta: 0.5\nbeta: 2.0\n", "duplicate key 'beta'"),
    ("json-duplicate-keys", "c.json", '{"beta": 0.5, "beta": 2.0}', "duplicate key 'beta'"),
    ("yaml-is-a-list", "c.yaml", "- beta: 0.5\n", "expected a mapping"),
    ("section-not-a-mapping", "c.yaml", "progadv: [beta, 0.5]\n", "field 'progadv'"),
    ("near-miss-key", "c.yaml", "progadv:\n  betta: 0.1\n", "did you mean 'beta'"),
    ("json-nan-literal", "c.json", '{"beta": NaN}', "field 'beta'"),
    ("chunk-size-negative", "c.yaml", "chunk_size: -5\n", "field 'chunk_size'"),
    ("backend-cuda", "c.yaml", "backend: cuda\n", "field 'backend'"),
    ("yaml-1e-3-is-text", "c.yaml", "beta: 1e-3\n", "YAML number, without quotes: 0.001"),
    ("choice-wrong-case", "c.yaml", "step_agg: SUM\n", "did you mean 'sum'"),
    ("huge-int-seed", "c.yaml", f"seed: {'9' * 400}\n", "field 'seed'"),
    ("huge-int-beta", "c.yaml", f"beta: {'9' * 400}\n", "field 'beta'"),
    ("lone-surrogate-separator", "c.yaml", 'step_separator: "\\ud800"\n', "field 'step_separator'"),
    ("config-version-bool", "c.yaml", "config_version: true\n", "field 'config_version'"),
    ("threshold-without-value", "c.yaml", "attribution: threshold\n", "field 'attribution_threshold'"),
    ("empty-file", "c.yaml", "# nothing here\n", "empty"),
    ("not-utf8", "c.yaml", "step_separator: \xa7\n".encode("latin-1"), "not valid UTF-8"),
    ("deeply-nested-yaml", "c.yaml", "beta: " + "[" * 5000 + "]" * 5000 + "\n", "c.yaml"),
]


@pytest.mark.parametrize("case, name, text, fragment", HOSTILE_FILES, ids=[c[0] for c in HOSTILE_FILES])
def test_hostile_config_files_are_refused_with_a_named_field(data, tmp_path, capsys, case, name, text, fragment):
    cfg = _cfg_file(tmp_path, text, name=name)
    with pytest.raises(ValueError) as info:
        ProgressAdvantageConfig.from_file(cfg)
    assert name in str(info.value) and fragment in str(info.value), str(info.value)
    # the same through the CLI: usage error (exit 2), one line, before any model is loaded
    rc, err = _cli(["score", "--policy", str(tmp_path / "no-such-model"), "--no-progress", "--config", str(cfg),
                    "--input", str(data), "--output", str(tmp_path / "o.jsonl")], capsys)
    line = _one_line(err)
    assert rc == 2 and name in line and fragment in line, err


def test_bom_at_the_start_of_yaml_and_json_is_accepted(tmp_path):
    assert ProgressAdvantageConfig.from_file(_cfg_file(tmp_path, "\ufeffbeta: 0.5\n")).beta == 0.5
    assert ProgressAdvantageConfig.from_file(_cfg_file(tmp_path, '\ufeff{"beta": 0.5}', name="c.json")).beta == 0.5


def test_empty_progadv_section_means_no_settings(tmp_path):
    cfg = _cfg_file(tmp_path, "model_name_or_path: tiny\nprogadv:\n")
    assert ProgressAdvantageConfig.from_file(cfg) == ProgressAdvantageConfig()


HOSTILE_FLAGS = [
    (["--beta", "-0.0"], "--beta"),
    (["--temperature", "1e-30"], "--temperature"),
    (["--step-separator", ""], "--step-separator"),
    (["--step-separator", "\\x4"], "--step-separator"),
    (["--step-separator", "\\ud800"], "--step-separator"),
    (["--step-separator", "ab\\"], "--step-separator"),
    (["--baselines", "all,foo"], "--baselines"),
    (["--max-length", "1"], "--max-length"),
    (["--batch-size", "0"], "--batch-size"),
    (["--config", "no-such-config.yaml"], "--config"),
    (["--config", ""], "--config"),
    (["--attribution", "threshold"], "attribution_threshold"),
]


@pytest.mark.parametrize("flags, fragment", HOSTILE_FLAGS, ids=[" ".join(f) for f, _ in HOSTILE_FLAGS])
def test_hostile_flags_are_usage_errors(data, tmp_path, capsys, flags, fragment):
    rc, err = _cli(["score", "--policy", str(tmp_path / "no-such-model"), "--no-progress", "--input", str(data),
                    "--output", str(tmp_path / "o.jsonl"), *flags], capsys)
    assert rc == 2 and fragment in _one_line(err), err


def test_saved_config_with_wrong_types_is_refused(tmp_path):
    with pytest.raises(ValueError, match=r"scorer\.json: field 'cumulative'"):
        ProgressAdvantageConfig.from_dict({"cumulative": "yes"}, source="scorer.json")


def test_yaml_anchors_and_merge_keys_still_work(tmp_path):
    cfg = _cfg_file(tmp_path, "base: &base\n  beta: 0.5\n  temperature: 0.7\nprogadv:\n  <<: *base\n  beta: 0.25\n")
    got = ProgressAdvantageConfig.from_file(cfg)
    assert (got.beta, got.temperature) == (0.25, 0.7)  # an explicit key overrides a merged one: not a duplicate


def test_an_explicit_null_resets_a_saved_setting():
    saved = ProgressAdvantageConfig(step_separator="\n\n", chunk_size=4096, compat="authors")
    merged = saved.merged({"step_separator": None, "chunk_size": None, "compat": None})
    assert (merged.step_separator, merged.chunk_size, merged.compat) == (None, None, None)
    assert (merged.token_agg, merged.rendering) == ("sum", "chat_template")  # compat's defaults follow it
    assert saved.merged({}) == saved
