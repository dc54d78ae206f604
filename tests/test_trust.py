"""A scorer folder is data we write and later trust: saving never destroys what it did not write, and loading
verifies every score-relevant file against the manifest before any model is built.

Each test says which outcome the design chose (refuse, carry over, allow) for one careless or hostile case.
"""

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

from progadv_trl import ProgressAdvantageScorer, ScoringConfig
from progadv_trl.config import SCORING_FIELDS
from progadv_trl.cli import main
from progadv_trl.formats import save_trajectories
from progadv_trl.tiny import build_tokenizer

from conftest import sample_trajectories

CONFIG_NAME = "progadv_config.json"


def file_sha256(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def canonical_digest(meta):
    """The documented digest: SHA-256 of the canonical JSON of every field but ``digest``."""
    body = json.dumps({k: v for k, v in meta.items() if k != "digest"}, sort_keys=True, separators=(",", ":"),
                      ensure_ascii=True)
    return hashlib.sha256(body.encode("utf-8")).hexdigest()


@pytest.fixture(scope="module")
def scorer(tiny_dir):
    return ProgressAdvantageScorer.from_models(tiny_dir / "policy", tiny_dir / "reference", beta=0.5,
                                               temperature=0.7)


@pytest.fixture(scope="module")
def scores(scorer):
    return [r.score for r in scorer.score(sample_trajectories())]


@pytest.fixture(scope="module")
def export(scorer, tmp_path_factory):
    out = tmp_path_factory.mktemp("export") / "s"
    scorer.save_pretrained(out)
    return out


@pytest.fixture
def saved(export, tmp_path):
    """A fresh copy of a valid export for one test to damage."""
    dst = tmp_path / "s"
    shutil.copytree(export, dst)
    return dst


def load(folder, **kw):
    return ProgressAdvantageScorer.from_pretrained(folder, **kw)


def meta_of(folder):
    return json.loads((folder / CONFIG_NAME).read_text())


def rewrite(folder, edit, *, redigest=True):
    """Edit progadv_config.json; ``redigest`` also recomputes the digest, as a forger who knows the format would."""
    meta = meta_of(folder)
    edit(meta)
    if redigest and isinstance(meta, dict) and "digest" in meta:
        meta["digest"] = canonical_digest(meta)
    (folder / CONFIG_NAME).write_text(json.dumps(meta))


def relist(folder, *rels):
    """Forge the manifest so that it matches the files as they are now (digest recomputed too)."""
    def edit(meta):
        for rel in rels:
            p = folder / rel
            meta["files"][rel] = {"sha256": file_sha256(p), "size": p.stat().st_size}
    rewrite(folder, edit)


def edit_json(path, **changes):
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


def tree(folder):
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*"))


# ------------------------------------------------------------------------------------------- A. saving destroys data
def test_save_refuses_a_folder_that_is_not_a_scorer_and_keeps_its_files(scorer, tmp_path):
    d = tmp_path / "d"
    (d / "sub").mkdir(parents=True)
    (d / "important.txt").write_text("keep me")
    (d / "sub" / "notes.md").write_text("me too")
    with pytest.raises(ValueError, match=r"d: is not empty and is not a progadv scorer .*important\.txt.*sub"):
        scorer.save_pretrained(d)
    assert (d / "important.txt").read_text() == "keep me" and (d / "sub" / "notes.md").read_text() == "me too"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d"]  # no temporary folder left behind


def test_save_into_an_empty_folder_and_a_new_one(scorer, scores, tmp_path):
    (tmp_path / "empty").mkdir()
    for d in (tmp_path / "empty", tmp_path / "new" / "nested"):
        scorer.save_pretrained(d)
        assert [r.score for r in load(d).score(sample_trajectories())] == pytest.approx(scores, abs=1e-6)


def test_overwriting_a_scorer_is_atomic_and_carries_other_top_level_files_over(scorer, scores, saved):
    (saved / "README.md").write_text("my notes about this export")
    (saved / "results").mkdir()
    (saved / "results" / "eval.json").write_text("{}")
    before = meta_of(saved)["digest"]
    scorer.save_pretrained(saved)
    assert (saved / "README.md").read_text() == "my notes about this export"
    assert (saved / "results" / "eval.json").read_text() == "{}"
    assert sorted(p.name for p in saved.parent.iterdir()) == ["s"]  # the old export is gone, nothing else is
    assert meta_of(saved)["digest"] == before == scorer.digest  # same scorer, same digest
    assert [r.score for r in load(saved).score(sample_trajectories())] == pytest.approx(scores, abs=1e-6)


def test_files_placed_inside_a_scorers_model_folders_block_the_overwrite(scorer, saved):
    (saved / "policy" / "my_eval.txt").write_text("not written by save_pretrained")
    (saved / "reference" / "sub").mkdir()
    (saved / "reference" / "sub" / "x.bin").write_bytes(b"x")
    before = tree(saved)
    with pytest.raises(ValueError, match=r"policy/my_eval\.txt, reference/sub/x\.bin\).*move them out"):
        scorer.save_pretrained(saved)
    assert tree(saved) == before and (saved / "policy" / "my_eval.txt").exists()


def test_a_modified_listed_file_counts_as_foreign(scorer, saved):
    (saved / "policy" / "config.json").write_text("{}")  # someone edited it: not what we wrote, not deleted
    with pytest.raises(ValueError, match=r"policy/config\.json"):
        scorer.save_pretrained(saved)
    assert (saved / "policy" / "config.json").read_text() == "{}"


def test_a_symlinked_target_is_refused_and_untouched(scorer, export, tmp_path):
    real = tmp_path / "real"
    shutil.copytree(export, real)
    link = tmp_path / "link"
    link.symlink_to(real, target_is_directory=True)
    before = tree(real)
    with pytest.raises(ValueError, match="is a symlink"):
        scorer.save_pretrained(link)
    assert link.is_symlink() and tree(real) == before
    dangling = tmp_path / "dangling"
    dangling.symlink_to(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="is a symlink"):
        scorer.save_pretrained(dangling)
    assert dangling.is_symlink() and not (tmp_path / "nowhere").exists()


def test_a_target_that_is_a_file_is_refused(scorer, tmp_path):
    f = tmp_path / "scorer"
    f.write_text("a file")
    with pytest.raises(ValueError, match="exists and is not a folder"):
        scorer.save_pretrained(f)
    assert f.read_text() == "a file"


def test_leftovers_of_killed_saves_are_cleaned_and_user_folders_kept(scorer, scores, saved, export):
    parent = saved.parent
    tmp = parent / ".s.tmp-abcd1234"  # an unfinished new export
    (tmp / "policy").mkdir(parents=True)
    (tmp / "policy" / "model.safetensors").write_bytes(b"partial")
    old = parent / ".s.old-0123abcd"  # a replaced export whose retirement was interrupted, with a carried file
    shutil.copytree(export, old)
    (old / "carried.txt").write_text("mine")
    lookalike = parent / ".s.old-notes"  # not our pattern: a user's folder
    lookalike.mkdir()
    (lookalike / "keep.txt").write_text("keep")
    scorer.save_pretrained(saved)
    assert sorted(p.name for p in parent.iterdir()) == [".s.old-notes", "s"]
    assert (saved / "carried.txt").read_text() == "mine"  # finished carrying it over
    assert (lookalike / "keep.txt").read_text() == "keep"
    assert [r.score for r in load(saved).score(sample_trajectories())] == pytest.approx(scores, abs=1e-6)


def test_a_save_killed_between_the_two_renames_is_recovered(scores, saved):
    parent = saved.parent
    os.replace(saved, parent / ".s.old-deadbeef")  # the previous export moved aside ...
    (parent / ".s.tmp-0000aaaa").mkdir()  # ... and the new one not moved in yet
    assert [r.score for r in load(saved).score(sample_trajectories())] == pytest.approx(scores, abs=1e-6)
    assert ".s.old-deadbeef" not in {p.name for p in parent.iterdir()}


# --------------------------------------------------------------------------------- B. the trust check trusts nothing
@pytest.mark.parametrize("change", [{"rope_theta": 1234.0}, {"rms_norm_eps": 0.5}, {"num_hidden_layers": 3}])
def test_edited_reference_config_is_refused(saved, change):
    edit_json(saved / "reference" / "config.json", **change)
    with pytest.raises(ValueError, match=r"reference/config\.json: (size|SHA-256) .*does not match the recorded"):
        load(saved)


def test_swapped_chat_template_is_refused(saved):
    t = saved / "policy" / "chat_template.jinja"
    t.write_text("{% for m in messages %}{{ m['content'] }}{% endfor %}")
    with pytest.raises(ValueError, match=r"policy/chat_template\.jinja"):
        load(saved)


def test_recorded_chat_template_hash_is_checked_after_loading(saved):
    """Even with a forged manifest the recorded chat_template_sha256 must match the tokenizer that loads."""
    t = saved / "policy" / "chat_template.jinja"
    t.write_text("{% for m in messages %}{{ m['content'] }}{% endfor %}")
    relist(saved, "policy/chat_template.jinja")
    with pytest.raises(ValueError, match="chat_template_sha256"):
        load(saved)


def test_weights_symlinked_outside_the_folder_are_refused(saved, tmp_path):
    outside = tmp_path / "outside.safetensors"
    w = saved / "policy" / "model.safetensors"
    shutil.copy(w, outside)  # even with identical bytes
    w.unlink()
    w.symlink_to(outside)
    with pytest.raises(ValueError, match=r"policy/model\.safetensors: is a symlink that leads outside"):
        load(saved)


def test_a_linked_reference_is_used_only_when_the_caller_passes_it(tiny_dir, scores, tmp_path):
    ref = tmp_path / "ref"
    shutil.copytree(tiny_dir / "reference", ref)
    s = ProgressAdvantageScorer.from_models(tiny_dir / "policy", ref, beta=0.5, temperature=0.7)
    s.save_pretrained(tmp_path / "s", reference="link")
    meta = meta_of(tmp_path / "s")
    assert meta["reference"]["linked"] and set(meta["reference"]["files"]) == {"config.json", "model.safetensors"}
    with pytest.raises(ValueError, match="reference is linked.*pass it explicitly"):
        load(tmp_path / "s")
    # the folder naming another folder (with a hash it supplies itself) changes nothing: its path is never opened
    evil = tmp_path / "evil"
    shutil.copytree(tiny_dir / "policy", evil)
    rewrite(tmp_path / "s", lambda m: m["reference"].update(path=str(evil)))
    with pytest.raises(ValueError, match="pass it explicitly"):
        load(tmp_path / "s")
    with pytest.raises(ValueError, match=r"model\.safetensors: SHA-256 does not match"):
        load(tmp_path / "s", reference=evil)  # the caller's folder must match the recorded hashes
    loaded = load(tmp_path / "s", reference=ref)
    assert [r.score for r in loaded.score(sample_trajectories())] == pytest.approx(scores, abs=1e-6)


def test_cli_passes_reference_with_scorer(tiny_dir, tmp_path, capsys):
    ref = tmp_path / "ref"
    shutil.copytree(tiny_dir / "reference", ref)
    ProgressAdvantageScorer.from_models(tiny_dir / "policy", ref).save_pretrained(tmp_path / "s", reference="link")
    data = tmp_path / "in.jsonl"
    save_trajectories(data, sample_trajectories())
    args = ["score", "--scorer", str(tmp_path / "s"), "--input", str(data), "--no-progress"]
    assert main([*args, "--output", str(tmp_path / "a.jsonl")]) != 0
    assert "--reference DIR" in capsys.readouterr().err
    assert main([*args, "--reference", str(ref), "--output", str(tmp_path / "b.jsonl")]) == 0
    assert len((tmp_path / "b.jsonl").read_text().splitlines()) == 4
    assert main([*args, "--reference", str(ref), "--policy", str(tiny_dir / "policy"),
                 "--output", str(tmp_path / "c.jsonl")]) != 0


def test_a_reference_argument_for_a_stored_reference_is_refused(saved, tiny_dir):
    with pytest.raises(ValueError, match="stores its own reference"):
        load(saved, reference=tiny_dir / "reference")


# ----------------------------------------------------------------------------- C. malformed progadv_config.json
def _drop(key):
    return lambda m: m.pop(key)


def _set(key, value):
    return lambda m: m.__setitem__(key, value)


@pytest.mark.parametrize("edit, field", [
    (_drop("reference"), "reference"), (_drop("policy"), "policy"), (_drop("config"), "config"),
    (_set("reference", 5), "reference"), (_set("policy", {"kind": 3}), "policy.kind"),
    (_set("policy", {"kind": "full"}), "policy.path"), (_set("policy", {"kind": "full", "path": 7}), "policy.path"),
    (lambda m: m["reference"].pop("linked"), "reference.linked"),
    (lambda m: m["reference"].update(kind="adapter_base"), "reference.kind"),
    (_set("config", [1, 2]), "config"), (lambda m: m["config"].update(baselines=5), "config"),
    (lambda m: m["config"].update(betta=1), "config"), (_set("files", "all good"), "files"),
    (lambda m: m["files"].update({"policy/x": {"sha256": "ab", "size": "12"}}), r"files\['policy/x'\]"),
    (_drop("files"), "files"), (_set("reference_tokenizer", 3), "reference_tokenizer"),
    (_set("provenance", "me"), "provenance"), (_set("config_version", "1"), "config_version"),
])
def test_malformed_config_names_the_file_and_field(saved, edit, field):
    rewrite(saved, edit)
    with pytest.raises(ValueError, match=rf"progadv_config\.json: field '{field}'") as e:
        load(saved)
    assert type(e.value) is ValueError  # never a KeyError / TypeError traceback


def test_config_that_is_not_an_object_is_refused(saved):
    (saved / CONFIG_NAME).write_text("[1, 2]")
    with pytest.raises(ValueError, match="expected a JSON object"):
        load(saved)


# ------------------------------------------------------------------------------------------ D. keyword overrides
def test_overrides_change_only_the_named_fields(export):
    loaded = load(export, max_length=128)
    assert (loaded.config.beta, loaded.config.temperature, loaded.config.max_length) == (0.5, 0.7, 128)
    saved_cfg = ScoringConfig.from_dict(meta_of(export)["config"])
    assert {**saved_cfg.to_dict(), "max_length": 128} == loaded.config.to_dict()  # every other field as saved
    with pytest.raises(ValueError, match=r"unknown scoring config field\(s\) \['betta'\]"):
        load(export, betta=0.1)
    with pytest.raises(ValueError, match=r"\['eval_steps'\]"):  # a training setting is not a scorer's
        load(export, eval_steps=3)


def test_an_export_holds_only_scoring_fields(export):
    assert set(meta_of(export)["config"]) == {"config_version", *SCORING_FIELDS}


# ----------------------------------------------------------------------------- hostile and careless extra cases
def test_edited_policy_config_is_refused(saved):
    edit_json(saved / "policy" / "config.json", rms_norm_eps=0.1)
    with pytest.raises(ValueError, match=r"policy/config\.json"):
        load(saved)


def test_swapped_tokenizer_json_is_refused(saved, tmp_path):
    build_tokenizer(tmp_path / "other", vocab_size=400)
    shutil.copy(tmp_path / "other" / "tokenizer.json", saved / "policy" / "tokenizer.json")
    with pytest.raises(ValueError, match=r"policy/tokenizer\.json"):
        load(saved)


def test_chat_template_injected_into_tokenizer_config_is_refused(saved):
    edit_json(saved / "policy" / "tokenizer_config.json", chat_template="{{ messages[0]['content'] }}")
    with pytest.raises(ValueError, match=r"policy/tokenizer_config\.json"):
        load(saved)


def test_an_extra_weight_shard_is_refused(saved):
    shutil.copy(saved / "reference" / "model.safetensors", saved / "reference" / "model-00002-of-00002.safetensors")
    with pytest.raises(ValueError, match=r"reference/model-00002-of-00002\.safetensors: unexpected file"):
        load(saved)


def test_an_unlisted_nested_file_is_refused(saved):
    (saved / "policy" / "sub").mkdir()
    (saved / "policy" / "sub" / "config.json").write_text("{}")
    with pytest.raises(ValueError, match=r"policy/sub/config\.json: unexpected file"):
        load(saved)


def test_a_hardlinked_weight_file_is_verified_by_content(saved, tmp_path):
    w = saved / "policy" / "model.safetensors"
    outside = tmp_path / "outside.safetensors"
    shutil.copy(w, outside)
    w.unlink()
    os.link(outside, w)  # not detectable as a link: allowed while its bytes are the recorded ones
    load(saved)
    with open(outside, "r+b") as f:  # the outside name changes the shared bytes
        f.seek(-4, os.SEEK_END)
        f.write(b"\x00\x01\x02\x03")
    with pytest.raises(ValueError, match=r"policy/model\.safetensors: SHA-256 does not match"):
        load(saved)


def test_a_file_dropped_from_the_manifest_is_refused(saved):
    rewrite(saved, lambda m: m["files"].pop("reference/config.json"))  # digest forged too
    with pytest.raises(ValueError, match=r"reference/config\.json: unexpected file"):
        load(saved)


@pytest.mark.parametrize("path", ["policy/../../../etc/passwd", "/etc/passwd", "../outside/model.safetensors",
                                  "policy\\..\\..\\x"])
def test_manifest_paths_that_escape_are_refused(saved, path):
    rewrite(saved, lambda m: m["files"].update({path: {"sha256": "0" * 64, "size": 1}}))
    with pytest.raises(ValueError, match="escapes the scorer directory"):
        load(saved)


def test_manifest_entries_outside_the_model_folders_are_refused(saved):
    (saved / "notes.txt").write_text("x")
    rewrite(saved, lambda m: m["files"].update({"notes.txt": {"sha256": file_sha256(saved / "notes.txt"),
                                                              "size": 1}}))
    with pytest.raises(ValueError, match="'notes.txt' is not a normalised path under policy/"):
        load(saved)


@pytest.mark.parametrize("field, value", [("policy", {"kind": "full", "path": "policy/../reference"}),
                                          ("policy", {"kind": "full", "path": "/abs/policy"})])
def test_model_paths_that_escape_are_refused(saved, field, value):
    rewrite(saved, lambda m: m.__setitem__(field, value))
    with pytest.raises(ValueError, match="escapes the scorer directory"):
        load(saved)


def test_reference_path_pointing_at_the_policy_is_refused(saved):
    rewrite(saved, lambda m: m["reference"].update(path="policy"))
    with pytest.raises(ValueError, match="field 'reference.path'"):
        load(saved)


def test_a_policy_folder_symlinked_elsewhere_is_refused(saved, tmp_path):
    elsewhere = tmp_path / "elsewhere"
    shutil.copytree(saved / "policy", elsewhere)  # identical files
    shutil.rmtree(saved / "policy")
    (saved / "policy").symlink_to(elsewhere, target_is_directory=True)
    with pytest.raises(ValueError, match="policy: is a symlink that leads outside"):
        load(saved)


def test_loading_through_a_symlink_to_the_scorer_folder_is_allowed(saved, tmp_path):
    link = tmp_path / "latest"
    link.symlink_to(saved, target_is_directory=True)  # the caller's own path: followed, then checked inside
    assert load(link).config.beta == 0.5


def test_a_symlinked_config_file_outside_is_refused(saved, tmp_path):
    outside = tmp_path / "cfg.json"
    shutil.move(saved / CONFIG_NAME, outside)
    (saved / CONFIG_NAME).symlink_to(outside)
    with pytest.raises(ValueError, match="leads outside"):
        load(saved)


def test_a_symlink_loop_is_refused(saved):
    (saved / "policy" / "loop").symlink_to(saved / "policy", target_is_directory=True)
    with pytest.raises(ValueError, match="symlink loop|unexpected file"):
        load(saved)


def test_a_missing_listed_file_is_named(saved):
    (saved / "reference" / "model.safetensors").unlink()
    with pytest.raises(ValueError, match=r"reference/model\.safetensors: missing") as e:
        load(saved)
    assert isinstance(e.value, FileNotFoundError)  # both kinds: ScorerFileMissing


def test_a_hand_edited_beta_is_refused_and_overrides_are_the_way(saved):
    rewrite(saved, lambda m: m["config"].update(beta=5.0), redigest=False)
    with pytest.raises(ValueError, match="field 'digest'.*edited after export.*keyword overrides"):
        load(saved)
    rewrite(saved, lambda m: m["config"].update(beta=0.5), redigest=False)  # back as exported
    assert load(saved, beta=5.0).config.beta == 5.0


def test_a_removed_digest_is_refused(saved):
    rewrite(saved, _drop("digest"), redigest=False)
    with pytest.raises(ValueError, match="field 'digest'"):
        load(saved)


def test_an_export_without_manifest_is_refused_with_a_clear_message(saved):
    rewrite(saved, lambda m: [m.pop(k) for k in ("format_version", "files", "digest")], redigest=False)
    with pytest.raises(ValueError, match="older progadv-trl, without a manifest.*export it again"):
        load(saved)


def test_a_newer_format_is_refused(saved):
    rewrite(saved, _set("format_version", 99))
    with pytest.raises(ValueError, match="format_version.*newer.*upgrade"):
        load(saved)


def test_expected_digest_pins_an_export(saved, tiny_dir, tmp_path):
    good = meta_of(saved)["digest"]
    assert load(saved, expected_digest=good).digest == good
    # a consistent forgery (file and manifest and digest rewritten) passes the self-check but not a pinned digest
    edit_json(saved / "reference" / "config.json", rope_theta=1234.0)
    relist(saved, "reference/config.json")
    load(saved)
    with pytest.raises(ValueError, match="not the expected"):
        load(saved, expected_digest=good)


def test_saving_into_the_working_directory_is_refused(scorer, tmp_path, monkeypatch):
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    with pytest.raises(ValueError, match="current working directory"):
        scorer.save_pretrained(".")
    with pytest.raises(ValueError, match="current working directory"):
        scorer.save_pretrained(tmp_path)  # a folder containing it
    assert list(work.iterdir()) == []
    scorer.save_pretrained("progadv-scorer")  # a subfolder, relative to the cwd, is fine
    load(work / "progadv-scorer")


def test_saving_into_a_parent_of_the_source_model_is_refused(tiny_dir, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(tiny_dir / "policy", run / "policy")
    shutil.copytree(tiny_dir / "reference", run / "reference")  # looks like our layout, but is not a scorer
    before = {p: file_sha256(run / p) for p in tree(run) if (run / p).is_file()}
    s = ProgressAdvantageScorer.from_models(run / "policy", run / "reference")
    with pytest.raises(ValueError, match="not a progadv scorer"):
        s.save_pretrained(run)
    assert {p: file_sha256(run / p) for p in tree(run) if (run / p).is_file()} == before


def test_saving_inside_the_policy_model_folder_is_allowed(tiny_dir, scores, tmp_path):
    pol = tmp_path / "policy"
    shutil.copytree(tiny_dir / "policy", pol)
    before = {p: file_sha256(pol / p) for p in tree(pol) if (pol / p).is_file()}
    s = ProgressAdvantageScorer.from_models(pol, tiny_dir / "reference", beta=0.5, temperature=0.7)
    s.save_pretrained(pol / "scorer")  # a new subfolder: nothing of the model folder is touched
    assert {p: file_sha256(pol / p) for p in tree(pol) if (pol / p).is_file() and not p.startswith("scorer")} \
        == before
    assert [r.score for r in load(pol / "scorer").score(sample_trajectories())] == pytest.approx(scores, abs=1e-6)
    again = ProgressAdvantageScorer.from_models(pol, tiny_dir / "reference", beta=0.5, temperature=0.7)
    assert [r.score for r in again.score(sample_trajectories())] == pytest.approx(scores, abs=1e-6)


def test_linking_a_reference_that_lives_inside_the_target_is_refused(tiny_dir, tmp_path):
    s = ProgressAdvantageScorer.from_models(tiny_dir / "policy", tiny_dir / "reference")
    s.save_pretrained(tmp_path / "s")
    inner = ProgressAdvantageScorer.from_models(tiny_dir / "policy", tmp_path / "s" / "reference",
                                                reference_tokenizer=AutoTokenizer.from_pretrained(tiny_dir / "policy"))
    with pytest.raises(ValueError, match="lies inside the export folder"):
        inner.save_pretrained(tmp_path / "s", reference="link")
    load(tmp_path / "s")  # untouched


def test_reference_equal_to_policy_and_an_inside_symlink(tiny_dir, tmp_path):
    s = ProgressAdvantageScorer.from_models(tiny_dir / "policy", tiny_dir / "policy")
    s.save_pretrained(tmp_path / "s")
    pol_w, ref_w = tmp_path / "s" / "policy" / "model.safetensors", tmp_path / "s" / "reference" / "model.safetensors"
    assert file_sha256(pol_w) == file_sha256(ref_w)
    ref_w.unlink()
    ref_w.symlink_to(Path("..") / "policy" / "model.safetensors")  # stays inside and has the recorded bytes: allowed
    loaded = load(tmp_path / "s")
    assert all(r.score == 0.0 for r in loaded.score(sample_trajectories()))


def test_a_linked_reference_with_an_extra_shard_is_refused(tiny_dir, tmp_path):
    ref = tmp_path / "ref"
    shutil.copytree(tiny_dir / "reference", ref)
    ProgressAdvantageScorer.from_models(tiny_dir / "policy", ref).save_pretrained(tmp_path / "s", reference="link")
    (ref / "README.md").write_text("not score-relevant: ignored")
    load(tmp_path / "s", reference=ref)
    shutil.copy(ref / "model.safetensors", ref / "model-00002-of-00002.safetensors")
    with pytest.raises(ValueError, match=r"is not the reference recorded.*unexpected model-00002"):
        load(tmp_path / "s", reference=ref)


def test_a_peft_adapter_passed_as_linked_reference_is_refused(tiny_dir, tmp_path):
    from peft import LoraConfig, get_peft_model

    ref = tmp_path / "ref"
    shutil.copytree(tiny_dir / "reference", ref)
    ProgressAdvantageScorer.from_models(tiny_dir / "policy", ref).save_pretrained(tmp_path / "s", reference="link")
    base = AutoModelForCausalLM.from_pretrained(tiny_dir / "reference")
    get_peft_model(base, LoraConfig(r=2, target_modules=["q_proj"])).save_pretrained(tmp_path / "adapter")
    with pytest.raises(ValueError, match="not a PEFT adapter"):
        load(tmp_path / "s", reference=tmp_path / "adapter")


def test_a_fake_manifest_does_not_license_deleting_user_files(scorer, tmp_path):
    d = tmp_path / "d"
    (d / "policy").mkdir(parents=True)
    (d / "policy" / "precious.txt").write_text("years of work")
    fake = {"library": "progadv-trl", "files": {"policy/precious.txt": {"sha256": "0" * 64, "size": 1}}}
    (d / CONFIG_NAME).write_text(json.dumps(fake))
    with pytest.raises(ValueError, match=r"policy/precious\.txt"):
        scorer.save_pretrained(d)
    assert (d / "policy" / "precious.txt").read_text() == "years of work"
    (d / CONFIG_NAME).write_text("{not json")  # unreadable: not recognised as a scorer at all
    with pytest.raises(ValueError, match="without a manifest this version can read"):
        scorer.save_pretrained(d)
    assert (d / "policy" / "precious.txt").read_text() == "years of work"


def test_peft_export_round_trips_with_its_manifest(tiny_dir, tmp_path):
    from peft import LoraConfig, get_peft_model

    base = AutoModelForCausalLM.from_pretrained(tiny_dir / "reference")
    get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)) \
        .save_pretrained(tmp_path / "adapter")
    s = ProgressAdvantageScorer.from_models(tmp_path / "adapter")
    s.save_pretrained(tmp_path / "exp")
    files = meta_of(tmp_path / "exp")["files"]
    assert "policy/adapter_model.safetensors" in files and "reference/model.safetensors" in files
    expected = [r.score for r in s.score(sample_trajectories())]
    assert [r.score for r in load(tmp_path / "exp").score(sample_trajectories())] == pytest.approx(expected, abs=1e-5)
    (tmp_path / "exp" / "policy" / "adapter_config.json").write_text(
        (tmp_path / "exp" / "policy" / "adapter_config.json").read_text().replace('"r": 4', '"r": 2'))
    with pytest.raises(ValueError, match=r"policy/adapter_config\.json"):
        load(tmp_path / "exp")


def test_an_export_of_a_development_version_with_training_settings_still_loads(saved):
    # 0.1.0 development exports also held the callback's settings: they are read past, never applied
    rewrite(saved, lambda m: m["config"].update(eval_steps=3, quality_metric="spearman", heldout="h.jsonl"))
    config = load(saved).config
    assert type(config) is ScoringConfig and (config.beta, config.temperature) == (0.5, 0.7)
    assert "eval_steps" not in config.to_dict()
