"""Scorers on the Hugging Face Hub: loading a scorer repository, pushing an export, a reference linked by repo id and
commit, and the model card every export carries.

* ``from_pretrained("user/repo", revision=...)``: :func:`scorer_folder` downloads the repository with
  ``snapshot_download`` (a local folder of that name keeps priority) and the folder is then loaded and verified like
  any local one. The files of a Hub snapshot are symlinks into the cache's blobs, so the cache folder is the one
  place they may lead to (:func:`scorer_folder` returns it).
* ``save_pretrained(..., reference="hub")`` / ``push_to_hub(..., reference="hub")``: a reference that is a Hub model
  is recorded as ``{"repo_id", "revision": <commit>}`` plus the hashes of its score-relevant files, never a branch;
  the export is refused unless the reference's weights equal that commit's files (:func:`link_hub_reference`).
  Loading downloads exactly that commit (:func:`fetch_reference`) and verifies the hashes.
* ``README.md``: :func:`model_card`, documentation only: not in the manifest, so editing it never breaks loading.
  Its last line records the hash of the text above it, so that a later save replaces a card it generated and keeps
  a card someone edited (:func:`is_generated_card`).
"""

from __future__ import annotations

import glob
import hashlib
import logging
import math
import os
import re
from pathlib import Path
from typing import Any

import torch

logger = logging.getLogger(__name__)

CARD_NAME = "README.md"
_COMMIT = re.compile(r"^[0-9a-f]{40}$")
_CARD_MARK = re.compile(r"\n<!-- progadv-trl model card, sha256 of the text above: (?P<sha>[0-9a-f]{64}) -->\n?$")
_CACHE_SNAPSHOT = re.compile(r"^models--(?P<repo>.+)$")


# ------------------------------------------------------------------------------------------------------- repo ids
def is_repo_id(name: str, *, namespaced: bool = True) -> bool:
    """Whether ``name`` is spelled as a Hub model id (``owner/name``; a bare ``name`` too unless ``namespaced``)."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if not isinstance(name, str) or name.count("/") > 1 or (namespaced and name.count("/") != 1):
        return False
    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def is_commit(revision) -> bool:
    return isinstance(revision, str) and bool(_COMMIT.match(revision))


def cache_snapshot_origin(path: str | os.PathLike) -> tuple[str, str] | None:
    """``(repo_id, commit)`` of a folder laid out as a Hub cache snapshot (``models--a--b/snapshots/<commit>``)."""
    p = Path(os.path.abspath(path))
    m = _CACHE_SNAPSHOT.match(p.parent.parent.name)
    if p.parent.name != "snapshots" or m is None or not is_commit(p.name):
        return None
    repo = m["repo"].replace("--", "/")
    return (repo, p.name) if is_repo_id(repo, namespaced=False) else None


# ------------------------------------------------------------------------------------------------------- download
def scorer_folder(name_or_path: str | os.PathLike, *, revision: str | None = None, token: str | bool | None = None,
                  cache_dir: str | os.PathLike | None = None) -> tuple[Path, Path | None]:
    """The local folder of a scorer given as a path or a Hub repo id, and the folder its symlinks may lead into
    (``None`` for a local folder: its own; the Hub cache for a downloaded snapshot).

    A path that exists locally (or that :func:`~progadv_trl.persistence.recover` puts back) is a local folder; a
    missing path spelled ``owner/name`` is downloaded; anything else is a ``FileNotFoundError``."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError

    from . import __version__
    from .persistence import recover

    local = Path(os.path.abspath(name_or_path))
    if local.name and local.parent.is_dir():
        recover(local)
    if os.path.lexists(local):
        if revision is not None:
            raise ValueError(f"revision={revision!r}: {name_or_path} is a local folder, which has no revisions "
                             f"(revision selects a commit, branch or tag of a Hub repository); drop revision")
        return local, None
    name = str(name_or_path)
    if not is_repo_id(name):
        raise FileNotFoundError(f"{name}: no such scorer folder, and not a Hugging Face Hub repository id (expected "
                                f"'owner/name')")
    try:
        folder = snapshot_download(name, revision=revision, token=token, cache_dir=cache_dir,
                                   library_name="progadv-trl", library_version=__version__)
    except (RepositoryNotFoundError, RevisionNotFoundError, LocalEntryNotFoundError) as e:
        at = f" at revision {revision!r}" if revision is not None else ""
        raise FileNotFoundError(f"{name}: no such local scorer folder, and the Hub repository {name}{at} could not "
                                f"be fetched: {type(e).__name__}: {e}") from e
    folder = Path(folder)
    logger.info("progadv: scorer %s at commit %s (%s)", name, folder.name, folder)
    # a snapshot's files link to <cache>/models--owner--name/blobs (or to the cache-wide shared blobs)
    return folder, folder.parents[2].resolve()


def fetch_reference(repo_id: str, revision: str, names, *, token: str | bool | None = None,
                    cache_dir: str | os.PathLike | None = None, where: str = "") -> Path:
    """Download the named files of ``repo_id`` at commit ``revision`` (a Hub-linked reference); returns the folder."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError

    if not is_commit(revision):  # read_meta already refuses it; never fetch a moving branch
        raise ValueError(f"{where}field 'reference.hub.revision': {revision!r} is not a commit hash")
    try:
        return Path(snapshot_download(repo_id, revision=revision, token=token, cache_dir=cache_dir,
                                      allow_patterns=[glob.escape(n) for n in sorted(names)]))
    except (RepositoryNotFoundError, RevisionNotFoundError, LocalEntryNotFoundError) as e:
        raise FileNotFoundError(f"{where}field 'reference.hub': the reference {repo_id} at commit {revision} could "
                                f"not be fetched from the Hub ({type(e).__name__}: {e}); pass a folder holding it "
                                f"as from_pretrained(..., reference=DIR)") from e


# ----------------------------------------------------------------------------------------------------------- push
def push_scorer(scorer, repo_id: str, *, private: bool | None = None, token: str | bool | None = None,
                revision: str | None = None, commit_message: str | None = None, reference: str = "copy"):
    """``ProgressAdvantageScorer.push_to_hub``: create the repository (if needed), save the scorer into a temporary
    folder and upload it in one commit that also deletes the previous export's files in the model folders (which
    would otherwise stay and fail the manifest check on load). Returns the ``CommitInfo``."""
    import tempfile

    from huggingface_hub import HfApi

    from .persistence import MODEL_DIRS, save_scorer

    if reference not in ("copy", "hub"):
        raise ValueError(f"reference={reference!r}: push_to_hub stores the reference ('copy') or links it by Hub "
                         f"repo id and commit ('hub'); a local folder ('link') cannot be used by others")
    api = HfApi(token=token)
    repo = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
    repo_id = getattr(repo, "repo_id", None) or repo_id
    if revision is not None:
        api.create_branch(repo_id, branch=revision, exist_ok=True, repo_type="model")
    with tempfile.TemporaryDirectory(prefix="progadv-push-") as tmp:
        folder = save_scorer(scorer, Path(tmp) / "scorer", reference, token=token, repo_id=repo_id)
        return api.upload_folder(repo_id=repo_id, folder_path=str(folder), repo_type="model", revision=revision,
                                 commit_message=commit_message or f"Upload progress-advantage scorer {scorer.digest}",
                                 delete_patterns=[f"{d}/*" for d in MODEL_DIRS])


# ---------------------------------------------------------------------------------------------- hub-linked export
def hub_commit(repo_id: str, revision: str | None = None, *, token: str | bool | None = None) -> str:
    """The commit ``revision`` (default: the main branch) of ``repo_id``: the local cache's, else the Hub's."""
    from huggingface_hub import HfApi, try_to_load_from_cache

    if is_commit(revision):
        return revision
    cached = try_to_load_from_cache(repo_id, "config.json", revision=revision)
    if isinstance(cached, str):
        origin = cache_snapshot_origin(Path(cached).parent)
        if origin is not None:
            return origin[1]
    return HfApi().model_info(repo_id, revision=revision, token=token).sha


def link_hub_reference(name: str | None, state: dict[str, torch.Tensor], *, revision: str | None = None,
                       token: str | bool | None = None) -> dict[str, Any]:
    """The ``reference`` fields of an export that links its reference by Hub repo id and commit.

    ``name`` is where the reference was loaded from (a repo id, or a Hub cache snapshot folder), ``state`` its
    weights as the scorer holds them. Refused unless ``state`` equals the files of that commit (same names, dtypes,
    values; tied weights may be absent from the files)."""
    from huggingface_hub import snapshot_download

    from .persistence import LINKED_PATTERNS, linked_files

    origin = cache_snapshot_origin(name) if name and os.path.isdir(name) else None
    if origin is None:
        if not name or os.path.exists(name) or not is_repo_id(name, namespaced=False):
            raise ValueError(f"reference='hub' needs a reference loaded from the Hugging Face Hub (a repo id, or its "
                             f"cache snapshot); this one was loaded from {name!r}. Use reference='copy'")
        origin = (name, hub_commit(name, revision, token=token))
    repo_id, commit = origin
    folder = Path(snapshot_download(repo_id, revision=commit, token=token, allow_patterns=list(LINKED_PATTERNS)))
    files = linked_files(folder)
    _check_same_weights(state, folder, f"{repo_id}@{commit}")
    return {"hub": {"repo_id": repo_id, "revision": commit}, "files": files, "linked": True}


def _check_same_weights(state: dict[str, torch.Tensor], folder: Path, where: str) -> None:
    from safetensors import safe_open

    seen: dict[str, torch.Tensor] = {}
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():
                mine = state.get(key)
                if mine is None:
                    raise ValueError(f"reference='hub': {where} holds {key!r} ({path.name}), which the scorer's "
                                     f"reference does not have: it is not that model. Use reference='copy'")
                theirs = f.get_tensor(key)
                mine = mine.detach().cpu()
                if mine.dtype != theirs.dtype or mine.shape != theirs.shape or not torch.equal(mine, theirs):
                    raise ValueError(f"reference='hub': the scorer's reference differs from {where} in {key!r} "
                                     f"({mine.dtype} {tuple(mine.shape)} vs {theirs.dtype} {tuple(theirs.shape)}"
                                     f"{'' if mine.shape != theirs.shape or mine.dtype != theirs.dtype else ', values'}"
                                     f"); it was loaded in another dtype or changed. Use reference='copy'")
                seen[key] = state[key]
    stored = {t.data_ptr() for t in seen.values()}
    missing = sorted(k for k, t in state.items() if k not in seen and t.data_ptr() not in stored)
    if missing:
        raise ValueError(f"reference='hub': {where} lacks weights the scorer's reference has ({', '.join(missing[:5])}"
                         f"{' ...' if len(missing) > 5 else ''}). Use reference='copy'")


# ------------------------------------------------------------------------------------------------------ model card
def heldout_metrics(history: list[dict], step: int | None, temperature: float, beta: float) -> dict | None:
    """The ``progadv/...`` metrics of the evaluation at ``step`` with this temperature and beta, if there was one
    (so that a card never shows another step's numbers)."""
    for entry in reversed(history):
        if entry.get("step") == step and entry.get("temperature") == temperature and entry.get("beta") == beta:
            return {k: v for k, v in entry.items() if k.startswith("progadv/") and k != "progadv/seconds"}
    return None


def model_origin(model_name: str | None, given: str | None, revision: str | None) -> dict[str, str | None]:
    """``{"name", "revision"}`` of where a model came from, for provenance and the card: the name it was given as
    (else its ``name_or_path``) and, for a Hub model, the commit known from the local cache (never the network)."""
    from huggingface_hub import try_to_load_from_cache

    name = given if isinstance(given, str) and given else model_name
    origin = cache_snapshot_origin(name) if name and os.path.isdir(name) else None
    if origin is not None:
        return {"name": origin[0], "revision": origin[1]}
    commit = revision if is_commit(revision) else None
    if commit is None and name and not os.path.exists(name) and is_repo_id(name, namespaced=False):
        try:
            cached = try_to_load_from_cache(name, "config.json", revision=revision)
        except ValueError:
            cached = None
        snap = cache_snapshot_origin(Path(cached).parent) if isinstance(cached, str) else None
        commit = snap[1] if snap is not None else None
    return {"name": name, "revision": commit}


def card_sha256(body: str) -> str:
    return hashlib.sha256(body.encode("utf-8")).hexdigest()


def is_generated_card(path: Path) -> bool:
    """Whether ``path`` is a card :func:`model_card` wrote and nobody edited since."""
    if path.is_symlink() or not path.is_file():
        return False
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return False
    m = _CARD_MARK.search(text)
    return m is not None and card_sha256(text[:m.start()]) == m["sha"]


def _fmt(value) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    if isinstance(value, bool) or isinstance(value, int):
        return str(value)
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _name(origin: dict | None) -> str:
    if not origin or not origin.get("name"):
        return "unknown"
    rev = origin.get("revision")
    return f"`{origin['name']}`" + (f" (revision `{rev}`)" if rev else "")


def _candidate_lines(prov: dict) -> list[str]:
    """What the card says about the scoring reference when it was chosen among candidates or is not the reference
    itself (a weight-space blend, or an earlier policy)."""
    alpha, previous, choice = prov.get("reference_alpha"), prov.get("reference_previous"), prov.get("reference_choice")
    if alpha is not None:
        line = (f"  - scored against the weight-space blend `theta_ref + a * (theta - theta_ref)` with a = {_fmt(alpha)} "
                "of that reference and the policy (the blended weights are what `reference/` holds)")
    elif previous is not None:
        line = (f"  - scored against the policy {previous} evaluation(s) earlier"
                + (f", at training step {prov['reference_step']}" if prov.get("reference_step") is not None else "")
                + " (its weights are what `reference/` holds)")
    elif choice:
        line = "  - scored against that reference itself"
    else:
        return []
    if choice and choice.get("quality_metric"):
        names = ["initial"] + [c for c in choice.get("candidates") or [] if c != "initial"]
        line += (f"; candidate `{prov.get('reference_candidate')}` chosen among "
                 f"{', '.join(f'`{c}`' for c in names)} by `{choice['quality_metric']}` on the validation groups of "
                 f"the held-out rollouts ({_fmt(choice.get('val'))}; test groups {_fmt(choice.get('test'))})")
    return [line]


def model_card(meta: dict, repo_id: str | None = None) -> str:
    """``README.md`` of an export, from its ``progadv_config.json`` fields (YAML front matter for the Hub, then what
    the scorer is, its models, settings, held-out metrics and how to load it)."""
    from huggingface_hub import ModelCardData

    cfg, prov = meta.get("config", {}), meta.get("provenance") or {}
    origins = prov.get("models") or {}
    ref_meta, pol_meta = meta.get("reference", {}), meta.get("policy", {})
    hub_ref = ref_meta.get("hub")
    ref_origin = ({"name": hub_ref["repo_id"], "revision": hub_ref["revision"]} if hub_ref
                  else origins.get("reference"))
    base_model = None
    if ref_origin and ref_origin.get("name") and is_repo_id(ref_origin["name"], namespaced=False) \
            and not os.path.isabs(ref_origin["name"]) and ref_origin.get("revision"):
        base_model = ref_origin["name"]
    data = ModelCardData(library_name="progadv-trl", base_model=base_model,
                         tags=["progadv-trl", "progress-advantage", "process-reward", "trl", "reinforcement-learning"])
    load_id = repo_id or "path/to/this/folder"
    if hub_ref:
        stored = (f"linked by Hub repo id and commit: `{hub_ref['repo_id']}` at `{hub_ref['revision']}`, downloaded "
                  f"at load time and checked against the recorded SHA-256 of its files")
    elif ref_meta.get("linked"):
        stored = ("linked to a local folder (not stored here): pass it as `from_pretrained(..., reference=DIR)`; it is "
                  "checked against the recorded SHA-256 of its files")
    elif ref_meta.get("kind") == "adapter_base":
        stored = ("the policy adapter's base model with the adapter switched off"
                  + (", plus a frozen reference adapter" if ref_meta.get("adapter_path") else "")
                  + " (stored in this folder)")
    else:
        stored = "stored in this folder (`reference/`)"
    policy_kind = "a PEFT adapter" if pol_meta.get("kind") == "peft_adapter" else "full weights"
    lines = [
        "---", data.to_yaml(), "---", "",
        f"# Progress-advantage scorer{f': {repo_id}' if repo_id else ''}", "",
        "A step-level scorer for agent trajectories, exported by the `progadv-trl` library: "
        "every assistant step gets the progress advantage", "",
        "    A(step) = beta * (log pi(step) - log pi_ref(step))", "",
        "from an RL-trained policy `pi` and the reference `pi_ref` it was regularised toward (token log-ratios "
        f"aggregated per step with `{cfg.get('token_agg') or 'sum'}`, steps per trajectory with "
        f"`{cfg.get('step_agg', 'mean')}`). Higher scores mean trajectories more likely to succeed; the per-step "
        "advantages point at the decisive step of a failed one.", "",
        "## Models", "",
        (f"- Policy: trained from {_name(origins.get('policy'))}, exported at training step {prov['step']}"
         if prov.get("step") is not None else f"- Policy: {_name(origins.get('policy'))}")
        + f", {policy_kind} (stored in this folder, `policy/`)",
        f"- Reference: {_name(ref_origin)}, {stored}", *_candidate_lines(prov), "",
        "## Settings", "",
        "| setting | value |", "| --- | --- |",
        *(f"| `{k}` | {_fmt(cfg.get(k))} |" for k in ("beta", "temperature", "top_k", "rendering", "max_length")
          if k in cfg),
        f"| digest | `{meta.get('digest')}` |", "",
    ]
    metrics = prov.get("heldout_metrics")
    if metrics:
        lines += ["## Held-out metrics at export", "",
                  "Measured by the training run on its held-out rollouts, at the step and settings above.", "",
                  "| metric | value |", "| --- | --- |",
                  *(f"| `{k}` | {_fmt(v)} |" for k, v in sorted(metrics.items())), ""]
    lines += [
        "## Usage", "",
        "```python",
        "from progadv_trl import ProgressAdvantageScorer, load_trajectories", "",
        f"scorer = ProgressAdvantageScorer.from_pretrained(\"{load_id}\""
        + (", reference=\"path/to/reference\"" if ref_meta.get("linked") and not hub_ref else "") + ")",
        "results = scorer.score(load_trajectories(\"rollouts.jsonl\"))",
        "results[0].score, [s.advantage for s in results[0].steps]",
        "```", "",
        "Loading verifies every weight, tokenizer and config file against the SHA-256 manifest in "
        "`progadv_config.json` before any model is built. To pin this exact export, pass "
        f"`expected_digest=\"{meta.get('digest')}\"`. This card is documentation: editing it does not affect "
        "loading.", "",
    ]
    body = "\n".join(lines)
    return body + f"\n<!-- progadv-trl model card, sha256 of the text above: {card_sha256(body)} -->\n"
