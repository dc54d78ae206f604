"""Trained reward-model baselines: a real (tiny) ORM and PRM learn a separable toy task, their rows reach the
evaluation table, and unlabelled episodes are refused with the record and field named."""

import random

import numpy as np
import pytest
import torch

from progadv_trl.data import ProgadvDataError
from progadv_trl.envs.evaluation import evaluate_episodes
from progadv_trl.envs.exact import ExactSolver
from progadv_trl.envs.number_line import NumberLineEnv, Task
from progadv_trl.envs.reward_models import (RewardModel, RewardModelConfig, add_reward_model_rows, orm_pairs,
                                            prm_examples, train_orm, train_prm)
from progadv_trl.envs.sampling import Episode, to_trajectory
from progadv_trl.metrics import auroc
from progadv_trl.rendering import TrajectoryTokenizer

REPLIES = (("right", "right", 0.7), ("go right", "right", 0.3), ("left", "left", 0.6), ("go left", "left", 0.4))
# slip 0, goal one step to the right, two turns: the first reply decides (a left move leaves the goal two steps away)
ENV = NumberLineEnv(size=4, max_turns=2, slip=0.0, max_distance=1, replies=REPLIES)
TASKS = [Task(1, 2), Task(2, 3)]
CONFIG = RewardModelConfig(max_steps=60, batch_size=8, learning_rate=3e-3)


def uniform_oracle(task, histories):
    return np.full((len(histories), len(REPLIES)), np.log(1 / (len(REPLIES) + 1)))


def scripted_episodes(n: int, seed: int, group_size: int = 4):
    """Episodes of a uniformly random reply policy, labelled exactly (as ``sample_episodes`` labels them)."""
    rng, solver = random.Random(seed), ExactSolver(ENV, uniform_oracle, beta=0.5)
    out = []
    for i in range(n):
        task = TASKS[(i // group_size) % len(TASKS)]
        ep, state = Episode(task), ENV.initial_state(task)
        while not state.done:
            y = rng.randrange(len(REPLIES))
            state = ENV.step(task, state, y, rng)
            ep.replies.append(y)
            ep.texts.append(ENV.replies[y])
            ep.states.append(state)
        out.append(to_trajectory(ENV, ep, solver, id=f"{seed}-{i}", group=f"{seed}-g{i // group_size}"))
    return out


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    from progadv_trl.tiny import build_model, build_tokenizer, default_corpus, perturbed_copy

    root = tmp_path_factory.mktemp("rm")
    tok = build_tokenizer(corpus=default_corpus() + ENV.corpus())
    ref = build_model(tok, root / "reference", hidden_size=32, seed=0, initializer_range=0.1)
    perturbed_copy(ref, root / "policy", scale=0.3, seed=1)
    tok.save_pretrained(root / "policy")
    return root


@pytest.fixture(scope="module")
def trained(reference):
    torch.set_num_threads(1)
    train = scripted_episodes(64, seed=1)
    return train, train_orm(reference / "reference", train, CONFIG), train_prm(reference / "reference", train, CONFIG)


def test_toy_labels_are_separable():
    trajs = scripted_episodes(32, seed=5)
    for t in trajs:
        first_right = ENV.reply_action[t.metadata["replies"][0]] == 1
        assert t.success() == first_right
        assert (t.metadata["optimal_success_advantage"][0] >= -0.1) == first_right


def untrained(reference, kind: str) -> RewardModel:
    """The model training starts from (same seed for the new head)."""
    from transformers import (AutoModelForSequenceClassification, AutoModelForTokenClassification, AutoTokenizer,
                              set_seed)

    set_seed(CONFIG.seed)
    cls, n = (AutoModelForSequenceClassification, 1) if kind == "orm" else (AutoModelForTokenClassification, 2)
    tok = AutoTokenizer.from_pretrained(reference / "reference")
    return RewardModel(kind, cls.from_pretrained(reference / "reference", num_labels=n).eval(), tok, {})


def test_orm_learns_and_scores_prefixes(trained, reference):
    train, orm, _ = trained
    assert orm.info["max_steps"] == 60 and orm.info["n_episodes"] == 64 and orm.info["seconds"] > 0
    assert orm.info["epochs"] == pytest.approx(60 * 8 / orm.info["n_examples"])
    heldout = scripted_episodes(32, seed=2)
    success = [t.success() for t in heldout]
    assert auroc([s.score for s in untrained(reference, "orm").score(heldout)], success) < 0.8
    scored = orm.score(heldout)
    assert auroc([s.score for s in scored], success) > 0.9
    # one pass = the model run on each prefix; step values are the differences of successive prefix scores
    t, s = heldout[0], scored[0]
    tok = TrajectoryTokenizer(orm.tokenizer)(t)
    ends = [max(i for i, k in enumerate(tok.step_index) if k == j) for j in range(len(tok.steps))]
    with torch.no_grad():
        full = [float(orm.model(input_ids=torch.tensor([tok.input_ids[: e + 1]])).logits) for e in
                [ends[0] - 1, *ends]]
    assert s.raw == pytest.approx(full[1:], abs=1e-5) and s.score == pytest.approx(full[-1], abs=1e-5)
    assert s.step_values == pytest.approx(np.diff(full).tolist(), abs=1e-5)
    assert s.message_indices == list(t.steps)


def test_prm_learns_step_labels(trained, reference):
    _, _, prm = trained
    assert prm.info["n_labelled_steps"] > 64 and 0 < prm.info["good_fraction"] < 1
    heldout = scripted_episodes(32, seed=3)
    good = [g >= -0.1 for t in heldout for g in t.metadata["optimal_success_advantage"]]
    assert auroc([p for s in untrained(reference, "prm").score(heldout) for p in s.raw], good) < 0.8
    scored = prm.score(heldout)
    assert auroc([p for s in scored for p in s.raw], good) > 0.9
    for s in scored:
        assert s.step_values == pytest.approx(np.log(s.raw).tolist()) and s.score == pytest.approx(min(s.raw))


def test_rows_reach_the_evaluation_table(trained, reference):
    from progadv_trl import ProgressAdvantageScorer

    _, orm, prm = trained
    episodes = scripted_episodes(32, seed=4)
    scorer = ProgressAdvantageScorer.from_models(reference / "policy", reference / "reference", beta=0.5,
                                                 baselines=["policy_logprob"])
    results = scorer.score(episodes)
    add_reward_model_rows(episodes, results, {"orm": orm, "prm": prm})
    for r, t in zip(results, episodes):
        assert len(r.action_values["orm"]) == len(r.action_messages) == len(t.steps)
        assert set(r.scores) == {"progress_advantage", "policy_logprob", "orm", "prm"}
    table = evaluate_episodes(episodes, results)["table"]
    failed_labelled = [t for t in episodes if t.mistake_step is not None]
    assert failed_labelled
    for name in ("orm", "prm"):
        row = table[name]
        assert row["auroc"] > 0.9 and np.isfinite(row["spearman_exact"])
        # "step" attribution: the argmin of the action values
        hits = [r.predicted_mistake(using=name) == t.mistake_step for r, t in zip(results, episodes)
                if t.mistake_step is not None]
        assert row["attribution_accuracy"] == pytest.approx(np.mean(hits))
    # the PRM was taught the first reply's label; the ORM saw whole episodes only (here every two-reply episode
    # fails, so it scores a one-reply prefix as a likely success whatever the reply: no attribution claim for it)
    assert table["prm"]["attribution_accuracy"] > 0.8
    with pytest.raises(ValueError, match="taken by a built-in method"):
        add_reward_model_rows(episodes, results, {"policy_logprob": orm})
    with pytest.raises(ValueError, match="same order"):
        add_reward_model_rows(episodes[::-1], results, {"orm": orm})


def test_unlabelled_episodes_are_refused(reference):
    from transformers import AutoTokenizer

    render = TrajectoryTokenizer(AutoTokenizer.from_pretrained(reference / "reference"))
    trajs = scripted_episodes(8, seed=6)
    del trajs[3].metadata["optimal_success_advantage"]
    with pytest.raises(ProgadvDataError, match=r"record 6-3.*metadata\.optimal_success_advantage"):
        prm_examples(trajs, render, 0.1)
    trajs = scripted_episodes(8, seed=6)
    trajs[2].metadata["optimal_success_advantage"] = trajs[2].metadata["optimal_success_advantage"] + [0.0]
    with pytest.raises(ProgadvDataError, match=r"record 6-2.*labels for"):
        prm_examples(trajs, render, 0.1)
    trajs[2].reward = None
    with pytest.raises(ProgadvDataError, match=r"record 6-2, field 'reward'"):
        orm_pairs(trajs, render)
    won = [t for t in scripted_episodes(16, seed=7) if t.success()]
    with pytest.raises(ValueError, match="both a success and a failure"):
        orm_pairs(won, render)
