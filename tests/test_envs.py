"""The number-line agent task: dynamics, the exact DP over histories, the LM oracle, sampling and a GRPO smoke run."""

import math
import random

import numpy as np
import pytest
from conftest import synthetic_log_probs
import torch

from progadv_trl.envs.codec import ChatCodec
from progadv_trl.envs.exact import ExactSolver, solve
from progadv_trl.envs.number_line import NumberLineEnv, State, Task
from progadv_trl.envs.oracle import LMReplyOracle
from progadv_trl.envs.sampling import run_episodes, sample_episodes
from progadv_trl.rendering import TrajectoryTokenizer

SMALL_REPLIES = (("right", "right", 0.7), ("go right", "right", 0.3), ("left", "left", 0.6), ("go left", "left", 0.4))


def small_env(**kw):
    return NumberLineEnv(**{"size": 4, "max_turns": 3, "max_distance": 2, "replies": SMALL_REPLIES, **kw})


def synthetic_oracle(task, histories, n_replies=4, seed=0):
    """History-dependent pseudo-random reply distribution with some invalid mass."""
    return synthetic_log_probs(task, histories, n_replies, seed)


def enumerate_episodes(env, task, policy, history=(), state=None, prob=1.0, log_ratio=0.0):
    """Every complete episode: ``(probability, reward, sum_t log(pi/P_ref))`` under ``policy(history) ->
    (pi over replies, pi_invalid, P_ref over replies, P_ref_invalid)``."""
    state = env.initial_state(task) if state is None else state
    if state.done:
        yield prob, env.reward(state), log_ratio
        return
    pi, pi_inv, ref, ref_inv = policy(history, state)
    if pi_inv > 0:
        yield prob * pi_inv, 0.0, log_ratio + math.log(pi_inv / ref_inv)
    for y in range(len(env.replies)):
        if pi[y] == 0:
            continue
        for p, nxt in env.transitions(task, state, env.reply_action[y]):
            yield from enumerate_episodes(env, task, policy, history + ((y, nxt),), nxt, prob * pi[y] * p,
                                          log_ratio + math.log(pi[y] / ref[y]))


def ref_dist(task, history):
    p = np.exp(synthetic_oracle(task, [history])[0])
    return p, 1.0 - p.sum()


def objective(env, task, policy, beta):
    """J(pi) = E_pi[R - beta * sum_t log(pi/P_ref)], by enumeration."""
    return sum(p * (r - beta * lr) for p, r, lr in enumerate_episodes(env, task, policy))


# ---------------------------------------------------------------------------------------------- environment
def test_dynamics_and_parsing():
    env = NumberLineEnv()
    task = Task(1, 3)
    s = env.initial_state(task)
    assert s == State(1, 4)
    right = env.parse("move right")
    assert env.reply_action[right] == 1 and env.parse("Move right") is None and env.parse("right ") is None
    trans = env.transitions(task, s, 1)
    assert sorted(p for p, _ in trans) == pytest.approx([0.2, 0.8]) and {t.pos for _, t in trans} == {1, 2}
    wall = env.transitions(Task(0, 2), State(0, 3), 0)  # into the wall: both outcomes merge
    assert wall == [(1.0, State(0, 2))]
    assert env.transitions(task, s, None) == [(1.0, State(1, 3, invalid=True))]
    assert env.transitions(task, State(2, 1), 1)[0][1].success
    assert env.best_success(task, State(2, 1)) == pytest.approx(0.8)
    assert env.best_success(task, State(0, 2)) == 0.0
    assert env.action_success(task, State(2, 2), 0) == pytest.approx(0.2 * 0.8)
    assert env.task_from_prompt(env.prompt(task)) == task
    rng = random.Random(0)
    moves = [env.step(task, s, right, rng).pos for _ in range(4000)]
    assert np.mean(np.array(moves) == 2) == pytest.approx(0.8, abs=0.03)


def test_trajectory_rendering():
    env = NumberLineEnv()
    task = Task(1, 3)
    states = [State(2, 3), State(3, 2, success=True)]
    traj = env.to_trajectory(task, ["move right", "go right"], states).validate()
    assert traj.reward == 1.0 and traj.steps == (2, 4)
    assert [m.role for m in traj.messages] == ["system", "user", "assistant", "user", "assistant", "user"]
    assert traj.messages[-1].content == "You reached the goal at 3."


# ---------------------------------------------------------------------------------------------- exact DP
@pytest.mark.parametrize("slip", [0.0, 0.3])
def test_dp_matches_brute_force(slip):
    env, beta = small_env(slip=slip), 0.3
    for task in [Task(0, 2), Task(3, 2)]:
        sol = solve(env, task, synthetic_oracle, beta)
        full = solve(env, task, synthetic_oracle, beta, prune=False)
        assert sol.v[()] == pytest.approx(full.v[()], abs=1e-12)
        assert len(sol.logp) <= len(full.logp)

        def soft(history, state):
            ref, ref_inv = ref_dist(task, history)
            if history not in sol.q:  # pruned (no success possible): pi* = P_ref
                return ref, ref_inv, ref, ref_inv
            pi, pi_inv = sol.soft_policy(history)
            return pi, pi_inv, ref, ref_inv

        # the soft-optimal policy attains V*(root) and beats perturbed policies
        assert objective(env, task, soft, beta) == pytest.approx(sol.v[()], abs=1e-9)
        rng = np.random.default_rng(0)
        for _ in range(3):
            noise = {}

            def perturbed(history, state):
                pi, pi_inv, ref, ref_inv = soft(history, state)
                w = np.append(pi, pi_inv) * np.exp(noise.setdefault(history, rng.normal(size=len(pi) + 1) * 0.3))
                w /= w.sum()
                return w[:-1], w[-1], ref, ref_inv

            assert objective(env, task, perturbed, beta) < sol.v[()]
        # success probabilities at the root, by enumeration
        ref_policy = lambda h, s: (*ref_dist(task, h), *ref_dist(task, h))  # noqa: E731
        assert sol.success_reference == pytest.approx(
            sum(p * r for p, r, _ in enumerate_episodes(env, task, ref_policy)), abs=1e-12)
        assert sol.success_soft == pytest.approx(sum(p * r for p, r, _ in enumerate_episodes(env, task, soft)),
                                                 abs=1e-12)
        if slip == 0.0:  # deterministic dynamics: V* = beta log E_{P_ref}[exp(R / beta)]
            closed = beta * math.log(sum(p * math.exp(r / beta) for p, r, _ in enumerate_episodes(env, task,
                                                                                                   ref_policy)))
            assert sol.v[()] == pytest.approx(closed, abs=1e-9)


def test_soft_optimal_identities():
    env, beta = small_env(), 0.5
    sol = solve(env, Task(1, 3), synthetic_oracle, beta)
    for h in sol.q:
        pi, pi_inv = sol.soft_policy(h)
        assert pi.sum() + pi_inv == pytest.approx(1.0, abs=1e-12)
        for y in range(len(env.replies)):
            assert math.log(pi[y]) - sol.logp[h][y] == pytest.approx(sol.advantage(h, y) / beta, abs=1e-9)
        # E_{pi*}[A*] = beta * KL(pi* || P_ref) >= 0 and the advantages of P_ref's samples average below 0
        a = np.array([sol.advantage(h, y) for y in range(len(env.replies))])
        a_inv = sol.advantage(h, None)
        p_ref = np.exp(sol.logp[h])
        assert pi @ a + pi_inv * a_inv >= -1e-12
        assert p_ref @ a + (1 - p_ref.sum()) * a_inv <= 1e-12


def test_annotate_mistake():
    env = small_env(slip=0.0)
    sol = solve(env, Task(1, 3), synthetic_oracle, 0.3)
    left, right = env.parse("left"), env.parse("right")
    values = sol.annotate([right, left, right], [State(2, 2), State(1, 1), State(2, 0)])
    assert values["mistake_turn"] == 1  # at 2 with 2 turns, "left" makes the goal unreachable
    assert values["optimal_success_advantage"] == pytest.approx([0.0, -1.0, 0.0])
    assert values["exact_advantage"][2] == 0.0  # nothing matters once success is impossible
    ok = sol.annotate([right, right], [State(2, 2), State(3, 1, success=True)])
    assert ok["mistake_turn"] is None and ok["exact_advantage"][0] == pytest.approx(sol.advantage((), right))


# ---------------------------------------------------------------------------------------------- LM pieces
@pytest.fixture(scope="module")
def env_model(tmp_path_factory):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from progadv_trl.tiny import build_model, build_tokenizer, default_corpus

    env = small_env(max_turns=2)
    path = tmp_path_factory.mktemp("envlm")
    tok = build_tokenizer(corpus=default_corpus() + env.corpus())
    build_model(tok, path, hidden_size=32, seed=0)
    return env, AutoTokenizer.from_pretrained(path), AutoModelForCausalLM.from_pretrained(path).eval(), path


def test_codec_matches_trajectory_tokenizer(env_model):
    env, tok, _, _ = env_model
    codec = ChatCodec(tok, env)
    task = Task(0, 2)
    history = ((env.parse("go right"), State(1, 1)),)
    traj = env.to_trajectory(task, ["go right", "right"], [State(1, 1), State(2, 0, success=True)])
    tt = TrajectoryTokenizer(tok)(traj)
    ids = codec.history_ids(task, history)
    assert tt.input_ids[: len(ids)] == ids
    step2 = [t for t, s in zip(tt.input_ids, tt.step_index) if s == 1]
    assert step2 == codec.reply_ids[env.parse("right")] and step2[-1] == codec.eos_id
    assert codec.reply_index(step2) == env.parse("right") and codec.reply_index(step2[:-1]) is None


def test_oracle_matches_naive_forward(env_model):
    env, tok, model, _ = env_model
    codec = ChatCodec(tok, env)
    task = Task(2, 0)
    histories = [(), ((env.parse("left"), State(1, 1)),), ((env.parse("go right"), State(3, 1)),)]
    got = LMReplyOracle(model, codec, temperature=0.7, batch_size=2)(task, histories)
    for i, h in enumerate(histories):
        ids = codec.history_ids(task, h)
        for j, reply in enumerate(codec.reply_ids):
            with torch.no_grad():
                logp = torch.log_softmax(model(torch.tensor([ids + reply])).logits[0].float() / 0.7, -1)
            naive = sum(float(logp[len(ids) - 1 + k, t]) for k, t in enumerate(reply))
            assert got[i, j] == pytest.approx(naive, abs=1e-4)


def test_scorer_reads_the_oracles_tokens(env_model, tmp_path):
    """The scorer's step log-ratio equals the difference of the two models' oracle log-probs of that reply."""
    from progadv_trl import ProgressAdvantageScorer
    from progadv_trl.tiny import perturbed_copy

    env, tok, model, path = env_model
    policy = perturbed_copy(model, tmp_path / "policy", scale=0.3, seed=5)
    tok.save_pretrained(tmp_path / "policy")
    task, replies = Task(1, 3), [env.parse("go right"), env.parse("left")]
    states = [State(2, 1), State(1, 0)]
    traj = env.to_trajectory(task, [env.replies[y] for y in replies], states)
    scorer = ProgressAdvantageScorer.from_models(tmp_path / "policy", path, beta=1.0, temperature=0.7,
                                                 token_agg="sum")
    steps = scorer.score([traj])[0].steps
    codec = ChatCodec(tok, env)
    histories = [(), ((replies[0], states[0]),)]
    diff = (LMReplyOracle(policy.eval(), codec, 0.7)(task, histories)
            - LMReplyOracle(model, codec, 0.7)(task, histories))
    assert [s.message_index for s in steps] == [2, 4]
    for k, s in enumerate(steps):
        assert s.advantage == pytest.approx(diff[k, replies[k]], abs=1e-4)


def test_sampling_matches_naive_forward(env_model):
    env, tok, model, _ = env_model
    codec = ChatCodec(tok, env)
    eps = run_episodes(model, codec, [Task(0, 2)] * 3 + [Task(3, 1)] * 3, temperature=1.3,
                       generator=torch.Generator().manual_seed(0), rng=random.Random(0))
    for e in eps:
        assert len(e.completion_ids) == len(e.env_mask) == len(e.logprobs) and e.states
        ids = torch.tensor([e.prompt_ids + e.completion_ids])
        with torch.no_grad():
            logp = torch.log_softmax(model(ids).logits[0, len(e.prompt_ids) - 1: -1].float() / 1.3, -1)
        naive = logp.gather(-1, ids[0, len(e.prompt_ids):, None]).squeeze(-1)
        mask = torch.tensor(e.env_mask).bool()
        assert torch.allclose(naive[mask], torch.tensor(e.logprobs)[mask], atol=1e-4)
        assert e.completion_ids[-1] == codec.eos_id or len(e.replies) and e.replies[-1] is None


def test_sample_episodes_labels(env_model):
    env, tok, model, _ = env_model
    trajs = sample_episodes(model, tok, env, 16, temperature=1.0, seed=1, reference=model, beta=0.5)
    assert len(trajs) == 16 and len({t.group for t in trajs}) == 2
    for t in trajs:
        t.validate()
        assert len(t.metadata["exact_advantage"]) == len(t.steps)
        assert t.mistake_step is None or t.reward == 0.0
    # a policy equal to its reference: A* of P_ref's own samples averages below zero (it is -KL(P_ref||pi*)*beta)
    solver = ExactSolver(env, LMReplyOracle(model, ChatCodec(tok, env)), 0.5)
    sol = solver(Task(0, 2))
    p = np.exp(sol.logp[()])
    a = np.array([sol.advantage((), y) for y in range(len(env.replies))])
    assert p @ a + (1 - p.sum()) * sol.advantage((), None) <= 1e-12


# ---------------------------------------------------------------------------------------------- GRPO
@pytest.mark.slow
@pytest.mark.parametrize("beta,loss_type", [(0.04, "grpo"), (0.0, "dapo")])
def test_grpo_smoke(env_model, tmp_path, beta, loss_type):
    from progadv_trl.envs.training import train_grpo

    env, _, _, path = env_model
    trainer = train_grpo(path, tmp_path / "out", env=env, beta=beta, loss_type=loss_type, max_steps=2,
                         prompts_per_step=2, num_generations=4, save=False)
    logs = [row for row in trainer.state.log_history if "loss" in row]
    assert len(logs) == 2 and all(math.isfinite(row["loss"]) for row in logs)
    assert ("kl" in logs[0]) == (beta > 0)
    assert "rewards/env_reward/mean" in logs[0]
