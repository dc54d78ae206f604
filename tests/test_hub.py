"""Scorers on the Hugging Face Hub, offline: a local Hub cache laid out as ``huggingface_hub`` lays it out
(``models--owner--name/{refs,snapshots,blobs}``, snapshot files symlinked to blobs), loaded through the real hub
client in offline mode; ``push_to_hub`` up to the request (``HfApi.create_repo``/``upload_folder`` replaced).
"""

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import huggingface_hub
import pytest
import torch
from huggingface_hub import HfApi, ModelCard
from huggingface_hub import constants as hub_constants

from progadv_trl import ProgressAdvantageConfig, ProgressAdvantageMonitor, ProgressAdvantageScorer
from progadv_trl.hub import is_generated_card
from progadv_trl.models import load_causal_lm

from conftest import sample_trajectories
from test_trust import scorer  # noqa: F401  (the same beta 0.5, T 0.7 scorer fixture)

CONFIG_NAME = "progadv_config.json"
COMMIT_A, COMMIT_B, COMMIT_REF = ("a" * 39 + "1"), ("b" * 39 + "2"), ("c" * 39 + "3")


def blob_id(data: bytes, name: str) -> str:
    """The cache's blob name: the SHA-256 of an LFS file (weights), the git blob SHA-1 of any other."""
    if name.endswith(".safetensors"):
        return hashlib.sha256(data).hexdigest()
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def cache_repo(cache: Path, repo_id: str, folder: Path, commit: str, ref: str | None = "main") -> Path:
    """Put ``folder`` into the Hub cache ``cache`` as commit ``commit`` of ``repo_id`` (``refs/<ref>`` -> commit)."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snap = repo / "snapshots" / commit
    for f in sorted(p for p in folder.rglob("*") if p.is_file()):
        data = f.read_bytes()
        blob = repo / "blobs" / blob_id(data, f.name)
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = snap / f.relative_to(folder)
        link.parent.mkdir(parents=True, exist_ok=True)
        os.symlink(os.path.relpath(blob, link.parent), link)
    if ref is not None:
        (repo / "refs").mkdir(exist_ok=True)
        (repo / "refs" / ref).write_text(commit)
    return snap


def scores_of(scorer):
    return [r.score for r in scorer.score(sample_trajectories())]


def meta_of(folder):
    return json.loads((Path(folder) / CONFIG_NAME).read_text())


@pytest.fixture(scope="module")
def other(tiny_dir):
    return ProgressAdvantageScorer.from_models(tiny_dir / "policy", tiny_dir / "reference", beta=0.25,
                                               temperature=1.0)


@pytest.fixture(scope="module")
def exports(scorer, other, tmp_path_factory):
    root = tmp_path_factory.mktemp("exports")
    return scorer.save_pretrained(root / "a"), other.save_pretrained(root / "b")


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """An empty Hub cache that the (already imported) hub client uses, offline."""
    cache = tmp_path / "hf" / "hub"
    cache.mkdir(parents=True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(cache))
    return cache


@pytest.fixture
def published(exports, hub_cache):
    """``user/scorer`` with two commits: A (``main``) is export a, B is export b."""
    cache_repo(hub_cache, "user/scorer", exports[1], COMMIT_B, ref=None)
    cache_repo(hub_cache, "user/scorer", exports[0], COMMIT_A)
    return hub_cache


# ------------------------------------------------------------------------------------------------ from_pretrained
def test_a_repo_id_loads_the_cached_snapshot_and_a_revision_selects_the_commit(scorer, other, exports, published):
    hub = ProgressAdvantageScorer.from_pretrained("user/scorer")
    assert hub.digest == scorer.digest == meta_of(exports[0])["digest"]
    assert scores_of(hub) == pytest.approx(scores_of(scorer), abs=1e-6)
    at_b = ProgressAdvantageScorer.from_pretrained("user/scorer", revision=COMMIT_B)
    assert at_b.digest == other.digest != scorer.digest
    assert at_b.config.beta == 0.25 and at_b.config.temperature == 1.0
    assert ProgressAdvantageScorer.from_pretrained("user/scorer", revision=COMMIT_A).digest == scorer.digest


@pytest.mark.slow
def test_the_cache_is_found_from_the_environment_in_a_fresh_process(scorer, exports, tmp_path):
    cache = tmp_path / "home" / "hub"
    cache_repo(cache, "user/scorer", exports[0], COMMIT_A)
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "home"), OMP_NUM_THREADS="1")
    env.pop("HF_HUB_CACHE", None)
    code = ("import torch; torch.set_num_threads(1)\n"
            "from progadv_trl import ProgressAdvantageScorer\n"
            f"print(ProgressAdvantageScorer.from_pretrained('user/scorer', revision='{COMMIT_A}').digest)")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300,
                         cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split()[-1] == scorer.digest


def test_an_explicit_cache_dir_is_used(scorer, exports, tmp_path):
    cache = tmp_path / "elsewhere"
    cache_repo(cache, "user/scorer", exports[0], COMMIT_A)
    assert ProgressAdvantageScorer.from_pretrained("user/scorer", cache_dir=cache).digest == scorer.digest


def test_a_tampered_blob_in_the_cache_is_refused(published):
    snap = published / "models--user--scorer" / "snapshots" / COMMIT_A
    weights = os.path.realpath(snap / "policy" / "model.safetensors")
    os.chmod(weights, 0o644)
    data = bytearray(Path(weights).read_bytes())
    data[-1] ^= 1
    Path(weights).write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"policy/model\.safetensors: SHA-256 does not match"):
        ProgressAdvantageScorer.from_pretrained("user/scorer")


def test_a_snapshot_symlink_leading_out_of_the_cache_is_refused(published, tmp_path):
    snap = published / "models--user--scorer" / "snapshots" / COMMIT_A
    outside = tmp_path / "outside.json"
    shutil.copy(snap / "policy" / "config.json", outside)
    (snap / "policy" / "config.json").unlink()
    os.symlink(outside, snap / "policy" / "config.json")
    with pytest.raises(ValueError, match="leads outside the scorer folder"):
        ProgressAdvantageScorer.from_pretrained("user/scorer")


def test_a_local_folder_keeps_priority_over_a_repo_of_the_same_name(other, exports, published, tmp_path,
                                                                    monkeypatch):
    monkeypatch.chdir(tmp_path)
    shutil.copytree(exports[1], tmp_path / "user" / "scorer")
    assert ProgressAdvantageScorer.from_pretrained("user/scorer").digest == other.digest
    with pytest.raises(ValueError, match="is a local folder, which has no revisions"):
        ProgressAdvantageScorer.from_pretrained("user/scorer", revision=COMMIT_A)


def test_missing_folders_and_repositories_are_clear_errors(hub_cache, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"no such scorer folder, and not a Hugging Face Hub repository id"):
        ProgressAdvantageScorer.from_pretrained(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match=r"not a Hugging Face Hub repository id"):
        ProgressAdvantageScorer.from_pretrained("just-a-name")
    with pytest.raises(FileNotFoundError, match=r"user/absent: no such local scorer folder, and the Hub repository "
                                                r"user/absent could not be fetched"):
        ProgressAdvantageScorer.from_pretrained("user/absent")


def test_a_hub_repo_that_is_not_a_scorer_is_refused(hub_cache, tiny_dir):
    cache_repo(hub_cache, "user/model", tiny_dir / "reference", COMMIT_A)
    with pytest.raises(FileNotFoundError, match=f"not a progadv scorer \\(missing {CONFIG_NAME}\\)"):
        ProgressAdvantageScorer.from_pretrained("user/model")


# ----------------------------------------------------------------------------------------------------- model card
def test_the_card_describes_the_scorer_and_is_not_score_relevant(scorer, exports, tmp_path):
    folder = tmp_path / "s"
    shutil.copytree(exports[0], folder)
    card = ModelCard.load(folder / "README.md")
    assert card.data.library_name == "progadv-trl" and "progress-advantage" in card.data.tags
    assert card.data.base_model is None  # a local reference is no Hub model
    text = card.text
    assert "| `beta` | 0.5 |" in text and "| `temperature` | 0.7 |" in text
    assert scorer.digest in text and str(Path(scorer.provenance["reference"])) in text
    assert 'from_pretrained("path/to/this/folder")' in text and "Held-out metrics" not in text
    assert is_generated_card(folder / "README.md")
    (folder / "README.md").write_text("my own card\n")
    assert ProgressAdvantageScorer.from_pretrained(folder).digest == scorer.digest  # documentation only
    with open(folder / "policy" / "config.json", "a") as f:
        f.write(" ")
    with pytest.raises(ValueError, match=r"policy/config\.json: size"):  # a score-relevant file still counts
        ProgressAdvantageScorer.from_pretrained(folder)


def test_saving_again_regenerates_an_unedited_card_and_keeps_an_edited_one(scorer, other, exports, tmp_path):
    folder = tmp_path / "s"
    shutil.copytree(exports[0], folder)
    other.save_pretrained(folder)
    assert "| `beta` | 0.25 |" in (folder / "README.md").read_text() and is_generated_card(folder / "README.md")
    (folder / "README.md").write_text((folder / "README.md").read_text() + "\nMy notes.\n")
    scorer.save_pretrained(folder)
    assert (folder / "README.md").read_text().endswith("My notes.\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s"]  # nothing left beside it
    assert ProgressAdvantageScorer.from_pretrained(folder).digest == scorer.digest


def test_an_export_by_the_monitor_shows_the_held_out_metrics_of_its_step(tiny_dir, tmp_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_dir / "policy")
    reference = load_causal_lm(tiny_dir / "reference")
    policy = load_causal_lm(tiny_dir / "policy")
    monitor = ProgressAdvantageMonitor(reference, tok, ProgressAdvantageConfig(beta=0.5, temperature=0.7),
                                       output_dir=tmp_path, heldout=sample_trajectories())
    metrics = monitor.evaluate(policy, 3)
    card = (monitor.export(policy, tmp_path / "at3", step=3) / "README.md").read_text()
    assert "## Held-out metrics at export" in card and "exported at training step 3" in card
    assert f"| `progadv/auroc` | {metrics['progadv/auroc']:.4g} |" in card
    assert f"| `progadv/n_trajectories` | {metrics['progadv/n_trajectories']} |" in card
    saved = meta_of(tmp_path / "at3")["provenance"]["heldout_metrics"]
    assert saved["progadv/auroc"] == metrics["progadv/auroc"] and "progadv/seconds" not in saved
    # another step, or other settings, were not evaluated: no numbers that describe other weights
    assert "Held-out metrics" not in (monitor.export(policy, tmp_path / "at4", step=4) / "README.md").read_text()
    assert "Held-out metrics" not in (monitor.export(policy, tmp_path / "b", step=3, beta=0.1) / "README.md"
                                      ).read_text()


# ----------------------------------------------------------------------------------------------------- push_to_hub
@pytest.fixture
def uploads(monkeypatch, tmp_path):
    """Replace the hub client's requests: record create_repo/create_branch and copy what upload_folder uploads."""
    calls = {"create_repo": [], "create_branch": [], "upload_folder": []}

    def create_repo(self, repo_id, **kw):
        calls["create_repo"].append((repo_id, kw))
        return huggingface_hub.RepoUrl(f"https://huggingface.co/{repo_id}")

    def create_branch(self, repo_id, **kw):
        calls["create_branch"].append((repo_id, kw))

    def upload_folder(self, *, repo_id, folder_path, **kw):
        dst = tmp_path / "uploaded" / str(len(calls["upload_folder"]))
        shutil.copytree(folder_path, dst)
        calls["upload_folder"].append({"repo_id": repo_id, "folder": dst, **kw})
        return "commit-info"

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "create_branch", create_branch)
    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    return calls


def test_push_to_hub_uploads_a_folder_that_loads(scorer, uploads):
    assert scorer.push_to_hub("user/scorer", private=True, revision="v1", commit_message="first") == "commit-info"
    assert uploads["create_repo"] == [("user/scorer", {"private": True, "exist_ok": True, "repo_type": "model"})]
    assert uploads["create_branch"][0][0] == "user/scorer" and uploads["create_branch"][0][1]["branch"] == "v1"
    up = uploads["upload_folder"][0]
    assert up["repo_id"] == "user/scorer" and up["revision"] == "v1" and up["commit_message"] == "first"
    assert set(up["delete_patterns"]) == {"policy/*", "policy_base/*", "reference/*", "reference_adapter/*",
                                          "reference_tokenizer/*"}
    folder = up["folder"]
    assert {p.name for p in folder.iterdir()} == {"README.md", CONFIG_NAME, "policy", "reference"}
    card = (folder / "README.md").read_text()
    assert "# Progress-advantage scorer: user/scorer" in card and 'from_pretrained("user/scorer")' in card
    loaded = ProgressAdvantageScorer.from_pretrained(folder)
    assert loaded.digest == scorer.digest
    assert scores_of(loaded) == pytest.approx(scores_of(scorer), abs=1e-6)


def test_push_to_hub_refuses_a_local_link(scorer, uploads):
    with pytest.raises(ValueError, match="reference='link'.*cannot be used by others"):
        scorer.push_to_hub("user/scorer", reference="link")
    assert uploads["upload_folder"] == []


# ------------------------------------------------------------------------------------------- hub-linked reference
@pytest.fixture
def hub_base(tiny_dir, hub_cache):
    """The tiny reference published as ``org/base`` (commit COMMIT_REF, ``main``)."""
    return cache_repo(hub_cache, "org/base", tiny_dir / "reference", COMMIT_REF)


def test_a_hub_reference_is_linked_by_commit_and_fetched_on_load(tiny_dir, scorer, hub_base, uploads):
    linked = ProgressAdvantageScorer.from_models(tiny_dir / "policy", "org/base", beta=0.5, temperature=0.7)
    linked.push_to_hub("user/linked", reference="hub")
    folder = uploads["upload_folder"][0]["folder"]
    meta = meta_of(folder)
    assert not (folder / "reference").exists() and meta["format_version"] == 3
    assert meta["reference"]["hub"] == {"repo_id": "org/base", "revision": COMMIT_REF}
    assert set(meta["reference"]["files"]) == {"config.json", "model.safetensors"}
    assert ModelCard.load(folder / "README.md").data.base_model == "org/base"
    assert f"`org/base` at `{COMMIT_REF}`" in (folder / "README.md").read_text()
    # published, then loaded by repo id: the reference comes from the cache at exactly that commit
    cache_repo(hub_base.parents[2], "user/linked", folder, COMMIT_A)
    (hub_base.parents[1] / "refs" / "main").write_text(COMMIT_B)  # main moved on: never followed
    loaded = ProgressAdvantageScorer.from_pretrained("user/linked")
    assert loaded.digest == linked.digest
    assert scores_of(loaded) == pytest.approx(scores_of(scorer), abs=1e-6)
    assert Path(loaded.reference.model.config._name_or_path).name == COMMIT_REF


def test_a_hub_reference_is_verified_against_the_recorded_hashes(tiny_dir, hub_base, tmp_path):
    linked = ProgressAdvantageScorer.from_models(tiny_dir / "policy", hub_base, beta=0.5)
    out = linked.save_pretrained(tmp_path / "s", reference="hub")
    config = Path(os.path.realpath(hub_base / "config.json"))
    config.write_text(config.read_text() + " ")
    with pytest.raises(ValueError, match=r"config\.json: size .*'reference\.files'"):
        ProgressAdvantageScorer.from_pretrained(out)


def test_a_hub_reference_missing_from_an_offline_cache_is_a_clear_error(tiny_dir, hub_base, tmp_path):
    out = ProgressAdvantageScorer.from_models(tiny_dir / "policy", hub_base).save_pretrained(tmp_path / "s",
                                                                                              reference="hub")
    shutil.rmtree(hub_base.parents[1] / "snapshots")
    with pytest.raises(FileNotFoundError, match=f"field 'reference.hub': the reference org/base at commit "
                                                f"{COMMIT_REF} could not be fetched"):
        ProgressAdvantageScorer.from_pretrained(out)
    # a local copy of that commit can be passed instead, and is verified like any linked reference
    assert ProgressAdvantageScorer.from_pretrained(out, reference=tiny_dir / "reference").digest == meta_of(out)[
        "digest"]


def test_hub_links_need_the_hub_files_and_a_commit(tiny_dir, hub_base, tmp_path):
    local = ProgressAdvantageScorer.from_models(tiny_dir / "policy", tiny_dir / "reference")
    with pytest.raises(ValueError, match="reference='hub' needs a reference loaded from the Hugging Face Hub"):
        local.save_pretrained(tmp_path / "s", reference="hub")
    changed = ProgressAdvantageScorer.from_models(tiny_dir / "policy", hub_base)
    with torch.no_grad():
        next(changed.reference.model.parameters()).add_(1e-3)
    with pytest.raises(ValueError, match=f"differs from org/base@{COMMIT_REF} in .*values"):
        changed.save_pretrained(tmp_path / "s", reference="hub")
    assert not (tmp_path / "s").exists()
    out = ProgressAdvantageScorer.from_models(tiny_dir / "policy", hub_base).save_pretrained(tmp_path / "t",
                                                                                              reference="hub")
    meta = meta_of(out)
    meta["reference"]["hub"]["revision"] = "main"
    body = json.dumps({k: v for k, v in meta.items() if k != "digest"}, sort_keys=True, separators=(",", ":"))
    meta["digest"] = hashlib.sha256(body.encode()).hexdigest()
    (out / CONFIG_NAME).write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=r"field 'reference.hub.revision': expected a 40-hex commit hash"):
        ProgressAdvantageScorer.from_pretrained(out)
