"""The callback in real TRL runs on tiny local models: every way TRL keeps (or drops) the reference."""

import json
import logging

import pytest
import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
from trl import GRPOConfig, GRPOTrainer, RLOOConfig, RLOOTrainer

from progadv_trl import ProgressAdvantageConfig, ProgressAdvantageScorer
from progadv_trl.callback import STATE_FILE, ProgressAdvantageCallback
from progadv_trl.tiny import build_model, build_tokenizer

from conftest import sample_trajectories

pytestmark = pytest.mark.slow  # real TRL trainer runs (all but test_bad_configuration_fails_before_training)


def reward_even_length(completions, **kwargs):
    """1 when the completion has an even number of characters: about half of a random tiny model's samples."""
    texts = [c[0]["content"] if isinstance(c, list) else c for c in completions]
    return [float(len(t) % 2 == 0) for t in texts]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("grpo") / "base"
    tok = build_tokenizer()
    build_model(tok, root, seed=0)
    return root


@pytest.fixture(scope="module")
def dataset():
    return Dataset.from_list([{"prompt": [{"role": "user", "content": f"What is {i} + {i}?"}]} for i in range(32)])


def grpo_args(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path / "out"), per_device_train_batch_size=4, num_generations=4,
                max_completion_length=8, max_steps=4, logging_steps=2, use_cpu=True, bf16=False, report_to="none",
                save_strategy="no", learning_rate=5e-3, seed=0, temperature=0.9)
    base.update(kw)
    return base


def run(trainer, **cfg):
    cb = ProgressAdvantageCallback(trainer=trainer, config=ProgressAdvantageConfig(heldout=sample_trajectories(), **cfg))
    trainer.add_callback(cb)
    trainer.train()
    return cb


def history(out):
    return [json.loads(x) for x in (out / "progadv-history.jsonl").read_text().splitlines()]


def assert_exported_equals_last_evaluation(cb, out):
    loaded = ProgressAdvantageScorer.from_pretrained(out / "_progadv" / "scorer")
    again = loaded.score(sample_trajectories())
    assert [r.score for r in again] == pytest.approx([r.score for r in cb.monitor.last_results], abs=1e-5)
    assert (out / "_progadv" / "scorer-best" / "progadv_config.json").exists()


def test_grpo_beta_positive_uses_trl_reference(model_dir, dataset, tmp_path):
    args = GRPOConfig(**grpo_args(tmp_path, beta=0.04, loss_type="grpo"))
    trainer = GRPOTrainer(model=str(model_dir), reward_funcs=reward_even_length, args=args, train_dataset=dataset)
    cb = run(trainer)
    assert cb.monitor.reference.kind == "trl_ref_model"
    out = tmp_path / "out"
    h = history(out)
    assert [e["step"] for e in h] == [0, 2, 4]
    assert h[0]["progadv/kl/mean"] == 0.0 and h[0]["progadv/weight_drift"] == 0.0
    assert h[-1]["progadv/kl/mean"] > 0 and h[-1]["progadv/weight_drift"] > 0
    assert h[-1]["temperature"] == 0.9 and h[-1]["beta"] == 0.04
    # after train begin (a row of its own), metrics ride in GRPO's own log rows, beside its own keys
    rows = [r for r in trainer.state.log_history if "progadv/auroc" in r]
    assert [r["step"] for r in rows] == [0, 2, 4] and all("reward" in r and "kl" in r for r in rows[1:])
    assert_exported_equals_last_evaluation(cb, out)


def test_dapo_beta_zero_snapshot_reference(model_dir, dataset, tmp_path):
    args = GRPOConfig(**grpo_args(tmp_path, beta=0.0, loss_type="dapo"))
    trainer = GRPOTrainer(model=str(model_dir), reward_funcs=reward_even_length, args=args, train_dataset=dataset)
    assert trainer.ref_model is None
    cb = run(trainer, reference_placement="cpu")
    out = tmp_path / "out"
    assert cb.monitor.reference.kind == "snapshot" and (out / "_progadv" / "reference" / "config.json").exists()
    h = history(out)
    assert h[0]["beta"] == 1.0 and h[-1]["progadv/kl/mean"] > 0
    # the snapshot is the initial policy
    init = AutoModelForCausalLM.from_pretrained(model_dir)
    snap = AutoModelForCausalLM.from_pretrained(out / "_progadv" / "reference")
    assert all(torch.equal(a, b) for a, b in zip(init.state_dict().values(), snap.state_dict().values()))
    assert_exported_equals_last_evaluation(cb, out)


@pytest.mark.parametrize("beta", [0.0, 0.04])
def test_peft_fresh_adapter_uses_adapters_off(model_dir, dataset, tmp_path, beta):
    from peft import LoraConfig

    args = GRPOConfig(**grpo_args(tmp_path, beta=beta, learning_rate=5e-2))
    trainer = GRPOTrainer(model=str(model_dir), reward_funcs=reward_even_length, args=args, train_dataset=dataset,
                          peft_config=LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    cb = run(trainer)
    assert cb.monitor.reference.kind == "adapters_off" and trainer.ref_model is None
    out = tmp_path / "out"
    assert history(out)[-1]["progadv/weight_drift"] > 0
    assert (out / "_progadv" / "scorer" / "policy" / "adapter_config.json").exists()
    assert_exported_equals_last_evaluation(cb, out)


def test_peft_pretrained_adapter_beta_zero_keeps_initial_adapter(model_dir, dataset, tmp_path):
    from peft import LoraConfig, get_peft_model

    base = AutoModelForCausalLM.from_pretrained(model_dir)
    model = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    initial = {k: v.clone() for k, v in model.state_dict().items() if "lora_" in k}
    args = GRPOConfig(**grpo_args(tmp_path, beta=0.0, learning_rate=5e-2))
    trainer = GRPOTrainer(model=model, reward_funcs=reward_even_length, args=args, train_dataset=dataset,
                          processing_class=AutoTokenizer.from_pretrained(model_dir))
    cb = run(trainer)
    assert cb.monitor.reference.kind == "progadv_ref"
    state = trainer.model.state_dict()
    for k, v in initial.items():  # the frozen copy still holds the initial adapter
        assert torch.equal(state[k.replace(".default.", ".progadv_ref.")], v)
    h = history(tmp_path / "out")
    assert h[0]["progadv/kl/mean"] == pytest.approx(0.0, abs=1e-6) and h[-1]["progadv/kl/mean"] > 0
    assert_exported_equals_last_evaluation(cb, tmp_path / "out")


def test_sync_ref_model_keeps_initial_policy_by_default(model_dir, dataset, tmp_path, caplog):
    args = GRPOConfig(**grpo_args(tmp_path, beta=0.04, sync_ref_model=True, ref_model_sync_steps=1,
                                  ref_model_mixup_alpha=0.9))
    trainer = GRPOTrainer(model=str(model_dir), reward_funcs=reward_even_length, args=args, train_dataset=dataset)
    with caplog.at_level(logging.WARNING):
        cb = run(trainer)
    assert cb.monitor.reference.kind == "snapshot" and "sync_ref_model" in caplog.text


def test_rloo(model_dir, dataset, tmp_path):
    args = RLOOConfig(**grpo_args(tmp_path))
    trainer = RLOOTrainer(model=str(model_dir), reward_funcs=reward_even_length, args=args, train_dataset=dataset)
    cb = run(trainer)
    assert cb.monitor.reference.kind == ("trl_ref_model" if trainer.beta else "snapshot")
    h = history(tmp_path / "out")
    assert len(h) == 3 and h[-1]["progadv/kl/mean"] > 0
    assert any("progadv/auroc" in r for r in trainer.state.log_history)


def test_heldout_prompts_sampled_and_labelled_by_trainer_rewards(model_dir, dataset, tmp_path):
    args = GRPOConfig(**grpo_args(tmp_path, beta=0.04, max_steps=2))
    trainer = GRPOTrainer(model=str(model_dir), reward_funcs=reward_even_length, args=args, train_dataset=dataset)
    prompts = [{"prompt": [{"role": "user", "content": f"What is {i} times 3?"}]} for i in range(3)]
    cb = ProgressAdvantageCallback(trainer=trainer, config=ProgressAdvantageConfig(heldout_prompts=prompts,
                                                                                   eval_num_generations=4))
    trainer.add_callback(cb)
    trainer.train()
    res = cb.monitor.last_results
    assert len(res) == 12 and {r.group for r in res} == {"heldout-prompt-0", "heldout-prompt-1", "heldout-prompt-2"}
    assert all(r.reward in (0.0, 1.0) for r in res)


@pytest.mark.parametrize("beta,loss_type", [(0.04, "grpo"), (0.0, "dapo")])
def test_the_callback_does_not_change_training(model_dir, dataset, tmp_path, beta, loss_type):
    """Same seed, with and without the callback (evaluating every step, generating held-out completions, keeping
    a snapshot when beta is 0): the trainer's own log rows and the final weights are bit-identical."""
    def train(out, with_callback):
        args = GRPOConfig(**grpo_args(tmp_path, beta=beta, loss_type=loss_type, output_dir=str(out), logging_steps=1))
        t = GRPOTrainer(model=str(model_dir), reward_funcs=reward_even_length, args=args, train_dataset=dataset)
        if with_callback:
            prompts = [{"prompt": [{"role": "user", "content": f"What is {i} times 3?"}]} for i in range(2)]
            t.add_callback(ProgressAdvantageCallback(trainer=t, config=ProgressAdvantageConfig(
                heldout=sample_trajectories(), heldout_prompts=prompts, eval_num_generations=4, eval_steps=1)))
        t.train()
        rows = [{k: v for k, v in r.items() if not k.startswith("progadv/") and k not in ("step_time", "train_runtime")
                 and not k.endswith("_per_second")} for r in t.state.log_history if "loss" in r or "train_loss" in r]
        return rows, t.model.state_dict()

    rows, weights = train(tmp_path / "plain", False)
    rows_cb, weights_cb = train(tmp_path / "monitored", True)
    assert len(rows) == 5 and rows == rows_cb
    assert all(torch.equal(weights[k], weights_cb[k]) for k in weights)


class StopAt(TrainerCallback):
    """Ends the run after ``step``, as a kill right after a checkpoint would."""

    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            control.should_training_stop = True


def test_resume_gives_the_same_history(model_dir, dataset, tmp_path):
    def make(out, stop=None):
        args = GRPOConfig(**grpo_args(tmp_path, beta=0.0, output_dir=str(out), save_strategy="steps", save_steps=2,
                                      lr_scheduler_type="constant"))
        t = GRPOTrainer(model=str(model_dir), reward_funcs=reward_even_length, args=args, train_dataset=dataset)
        t.add_callback(ProgressAdvantageCallback(trainer=t, config=ProgressAdvantageConfig(
            heldout=sample_trajectories(), export=False)))
        if stop:
            t.add_callback(StopAt(stop))
        return t

    make(tmp_path / "full").train()
    full = history(tmp_path / "full")
    make(tmp_path / "cut", stop=2).train()
    assert (tmp_path / "cut" / "checkpoint-2" / STATE_FILE).exists()
    make(tmp_path / "cut").train(resume_from_checkpoint=str(tmp_path / "cut" / "checkpoint-2"))
    cut = history(tmp_path / "cut")
    assert [e["step"] for e in cut] == [e["step"] for e in full] == [0, 2, 4]
    for a, b in zip(full, cut):
        for key in ("progadv/kl/mean", "progadv/auroc", "progadv/weight_drift", "progadv/log_ratio/mean"):
            assert a[key] == pytest.approx(b[key], abs=1e-5), key


def test_bad_configuration_fails_before_training(model_dir, dataset, tmp_path):
    args = GRPOConfig(**grpo_args(tmp_path, beta=0.04))
    trainer = GRPOTrainer(model=str(model_dir), reward_funcs=reward_even_length, args=args, train_dataset=dataset)
    with pytest.raises(ValueError, match="held-out"):
        ProgressAdvantageCallback(trainer=trainer, config=ProgressAdvantageConfig())
    with pytest.raises(ValueError, match="eval_steps"):
        ProgressAdvantageCallback(trainer=trainer, config=ProgressAdvantageConfig(heldout=sample_trajectories(),
                                                                                  eval_steps=0))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "x", "messages": [{"role": "user", "content": "hi"}]}\n')
    with pytest.raises(ValueError, match="bad.jsonl"):
        ProgressAdvantageCallback(trainer=trainer, config=ProgressAdvantageConfig(heldout=str(bad)))
    unlabelled = [t for t in sample_trajectories()]
    for t in unlabelled:
        t.reward = None
    with pytest.raises(ValueError, match="needs rewards"):
        ProgressAdvantageCallback(trainer=trainer, config=ProgressAdvantageConfig(heldout=unlabelled))
    trainer.processing_class.chat_template = None
    with pytest.raises(ValueError, match="chat template"):
        ProgressAdvantageCallback(trainer=trainer, config=ProgressAdvantageConfig(heldout=sample_trajectories()))


def test_user_sampler_for_multi_turn_environments(model_dir, dataset, tmp_path):
    """An environment loop the callback cannot run itself hands it fresh episodes through sampler=."""
    calls = []

    def sampler(policy):
        calls.append(policy.training)
        return sample_trajectories()

    args = GRPOConfig(**grpo_args(tmp_path, beta=0.04, max_steps=2))
    trainer = GRPOTrainer(model=str(model_dir), reward_funcs=reward_even_length, args=args, train_dataset=dataset)
    cb = ProgressAdvantageCallback(trainer=trainer, config=ProgressAdvantageConfig(), sampler=sampler)
    trainer.add_callback(cb)
    trainer.train()
    assert len(calls) == 2 and not any(calls)  # train begin and step 2, each with the policy in eval mode
    assert len(cb.monitor.last_results) == 4


# ---------------------------------------------------------------------------------- interval, log rows, exports
def rows_with(trainer, key="progadv/score/mean"):
    return [r for r in trainer.state.log_history if key in r]


def test_interval_follows_the_trainers_eval_steps(model_dir, dataset, tmp_path):
    """No eval_steps in the progadv config: the trainer's eval_strategy="steps" interval (4), not every step."""
    args = GRPOConfig(**grpo_args(tmp_path, beta=0.04, max_steps=8, logging_steps=1, eval_strategy="steps",
                                  eval_steps=4, per_device_eval_batch_size=4))
    trainer = GRPOTrainer(model=str(model_dir), reward_funcs=reward_even_length, args=args, train_dataset=dataset,
                          eval_dataset=dataset.select(range(4)))
    cb = run(trainer, log_baselines=False, export=False)
    assert cb.eval_steps == 4
    assert [e["step"] for e in history(tmp_path / "out")] == [0, 4, 8]


def test_interval_resolves_a_fraction_of_max_steps(model_dir, dataset, tmp_path):
    args = GRPOConfig(**grpo_args(tmp_path, beta=0.04, max_steps=4, logging_steps=0.5))
    trainer = GRPOTrainer(model=str(model_dir), reward_funcs=reward_even_length, args=args, train_dataset=dataset)
    cb = run(trainer, log_baselines=False, export=False)
    assert cb.eval_steps == 2 and [e["step"] for e in history(tmp_path / "out")] == [0, 2, 4]


def assert_every_evaluation_logged(trainer, out):
    """Each evaluation of the history reaches the trainer's log rows at its own step, exactly once."""
    for entry in history(out):
        rows = [r for r in rows_with(trainer) if r["step"] == entry["step"]]
        assert len(rows) == 1, (entry["step"], [r["step"] for r in rows_with(trainer)])
        assert rows[0]["progadv/score/mean"] == pytest.approx(entry["progadv/score/mean"], abs=1e-6)


@pytest.mark.parametrize("logging_steps,stop", [(1, None), (3, None), (1, 3)])
def test_every_evaluation_reaches_the_logs(model_dir, dataset, tmp_path, logging_steps, stop):
    """Step 0 gets its own row (not overwritten by the next evaluation); steps without a trainer row and the final
    evaluation of a run stopped early (StopAt) get theirs; steps with a row carry the metrics beside GRPO's."""
    args = GRPOConfig(**grpo_args(tmp_path, beta=0.04, max_steps=4, logging_steps=logging_steps))
    trainer = GRPOTrainer(model=str(model_dir), reward_funcs=reward_even_length, args=args, train_dataset=dataset)
    cb = ProgressAdvantageCallback(trainer=trainer, config=ProgressAdvantageConfig(
        heldout=sample_trajectories(), eval_steps=2, log_baselines=False, export=False))
    trainer.add_callback(cb)
    if stop:
        trainer.add_callback(StopAt(stop))
    trainer.train()
    out = tmp_path / "out"
    assert [e["step"] for e in history(out)] == ([0, 2, 4] if stop is None else [0, 2, 3])
    assert_every_evaluation_logged(trainer, out)
    assert not any(k.startswith("progadv/") for k in trainer._metrics["train"])  # nothing left behind
    if logging_steps == 1:  # rows that the trainer writes anyway carry the metrics beside GRPO's own keys
        assert all("reward" in r for r in rows_with(trainer) if r["step"] == 2)


def test_plain_trainer_without_metric_store_gets_rows(model_dir, tmp_path):
    """A transformers Trainer (no GRPO _metrics store): every evaluation becomes a row of its own."""
    from transformers import Trainer, TrainingArguments

    tok = AutoTokenizer.from_pretrained(model_dir)
    ids = tok("What is 1 + 1? It is 2.")["input_ids"]
    data = Dataset.from_list([{"input_ids": ids, "labels": ids} for _ in range(8)])
    trainer = Trainer(model=AutoModelForCausalLM.from_pretrained(model_dir), processing_class=tok, train_dataset=data,
                      args=TrainingArguments(output_dir=str(tmp_path / "out"), max_steps=2, logging_steps=1,
                                             per_device_train_batch_size=2, use_cpu=True, report_to="none",
                                             save_strategy="no"))
    assert not hasattr(trainer, "_metrics")
    run(trainer, log_baselines=False, export=False)
    assert_every_evaluation_logged(trainer, tmp_path / "out")


class DiskWatch(TrainerCallback):
    """Records, after each training step, the bytes under the output folder (exports happen at train end)."""

    def __init__(self, root):
        self.root, self.sizes = root, []

    def on_step_end(self, args, state, control, **kwargs):
        self.sizes.append(sum(f.stat().st_size for f in self.root.rglob("*") if f.is_file()))


@pytest.mark.parametrize("best_export", ["end", "every_best"])
def test_exports_stay_out_of_the_hub_upload_and_best_is_written_once(model_dir, dataset, tmp_path, best_export):
    from fnmatch import fnmatch

    args = GRPOConfig(**grpo_args(tmp_path, beta=0.0, learning_rate=5e-2, logging_steps=1))
    trainer = GRPOTrainer(model=str(model_dir), reward_funcs=reward_even_length, args=args, train_dataset=dataset)
    out = tmp_path / "out"
    watch = DiskWatch(out)
    cb = ProgressAdvantageCallback(trainer=trainer, config=ProgressAdvantageConfig(
        heldout=sample_trajectories(), eval_steps=1, best_export=best_export, log_baselines=False))
    trainer.add_callback(cb)
    trainer.add_callback(watch)
    trainer.train()
    # what Trainer.push_to_hub would upload (it skips "_*" and "checkpoint-*"): no model copy of ours
    uploaded = [p for p in out.iterdir() if not any(fnmatch(p.name, pat) for pat in ("_*", "checkpoint-*"))]
    assert [p.name for p in uploaded] == ["progadv-history.jsonl"]
    h = history(out)
    growth = [b - a for a, b in zip(watch.sizes, watch.sizes[1:])]
    if best_export == "end":  # nothing but history lines written between evaluations
        assert max(growth) < 10_000, growth
    loaded = ProgressAdvantageScorer.from_pretrained(out / "_progadv" / "scorer-best")
    assert loaded.provenance["step"] == cb.monitor.detector.best_step
    mean = sum(r.score for r in loaded.score(sample_trajectories())) / len(sample_trajectories())
    entry = next(e for e in h if e["step"] == cb.monitor.detector.best_step)
    assert mean == pytest.approx(entry["progadv/score/mean"], abs=1e-5)
    # the live policy holds the final weights again after the best export
    assert_exported_equals_last_evaluation(cb, out)


def test_export_dir_can_name_an_uploaded_folder(model_dir, dataset, tmp_path):
    args = GRPOConfig(**grpo_args(tmp_path, beta=0.04, max_steps=2))
    trainer = GRPOTrainer(model=str(model_dir), reward_funcs=reward_even_length, args=args, train_dataset=dataset)
    run(trainer, export_dir="scorers", log_baselines=False)
    assert (tmp_path / "out" / "scorers" / "scorer" / "progadv_config.json").exists()
    assert not (tmp_path / "out" / "_progadv").exists()
