"""Model loading options (device_map, dtype, attn_implementation, revision, 4/8-bit quantization) reach
transformers' ``from_pretrained``, from the library and from the CLI; a QLoRA policy scores and exports its adapter."""

import importlib.util
import json
import math
import shutil

import pytest
import torch
from transformers import AutoModelForCausalLM

from progadv_trl import ProgressAdvantageScorer
from progadv_trl.cli import main
from progadv_trl.models import load_causal_lm

from conftest import cli_models, sample_trajectories


def _from_pretrained_calls(monkeypatch) -> list[dict]:
    """Record the keyword arguments of every ``AutoModelForCausalLM.from_pretrained`` call (the call still runs)."""
    calls, real = [], AutoModelForCausalLM.from_pretrained.__func__

    def spy(cls, *args, **kwargs):
        calls.append(kwargs)
        return real(cls, *args, **kwargs)

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", classmethod(spy))
    return calls


def test_attn_implementation_and_dtype_reach_both_models(tiny_dir):
    scorer = ProgressAdvantageScorer.from_models(tiny_dir / "policy", tiny_dir / "reference",
                                                 attn_implementation="eager", dtype=torch.bfloat16)
    for view in (scorer.policy, scorer.reference):
        assert view.model.config._attn_implementation == "eager"
        assert {p.dtype for p in view.model.parameters()} == {torch.bfloat16}
    assert all(math.isfinite(r.score) for r in scorer.score(sample_trajectories()))


def test_eager_attention_scores_like_the_default(tiny_dir):
    default = ProgressAdvantageScorer.from_models(tiny_dir / "policy", tiny_dir / "reference")
    eager = ProgressAdvantageScorer.from_models(tiny_dir / "policy", tiny_dir / "reference",
                                                attn_implementation="eager")
    assert default.policy.model.config._attn_implementation != "eager"
    a, b = default.score(sample_trajectories()), eager.score(sample_trajectories())
    assert [r.score for r in b] == pytest.approx([r.score for r in a], abs=1e-5)


def test_device_map_reaches_transformers_and_excludes_device(tiny_dir, monkeypatch):
    calls = _from_pretrained_calls(monkeypatch)
    model = load_causal_lm(tiny_dir / "policy", device_map={"": "cpu"})
    assert calls[-1]["device_map"] == {"": "cpu"} and next(model.parameters()).device.type == "cpu"
    with pytest.raises(ValueError, match="device .* or device_map .*, not both"):
        load_causal_lm(tiny_dir / "policy", device="cpu", device_map="cpu")


def test_revision_is_refused_for_a_local_folder(tiny_dir):
    with pytest.raises(ValueError, match=r"revision='v1'.*local folder, which has no revisions"):
        ProgressAdvantageScorer.from_models(tiny_dir / "policy", tiny_dir / "reference", revision="v1")
    with pytest.raises(ValueError, match=r"revision='v2'.*local folder"):
        ProgressAdvantageScorer.from_models(tiny_dir / "policy", tiny_dir / "reference", reference_revision="v2")


def _hub_cache(tmp_path, tiny_dir, monkeypatch):
    """A hub cache (offline) holding ``local/tiny`` at two revisions: ``main`` = the policy, ``v1`` = the
    reference."""
    import huggingface_hub.constants

    repo = tmp_path / "hub" / "models--local--tiny"
    for name, commit, src in (("main", "a" * 40, "policy"), ("v1", "b" * 40, "reference")):
        shutil.copytree(tiny_dir / src, repo / "snapshots" / commit)
        (repo / "refs").mkdir(parents=True, exist_ok=True)
        (repo / "refs" / name).write_text(commit)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))


def test_revision_selects_the_hub_revision(tiny_dir, tmp_path, monkeypatch):
    _hub_cache(tmp_path, tiny_dir, monkeypatch)
    expected = {name: AutoModelForCausalLM.from_pretrained(tiny_dir / name).state_dict()["model.norm.weight"]
                for name in ("policy", "reference")}
    scorer = ProgressAdvantageScorer.from_models("local/tiny", "local/tiny", reference_revision="v1")
    assert torch.equal(scorer.policy.model.state_dict()["model.norm.weight"], expected["policy"])
    assert torch.equal(scorer.reference.model.state_dict()["model.norm.weight"], expected["reference"])
    by_path = ProgressAdvantageScorer.from_models(tiny_dir / "policy", tiny_dir / "reference")
    assert ([r.score for r in scorer.score(sample_trajectories())]
            == pytest.approx([r.score for r in by_path.score(sample_trajectories())], abs=1e-6))


def test_cli_loading_flags_reach_transformers(tiny_dir, data, tmp_path, monkeypatch):
    calls = _from_pretrained_calls(monkeypatch)
    out = tmp_path / "out.jsonl"
    assert main(["score", *cli_models(tiny_dir), "--input", str(data), "--output", str(out),
                 "--attn-implementation", "eager", "--dtype", "bfloat16", "--device-map", "cpu"]) == 0
    assert len(calls) == 2  # policy and reference
    for kw in calls:
        assert kw["attn_implementation"] == "eager" and kw["dtype"] == torch.bfloat16 and kw["device_map"] == "cpu"
    assert len(out.read_text().splitlines()) == 4


def test_cli_refuses_loading_flags_that_cannot_apply(tiny_dir, data, tmp_path, capsys):
    base = ["score", *cli_models(tiny_dir), "--input", str(data)]
    assert main(base + ["--output", str(tmp_path / "a.jsonl"), "--device", "cpu", "--device-map", "cpu"]) == 2
    assert "either --device or --device-map" in capsys.readouterr().err
    assert main(base + ["--output", str(tmp_path / "b.jsonl"), "--revision", "v1"]) == 2
    assert "local folder, which has no revisions" in capsys.readouterr().err
    assert main(base + ["--output", str(tmp_path / "c.jsonl"), "--device-map", "{cpu"]) == 2
    assert "--device-map: not a JSON object" in capsys.readouterr().err
    scorer = ProgressAdvantageScorer.from_models(tiny_dir / "policy", tiny_dir / "reference")
    scorer.save_pretrained(tmp_path / "scorer")
    assert main(["score", "--scorer", str(tmp_path / "scorer"), "--input", str(data), "--output",
                 str(tmp_path / "d.jsonl"), "--attn-implementation", "eager", "--no-progress"]) == 2
    assert "a --scorer folder is loaded as it was saved" in capsys.readouterr().err
    assert not any((tmp_path / f"{x}.jsonl").exists() for x in "abcd")


def test_quantization_without_bitsandbytes_is_a_clear_error(tiny_dir, data, tmp_path, monkeypatch, capsys):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "bitsandbytes"
                        else real(name, *a))
    with pytest.raises(ValueError, match="needs the bitsandbytes package.*pip install bitsandbytes"):
        load_causal_lm(tiny_dir / "policy", quantization_config={"load_in_4bit": True})
    for flag in ("--load-in-4bit", "--load-in-8bit"):
        assert main(["score", *cli_models(tiny_dir), "--input", str(data), "--output", str(tmp_path / "o.jsonl"),
                     flag]) == 2
        assert f"{flag} needs the bitsandbytes package" in capsys.readouterr().err
    assert not (tmp_path / "o.jsonl").exists()


needs_bnb = pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None, reason="bitsandbytes not installed")


def _adapter(tiny_dir, path):
    """A LoRA adapter (non-zero) on the tiny reference, saved with the tokenizer."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoTokenizer

    base = AutoModelForCausalLM.from_pretrained(tiny_dir / "reference")
    torch.manual_seed(5)
    peft = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                                           init_lora_weights=False))
    peft.save_pretrained(path)
    AutoTokenizer.from_pretrained(tiny_dir / "policy").save_pretrained(path)
    assert json.loads((path / "adapter_config.json").read_text())["base_model_name_or_path"] == str(
        tiny_dir / "reference")
    return path


@needs_bnb
def test_qlora_policy_scores_and_exports_its_adapter_only(tiny_dir, tmp_path):
    import bitsandbytes as bnb

    adapter = _adapter(tiny_dir, tmp_path / "adapter")
    qlora = ProgressAdvantageScorer.from_models(adapter, None, quantization_config={"load_in_4bit": True})
    layers = [m for m in qlora.policy.model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(layers) == 2 * 7  # every linear layer of the two decoder layers is 4-bit (the LM head is not)
    assert qlora.reference.adapter == "off" and qlora.reference.model is qlora.policy.model
    scores = [r.score for r in qlora.score(sample_trajectories())]
    assert all(math.isfinite(s) for s in scores) and any(s != 0 for s in scores)
    full = ProgressAdvantageScorer.from_models(adapter, None)
    assert scores != pytest.approx([r.score for r in full.score(sample_trajectories())], abs=1e-6)  # it is 4-bit

    with pytest.raises(ValueError, match="quantized model .* reference='link'"):  # a copy of 4-bit weights: no
        qlora.save_pretrained(tmp_path / "copy")
    assert not (tmp_path / "copy").exists()
    export = qlora.save_pretrained(tmp_path / "export", reference="link")
    meta = json.loads((export / "progadv_config.json").read_text())
    assert meta["policy"]["kind"] == "peft_adapter" and "base_path" not in meta["policy"]
    assert meta["reference"] == {**meta["reference"], "kind": "adapter_base", "linked": True,
                                 "path": str((tiny_dir / "reference").resolve())}
    assert [p.name for p in export.iterdir() if p.is_dir()] == ["policy"]  # no reference/ nor policy_base/
    weights = [p.name for p in (export / "policy").iterdir() if p.suffix == ".safetensors"]
    assert weights == ["adapter_model.safetensors"]
    # the adapter kept is the one loaded: on the full-precision base it scores as the adapter folder does
    loaded = ProgressAdvantageScorer.from_pretrained(export, reference=tiny_dir / "reference")
    assert ([r.score for r in loaded.score(sample_trajectories())]
            == pytest.approx([r.score for r in full.score(sample_trajectories())], abs=1e-5))


@needs_bnb
def test_cli_load_in_4bit_is_recorded_and_checked_on_resume(tiny_dir, data, tmp_path, capsys):
    out = tmp_path / "out.jsonl"
    args = ["score", *cli_models(tiny_dir), "--input", str(data), "--output", str(out), "--load-in-4bit"]
    assert main(args) == 0
    sidecar = json.loads((tmp_path / "out.jsonl.progadv.json").read_text())
    assert sidecar["settings"]["run"]["quantization"] == "4bit"
    out.write_text("".join(out.read_text().splitlines(keepends=True)[:2]))
    assert main(args[:-1] + ["--resume"]) == 2  # the rest would be scored in full precision
    assert "run.quantization" in capsys.readouterr().err
    assert main(args + ["--resume"]) == 0
    assert len(out.read_text().splitlines()) == 4
