"""Held-out prompts completed and rewarded the way the trainer completes and rewards its training prompts (tiny GRPO
and RLOO runs on CPU)."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from datasets import Dataset
from transformers import AutoModelForSequenceClassification, AutoTokenizer, Trainer, TrainingArguments
from trl import GRPOConfig, GRPOTrainer, RLOOConfig, RLOOTrainer

from progadv_trl import ProgressAdvantageConfig
from progadv_trl.callback import ProgressAdvantageCallback
from progadv_trl.data import ProgadvDataError
from progadv_trl.rollouts import load_prompt_rows, sample_rollouts
from progadv_trl.tiny import build_model, build_tokenizer

PROMPT = [{"role": "user", "content": "What is 3 + 4?"}]
SCRIPT = Path(__file__).parent / "scripts" / "heldout_two_process.py"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("heldout") / "base"
    build_model(build_tokenizer(), root, seed=0)
    return root


def config(cls, tmp_path, **kw):
    base = dict(output_dir=str(tmp_path / "out"), per_device_train_batch_size=4, num_generations=4,
                max_completion_length=8, max_steps=1, logging_steps=1, use_cpu=True, bf16=False, report_to="none",
                save_strategy="no", learning_rate=5e-3, seed=0, beta=0.04)
    base.update(kw)
    return cls(**base)


def train_rows(n=8):
    return Dataset.from_list([{"prompt": PROMPT, "answer": "7", "split": "train"} for _ in range(n)])


class Recorder:
    """A reward function that records every call: the split of its rows, its keyword names and the completion ids."""

    __name__ = "recorder"

    def __init__(self):
        self.calls = []

    def __call__(self, prompts, completions, completion_ids, **kwargs):
        self.calls.append({"split": kwargs["split"][0], "keys": sorted(kwargs) + ["completion_ids", "completions",
                                                                                  "prompts"],
                           "completion_ids": completion_ids})
        if kwargs["split"][0] == "heldout":
            kwargs["log_metric"]("heldout_only", 1.0)  # must not reach the training's log rows
        return [float(len(ids) % 2 == 0) for ids in completion_ids]

    def of(self, split):
        return [c for c in self.calls if c["split"] == split]


def attach(trainer, prompts, **cfg):
    cb = ProgressAdvantageCallback(trainer=trainer, config=ProgressAdvantageConfig(
        heldout_prompts=prompts, log_baselines=False, export=False, **cfg))
    trainer.add_callback(cb)
    return cb


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["grpo", "rloo"])
def test_heldout_generation_is_the_trainers_own(model_dir, tmp_path, kind):
    """Greedy decoding set through generation_kwargs, thinking turned off through chat_template_kwargs, a repetition
    penalty and a short max_completion_length: at train begin (the weights of the first training generation) the
    held-out completions of the training prompt are token for token the training's, and the reward function sees the
    same keys (the extra dataset columns included)."""
    cls, trainer_cls = (GRPOConfig, GRPOTrainer) if kind == "grpo" else (RLOOConfig, RLOOTrainer)
    args = config(cls, tmp_path, max_completion_length=6, generation_kwargs={"do_sample": False},
                  chat_template_kwargs={"enable_thinking": False}, repetition_penalty=3.0)
    rec = Recorder()
    trainer = trainer_cls(model=str(model_dir), reward_funcs=rec, args=args, train_dataset=train_rows())
    cb = attach(trainer, [{"prompt": PROMPT, "answer": "7", "split": "heldout"}], eval_num_generations=3)
    trainer.train()
    train_calls, heldout_calls = rec.of("train"), rec.of("heldout")
    assert len(train_calls) == 1 and len(heldout_calls) == 2  # train begin and step 1
    assert heldout_calls[0]["keys"] == train_calls[0]["keys"]
    assert {"answer", "split", "trainer_state", "completion_ids", "log_metric", "log_extra"} <= set(
        heldout_calls[0]["keys"])
    trained, held = train_calls[0]["completion_ids"], heldout_calls[0]["completion_ids"]
    assert len(held) == 3 and all(len(ids) <= 6 for ids in held) and max(map(len, held)) == 6
    assert held == trained[:3]
    res = cb.monitor.last_results
    assert len(res) == 3 and {r.group for r in res} == {"heldout-prompt-0"}
    assert not any("heldout_only" in row for row in trainer.state.log_history)


@pytest.mark.slow
def test_sampling_settings_reach_heldout_generation(model_dir, tmp_path):
    """Sampled (not greedy) with top_k=1 from GRPOConfig: every completion of a prompt is the arg-max path (under
    the repetition penalty, without which the tiny model's is blank lines), so the held-out group is identical;
    min_new_tokens in generation_kwargs makes every one max_completion_length long."""
    args = config(GRPOConfig, tmp_path, max_completion_length=5, top_k=1, temperature=1.3, repetition_penalty=3.0,
                  generation_kwargs={"min_new_tokens": 5})
    rec = Recorder()
    trainer = GRPOTrainer(model=str(model_dir), reward_funcs=rec, args=args, train_dataset=train_rows())
    prompts = [{"prompt": [{"role": "user", "content": f"Add {i} and {i}."}], "answer": str(2 * i),
                "split": "heldout"} for i in range(2)]
    attach(trainer, prompts)
    trainer.train()
    first = rec.of("heldout")[0]["completion_ids"]
    assert len(first) == 2 * 4 and all(len(ids) == 5 for ids in first)  # num_generations by default
    assert first[0] == first[3] and first[4] == first[7] and first[0] != first[4]


@pytest.mark.slow
def test_async_and_weighted_reward_functions(model_dir, tmp_path):
    async def quarter(completions, **kwargs):
        return [0.25] * len(completions)

    def even(completions, **kwargs):
        return [float(len(c[0]["content"]) % 2 == 0) for c in completions]

    args = config(GRPOConfig, tmp_path, reward_weights=[2.0, 1.0])
    trainer = GRPOTrainer(model=str(model_dir), reward_funcs=[quarter, even], args=args, train_dataset=train_rows())
    cb = attach(trainer, [PROMPT, [{"role": "user", "content": "What is 2 + 2?"}]], eval_num_generations=4)
    trainer.train()
    res = cb.monitor.last_results
    assert len(res) == 8 and {r.reward for r in res} <= {0.5, 1.5} and len({r.reward for r in res}) == 2


@pytest.mark.slow
def test_reward_model_with_its_tokenizer(model_dir, tmp_path):
    """A sequence-classification reward model scores held-out completions as in training: the chat-rendered
    prompt + completion through its own tokenizer, the logit is the reward."""
    from trl.data_utils import apply_chat_template

    rm_dir = tmp_path / "rm"
    tok = AutoTokenizer.from_pretrained(model_dir)
    build_model(tok, tmp_path / "rm_lm", seed=5)
    rm = AutoModelForSequenceClassification.from_pretrained(tmp_path / "rm_lm", num_labels=1)
    rm.config.pad_token_id = tok.pad_token_id
    rm.save_pretrained(rm_dir)
    tok.save_pretrained(rm_dir)
    args = config(GRPOConfig, tmp_path)
    trainer = GRPOTrainer(model=str(model_dir), reward_funcs=[str(rm_dir)], args=args, train_dataset=train_rows())
    cb = attach(trainer, [PROMPT], eval_num_generations=2)
    trainer.train()
    assert len(cb.monitor.last_results) == 2 and all(r.reward is not None for r in cb.monitor.last_results)
    rm = AutoModelForSequenceClassification.from_pretrained(rm_dir).eval()
    again = sample_rollouts(trainer, [{"prompt": PROMPT}], 2, seed=0, tag="x")
    for t in again:
        text = apply_chat_template({"messages": [m.to_chat() for m in t.messages]}, tok)["text"]
        ids = tok(text, return_tensors="pt", add_special_tokens=False)
        with torch.no_grad():
            assert rm(**ids).logits[0, 0].item() == pytest.approx(t.reward, abs=1e-4)


def test_bad_prompt_rows_and_trainers_fail_early(model_dir, tmp_path):
    with pytest.raises(ProgadvDataError, match=r"record 1.*'prompt'"):
        load_prompt_rows([{"prompt": "hi"}, {"question": "no prompt"}])
    with pytest.raises(ProgadvDataError, match=r"record 0.*'prompt\[0\].role'"):
        load_prompt_rows([{"prompt": [{"role": "wizard", "content": "x"}]}])
    with pytest.raises(ProgadvDataError, match="mix strings"):
        load_prompt_rows(["a string", PROMPT])
    with pytest.raises(ProgadvDataError, match="no held-out prompts"):
        load_prompt_rows([])
    tok = AutoTokenizer.from_pretrained(model_dir)
    ids = tok("What is 1 + 1?")["input_ids"]
    plain = Trainer(model=build_model(tok), processing_class=tok,
                    train_dataset=Dataset.from_list([{"input_ids": ids, "labels": ids}]),
                    args=TrainingArguments(output_dir=str(tmp_path / "p"), use_cpu=True, report_to="none"))
    with pytest.raises(ValueError, match="heldout_prompts needs a trainer"):
        ProgressAdvantageCallback(trainer=plain, config=ProgressAdvantageConfig(heldout_prompts=[PROMPT]))


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("torchrun") is None and not Path(sys.executable).with_name("torchrun").exists(),
                    reason="torchrun not installed")
def test_two_processes_split_the_prompts_and_gather_in_order(model_dir, tmp_path):
    torchrun = shutil.which("torchrun") or str(Path(sys.executable).with_name("torchrun"))
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([torchrun, "--nproc_per_node", "2", "--master_port", "29541", str(SCRIPT),
                           str(model_dir), str(tmp_path)], env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, "\n".join(x for x in proc.stderr.splitlines() if "Warning" not in x)[-4000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    # each rank completed and rewarded only its share: prompts 0 and 2 on rank 0, prompt 1 (and a padding copy) on 1
    assert [sorted(set(r["rewarded"])) for r in ranks] == [["Add 0 and 0.", "Add 2 and 2."], ["Add 1 and 1."]]
    assert all(len(r["rewarded"]) == 2 * 2 for r in ranks)  # the same batch size on both ranks
    # every rank holds all rollouts, in input order, the same ones
    assert ranks[0]["rollouts"] == ranks[1]["rollouts"]
    assert [(x[0], x[1]) for x in ranks[0]["rollouts"]] == [
        (f"x-{i}-{k}", f"Add {i} and {i}.") for i in range(3) for k in range(2)]
