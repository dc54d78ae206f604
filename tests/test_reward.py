"""ProgressAdvantageReward: TRL reward-function inputs -> the scorer's trajectory scores, and real GRPO/RLOO runs."""

import copy
import logging
import math

import pytest
import torch
from datasets import Dataset
from torch import nn
from trl import GRPOConfig, GRPOTrainer, RLOOConfig, RLOOTrainer
from trl.trainer.utils import get_callable_name

from progadv_trl import (Message, ProgadvDataError, ProgressAdvantageReward, ProgressAdvantageScorer, ToolCall,
                         Trajectory)
from progadv_trl.config import ConfigError
from progadv_trl.tiny import build_model, build_tokenizer

PROMPTS = ["What is 2 + 2?", "Book the cheapest flight.", "Move left or right?"]
COMPLETIONS = ["The answer is 4.", "I will search for flights first.", "Move right, the goal is at 7."]

SYSTEM = {"role": "system", "content": "You are a travel agent."}
USER = {"role": "user", "content": "Book the cheapest flight."}
TOOL_TURN = [
    {"role": "assistant", "content": "I will search first.",
     "tool_calls": [{"type": "function", "function": {"name": "search", "arguments": {"query": "Paris Rome"}}}]},
    {"role": "tool", "name": "search", "content": "three flights found, prices 120, 95 and 143 euros."},
    {"role": "assistant", "content": "The cheapest flight costs 95 euros. I book it now."},
]
# an earlier assistant turn inside the prompt: context, not a step
PROMPT_WITH_HISTORY = [SYSTEM, {"role": "user", "content": "Hello."}, {"role": "assistant", "content": "Hello!"}, USER]


def tool_turn_messages():
    return [Message("assistant", "I will search first.", (ToolCall("search", {"query": "Paris Rome"}),)),
            Message("tool", "three flights found, prices 120, 95 and 143 euros.", name="search"),
            Message("assistant", "The cheapest flight costs 95 euros. I book it now.")]


@pytest.fixture(scope="module")
def scorer_dir(tiny_dir, tmp_path_factory):
    path = tmp_path_factory.mktemp("reward") / "scorer"
    scorer = ProgressAdvantageScorer.from_models(str(tiny_dir / "policy"), str(tiny_dir / "reference"), beta=0.5)
    scorer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def scorer(scorer_dir):
    return ProgressAdvantageScorer.from_pretrained(scorer_dir)


def text_trajectories():
    return [Trajectory([Message("user", p), Message("assistant", c)], id=str(i))
            for i, (p, c) in enumerate(zip(PROMPTS, COMPLETIONS))]


def test_is_a_trl_reward_function(scorer):
    reward = ProgressAdvantageReward(scorer)
    assert get_callable_name(reward) == "progress_advantage" and not isinstance(reward, nn.Module)
    assert get_callable_name(ProgressAdvantageReward(scorer, name="pa")) == "pa"


def test_text_completions_equal_the_scorer(scorer):
    rewards = ProgressAdvantageReward(scorer)(prompts=PROMPTS, completions=COMPLETIONS, completion_ids=[[1]] * 3)
    expected = [r.score for r in scorer.score(text_trajectories())]
    assert rewards == expected and len(set(rewards)) == 3


def test_conversational_completions_equal_the_scorer(scorer):
    prompts = [[SYSTEM, USER], PROMPT_WITH_HISTORY, [USER]]
    completions = [TOOL_TURN, TOOL_TURN, [{"role": "assistant", "content": "I book the first flight."}]]
    rewards = ProgressAdvantageReward(scorer)(prompts, completions, None, trainer_state=None)
    history = [Message("system", "You are a travel agent."), Message("user", "Hello."), Message("assistant", "Hello!"),
               Message("user", "Book the cheapest flight.")]
    trajs = [Trajectory([Message("system", "You are a travel agent."), Message("user", "Book the cheapest flight."),
                         *tool_turn_messages()]),
             Trajectory(history + tool_turn_messages(), action_indices=(4, 6)),
             Trajectory([Message("user", "Book the cheapest flight."),
                         Message("assistant", "I book the first flight.")])]
    results = scorer.score(trajs)
    assert rewards == [r.score for r in results]
    assert [s.message_index for s in results[1].steps] == [4, 6]  # the prompt's assistant turn is no step


def test_step_agg_override_equals_a_scorer_loaded_with_it(scorer, scorer_dir):
    prompts, completions = [[USER], PROMPT_WITH_HISTORY], [TOOL_TURN, TOOL_TURN[:1]]
    rewards = ProgressAdvantageReward(scorer, step_agg="min", batch_size=1)(prompts, completions)
    reloaded = ProgressAdvantageScorer.from_pretrained(scorer_dir, step_agg="min", batch_size=1)
    reward = ProgressAdvantageReward(scorer)
    trajs = [reward.trajectory(p, c, i) for i, (p, c) in enumerate(zip(prompts, completions))]
    assert rewards == [r.score for r in reloaded.score(trajs)]
    assert rewards[0] == min(s.advantage for s in scorer.score(trajs[:1])[0].steps)
    assert scorer.config.step_agg == "mean" and scorer.config.batch_size == 8  # the given scorer is left as it was


def test_per_step_aggregates_step_advantages_not_running_sums(scorer_dir):
    cumulative = ProgressAdvantageScorer.from_pretrained(scorer_dir, cumulative=True)
    plain = ProgressAdvantageScorer.from_pretrained(scorer_dir)
    steps = [s.advantage for s in plain.score([Trajectory([Message("user", "Book the cheapest flight."),
                                                           *tool_turn_messages()])])[0].steps]
    assert len(steps) == 2
    per_step = ProgressAdvantageReward(cumulative, per_step=True)([[USER]], [TOOL_TURN])[0]
    assert per_step == pytest.approx(sum(steps), abs=1e-12)
    assert ProgressAdvantageReward(cumulative, per_step=True, step_agg="mean")([[USER]], [TOOL_TURN])[0] == \
        pytest.approx(sum(steps) / 2, abs=1e-12)
    # the cumulative score's mean weighs the first step twice: a different number
    assert ProgressAdvantageReward(cumulative)([[USER]], [TOOL_TURN])[0] == pytest.approx(steps[0] + steps[1] / 2)


def test_scale_and_clip(scorer):
    raw = ProgressAdvantageReward(scorer)(PROMPTS, COMPLETIONS)
    shaped = ProgressAdvantageReward(scorer, scale=-2.0, clip=0.1)(PROMPTS, COMPLETIONS)
    assert shaped == [min(max(-2.0 * r, -0.1), 0.1) for r in raw]
    assert any(abs(2.0 * r) > 0.1 for r in raw)  # the clip did something
    low_high = ProgressAdvantageReward(scorer, clip=(0.0, 0.01))(PROMPTS, COMPLETIONS)
    assert low_high == [min(max(r, 0.0), 0.01) for r in raw]


def test_empty_completions_get_the_empty_reward(scorer, caplog):
    prompts = ["What is 2 + 2?", "What is 2 + 2?", [USER], [USER], [USER]]
    completions = ["", "The answer is 4.", [{"role": "assistant", "content": ""}], [], TOOL_TURN]
    logged = {}
    with caplog.at_level(logging.WARNING, logger="progadv_trl.reward"):
        rewards = ProgressAdvantageReward(scorer)(prompts, completions, log_metric=logged.__setitem__)
    assert [r is None for r in rewards] == [True, False, True, True, False]
    assert logged == {"rewards/progress_advantage/unscored_frac": pytest.approx(3 / 5)}
    assert sum("the completion is empty" in r.message for r in caplog.records) == 1  # once, not per completion
    zero = ProgressAdvantageReward(scorer, empty_reward=0.0)(prompts, completions)
    assert zero[0] == zero[2] == zero[3] == 0.0 and zero[1] == rewards[1] and zero[4] == rewards[4]


def test_no_action_token_left_after_the_length_cut(scorer_dir):
    short = ProgressAdvantageScorer.from_pretrained(scorer_dir, max_length=2)
    traj = text_trajectories()[0]
    result = short.score([traj])[0]
    assert result.score == 0.0 and sum(s.n_tokens for s in result.steps) == 0  # the scorer's own convention
    assert ProgressAdvantageReward(short)(PROMPTS[:1], COMPLETIONS[:1]) == [None]
    assert ProgressAdvantageReward(short, empty_reward=-1.0)(PROMPTS[:1], COMPLETIONS[:1]) == [-1.0]


def test_truncated_completions_still_score(scorer):
    """What TRL hands over when max_completion_length cuts a generation: the text so far, a tool call half written."""
    cut = [[{"role": "assistant", "content": '<tool_call>\n{"name": "search", "argu'}], COMPLETIONS[1][:9]]
    rewards = ProgressAdvantageReward(scorer)([[USER], PROMPTS[1]], cut)
    trajs = [Trajectory([Message("user", USER["content"]), Message("assistant", cut[0][0]["content"])]),
             Trajectory([Message("user", PROMPTS[1]), Message("assistant", cut[1])])]
    assert rewards == [r.score for r in scorer.score(trajs)] and all(math.isfinite(r) for r in rewards)


def test_a_completion_the_scorer_refuses_costs_only_its_own_reward(scorer, caplog):
    # Qwen3's template moves a think block out of the content: the generated text is not rendered verbatim
    completions = [COMPLETIONS[0], "<think>plan</think>The answer is 4.", COMPLETIONS[2]]
    prompts = [PROMPTS[0], PROMPTS[0], PROMPTS[2]]
    with caplog.at_level(logging.WARNING, logger="progadv_trl.reward"):
        rewards = ProgressAdvantageReward(scorer)(prompts, completions)
    ok = [text_trajectories()[0], text_trajectories()[2]]
    assert rewards[1] is None and [rewards[0], rewards[2]] == [scorer.score([t])[0].score for t in ok]
    assert any("record 1" in r.message and "messages[1].content" in r.message for r in caplog.records)


def test_bad_completion_messages_are_unscored_not_raised(scorer):
    completions = [[{"role": "assistant", "content": None}], [{"role": "robot", "content": "hi"}],
                   [{"role": "assistant", "content": [{"type": "image", "image": None}]}], TOOL_TURN]
    rewards = ProgressAdvantageReward(scorer)([[USER]] * 4, completions)
    assert rewards[:3] == [None, None, None] and rewards[3] is not None


def test_content_blocks_are_joined_text(scorer):
    blocks = [{"role": "user", "content": [{"type": "text", "text": "Book the cheapest "},
                                           {"type": "text", "text": "flight."}]}]
    completion = [{"role": "assistant", "content": "I book the first flight."}]
    reward = ProgressAdvantageReward(scorer)
    assert reward([blocks], [completion]) == reward([[USER]], [completion])


@pytest.mark.parametrize(("prompts", "completions", "field"), [
    (["ok", [{"role": "robot", "content": "x"}]], ["a", [{"role": "assistant", "content": "b"}]], "prompts[1][0].role"),
    ([{"text": "x"}], ["a"], "prompts[0]"),
    (["x"], [[{"role": "assistant", "content": "b"}]], "completions[0]"),
    ([[USER]], ["b"], "completions[0]"),
    ([[{"role": "user", "content": [{"type": "image"}]}]], [[{"role": "assistant", "content": "b"}]],
     "prompts[0][0].content[0]"),
])
def test_bad_prompts_raise_naming_record_and_field(scorer, prompts, completions, field):
    with pytest.raises(ProgadvDataError) as info:
        ProgressAdvantageReward(scorer)(prompts, completions)
    assert info.value.field == field and info.value.record == len(prompts) - 1


@pytest.mark.parametrize(("kwargs", "field"), [
    ({"step_agg": "median"}, "step_agg"), ({"scale": float("nan")}, "scale"), ({"clip": -1.0}, "clip"),
    ({"clip": (1.0, 0.0)}, "clip"), ({"batch_size": 0}, "batch_size"), ({"empty_reward": float("inf")}, "empty_reward"),
    ({"per_step": "yes"}, "per_step"), ({"name": ""}, "name"), ({"scale": 10**400}, "scale"),
])
def test_bad_options_name_the_field(scorer, kwargs, field):
    with pytest.raises(ConfigError) as info:
        ProgressAdvantageReward(scorer, **kwargs)
    assert info.value.field == field


def test_no_autograd_graph(scorer):
    grad_enabled = []
    hook = nn.modules.module.register_module_forward_hook(lambda *_: grad_enabled.append(torch.is_grad_enabled()))
    try:
        with torch.enable_grad():
            ProgressAdvantageReward(scorer)(PROMPTS, COMPLETIONS)
    finally:
        hook.remove()
    assert grad_enabled and not any(grad_enabled)
    assert any(p.requires_grad for p in scorer.policy.model.parameters())


# ---------------------------------------------------------------------------------------------- real TRL runs
class EvenLength:
    """A second reward beside progress advantage (1 for an even number of characters) that keeps what TRL gave it."""

    __name__ = "even_length"

    def __init__(self):
        self.calls = []

    def __call__(self, prompts, completions, **kwargs):
        self.calls.append((copy.deepcopy(prompts), copy.deepcopy(completions)))
        return [float(len(c[0]["content"] if isinstance(c, list) else c) % 2 == 0) for c in completions]


@pytest.fixture(scope="module")
def base_model(tmp_path_factory):
    root = tmp_path_factory.mktemp("reward_grpo") / "base"
    build_model(build_tokenizer(), root, seed=0)
    return root


@pytest.fixture(scope="module")
def dataset():
    return Dataset.from_list([{"prompt": [{"role": "user", "content": f"What is {i} + {i}?"}]} for i in range(16)])


def run_args(tmp_path):
    # max_completion_length=8 cuts every sample of the random tiny model: truncated completions are what is scored
    return dict(output_dir=str(tmp_path / "out"), per_device_train_batch_size=4, num_generations=4,
                max_completion_length=8, max_steps=2, logging_steps=1, use_cpu=True, bf16=False, report_to="none",
                save_strategy="no", learning_rate=5e-3, seed=0)


def train_and_check(trainer, reward, other):
    trainer.train()
    rows = [r for r in trainer.state.log_history if "rewards/progress_advantage/mean" in r]
    assert len(rows) == 2 and len(other.calls) == 2
    for row, (prompts, completions) in zip(rows, other.calls):
        assert math.isfinite(row["rewards/progress_advantage/mean"])
        assert math.isfinite(row["rewards/progress_advantage/std"])
        assert row["rewards/progress_advantage/unscored_frac"] == 0.0 and "rewards/even_length/mean" in row
        assert row["completions/clipped_ratio"] == 1.0  # every completion was cut by max_completion_length
        # the logged mean is the mean of our rewards on exactly the completions TRL generated
        again = reward(prompts, completions)
        assert row["rewards/progress_advantage/mean"] == pytest.approx(sum(again) / len(again), abs=1e-6)


@pytest.mark.slow
def test_grpo_trains_with_progress_advantage_reward(base_model, dataset, scorer, tmp_path):
    reward, other = ProgressAdvantageReward(scorer), EvenLength()
    trainer = GRPOTrainer(model=str(base_model), args=GRPOConfig(**run_args(tmp_path)), train_dataset=dataset,
                          reward_funcs=[reward, other])
    train_and_check(trainer, reward, other)


@pytest.mark.slow
def test_rloo_trains_with_progress_advantage_reward(base_model, dataset, scorer, tmp_path):
    reward, other = ProgressAdvantageReward(scorer, scale=0.1, clip=1.0), EvenLength()
    trainer = RLOOTrainer(model=str(base_model), args=RLOOConfig(**run_args(tmp_path)), train_dataset=dataset,
                          reward_funcs=[reward, other])
    train_and_check(trainer, reward, other)
