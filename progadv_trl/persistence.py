"""A scorer folder on disk: layout, manifest, atomic replacement, recovery after a kill, and the checks on load.

Layout (format 2)::

    progadv_config.json   scoring config, policy/reference metadata, the manifest ("files") and its "digest"
    policy/               the policy's weights (or PEFT adapter) and its tokenizer
    policy_base/          the adapter's base weights, when the policy is an adapter whose base is not the reference
    reference/            the reference's weights (absent when the reference is linked)
    reference_adapter/    a frozen reference adapter on the policy's base (only then)
    reference_tokenizer/  the reference's tokenizer when it tokenizes differently (only then)
    README.md             the model card (:func:`~progadv_trl.hub.model_card`): documentation, not in the manifest

Manifest: ``files`` maps every file under the model folders (posix path relative to the scorer folder) to
``{"sha256", "size"}``. ``digest`` is the SHA-256 of the canonical JSON (sorted keys, no spaces) of every other
field of ``progadv_config.json`` -- scoring config, policy/reference metadata, the chat-template hashes and the
manifest itself -- so that one hash names the whole scorer (``ProgressAdvantageScorer.digest``; pass it back as
``from_pretrained(..., expected_digest=)`` to pin an export you trust, since anyone who can write the folder can
also rewrite a manifest kept in it).

Loading checks, before any model is built: versions and field types; every manifest path stays in its model
folder; the digest; every listed file exists with its size and hash; no unlisted file lies in a model folder; no
symlink (file or folder) resolves outside the scorer folder. A linked reference (``reference="link"``) is recorded
by path and by the hashes of its score-relevant files (:data:`LINKED_PATTERNS`) and is used only when the caller
passes that folder explicitly (``from_pretrained(..., reference=DIR)``, ``--scorer S --reference DIR``); the path
recorded in the folder is never opened. A Hub-linked reference (``reference="hub"``, format 3) is recorded by repo id
and commit and the same hashes; loading downloads exactly that commit (:mod:`progadv_trl.hub`). After loading, the tokenizers' chat templates are checked against their
recorded hashes.

Saving never deletes what it did not write: a non-empty folder that is not a scorer is refused; in an existing
scorer, unlisted files inside the model folders are refused, and other top-level entries (notes, results) are
carried over into the new export. The model card is regenerated unless someone edited it (then theirs is kept). The new export is written beside the target and swapped in; a save killed
between the two renames is repaired by the next save or load (:func:`recover`).
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Any

import torch

from . import __version__
from .config import CONFIG_VERSION, SCORING_FIELDS, TRAINING_FIELDS, ScoringConfig
from .hub import CARD_NAME, fetch_reference, is_commit, is_generated_card, is_repo_id, link_hub_reference, model_card, \
    model_origin
from .models import ModelView, is_adapter_dir, is_peft_model, load_causal_lm, load_tokenizer, name_or_path, \
    strip_wrappers, unwrap
from .reference_blend import BLEND_ATTR

logger = logging.getLogger(__name__)

FORMAT_VERSION = 2
#: written only when the reference is linked by Hub repo id and commit, so that older readers ask for an upgrade
HUB_LINK_FORMAT_VERSION = 3
CONFIG_NAME = "progadv_config.json"
POLICY_DIR, REFERENCE_DIR, REFERENCE_TOKENIZER_DIR = "policy", "reference", "reference_tokenizer"
REFERENCE_ADAPTER_DIR, POLICY_BASE_DIR = "reference_adapter", "policy_base"
MODEL_DIRS = (POLICY_DIR, POLICY_BASE_DIR, REFERENCE_DIR, REFERENCE_ADAPTER_DIR, REFERENCE_TOKENIZER_DIR)
OWN_ENTRIES = (CONFIG_NAME, *MODEL_DIRS)
#: files of a linked reference folder that decide its scores (what ``AutoModelForCausalLM`` reads, remote code too)
LINKED_PATTERNS = ("config.json", "*.safetensors", "*.safetensors.index.json", "*.py")
_HEX64 = re.compile(r"^[0-9a-f]{64}$")


class ScorerFileMissing(FileNotFoundError, ValueError):
    """A file the scorer's manifest lists is missing (both a ``FileNotFoundError`` and a ``ValueError``)."""


# ---------------------------------------------------------------------------------------------------------- hashing
def file_sha256(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def text_sha256(value) -> str | None:
    """Hash of a chat template (a string, or a dict of named templates), ``None`` for none."""
    if value is None:
        return None
    text = value if isinstance(value, str) else json.dumps(value, sort_keys=True)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def canonical_digest(meta: dict) -> str:
    """SHA-256 of the canonical JSON of ``meta`` without its ``digest`` field."""
    body = {k: v for k, v in meta.items() if k != "digest"}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _record(path: Path) -> dict:
    return {"sha256": file_sha256(path), "size": path.stat().st_size}


def _manifest_of(folder: Path) -> dict[str, dict]:
    """Every file under the model folders of a freshly written export."""
    files = {}
    for d in MODEL_DIRS:
        base = folder / d
        if not base.is_dir():
            continue
        for dirpath, dirnames, filenames in os.walk(base):
            for name in sorted(dirnames + filenames):
                p = Path(dirpath) / name
                if p.is_symlink():  # pragma: no cover - save_pretrained writes none
                    raise ValueError(f"{p}: a symlink was written into the export")
            for name in filenames:
                p = Path(dirpath) / name
                files[p.relative_to(folder).as_posix()] = _record(p)
    return dict(sorted(files.items()))


def linked_files(folder: str | os.PathLike) -> dict[str, dict]:
    """Hashes of the score-relevant files (:data:`LINKED_PATTERNS`) at the top of a linked reference folder."""
    folder = Path(folder)
    if is_adapter_dir(folder):
        raise ValueError(f"{folder}: a linked reference must be a full model folder, not a PEFT adapter")
    files = {p.name: _record(p) for p in sorted(folder.iterdir())
             if p.is_file() and any(fnmatch.fnmatchcase(p.name, pat) for pat in LINKED_PATTERNS)}
    if not any(n.endswith(".safetensors") for n in files):
        raise ValueError(f"{folder}: no .safetensors weights in the reference folder")
    return files


# ------------------------------------------------------------------------------------------------------------ save
def save_scorer(scorer, save_directory: str | os.PathLike, reference: str = "copy", *,
                token: str | bool | None = None, repo_id: str | None = None) -> Path:
    """Write ``scorer`` to ``save_directory`` (see the module docstring for what is refused and carried over).

    ``token`` is used by ``reference="hub"`` to resolve and fetch the reference; ``repo_id`` names the Hub repository
    in the model card's usage example."""
    if reference not in ("copy", "link", "hub"):
        raise ValueError(f"reference={reference!r}: expected 'copy', 'link' or 'hub'")
    target = Path(os.path.abspath(save_directory))
    if not target.name:
        raise ValueError(f"{save_directory}: cannot save a scorer as the filesystem root")
    target.parent.mkdir(parents=True, exist_ok=True)
    recover(target)
    _check_target(target)  # fail before writing gigabytes
    _clean_stale(target)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        meta = _write(scorer, tmp, reference, target, token)
        meta["files"] = _manifest_of(tmp)
        meta["format_version"] = HUB_LINK_FORMAT_VERSION if "hub" in meta["reference"] else FORMAT_VERSION
        meta["digest"] = canonical_digest(meta)
        (tmp / CONFIG_NAME).write_text(json.dumps(meta, indent=2, sort_keys=True), encoding="utf-8")
        (tmp / CARD_NAME).write_text(model_card(meta, repo_id), encoding="utf-8")
        _check_target(target)  # again: the folder may have changed while we wrote
        old = _atomic_swap(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if old is not None:
        _retire(old, target)
    scorer.digest = meta["digest"]
    return target


def _write(scorer, tmp: Path, reference_mode: str, target: Path, token=None) -> dict:
    policy_model = strip_wrappers(scorer.policy.model)
    ref_view = scorer.reference
    meta: dict[str, Any] = {"config": scorer.config.to_dict(), "library": "progadv-trl",
                            "library_version": __version__, "config_version": CONFIG_VERSION,
                            "provenance": _provenance(scorer),
                            "chat_template_sha256": text_sha256(getattr(scorer.tokenizer, "chat_template", None))}
    shares_base = ref_view.model is scorer.policy.model and ref_view.adapter is not None
    if is_peft_model(policy_model):
        adapter = scorer.policy.adapter or policy_model.active_adapter
        policy_model.save_pretrained(str(tmp / POLICY_DIR), selected_adapters=[adapter])
        src = tmp / POLICY_DIR / adapter if adapter != "default" else tmp / POLICY_DIR
        meta["policy"] = {"kind": "peft_adapter", "path": Path(os.path.relpath(src, tmp)).as_posix()}
        if not shares_base and not _base_is(policy_model, unwrap(ref_view.model)):
            # the adapter was trained on another base than the reference: keep that base, or the adapter would be
            # loaded onto the reference's weights and score as a different policy
            with policy_model.disable_adapter():
                _save_plain_base(unwrap(policy_model), tmp / POLICY_BASE_DIR)
            meta["policy"]["base_path"] = POLICY_BASE_DIR
    else:
        policy_model.save_pretrained(str(tmp / POLICY_DIR), safe_serialization=True)
        meta["policy"] = {"kind": "full", "path": POLICY_DIR}
    scorer.tokenizer.save_pretrained(str(tmp / POLICY_DIR))
    if shares_base:  # the reference is the policy's base, adapters off or with a frozen adapter of its own
        base = unwrap(policy_model)
        ref_meta: dict[str, Any] = {"kind": "adapter_base"}
        if ref_view.adapter != "off":
            policy_model.save_pretrained(str(tmp / REFERENCE_ADAPTER_DIR), selected_adapters=[ref_view.adapter])
            ref_meta["adapter_path"] = Path(os.path.relpath(tmp / REFERENCE_ADAPTER_DIR / ref_view.adapter,
                                                            tmp)).as_posix()
    else:
        base = unwrap(ref_view.model)
        ref_meta = {"kind": "full"}
    blend = getattr(base, BLEND_ATTR, None)
    if blend is not None and reference_mode != "copy":
        raise ValueError(f"reference={reference_mode!r}: the reference is a weight-space blend of the reference and "
                         f"the policy built in memory (reference_alpha={blend.get('reference_alpha')}); no folder or "
                         "Hub commit holds its weights. Use reference='copy' (the blend is then stored)")
    if reference_mode == "link":
        src = name_or_path(base)
        if not src or not Path(src).is_dir():
            raise ValueError("reference='link' needs a reference loaded from a local folder; got "
                             f"{src!r}. Use reference='copy'")
        src_path = Path(src).resolve()
        if _within(src_path, target.resolve()):
            raise ValueError(f"reference='link': the reference folder {src_path} lies inside the export folder "
                             f"{target} that this save replaces. Use reference='copy'")
        ref_meta.update(path=str(src_path), files=linked_files(src_path), linked=True)
    elif reference_mode == "hub":
        prov = scorer.provenance
        hint = prov.get("reference_revision") if prov.get("reference") == name_or_path(base) else None
        state = _plain_base_state(base) if shares_base else base.state_dict()
        ref_meta.update(link_hub_reference(name_or_path(base), state, revision=hint, token=token))
    else:
        if getattr(base, "is_quantized", False) or getattr(base, "quantization_method", None):
            raise ValueError("the reference is a quantized model (e.g. the 4-bit base of a QLoRA policy): a copy "
                             "would not be the weights it was trained against; save with reference='link' (the "
                             "base's folder is recorded with its hashes) instead")
        if shares_base:
            with policy_model.disable_adapter():
                _save_plain_base(base, tmp / REFERENCE_DIR)
        else:
            base.save_pretrained(str(tmp / REFERENCE_DIR), safe_serialization=True)
        ref_meta.update(path=REFERENCE_DIR, linked=False)
    meta["reference"] = ref_meta
    meta["reference_tokenizer"] = None
    if scorer.reference_tokenizer is not None:
        scorer.reference_tokenizer.save_pretrained(str(tmp / REFERENCE_TOKENIZER_DIR))
        meta["reference_tokenizer"] = REFERENCE_TOKENIZER_DIR
        meta["reference_chat_template_sha256"] = text_sha256(
            getattr(scorer.reference_tokenizer, "chat_template", None))
    return meta


def _provenance(scorer) -> dict:
    """The scorer's provenance plus, at its first export, where its models came from (``"models"``: name and Hub
    commit of the policy and the reference), which later exports of the loaded scorer keep."""
    prov = dict(scorer.provenance)
    if "models" not in prov:
        ref = scorer.reference
        ref_model = scorer.policy.model if ref.adapter is not None else ref.model
        given_ref = prov.get("reference") if ref.adapter is None else None
        prov["models"] = {
            "policy": model_origin(name_or_path(scorer.policy.model), prov.get("policy"),
                                   prov.get("policy_revision")),
            "reference": model_origin(name_or_path(ref_model), given_ref, prov.get("reference_revision"))}
    return prov


def _plain_base_state(base) -> dict:
    """A PEFT model's base weights under the plain model's names (LoRA layers left out)."""
    return {k.replace("base_layer.", ""): v for k, v in base.state_dict().items() if "lora_" not in k}


def _base_is(peft_model, reference) -> bool:
    """Whether the adapter's base holds exactly the reference's weights (same names, shapes, dtypes, values)."""
    mine, theirs = _plain_base_state(unwrap(peft_model)), reference.state_dict()
    if set(mine) != set(theirs):
        return False
    for key, a in mine.items():
        b = theirs[key]
        if a.shape != b.shape or a.dtype != b.dtype or not torch.equal(a.detach().cpu(), b.detach().cpu()):
            return False
    return True


def _save_plain_base(base, path: Path) -> None:
    """Save a PEFT model's base weights without the LoRA layers (adapters are disabled by the caller)."""
    state = _plain_base_state(base)
    clone = type(base)(base.config)
    clone.load_state_dict(state)
    clone.save_pretrained(str(path), safe_serialization=True)


def _check_target(target: Path) -> None:
    """Refuse a target we may not replace: a symlink, a file, a non-empty folder that is not a scorer, a scorer with
    files of someone else's inside its model folders, or a folder holding the working directory."""
    if os.path.islink(target):
        raise ValueError(f"{target}: is a symlink (to {os.readlink(target)}); save_pretrained does not replace "
                         f"symlinks: pass the folder it points to, or another path")
    if not os.path.lexists(target):
        return
    if not target.is_dir():
        raise ValueError(f"{target}: exists and is not a folder; save_pretrained will not replace it")
    try:
        cwd = Path.cwd().resolve()
    except OSError:  # the working directory was deleted
        cwd = None
    if cwd is not None and _within(cwd, target.resolve()):
        raise ValueError(f"{target}: is (or contains) the current working directory; save the scorer into a "
                         f"subfolder, e.g. {target / 'progadv-scorer'}")
    entries = sorted(p.name for p in target.iterdir())
    if not entries:
        return
    files = _existing_manifest(target)
    if files is None and (target / CONFIG_NAME).is_file():
        raise ValueError(f"{target}: holds a {CONFIG_NAME} without a manifest this version can read (an older "
                         f"export, or an edited one), so save_pretrained cannot tell which files it wrote; delete "
                         f"the folder yourself or choose another")
    if files is None:
        raise ValueError(f"{target}: is not empty and is not a progadv scorer (it holds {_some(entries)}); "
                         f"save_pretrained never deletes files it did not write: choose a new or empty folder")
    foreign = _foreign_in_model_dirs(target, files)
    if foreign:
        raise ValueError(f"{target}: this scorer folder holds files the previous export did not write inside its "
                         f"model folders ({_some(foreign)}); move them out first (other top-level files are "
                         f"carried over into the new export)")


def _existing_manifest(folder: Path) -> dict | None:
    """The manifest of a scorer folder we wrote, or ``None`` when ``folder`` is not one (or not readable as one)."""
    path = folder / CONFIG_NAME
    if path.is_symlink() or not path.is_file():
        return None
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(meta, dict) or meta.get("library") != "progadv-trl":
            return None
        return _check_manifest(meta.get("files"), path)
    except (ValueError, UnicodeDecodeError, OSError):
        return None


def _foreign_in_model_dirs(folder: Path, files: dict) -> list[str]:
    """Entries inside the model folders that the manifest does not list as written by us (with that size)."""
    foreign = []
    for d in MODEL_DIRS:
        base = folder / d
        if base.is_symlink() or (os.path.lexists(base) and not base.is_dir()):
            foreign.append(d)
            continue
        if not base.is_dir():
            continue
        for dirpath, dirnames, filenames in os.walk(base):
            for name in list(dirnames):
                if (Path(dirpath) / name).is_symlink():  # os.walk lists links to folders among the folders
                    dirnames.remove(name)
                    filenames.append(name)
            for name in filenames:
                p = Path(dirpath) / name
                rel = p.relative_to(folder).as_posix()
                rec = files.get(rel)
                if rec is None or p.is_symlink() or not p.is_file() or p.stat().st_size != rec["size"]:
                    foreign.append(rel)
    return sorted(foreign)


def _some(names: list[str], k: int = 5) -> str:
    shown = ", ".join(names[:k])
    return shown + (f" and {len(names) - k} more" if len(names) > k else "")


def _within(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


_STALE = re.compile(r"^\.(?P<name>.+)\.(?P<kind>tmp|old)-[a-z0-9_]{8}$")


def _stale_siblings(target: Path, kind: str) -> list[Path]:
    out = []
    for p in target.parent.glob(f".{_glob_escape(target.name)}.{kind}-*"):
        m = _STALE.match(p.name)
        if m and m["name"] == target.name and m["kind"] == kind and p.is_dir() and not p.is_symlink():
            out.append(p)
    return sorted(out, key=lambda p: p.stat().st_mtime)


def _glob_escape(name: str) -> str:
    return re.sub(r"([*?\[])", r"[\1]", name)


def recover(target: Path) -> None:
    """Put back the previous export if a save was killed between moving it aside and moving the new one in."""
    if os.path.lexists(target):
        return
    olds = [p for p in _stale_siblings(target, "old") if _existing_manifest(p) is not None]
    if olds:
        os.replace(olds[-1], target)


def _clean_stale(target: Path) -> None:
    """Remove what killed saves left beside ``target``: unfinished exports (``.tmp-*``) and replaced ones
    (``.old-*``, retired like any replaced export)."""
    for stale in _stale_siblings(target, "tmp"):
        shutil.rmtree(stale, ignore_errors=True)
    for old in _stale_siblings(target, "old"):
        if _existing_manifest(old) is not None and target.is_dir():
            _retire(old, target)


def _atomic_swap(tmp: Path, target: Path) -> Path | None:
    """Move ``tmp`` to ``target``; an existing ``target`` stays whole until the new one is in place. Returns the
    previous export, moved aside, for :func:`_retire`."""
    if not os.path.lexists(target) or (target.is_dir() and not any(target.iterdir())):
        os.replace(tmp, target)  # rename(2) replaces an empty folder
        return None
    old = target.parent / f".{target.name}.old-{uuid.uuid4().hex[:8]}"
    os.replace(target, old)
    try:
        os.replace(tmp, target)
    except BaseException:
        os.replace(old, target)
        raise
    return old


def _retire(old: Path, target: Path) -> None:
    """Dispose of a replaced export: move its other top-level entries into ``target`` (carry-over), delete the
    files its manifest lists, and keep (with a warning) anything else."""
    files = _existing_manifest(old) or {}
    card = old / CARD_NAME
    if os.path.lexists(card) and os.path.lexists(target / CARD_NAME):
        if is_generated_card(card):
            card.unlink()  # ours, unedited: the new export's card replaces it
        else:
            logger.warning("%s: kept the edited %s of the previous export instead of the generated card; delete it "
                           "and save again to regenerate it", target, CARD_NAME)
            (target / CARD_NAME).unlink()
    for entry in sorted(old.iterdir()):
        if entry.name not in OWN_ENTRIES and not os.path.lexists(target / entry.name):
            os.replace(entry, target / entry.name)
    for rel in _listed_present(old, files):
        (old / rel).unlink()
    for d in MODEL_DIRS:  # now-empty folders, deepest first
        base = old / d
        if base.is_dir() and not base.is_symlink():
            for dirpath, _, _ in sorted(os.walk(base), key=lambda t: -len(t[0])):
                try:
                    os.rmdir(dirpath)
                except OSError:
                    pass
    left = sorted(p.name for p in old.iterdir() if p.name != CONFIG_NAME)
    if left:
        logger.warning("%s: kept the replaced export folder %s because it holds files save_pretrained did not "
                       "write: %s", target, old, _some(left))
        return
    (old / CONFIG_NAME).unlink(missing_ok=True)
    os.rmdir(old)


def _listed_present(folder: Path, files: dict) -> list[str]:
    foreign = set(_foreign_in_model_dirs(folder, files))
    return [rel for rel in files if rel not in foreign and (folder / rel).is_file()
            and not (folder / rel).is_symlink()]


# ------------------------------------------------------------------------------------------------------------ load
def load_scorer(directory: str | os.PathLike, *, reference: str | os.PathLike | None = None, device=None,
                dtype=None, trust_remote_code: bool = False, expected_digest: str | None = None,
                make_config=None, links_into: Path | None = None, token: str | bool | None = None,
                cache_dir: str | os.PathLike | None = None) -> dict:
    """Verify a scorer folder and load it: keyword arguments for ``ProgressAdvantageScorer(...)`` plus ``digest``.

    ``make_config(saved_config)`` applies the caller's overrides (before any model is loaded). ``links_into``: a
    second folder symlinks may lead into (the Hub cache, for a downloaded snapshot). ``token``/``cache_dir``: for
    downloading a Hub-linked reference."""
    root = Path(os.path.abspath(directory))
    recover(root)
    meta_path = root / CONFIG_NAME
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: no such scorer folder")
    if not meta_path.is_file():
        raise FileNotFoundError(f"{root}: not a progadv scorer (missing {CONFIG_NAME})")
    real_roots = (root.resolve(),) + ((Path(links_into).resolve(),) if links_into is not None else ())
    _inside_real(meta_path, real_roots, meta_path)
    meta = read_meta(meta_path)
    if expected_digest is not None and meta["digest"] != expected_digest:
        raise ValueError(f"{meta_path}: field 'digest': this scorer is {meta['digest']}, not the expected "
                         f"{expected_digest}")
    verify_files(root, meta["files"], meta_path, links_into=links_into)
    try:
        # exports of 0.1.0 development versions also held the callback's training settings: they never changed a score
        saved = {k: v for k, v in meta["config"].items() if k not in TRAINING_FIELDS}
        base_config = ScoringConfig.from_dict(saved, source=f"{meta_path}: field 'config'")
    except (TypeError, ValueError) as e:
        raise ValueError(f"{meta_path}: field 'config': {e}") from None
    config = make_config(base_config) if make_config is not None else base_config
    ref_meta, pol_meta = meta["reference"], meta["policy"]
    if ref_meta["linked"] and reference is None and ref_meta.get("hub") is not None:
        hub = ref_meta["hub"]
        ref_path = fetch_reference(hub["repo_id"], hub["revision"], ref_meta["files"], token=token,
                                   cache_dir=cache_dir, where=f"{meta_path}: ")
        verify_linked(ref_path, ref_meta["files"], meta_path)
    elif ref_meta["linked"]:
        if reference is None:
            raise ValueError(f"{meta_path}: the reference is linked, not stored in the scorer folder (it was saved "
                             f"from {ref_meta.get('path')!r}); a scorer folder never chooses a folder outside "
                             f"itself: pass it explicitly, from_pretrained(..., reference=DIR) or "
                             f"`--scorer {root} --reference DIR`; it is verified against the recorded hashes")
        ref_path = Path(reference).resolve()
        verify_linked(ref_path, ref_meta["files"], meta_path)
    else:
        if reference is not None:
            raise ValueError(f"{meta_path}: this scorer stores its own reference in {REFERENCE_DIR}/; "
                             f"do not pass reference={str(reference)!r}")
        ref_path = root / ref_meta["path"]
    pol_path = root / pol_meta["path"]
    base_path = root / pol_meta["base_path"] if pol_meta.get("base_path") else ref_path
    for field, path in (("policy.path", pol_path), ("policy.base_path", base_path), ("reference.path", ref_path)):
        if not path.is_dir():
            raise ScorerFileMissing(f"{meta_path}: field '{field}': {path} does not exist")
    kw = {"dtype": dtype, "device": device, "trust_remote_code": trust_remote_code}
    if pol_meta["kind"] == "peft_adapter":
        policy_model = load_causal_lm(pol_path, adapter_base=base_path, **kw)
        if ref_meta["kind"] != "adapter_base":
            reference_view = ModelView(load_causal_lm(ref_path, **kw))
        elif ref_meta.get("adapter_path"):
            policy_model.load_adapter(str(root / ref_meta["adapter_path"]), adapter_name="reference",
                                      is_trainable=False)
            reference_view = ModelView(policy_model, adapter="reference")
        else:
            reference_view = ModelView(policy_model, adapter="off")
    else:
        policy_model = load_causal_lm(pol_path, **kw)
        reference_view = ModelView(load_causal_lm(ref_path, **kw))
    tokenizer = load_tokenizer(root / POLICY_DIR, trust_remote_code=trust_remote_code)
    _check_template(tokenizer, meta.get("chat_template_sha256"), meta_path, "chat_template_sha256")
    ref_tok = None
    if meta.get("reference_tokenizer"):
        ref_tok = load_tokenizer(root / meta["reference_tokenizer"], trust_remote_code=trust_remote_code)
        _check_template(ref_tok, meta.get("reference_chat_template_sha256"), meta_path,
                        "reference_chat_template_sha256")
    return {"policy": ModelView(policy_model), "reference": reference_view, "tokenizer": tokenizer,
            "reference_tokenizer": ref_tok, "config": config, "provenance": meta.get("provenance"),
            "digest": meta["digest"]}


def _check_template(tokenizer, recorded, meta_path: Path, field: str) -> None:
    found = text_sha256(getattr(tokenizer, "chat_template", None))
    if found != recorded:
        raise ValueError(f"{meta_path}: field '{field}': the loaded tokenizer's chat template does not match the "
                         f"recorded hash (recorded {recorded}, found {found})")


def check_override_names(overrides: dict) -> None:
    """Keyword overrides must name config fields (an unknown name is an error, not a ``TypeError`` later)."""
    unknown = sorted(set(overrides) - set(SCORING_FIELDS))
    if unknown:
        raise ValueError(f"unknown scoring config field(s) {unknown} given as keyword overrides; known: "
                         f"{sorted(SCORING_FIELDS)}")


# ------------------------------------------------------------------------------------------- progadv_config.json
def read_meta(meta_path: Path) -> dict:
    """Parse and validate ``progadv_config.json``: versions, field types, paths, manifest and digest. Every problem
    is a ``ValueError`` naming the file and the field."""
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"{meta_path}: invalid JSON: {e}") from None
    if not isinstance(meta, dict):
        raise ValueError(f"{meta_path}: expected a JSON object, got {type(meta).__name__}")

    def fail(field: str, msg: str):
        raise ValueError(f"{meta_path}: field '{field}': {msg}")

    version = meta.get("config_version")
    if not isinstance(version, int) or isinstance(version, bool):
        fail("config_version", f"expected an integer, got {_show(version)}")
    if version > CONFIG_VERSION:
        fail("config_version", f"{version!r} is newer than this progadv-trl supports ({CONFIG_VERSION}); "
                               f"upgrade progadv-trl")
    fmt = meta.get("format_version")
    if fmt is None:
        fail("format_version", "missing: this folder was saved by an older progadv-trl, without a manifest of its "
                               "files, and cannot be verified; export it again with save_pretrained")
    if not isinstance(fmt, int) or isinstance(fmt, bool) or fmt < FORMAT_VERSION:
        fail("format_version", f"{fmt!r}: not a supported scorer format ({FORMAT_VERSION})")
    if fmt > HUB_LINK_FORMAT_VERSION:
        fail("format_version", f"{fmt} is newer than this progadv-trl supports ({HUB_LINK_FORMAT_VERSION}); "
                               f"upgrade progadv-trl")
    if not isinstance(meta.get("config"), dict):
        fail("config", f"expected an object of config fields, got {_show(meta.get('config'))}")

    def section(name: str, kinds: tuple[str, ...]) -> dict:
        value = meta.get(name)
        if not isinstance(value, dict):
            fail(name, f"expected an object, got {_show(value)}")
        if value.get("kind") not in kinds:
            fail(f"{name}.kind", f"expected {' or '.join(map(repr, kinds))}, got {_show(value.get('kind'))}")
        return value

    pol = section("policy", ("full", "peft_adapter"))
    _rel_path(pol.get("path"), POLICY_DIR, "policy.path", meta_path)
    if pol.get("base_path") is not None:
        if pol["kind"] != "peft_adapter":
            fail("policy.base_path", "only a 'peft_adapter' policy has a base of its own")
        if pol["base_path"] != POLICY_BASE_DIR:
            _rel_path(pol["base_path"], POLICY_BASE_DIR, "policy.base_path", meta_path)
            fail("policy.base_path", f"expected {POLICY_BASE_DIR!r}, got {_show(pol['base_path'])}")

    ref = section("reference", ("full", "adapter_base"))
    if ref["kind"] == "adapter_base" and pol["kind"] != "peft_adapter":
        fail("reference.kind", "'adapter_base' needs a PEFT adapter policy")
    if not isinstance(ref.get("linked"), bool):
        fail("reference.linked", f"expected true or false, got {_show(ref.get('linked'))}")
    if ref.get("hub") is not None:
        hub = ref["hub"]
        if not ref["linked"] or fmt < HUB_LINK_FORMAT_VERSION:
            fail("reference.hub", f"only a linked reference of format {HUB_LINK_FORMAT_VERSION} is recorded by Hub "
                                  f"repo id (reference.linked={ref['linked']!r}, format_version={fmt!r})")
        if not isinstance(hub, dict):
            fail("reference.hub", f"expected {{\"repo_id\", \"revision\"}}, got {_show(hub)}")
        if not is_repo_id(hub.get("repo_id"), namespaced=False):
            fail("reference.hub.repo_id", f"expected a Hub model id, got {_show(hub.get('repo_id'))}")
        if not is_commit(hub.get("revision")):
            fail("reference.hub.revision", f"expected a 40-hex commit hash (never a branch or tag, which move), "
                                           f"got {_show(hub.get('revision'))}")
    if ref["linked"]:
        if ref.get("hub") is None and not isinstance(ref.get("path"), str):
            fail("reference.path", f"expected a string, got {_show(ref.get('path'))}")
        lf = ref.get("files")
        if not isinstance(lf, dict) or not lf:
            fail("reference.files", f"expected an object of file hashes, got {_show(lf)}")
        for name, rec in lf.items():
            if not isinstance(name, str) or "/" in name or "\\" in name or name in ("", ".", ".."):
                fail("reference.files", f"{name!r} is not a plain file name")
            _check_record(rec, f"reference.files[{name!r}]", meta_path)
    else:
        if ref.get("path") != REFERENCE_DIR:
            _rel_path(ref.get("path"), REFERENCE_DIR, "reference.path", meta_path)
            fail("reference.path", f"expected {REFERENCE_DIR!r}, got {_show(ref.get('path'))}")
    if ref.get("adapter_path") is not None:
        if ref["kind"] != "adapter_base":
            fail("reference.adapter_path", "only an 'adapter_base' reference has an adapter")
        _rel_path(ref["adapter_path"], REFERENCE_ADAPTER_DIR, "reference.adapter_path", meta_path)
    rt = meta.get("reference_tokenizer")
    if rt is not None and rt != REFERENCE_TOKENIZER_DIR:
        _rel_path(rt, REFERENCE_TOKENIZER_DIR, "reference_tokenizer", meta_path)
        fail("reference_tokenizer", f"expected {REFERENCE_TOKENIZER_DIR!r} or null, got {_show(rt)}")
    for field in ("chat_template_sha256", "reference_chat_template_sha256"):
        value = meta.get(field)
        if value is not None and not (isinstance(value, str) and _HEX64.match(value)):
            fail(field, f"expected a SHA-256 hex string or null, got {_show(value)}")
    if meta.get("provenance") is not None and not isinstance(meta["provenance"], dict):
        fail("provenance", f"expected an object or null, got {_show(meta['provenance'])}")
    _check_manifest(meta.get("files"), meta_path)
    digest = meta.get("digest")
    if not (isinstance(digest, str) and _HEX64.match(digest)):
        fail("digest", f"expected a SHA-256 hex string, got {_show(digest)}")
    found = canonical_digest(meta)
    if found != digest:
        fail("digest", f"the file was edited after export (recorded {digest}, found {found}): its scoring config "
                       f"or manifest changed. Export again, or change settings with keyword overrides "
                       f"(from_pretrained(..., beta=...)) instead of editing the file")
    return meta


def _show(value) -> str:
    return "nothing (missing)" if value is None else f"{value!r} ({type(value).__name__})"


def _rel_path(value, first: str | tuple[str, ...], field: str, meta_path: Path, *, min_parts: int = 1) -> str:
    """A normalised relative posix path inside the scorer folder whose first component is (one of) ``first``."""
    firsts = (first,) if isinstance(first, str) else first
    if not isinstance(value, str) or not value:
        raise ValueError(f"{meta_path}: field '{field}': expected a relative path string, got {_show(value)}")
    parts = value.split("/")
    if "\\" in value or value.startswith("/") or re.match(r"^[A-Za-z]:", value) or ".." in parts:
        raise ValueError(f"{meta_path}: field '{field}': {value!r} escapes the scorer directory")
    if "." in parts or "" in parts or parts[0] not in firsts or len(parts) < min_parts:
        raise ValueError(f"{meta_path}: field '{field}': {value!r} is not a normalised path under "
                         f"{', '.join(f + '/' for f in firsts)}")
    return value


def _check_manifest(files, meta_path: Path) -> dict:
    if not isinstance(files, dict) or not files:
        raise ValueError(f"{meta_path}: field 'files': expected the manifest (an object mapping paths to "
                         f"hashes), got {_show(files)}")
    for rel, rec in files.items():
        _rel_path(rel, MODEL_DIRS, f"files[{rel!r}]", meta_path, min_parts=2)
        _check_record(rec, f"files[{rel!r}]", meta_path)
    return files


def _check_record(rec, field: str, meta_path: Path) -> None:
    if not (isinstance(rec, dict) and isinstance(rec.get("sha256"), str) and _HEX64.match(rec["sha256"])
            and isinstance(rec.get("size"), int) and not isinstance(rec.get("size"), bool) and rec["size"] >= 0):
        raise ValueError(f"{meta_path}: field '{field}': expected {{\"sha256\": <64 hex>, \"size\": <int>}}, "
                         f"got {_show(rec)}")


# ---------------------------------------------------------------------------------------------------- file checks
def _inside_real(path: Path, real_root: Path | tuple[Path, ...], meta_path: Path) -> None:
    real = Path(os.path.realpath(path))
    if not any(_within(real, r) for r in (real_root if isinstance(real_root, tuple) else (real_root,))):
        raise ValueError(f"{path}: is a symlink that leads outside the scorer folder (to {real}); refused "
                         f"(scorer {meta_path.parent})")


def verify_files(root: Path, files: dict, meta_path: Path, links_into: Path | None = None) -> None:
    """Every listed file present with its size and hash; nothing unlisted or leading outside in the model folders
    (outside both ``root`` and ``links_into``, when given)."""
    real_root = (root.resolve(),) + ((Path(links_into).resolve(),) if links_into is not None else ())
    walked: set[str] = set()
    for d in MODEL_DIRS:
        base = root / d
        if not os.path.lexists(base):
            continue
        _inside_real(base, real_root, meta_path)
        if not base.is_dir():
            raise ValueError(f"{base}: expected a folder (scorer {meta_path.parent})")
        visited: set[str] = set()
        for dirpath, dirnames, filenames in os.walk(base, followlinks=True):
            real_dir = os.path.realpath(dirpath)
            if real_dir in visited:  # a symlink loop
                raise ValueError(f"{dirpath}: a symlink loop in the scorer folder")
            visited.add(real_dir)
            for name in dirnames + filenames:
                _inside_real(Path(dirpath) / name, real_root, meta_path)
            for name in filenames:
                rel = (Path(dirpath) / name).relative_to(root).as_posix()
                if rel not in files:
                    raise ValueError(f"{Path(dirpath) / name}: unexpected file: it is not in the manifest of "
                                     f"{meta_path} (added after export?); remove it or export again")
                walked.add(rel)
    for rel, rec in files.items():
        path = root / rel
        if rel not in walked or not path.is_file():
            if not os.path.lexists(path):
                raise ScorerFileMissing(f"{path}: missing (listed in the manifest of {meta_path})")
            raise ValueError(f"{path}: not a regular file (listed in the manifest of {meta_path})")
        _verify_record(path, rec, f"the manifest of {meta_path}")


def _verify_record(path: Path, rec: dict, where: str) -> None:
    size = path.stat().st_size
    if size != rec["size"]:
        raise ValueError(f"{path}: size {size} does not match the recorded hash and size in {where} "
                         f"({rec['size']} bytes): the file changed since export")
    found = file_sha256(path)
    if found != rec["sha256"]:
        raise ValueError(f"{path}: SHA-256 does not match the recorded hash in {where} (recorded "
                         f"{rec['sha256']}, found {found}): the file changed since export")


def verify_linked(folder: Path, recorded: dict, meta_path: Path) -> None:
    """The caller's reference folder holds exactly the recorded score-relevant files, with their hashes."""
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: the reference folder passed for {meta_path} does not exist")
    if is_adapter_dir(folder):
        raise ValueError(f"{folder}: a linked reference must be a full model folder, not a PEFT adapter")
    present = {p.name for p in folder.iterdir()
               if p.is_file() and any(fnmatch.fnmatchcase(p.name, pat) for pat in LINKED_PATTERNS)}
    missing, extra = sorted(set(recorded) - present), sorted(present - set(recorded))
    if missing or extra:
        raise ValueError(f"{folder}: is not the reference recorded in {meta_path} (field 'reference.files'): "
                         + ", ".join(x for x in (missing and f"missing {_some(missing)}",
                                                 extra and f"unexpected {_some(extra)}") if x))
    for name, rec in sorted(recorded.items()):
        _verify_record(folder / name, rec, f"{meta_path} (field 'reference.files')")
