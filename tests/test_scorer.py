"""The scorer end to end on tiny local checkpoints, against a naive full-logits computation in float64."""

import math
import shutil

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from progadv_trl import ProgressAdvantageConfig, ProgressAdvantageScorer
from progadv_trl.advantage import token_aggregate, trajectory_aggregate
from progadv_trl.data import Message, Trajectory
from progadv_trl.tiny import build_model, build_tokenizer

from conftest import sample_trajectories


def naive_logprobs(model_dir, ids, temperature=1.0):
    """log p(ids[t] | ids[<t]) for t >= 1, from full logits in float64; entropy and full distributions too."""
    model = AutoModelForCausalLM.from_pretrained(model_dir).double().eval()
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0, :-1] / temperature
    logp = torch.log_softmax(logits, -1)
    return logp.gather(-1, torch.tensor(ids[1:])[:, None]).squeeze(-1), logp


@pytest.fixture(scope="module")
def scorer(tiny_dir):
    return ProgressAdvantageScorer.from_models(tiny_dir / "policy", tiny_dir / "reference", baselines=["all"])


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_details_match_naive_logprobs_and_aggregation(tiny_dir, temperature):
    scorer = ProgressAdvantageScorer.from_models(tiny_dir / "policy", tiny_dir / "reference",
                                                 temperature=temperature, beta=0.5, token_agg="mean")
    for res in scorer.score(sample_trajectories(), details=True):
        ids = res.tokens["input_ids"]
        lp, _ = naive_logprobs(tiny_dir / "policy", ids, temperature)
        lr, _ = naive_logprobs(tiny_dir / "reference", ids, temperature)
        got_p, got_r = res.tokens["policy_logprob"], res.tokens["reference_logprob"]
        assert got_p[0] is None and got_r[0] is None
        assert max(abs(a - b) for a, b in zip(got_p[1:], lp.tolist())) < 1e-4
        assert max(abs(a - b) for a, b in zip(got_r[1:], lr.tolist())) < 1e-4
        step = torch.tensor(res.tokens["step_index"][1:])
        expect = 0.5 * token_aggregate(lp - lr, step, len(res.steps), "mean")
        assert torch.allclose(torch.tensor([s.advantage for s in res.steps], dtype=torch.float64), expect, atol=1e-5)
        assert res.score == pytest.approx(trajectory_aggregate(expect, "mean"), abs=1e-5)


def test_baselines_match_naive(tiny_dir, scorer):
    res = scorer.score(sample_trajectories(), details=True)[0]
    ids, step = res.tokens["input_ids"], torch.tensor(res.tokens["step_index"][1:])
    _, logp = naive_logprobs(tiny_dir / "policy", ids)
    act = step >= 0
    p = logp.exp()
    V = logp.shape[-1]
    sc = (-(logp).mean(-1) - math.log(V))[act].mean()  # KL(U || p)
    top = logp.topk(20, -1).values
    conf = (-top.mean(-1))[act]
    ent = (-(p * logp).sum(-1))[act].mean()
    assert res.baselines["self_certainty"] == pytest.approx(sc.item(), abs=1e-4)
    assert res.baselines["deepconf_mean"] == pytest.approx(conf.mean().item(), abs=1e-4)
    assert res.baselines["deepconf_lowest"] == pytest.approx(conf.mean().item(), abs=1e-4)  # one window < 2048
    assert res.baselines["neg_entropy"] == pytest.approx(-ent.item(), abs=1e-4)
    lp = logp.gather(-1, torch.tensor(ids[1:])[:, None]).squeeze(-1)
    assert res.baselines["policy_logprob"] == pytest.approx(lp[act].mean().item(), abs=1e-4)


def test_policy_equal_reference_gives_zero(tiny_dir):
    scorer = ProgressAdvantageScorer.from_models(tiny_dir / "reference", tiny_dir / "reference")
    for res in scorer.score(sample_trajectories()):
        assert res.score == 0.0 and all(s.advantage == 0.0 for s in res.steps)


def test_invariant_to_batch_size_and_order(tiny_dir):
    trajs = sample_trajectories()
    a = ProgressAdvantageScorer.from_models(tiny_dir / "policy", tiny_dir / "reference", batch_size=1).score(trajs)
    b = ProgressAdvantageScorer.from_models(tiny_dir / "policy", tiny_dir / "reference", batch_size=4)
    b = {r.id: r for r in b.score(trajs[::-1])}
    for r in a:
        assert b[r.id].score == pytest.approx(r.score, abs=1e-5)
        assert [s.advantage for s in b[r.id].steps] == pytest.approx([s.advantage for s in r.steps], abs=1e-5)


def test_untied_llama_head(tiny_dir):
    scorer = ProgressAdvantageScorer.from_models(tiny_dir / "llama_policy", tiny_dir / "llama_ref")
    res = scorer.score(sample_trajectories()[:1], details=True)[0]
    lp, _ = naive_logprobs(tiny_dir / "llama_policy", res.tokens["input_ids"])
    assert max(abs(a - b) for a, b in zip(res.tokens["policy_logprob"][1:], lp.tolist())) < 1e-4


def test_save_and_load_round_trip(tiny_dir, scorer, tmp_path):
    trajs = sample_trajectories()
    before = scorer.score(trajs)
    scorer.save_pretrained(tmp_path / "s")
    loaded = ProgressAdvantageScorer.from_pretrained(tmp_path / "s")
    after = loaded.score(trajs)
    assert [r.score for r in after] == pytest.approx([r.score for r in before], abs=1e-6)
    assert loaded.config == scorer.config
    # a second save replaces the first atomically and leaves no temporary folders behind
    scorer.save_pretrained(tmp_path / "s")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s"]


def test_linked_reference_hash_is_verified(tiny_dir, tmp_path):
    import shutil

    ref = tmp_path / "ref"
    shutil.copytree(tiny_dir / "reference", ref)
    scorer = ProgressAdvantageScorer.from_models(tiny_dir / "policy", ref)
    scorer.save_pretrained(tmp_path / "s", reference="link")
    assert not (tmp_path / "s" / "reference").exists()
    with pytest.raises(ValueError, match="pass it explicitly"):  # the folder never picks a path by itself
        ProgressAdvantageScorer.from_pretrained(tmp_path / "s")
    ProgressAdvantageScorer.from_pretrained(tmp_path / "s", reference=ref)
    other = AutoModelForCausalLM.from_pretrained(tiny_dir / "policy")
    other.save_pretrained(ref)
    with pytest.raises(ValueError, match="does not match the recorded hash"):
        ProgressAdvantageScorer.from_pretrained(tmp_path / "s", reference=ref)


def test_peft_adapter_policy_uses_its_base_as_reference(tiny_dir, tmp_path):
    from peft import LoraConfig, get_peft_model

    base = AutoModelForCausalLM.from_pretrained(tiny_dir / "reference")
    peft_model = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    peft_model.save_pretrained(tmp_path / "adapter")
    trajs = sample_trajectories()
    s1 = ProgressAdvantageScorer.from_models(tmp_path / "adapter")  # reference = base, adapters off
    assert s1.reference.adapter == "off"
    merged = AutoModelForCausalLM.from_pretrained(tiny_dir / "reference")
    merged = get_peft_model(merged, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    merged.load_adapter(str(tmp_path / "adapter"), adapter_name="trained")
    merged.set_adapter("trained")
    merged = merged.merge_and_unload()
    s2 = ProgressAdvantageScorer.from_models(merged, tiny_dir / "reference",
                                             tokenizer=AutoTokenizer.from_pretrained(tiny_dir / "reference"))
    a, b = s1.score(trajs), s2.score(trajs)
    assert [r.score for r in a] == pytest.approx([r.score for r in b], abs=1e-4)
    assert any(abs(r.score) > 1e-3 for r in a)
    # export keeps the adapter and one copy of the base, and round-trips
    s1.save_pretrained(tmp_path / "exp")
    assert (tmp_path / "exp" / "policy" / "adapter_config.json").exists()
    loaded = ProgressAdvantageScorer.from_pretrained(tmp_path / "exp")
    assert [r.score for r in loaded.score(trajs)] == pytest.approx([r.score for r in a], abs=1e-5)


def test_different_tokenizers(tiny_dir, tmp_path):
    tok_b = build_tokenizer(vocab_size=400)
    build_model(tok_b, tmp_path / "ref_b", seed=5)
    scorer = ProgressAdvantageScorer.from_models(tiny_dir / "policy", tmp_path / "ref_b", token_agg="sum")
    assert scorer.reference_tokenizer is not None
    res = scorer.score(sample_trajectories(), details=True)
    for r in res:
        ids_r = r.tokens["reference_input_ids"]
        lr, _ = naive_logprobs(tmp_path / "ref_b", ids_r)
        lp, _ = naive_logprobs(tiny_dir / "policy", r.tokens["input_ids"])
        sp, sr = torch.tensor(r.tokens["step_index"][1:]), torch.tensor(r.tokens["reference_step_index"][1:])
        expect = token_aggregate(lp, sp, len(r.steps), "sum") - token_aggregate(lr, sr, len(r.steps), "sum")
        assert [s.advantage for s in r.steps] == pytest.approx(expect.tolist(), abs=1e-4)


def test_vocab_mismatch_with_shared_tokenizer_is_an_error(tiny_dir, tmp_path):
    tok = AutoTokenizer.from_pretrained(tiny_dir / "reference")
    bigger = build_model(tok, seed=7)
    bigger.resize_token_embeddings(len(tok) + 16)
    with pytest.raises(ValueError, match="vocabulary size"):
        ProgressAdvantageScorer.from_models(tiny_dir / "policy", bigger, tokenizer=tok, reference_tokenizer=tok)


def test_authors_compat_aggregates_each_model_then_subtracts(tiny_dir):
    cfg = ProgressAdvantageConfig(compat="authors", token_agg="min")
    scorer = ProgressAdvantageScorer.from_models(tiny_dir / "policy", tiny_dir / "reference", config=cfg)
    assert scorer.config.rendering == "plain"
    res = scorer.score(sample_trajectories()[:1], details=True)[0]
    lp = torch.tensor(res.tokens["policy_logprob"][1:], dtype=torch.float64)
    lr = torch.tensor(res.tokens["reference_logprob"][1:], dtype=torch.float64)
    step = torch.tensor(res.tokens["step_index"][1:])
    expect = token_aggregate(lp, step, 2, "min") - token_aggregate(lr, step, 2, "min")
    assert [s.advantage for s in res.steps] == pytest.approx(expect.tolist(), abs=1e-5)
    assert cfg.token_agg == "min" and ProgressAdvantageConfig(compat="authors").token_agg == "mean"


def test_truncated_steps_count_as_zero_and_are_recorded(tiny_dir):
    scorer = ProgressAdvantageScorer.from_models(tiny_dir / "policy", tiny_dir / "reference", max_length=12)
    res = scorer.score(sample_trajectories()[:1])[0]
    assert res.truncated["tokens_cut"] > 0
    assert res.steps[0].n_tokens == 0 and res.steps[0].advantage == 0.0


def test_uses_and_evaluation(scorer):
    trajs = sample_trajectories()
    results = scorer.score(trajs)
    chosen = scorer.best_of_n(results)
    assert set(chosen) == {"g1", "g2"}
    preds = scorer.attribute(results)
    assert all(p in t.steps for p, t in zip(preds, trajs))
    table = scorer.evaluate(results)
    assert set(table) >= {"progress_advantage", "self_certainty", "deepconf_mean", "random"}
    assert table["progress_advantage"]["n_success_labelled"] == 4
    assert table["progress_advantage"]["n_attribution_labelled"] == 2


def test_step_separator_parts(tiny_dir):
    scorer = ProgressAdvantageScorer.from_models(tiny_dir / "policy", tiny_dir / "reference", step_separator="\n\n")
    res = scorer.score(sample_trajectories()[3:])[0]
    assert [(s.message_index, s.part) for s in res.steps] == [(1, 0), (1, 1)]
    assert res.action_values["progress_advantage"][0] == pytest.approx(sum(s.advantage for s in res.steps))


def test_bf16_models_score_close_to_fp32(tiny_dir):
    trajs = sample_trajectories()
    a = ProgressAdvantageScorer.from_models(tiny_dir / "policy", tiny_dir / "reference").score(trajs)
    b = ProgressAdvantageScorer.from_models(tiny_dir / "policy", tiny_dir / "reference",
                                            dtype=torch.bfloat16).score(trajs)
    for x, y in zip(a, b):
        assert math.isfinite(y.score) and abs(x.score - y.score) < 0.1


def test_shared_prefix_encoding_matches_full_forwards(tiny_dir):
    from progadv_trl.models import ModelView
    from progadv_trl.rendering import TrajectoryTokenizer
    from progadv_trl.token_statistics import compute_token_stats

    prompt = "Book the cheapest flight from Paris to Rome on Monday for two people. " * 4
    trajs = [Trajectory([Message("user", prompt), Message("assistant", f"I will search for flights {k}."),
                         Message("tool", "three flights found"), Message("assistant", "The cheapest costs 95.")],
                        id=str(k)) for k in range(5)]
    tok = AutoTokenizer.from_pretrained(tiny_dir / "policy")
    toks = [TrajectoryTokenizer(tok)(t) for t in trajs]
    pol = ModelView(AutoModelForCausalLM.from_pretrained(tiny_dir / "policy"))
    ref = ModelView(AutoModelForCausalLM.from_pretrained(tiny_dir / "reference"))
    a = compute_token_stats(pol, ref, toks, batch_size=4, share_prefix=True, all_positions=True)
    b = compute_token_stats(pol, ref, toks, batch_size=4, share_prefix=False, all_positions=True)
    for x, y in zip(a, b):
        for key in ("logprob", "ref_logprob", "kl"):
            assert torch.allclose(x[key], y[key], atol=1e-5, equal_nan=True), key


def test_adapter_trained_on_another_base_than_the_reference_round_trips(tiny_dir, tmp_path):
    """A LoRA policy on base A scored against a different reference B: the export keeps base A (it used to load the
    adapter onto B's weights and score a different policy, without an error)."""
    from peft import LoraConfig, get_peft_model

    base_a = AutoModelForCausalLM.from_pretrained(tiny_dir / "policy")
    policy = get_peft_model(base_a, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    tok = AutoTokenizer.from_pretrained(tiny_dir / "policy")
    scorer = ProgressAdvantageScorer.from_models(policy, tiny_dir / "reference", tokenizer=tok)
    trajs = sample_trajectories()
    before = [r.score for r in scorer.score(trajs)]
    scorer.save_pretrained(tmp_path / "exp")
    assert (tmp_path / "exp" / "policy_base" / "config.json").exists()
    loaded = ProgressAdvantageScorer.from_pretrained(tmp_path / "exp")
    assert [r.score for r in loaded.score(trajs)] == pytest.approx(before, abs=1e-5)
    # an adapter whose base is the reference keeps a single copy of it
    same = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_dir / "reference"),
                          LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    ProgressAdvantageScorer.from_models(same, tiny_dir / "reference", tokenizer=tok).save_pretrained(tmp_path / "one")
    assert not (tmp_path / "one" / "policy_base").exists()


def test_reference_folder_without_tokenizer_files_uses_the_policys(tiny_dir, tmp_path):
    """transformers builds an empty tokenizer for such a folder; it used to tokenize the reference's side of every
    trajectory to nothing (a step advantage of -88 instead of about 0.8, no error)."""
    ref = tmp_path / "ref"
    shutil.copytree(tiny_dir / "reference", ref)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        (ref / name).unlink(missing_ok=True)
    trajs = sample_trajectories()
    bare = ProgressAdvantageScorer.from_models(tiny_dir / "policy", ref)
    assert bare.reference_tokenizer is None
    full = ProgressAdvantageScorer.from_models(tiny_dir / "policy", tiny_dir / "reference")
    assert [r.score for r in bare.score(trajs)] == pytest.approx([r.score for r in full.score(trajs)], abs=1e-6)
    policy = tmp_path / "pol"
    shutil.copytree(tiny_dir / "policy", policy)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        (policy / name).unlink(missing_ok=True)
    with pytest.raises(ValueError, match="no usable tokenizer"):
        ProgressAdvantageScorer.from_models(policy, tiny_dir / "reference")


def test_trajectory_longer_than_the_context_is_cut_to_it_and_recorded(tiny_dir, caplog):
    """It used to be scored past max_position_embeddings without a word."""
    import logging

    policy = AutoModelForCausalLM.from_pretrained(tiny_dir / "policy")
    reference = AutoModelForCausalLM.from_pretrained(tiny_dir / "reference")
    reference.config.max_position_embeddings = 48
    tok = AutoTokenizer.from_pretrained(tiny_dir / "policy")
    long = Trajectory([Message("user", "Count with me. " * 20), Message("assistant", "one two three " * 10)],
                      id="long", reward=1.0)
    with caplog.at_level(logging.WARNING):
        res = ProgressAdvantageScorer.from_models(policy, reference, tokenizer=tok).score([long])[0]
    assert res.truncated is not None and res.truncated["max_tokens"] == 48 and res.truncated["tokens_cut"] > 0
    assert "context of 48 tokens" in caplog.text
    explicit = ProgressAdvantageScorer.from_models(policy, reference, tokenizer=tok, max_length=48).score([long])[0]
    assert res.score == pytest.approx(explicit.score, abs=1e-6)


def test_only_the_requested_baselines_are_computed(tiny_dir, scorer):
    some = ProgressAdvantageScorer.from_models(tiny_dir / "policy", tiny_dir / "reference",
                                               baselines=["deepconf_tail", "reference_logprob"])
    few, full = some.score(sample_trajectories()), scorer.score(sample_trajectories())
    for r, f in zip(few, full):
        assert list(r.scores) == ["progress_advantage", "deepconf_tail", "reference_logprob"]
        assert set(r.action_values) == set(r.scores)
        assert all(r.scores[m] == f.scores[m] and r.action_values[m] == f.action_values[m] for m in r.scores)
        assert "self_certainty" not in r.to_dict()["baselines"]
    table = some.evaluate(few)
    assert set(table) == {"progress_advantage", "deepconf_tail", "reference_logprob"}
    with pytest.raises(KeyError, match="'neg_entropy' was not computed"):
        some.evaluate(few, methods=["neg_entropy"])
    with pytest.raises(KeyError, match="'random' was not computed"):
        some.best_of_n(few, using="random")
