"""A reference chosen by the data: weight-space blends, earlier policies as references, the callback's choice."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from progadv_trl import ProgressAdvantageConfig, ProgressAdvantageScorer
from progadv_trl.cli import main
from progadv_trl.config import ConfigError
from progadv_trl.models import ModelView
from progadv_trl.monitor import ProgressAdvantageMonitor
from progadv_trl.persistence import CONFIG_NAME
from progadv_trl.reference_blend import blend_into_, blend_state_dicts, check_same_architecture, model_like
from progadv_trl.reference_candidates import ReferenceCandidates, candidate_metrics, parse_candidates, split_groups
from progadv_trl.sharding import UnsupportedSetupError

from conftest import cli_models, many_trajectories, sample_trajectories


def load(path, dtype=None):
    return AutoModelForCausalLM.from_pretrained(path, **({"dtype": dtype} if dtype else {})).eval()


def scores(scorer, trajs):
    return [r.score for r in scorer.score(trajs)]


# ---------------------------------------------------------------------------------------------------- the blend
@pytest.mark.parametrize("alpha", [-1.0, 0.5, 2.0])
def test_blend_math_by_hand(tiny_dir, alpha):
    ref, pol = load(tiny_dir / "reference").state_dict(), load(tiny_dir / "policy").state_dict()
    out = blend_state_dicts(ref, pol, alpha)
    assert set(out) == set(ref)
    name = "model.layers.0.self_attn.q_proj.weight"
    for i, j in ((0, 0), (3, 7), (63, 5)):
        r, p = ref[name][i, j].item(), pol[name][i, j].item()
        assert out[name][i, j].item() == pytest.approx(r + alpha * (p - r), rel=1e-6, abs=1e-7)
    # the model blended in place holds the same numbers, tied head included
    model = load(tiny_dir / "reference")
    blend_into_(model, model, load(tiny_dir / "policy"), alpha)
    assert all(torch.equal(out[k], v) for k, v in model.state_dict().items())
    assert model.lm_head.weight is model.model.embed_tokens.weight


def test_blend_keeps_dtype_and_computes_in_float32():
    r = torch.tensor([1.0, 256.0], dtype=torch.bfloat16)
    p = torch.tensor([1.0078125, 258.0], dtype=torch.bfloat16)
    out = blend_state_dicts({"w": r}, {"w": p}, 0.5)["w"]
    assert out.dtype == torch.bfloat16
    expected = (r.float() + 0.5 * (p.float() - r.float())).to(torch.bfloat16)
    assert torch.equal(out, expected)


def test_blend_refuses_alpha_one_and_other_architectures(tiny_dir):
    ref = load(tiny_dir / "reference").state_dict()
    with pytest.raises(ValueError, match="policy itself"):
        blend_state_dicts(ref, ref, 1.0)
    llama = load(tiny_dir / "llama_ref").state_dict()
    # the tied qwen2 state dict has biases llama lacks: the first missing one is named
    first_missing = next(k for k in ref if k not in llama)
    with pytest.raises(ValueError, match=f"no parameter '{first_missing}'"):
        blend_state_dicts(ref, llama, 0.5)
    wider = dict(ref)
    wider["model.norm.weight"] = torch.ones(65)
    with pytest.raises(ValueError, match=r"'model.norm.weight' has shape \(64,\) in the reference and \(65,\)"):
        check_same_architecture(ref.items(), wider.items())


def test_model_like_copies_weights_and_buffers(tiny_dir, trajectories):
    ref = load(tiny_dir / "reference")
    copy = model_like(ref)
    assert copy is not ref and all(torch.equal(a, b) for a, b in zip(ref.state_dict().values(),
                                                                       copy.state_dict().values()))
    assert all(torch.equal(a, b) for a, b in zip(ref.buffers(), copy.buffers()))
    assert copy.lm_head.weight is copy.model.embed_tokens.weight  # tied as in the model it copies
    policy = ModelView(load(tiny_dir / "policy"))
    tok = ProgressAdvantageScorer.from_models(tiny_dir / "policy", tiny_dir / "reference").tokenizer
    assert scores(ProgressAdvantageScorer(policy, ModelView(copy), tok), trajectories) == \
        scores(ProgressAdvantageScorer(policy, ModelView(ref), tok), trajectories)


# ------------------------------------------------------------------------------------------ scorer and the CLI
@pytest.fixture(scope="module")
def blended_dir(tiny_dir, tmp_path_factory):
    """The reference blended with the policy at alpha=-1 by hand, saved as a checkpoint."""
    path = tmp_path_factory.mktemp("blend") / "alpha-neg1"
    ref, pol = load(tiny_dir / "reference"), load(tiny_dir / "policy")
    ref.load_state_dict(blend_state_dicts(ref.state_dict(), pol.state_dict(), -1.0))
    ref.save_pretrained(path)
    return path


def test_from_models_reference_alpha_equals_a_blended_checkpoint(tiny_dir, blended_dir, trajectories, tmp_path):
    by_hand = ProgressAdvantageScorer.from_models(tiny_dir / "policy", blended_dir, beta=0.1)
    blended = ProgressAdvantageScorer.from_models(tiny_dir / "policy", tiny_dir / "reference", beta=0.1,
                                                  reference_alpha=-1)
    expected = scores(by_hand, trajectories)
    assert scores(blended, trajectories) == pytest.approx(expected, abs=1e-6)
    assert scores(blended, trajectories) != pytest.approx(
        scores(ProgressAdvantageScorer.from_models(tiny_dir / "policy", tiny_dir / "reference", beta=0.1),
               trajectories), abs=1e-3)
    assert blended.provenance["reference_alpha"] == -1.0
    assert blended.provenance["reference"] == str(tiny_dir / "reference")
    assert blended.provenance["policy"] == str(tiny_dir / "policy")
    # a loaded reference model is copied, never changed
    ref_model = load(tiny_dir / "reference")
    before = {k: v.clone() for k, v in ref_model.state_dict().items()}
    from_module = ProgressAdvantageScorer.from_models(tiny_dir / "policy", ref_model, beta=0.1, reference_alpha=-1)
    assert scores(from_module, trajectories) == pytest.approx(expected, abs=1e-6)
    assert all(torch.equal(before[k], v) for k, v in ref_model.state_dict().items())
    # saved: the blend is stored, with its provenance; reloaded it scores the same
    with pytest.raises(ValueError, match="reference='link': the reference is a weight-space blend"):
        blended.save_pretrained(tmp_path / "linked", reference="link")
    blended.save_pretrained(tmp_path / "scorer")
    meta = json.loads((tmp_path / "scorer" / CONFIG_NAME).read_text())
    assert meta["provenance"]["reference_alpha"] == -1.0 and meta["reference"]["linked"] is False
    assert meta["provenance"]["reference"] == str(tiny_dir / "reference")
    reloaded = ProgressAdvantageScorer.from_pretrained(tmp_path / "scorer")
    assert scores(reloaded, trajectories) == scores(blended, trajectories)
    assert reloaded.provenance["reference_alpha"] == -1.0
    card = (tmp_path / "scorer" / "README.md").read_text()  # the card says what the scoring reference is
    assert "weight-space blend `theta_ref + a * (theta - theta_ref)` with a = -1" in card


def test_from_models_refuses_alpha_one_and_no_reference(tiny_dir):
    with pytest.raises(ValueError, match="policy itself"):
        ProgressAdvantageScorer.from_models(tiny_dir / "policy", tiny_dir / "reference", reference_alpha=1)
    with pytest.raises(ValueError, match="needs a reference"):
        ProgressAdvantageScorer.from_models(tiny_dir / "policy", None, reference_alpha=0.5)


def test_cli_reference_alpha(tiny_dir, blended_dir, data, tmp_path, capsys):
    out, ref_out = tmp_path / "alpha.jsonl", tmp_path / "hand.jsonl"
    assert main(["score", *cli_models(tiny_dir), "--reference-alpha", "-1", "--input", str(data),
                 "--output", str(out)]) == 0
    assert main(["score", "--policy", str(tiny_dir / "policy"), "--reference", str(blended_dir), "--no-progress",
                 "--input", str(data), "--output", str(ref_out)]) == 0
    got = [json.loads(x)["score"] for x in out.read_text().splitlines()]
    assert got == pytest.approx([json.loads(x)["score"] for x in ref_out.read_text().splitlines()], abs=1e-6)
    # the blend is part of what --resume compares
    assert main(["score", *cli_models(tiny_dir), "--reference-alpha", "0.5", "--input", str(data),
                 "--output", str(out), "--resume"]) == 2
    assert "reference_alpha" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["evaluate", *cli_models(tiny_dir), "--reference-alpha", "1", "--input", str(data)])
    assert e.value.code == 2 and "policy itself" in capsys.readouterr().err
    assert main(["evaluate", "--scorer", str(tmp_path), "--reference-alpha", "0.5", "--input", str(data)]) == 2
    assert "--reference-alpha" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------- candidates, config
def test_candidate_names_and_config_errors():
    names = [c.name for c in parse_candidates(["previous:2", "alpha:-1", "alpha:0.5", "alpha:-0.25"])]
    assert names == ["initial", "previous_2", "alpha_neg1", "alpha_0p5", "alpha_neg0p25"]
    for bad, words in ((["alpha:1"], "policy itself"), (["alpha:0"], "always compared as 'initial'"),
                       (["previous:0"], "k >= 1"), (["alpha:0.5", "alpha:.5"], "given twice"), (["best"], "expected")):
        with pytest.raises(ConfigError, match="field 'reference_candidates'") as e:
            ProgressAdvantageConfig(heldout=[], reference_candidates=bad)
        assert words in str(e.value)
    with pytest.raises(ConfigError, match="field 'validation_fraction'"):
        ProgressAdvantageConfig(validation_fraction=1.0)


def test_split_keeps_groups_whole_and_is_deterministic():
    trajs = many_trajectories(40)
    for i, t in enumerate(trajs):
        t.group = f"g{i // 4}"
    val, test = split_groups(trajs, 0.5)
    assert sorted(val + test) == list(range(40)) and len(val) == len(test) == 20
    assert not {trajs[i].group for i in val} & {trajs[i].group for i in test}
    assert split_groups(list(reversed(trajs)), 0.5)[0] == sorted(39 - i for i in val)
    assert len(split_groups(trajs, 0.3)[0]) == 12  # round(0.3 * 10) groups of 4


def test_monitor_candidates_match_scoring_by_hand(tiny_dir, tmp_path):
    """previous:1 at the second evaluation is the first evaluation's policy; alpha:a is the blend with the current
    one; 'initial' is the run's metrics split the same way."""
    trajs = many_trajectories(16)
    for i, t in enumerate(trajs):
        t.group = f"g{i // 2}"
    ref = load(tiny_dir / "reference")
    first, second = load(tiny_dir / "policy"), load(tiny_dir / "policy")
    with torch.no_grad():
        for p in second.parameters():
            p.mul_(1.1)
    cfg = ProgressAdvantageConfig(reference_candidates=["previous:1", "alpha:-1"], log_baselines=False, beta=0.1)
    tok = ProgressAdvantageScorer.from_models(tiny_dir / "policy", tiny_dir / "reference").tokenizer
    monitor = ProgressAdvantageMonitor(ref, tok, cfg, tmp_path, heldout=trajs)
    m0 = monitor.evaluate(first, 0)
    assert "progadv/reference/previous_1/val/auroc" not in m0 and "progadv/reference/alpha_neg1/val/auroc" in m0
    m1 = monitor.evaluate(second, 1)
    val, test = split_groups(trajs, 0.5)
    expected, by_hand = {}, {}
    blend = load(tiny_dir / "reference")
    blend_into_(blend, blend, second, -1.0)
    for name, reference in (("initial", ref), ("previous_1", load(tiny_dir / "policy")), ("alpha_neg1", blend)):
        by_hand[name] = ProgressAdvantageScorer(ModelView(second), ModelView(reference), tok, None, cfg).score(trajs)
        expected.update(candidate_metrics(name, by_hand[name], val, test, cfg))
    for key, value in expected.items():
        assert m1[key] == pytest.approx(value, nan_ok=True), key
    values = {n: m1[f"progadv/reference/{n}/val/auroc"] for n in ("initial", "previous_1", "alpha_neg1")}
    assert m1["progadv/reference/chosen"] == max(values, key=lambda n: (values[n], -list(values).index(n)))
    history = [json.loads(x) for x in (tmp_path / "progadv-history.jsonl").read_text().splitlines()]
    assert history[-1]["progadv/reference/chosen"] == m1["progadv/reference/chosen"]
    # every candidate exports as the pair it scored as
    for cand in monitor.candidates.candidates:
        # (the monitor now keeps the second policy too: the first is passed as that evaluation's previous_1)
        previous = (0, dict(first.named_parameters())) if cand.kind == "previous" else None
        monitor.export(second, tmp_path / cand.name, step=1, beta=0.1, _candidate=(cand, previous))
        exported = ProgressAdvantageScorer.from_pretrained(tmp_path / cand.name)
        assert exported.provenance["reference_candidate"] == cand.name
        assert [r.score for r in exported.score(trajs)] == pytest.approx([r.score for r in by_hand[cand.name]],
                                                                         abs=1e-5)
        card = (tmp_path / cand.name / "README.md").read_text()
        if cand.kind == "previous":
            assert exported.provenance["reference_step"] == 0 and exported.provenance["reference_previous"] == 1
            assert "scored against the policy 1 evaluation(s) earlier, at training step 0" in card
        if cand.kind == "alpha":
            assert exported.provenance["reference_alpha"] == -1.0
            assert "with a = -1 of that reference and the policy" in card
        if cand.kind == "initial":
            assert "scored against that reference itself" in card
        assert f"candidate `{cand.name}` chosen among `initial`, `previous:1`, `alpha:-1`" in card
    # memory: one reused model, one earlier policy on CPU
    size = sum(p.numel() * p.element_size() for p in ref.parameters())
    assert monitor.candidates.previous_bytes == size and len(monitor.candidates._previous) == 1
    assert monitor.candidates.buffer_bytes >= size


def test_default_config_computes_nothing_extra(tiny_dir, tmp_path, monkeypatch):
    import progadv_trl.monitor as monitor_module

    ref = load(tiny_dir / "reference")
    tok = ProgressAdvantageScorer.from_models(tiny_dir / "policy", tiny_dir / "reference").tokenizer
    monitor = ProgressAdvantageMonitor(ref, tok, ProgressAdvantageConfig(log_baselines=False), tmp_path,
                                       heldout=sample_trajectories())
    built = []
    monkeypatch.setattr(monitor_module, "split_groups", lambda *a: built.append(a))
    metrics = monitor.evaluate(load(tiny_dir / "policy"), 0)
    assert monitor.candidates is None and not built
    assert not any(k.startswith("progadv/reference/") for k in metrics)


def test_sharded_or_peft_models_are_refused(tiny_dir):
    from peft import LoraConfig, get_peft_model

    cands = ReferenceCandidates(["alpha:0.5"])
    ref = load(tiny_dir / "reference")
    sharded = load(tiny_dir / "policy")
    next(sharded.parameters()).ds_id = 0  # what DeepSpeed ZeRO-3 marks a partitioned parameter with
    with pytest.raises(UnsupportedSetupError, match="reference_candidates is not supported with zero3"):
        cands.check(sharded, ModelView(ref))
    peft = get_peft_model(load(tiny_dir / "policy"), LoraConfig(r=2, target_modules=["q_proj"]))
    with pytest.raises(UnsupportedSetupError, match="reference_candidates needs full"):
        cands.check(peft, ModelView(peft, adapter="off"))


# ---------------------------------------------------------------------------------------------- a real GRPO run
@pytest.mark.slow
def test_callback_in_a_grpo_run_logs_candidates_and_exports_the_chosen_pair(tmp_path):
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    from progadv_trl.callback import ProgressAdvantageCallback
    from progadv_trl.tiny import build_model, build_tokenizer

    base = tmp_path / "base"
    build_model(build_tokenizer(), base, seed=0)
    dataset = Dataset.from_list([{"prompt": [{"role": "user", "content": f"What is {i} + {i}?"}]} for i in range(32)])
    args = GRPOConfig(output_dir=str(tmp_path / "out"), per_device_train_batch_size=4, num_generations=4,
                      max_completion_length=8, max_steps=4, logging_steps=2, use_cpu=True, bf16=False,
                      report_to="none", save_strategy="no", learning_rate=5e-3, seed=0, temperature=0.9, beta=0.04)
    trainer = GRPOTrainer(model=str(base), reward_funcs=lambda completions, **kw: [
        float(len(c[0]["content"]) % 2 == 0) for c in completions], args=args, train_dataset=dataset)
    heldout = many_trajectories(16)
    for i, t in enumerate(heldout):
        t.group = f"g{i // 2}"
    cb = ProgressAdvantageCallback(trainer=trainer, config=ProgressAdvantageConfig(
        heldout=heldout, reference_candidates=["previous:1", "alpha:-1", "alpha:0.5"], log_baselines=False))
    trainer.add_callback(cb)
    trainer.train()
    out = tmp_path / "out"
    rows = [r for r in trainer.state.log_history if "progadv/auroc" in r]
    assert [r["step"] for r in rows] == [0, 2, 4]
    for name in ("initial", "previous_1", "alpha_neg1", "alpha_0p5"):
        assert all(f"progadv/reference/{name}/val/auroc" in r and f"progadv/reference/{name}/test/auroc" in r
                   for r in rows[1:])
    history = [json.loads(x) for x in (out / "progadv-history.jsonl").read_text().splitlines()]
    # at train begin the policy is the reference: every candidate's scores tie (no signal: null), none is earlier
    assert history[0]["progadv/reference/alpha_neg1/val/auroc"] is None
    assert "progadv/reference/previous_1/val/auroc" not in history[0]
    chosen = history[-1]["progadv/reference/chosen"]
    assert chosen in ("initial", "previous_1", "alpha_neg1", "alpha_0p5")
    assert all(r["progadv/reference/chosen_index"] in (0, 1, 2, 3) for r in rows)
    # the final export holds the chosen pair, and says which
    meta = json.loads((out / "_progadv" / "scorer" / CONFIG_NAME).read_text())
    prov = meta["provenance"]
    assert prov["reference_candidate"] == chosen and prov["step"] == 4
    assert prov["reference_choice"]["val"] == history[-1][f"progadv/reference/{chosen}/val/auroc"]
    exported = ProgressAdvantageScorer.from_pretrained(out / "_progadv" / "scorer")
    policy, initial = exported.policy.model.state_dict(), trainer.ref_model.state_dict()
    expected = {"initial": initial, "alpha_neg1": None, "alpha_0p5": None}.get(chosen, "previous")
    if chosen.startswith("alpha"):
        expected = blend_state_dicts(initial, policy, prov["reference_alpha"])
    if chosen == "previous_1":
        assert prov["reference_step"] == 2
    else:
        assert all(torch.allclose(v, expected[k].cpu()) for k, v in exported.reference.model.state_dict().items())
    assert (out / "_progadv" / "scorer-best" / CONFIG_NAME).exists()
    best = json.loads((out / "_progadv" / "scorer-best" / CONFIG_NAME).read_text())["provenance"]
    assert best["reference_candidate"] in ("initial", "previous_1", "alpha_neg1", "alpha_0p5")
