"""Reliability and safety: fuzzed input formats and spans, determinism, untrusted scorer folders, edge cases."""

import json
import shutil

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from progadv_trl import ProgadvDataError, ProgressAdvantageConfig, ProgressAdvantageScorer
from progadv_trl.data import Message, Trajectory
from progadv_trl.formats import load_trajectories
from progadv_trl.rendering import TrajectoryTokenizer
from progadv_trl.tiny import build_tokenizer

from conftest import sample_trajectories

TOK = build_tokenizer()
json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
                           lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=6), c, max_size=3),
                           max_leaves=8)
roles = st.sampled_from(["system", "user", "assistant", "tool", "robot", "", None, 3])
messages = st.lists(st.fixed_dictionaries({"role": roles}, optional={"content": st.none() | st.text(max_size=20) | st.integers(),
                                                                     "tool_calls": json_values, "name": json_values}),
                    max_size=5)
records = st.fixed_dictionaries({"messages": messages | json_values},
                                optional={"id": json_values, "reward": json_values, "mistake_step": json_values,
                                          "group": json_values})


@pytest.mark.slow
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(records, min_size=1, max_size=3))
def test_random_records_load_or_raise_our_error(rows):
    try:
        out = load_trajectories(rows, format="jsonl")
    except ProgadvDataError as e:
        assert "record" in str(e) or "no trajectories" in str(e).lower()
        return
    for t in out:  # whatever loads satisfies the invariants
        assert t.steps and all(m.role in ("system", "developer", "user", "assistant", "tool") for m in t.messages)


texts = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=30)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["user", "assistant", "tool"]), texts), min_size=1, max_size=6),
       st.sampled_from(["chat_template", "plain"]), st.sampled_from([None, "\n\n", "."]))
def test_step_spans_cover_each_action_exactly(msgs, rendering, sep):
    msgs = [("user", "start")] + msgs + [("assistant", "end")]
    traj = Trajectory([Message(r, c) for r, c in msgs])
    out = TrajectoryTokenizer(TOK, rendering, sep)(traj)
    normalizer = TOK.backend_tokenizer.normalizer  # Qwen2's NFC: non-NFC text decodes to its NFC form
    for s, text in enumerate(out.step_texts):
        expected = normalizer.normalize_str(text) if normalizer is not None else text
        assert TOK.decode([i for i, k in zip(out.input_ids, out.step_index) if k == s]) == expected
    for m in traj.steps:
        joined = "".join(t for (mi, _), t in zip(out.steps, out.step_texts) if mi == m)
        content = traj.messages[m].content
        assert (content if rendering == "chat_template" else content.strip()) in joined  # plain strips actions


@pytest.fixture(scope="module")
def scorer(tiny_dir):
    return ProgressAdvantageScorer.from_models(tiny_dir / "policy", tiny_dir / "reference", baselines=["all"])


def test_bit_identical_across_runs(scorer):
    a = scorer.score(sample_trajectories(), details=True)
    b = scorer.score(sample_trajectories(), details=True)
    assert [r.score for r in a] == [r.score for r in b]
    assert [r.tokens["policy_logprob"] for r in a] == [r.tokens["policy_logprob"] for r in b]
    assert [r.baselines for r in a] == [r.baselines for r in b]


def test_group_of_one_and_unlabelled(scorer):
    t = sample_trajectories()[2]
    t.group, t.reward = "solo", None
    res = scorer.score([t])
    assert scorer.best_of_n(res)["solo"].id == t.id  # a group of one picks itself
    table = scorer.evaluate(res)
    assert table["progress_advantage"]["n_success_labelled"] == 0  # recorded, not an error


@pytest.fixture
def saved(scorer, tmp_path):
    scorer.save_pretrained(tmp_path / "s")
    return tmp_path / "s"


def test_missing_files_are_named(saved):
    shutil.rmtree(saved / "reference")
    with pytest.raises(FileNotFoundError, match="reference"):
        ProgressAdvantageScorer.from_pretrained(saved)
    (saved / "progadv_config.json").unlink()
    with pytest.raises(FileNotFoundError, match="progadv_config.json"):
        ProgressAdvantageScorer.from_pretrained(saved)


def test_extra_files_beside_the_model_folders_are_ignored_inside_them_refused(saved):
    (saved / "notes.txt").write_text("hello")  # nothing reads it
    ProgressAdvantageScorer.from_pretrained(saved)
    (saved / "policy" / "extra.bin").write_bytes(b"\x80\x04not loaded")  # a model folder: all files are listed
    with pytest.raises(ValueError, match=r"policy/extra\.bin: unexpected file"):
        ProgressAdvantageScorer.from_pretrained(saved)


def test_newer_config_version_is_refused(saved):
    meta = json.loads((saved / "progadv_config.json").read_text())
    meta["config_version"] = 99
    (saved / "progadv_config.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="newer"):
        ProgressAdvantageScorer.from_pretrained(saved)


def test_paths_escaping_the_folder_are_refused(saved):
    meta = json.loads((saved / "progadv_config.json").read_text())
    meta["policy"]["path"] = "../../etc"
    (saved / "progadv_config.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="escapes the scorer directory"):
        ProgressAdvantageScorer.from_pretrained(saved)


def test_tampered_reference_weights_are_refused(saved):
    from safetensors.torch import load_file, save_file

    f = next((saved / "reference").glob("*.safetensors"))
    state = load_file(str(f))
    k = next(iter(state))
    state[k] = state[k] + 1
    save_file(state, str(f), metadata={"format": "pt"})
    with pytest.raises(ValueError, match="does not match the recorded hash"):
        ProgressAdvantageScorer.from_pretrained(saved)


def test_pickled_weights_are_never_loaded(saved, tiny_dir, tmp_path):
    pol = saved / "policy"
    for f in pol.glob("*.safetensors"):
        f.unlink()
    (pol / "pytorch_model.bin").write_bytes(b"\x80\x04 a pickle that must never be opened")
    with pytest.raises(ValueError, match=r"pytorch_model\.bin: unexpected file"):  # the manifest check, first
        ProgressAdvantageScorer.from_pretrained(saved)
    plain = tmp_path / "plain"  # a model folder outside any scorer: the loader refuses pickles on its own
    shutil.copytree(tiny_dir / "policy", plain)
    for f in plain.glob("*.safetensors"):
        f.unlink()
    (plain / "pytorch_model.bin").write_bytes(b"\x80\x04 a pickle that must never be opened")
    with pytest.raises(ValueError, match="pickled weights are never loaded"):
        ProgressAdvantageScorer.from_models(plain, tiny_dir / "reference")


def test_remote_code_needs_the_flag(saved, tiny_dir, tmp_path):
    def add_remote_code(folder):
        cfg = json.loads((folder / "config.json").read_text())
        cfg["auto_map"] = {"AutoModelForCausalLM": "evil.EvilModel"}
        (folder / "config.json").write_text(json.dumps(cfg))
        (folder / "evil.py").write_text("raise SystemExit('remote code ran')\n")

    add_remote_code(saved / "policy")  # inside a scorer: refused by the manifest before anything is imported
    with pytest.raises(ValueError, match=r"policy/(config\.json|evil\.py)"):
        ProgressAdvantageScorer.from_pretrained(saved)
    plain = tmp_path / "plain"
    shutil.copytree(tiny_dir / "policy", plain)
    add_remote_code(plain)
    # without trust_remote_code the custom class is never imported: the built-in architecture loads
    scorer = ProgressAdvantageScorer.from_models(plain, tiny_dir / "reference")
    assert type(scorer.policy.model).__module__.startswith("transformers.")
    scorer.save_pretrained(tmp_path / "exported")
    loaded = ProgressAdvantageScorer.from_pretrained(tmp_path / "exported")
    assert type(loaded.policy.model).__module__.startswith("transformers.")


def test_config_errors_name_the_field(tmp_path):
    with pytest.raises(ValueError, match="token_agg"):
        ProgressAdvantageConfig(token_agg="median")
    with pytest.raises(ValueError, match="baselines"):
        ProgressAdvantageConfig(baselines=["confidence"])
    bad = tmp_path / "c.yaml"
    bad.write_text("progadv:\n  betta: 0.1\n")
    with pytest.raises(ValueError, match="unknown field"):
        ProgressAdvantageConfig.from_file(bad)
    bad.write_text("config_version: 7\n")
    with pytest.raises(ValueError, match="newer"):
        ProgressAdvantageConfig.from_file(bad)
