"""The partially observed repair task: dynamics, the belief DP over observation histories (against enumeration and,
fully observed, against the state-tree DP), decisive-mistake labels, the LM pieces and the demo config."""

import math
import random
from pathlib import Path

import numpy as np
import pytest
from conftest import synthetic_log_probs

from progadv_trl.envs.codec import ChatCodec
from progadv_trl.envs.exact import solve
from progadv_trl.envs.number_line import NumberLineEnv, Task
from progadv_trl.envs.repair import (ACTIONS, PARTS, Reading, RepairDemonstrator, RepairEnv, RepairState,
                                     RepairTask)
from progadv_trl.envs.tasks import TASKS, make_env, spec_for_env

ROOT = Path(__file__).resolve().parents[1]
SMALL_REPLIES = (("test(pump)", "test(pump)", 1.0), ("test(valve)", "test(valve)", 1.0),
                 ("replace(pump)", "replace(pump)", 0.8), ("swap(pump)", "replace(pump)", 0.2),
                 ("replace(valve)", "replace(valve)", 1.0), ("replace(filter)", "replace(filter)", 1.0))


def small_env(**kw):
    return RepairEnv(**{"max_turns": 3, "hit": 0.7, "false_alarm": 0.25, "priors": [(50, 30, 20), (20, 20, 60)],
                        "replies": SMALL_REPLIES, **kw})


def synthetic_oracle(task, histories, n_replies=len(SMALL_REPLIES), seed=0):
    """History-dependent pseudo-random reply distribution with some invalid mass."""
    return synthetic_log_probs(task, histories, n_replies, seed)


def ref_dist(task, history, n_replies=len(SMALL_REPLIES)):
    p = np.exp(synthetic_oracle(task, [history], n_replies)[0])
    return p, 1.0 - p.sum()


def enumerate_episodes(env, task, policy):
    """Every complete episode over the hidden start states: ``(probability, reward, sum_t log(pi/P_ref))`` under
    ``policy(history) -> (pi over replies, pi_invalid, P_ref over replies, P_ref_invalid)``; the policy sees only
    observations."""

    def walk(state, history, prob, log_ratio):
        if state.done:
            yield prob, env.reward(state), log_ratio
            return
        pi, pi_inv, ref, ref_inv = policy(history)
        if pi_inv > 0:
            yield prob * pi_inv, 0.0, log_ratio + math.log(pi_inv / ref_inv)
        for y in range(len(env.replies)):
            if pi[y] > 0:
                for p, nxt in env.transitions(task, state, env.reply_action[y]):
                    yield from walk(nxt, history + ((y, env.observe(nxt)),), prob * pi[y] * p,
                                    log_ratio + math.log(pi[y] / ref[y]))

    for p0, s0 in env.initial_states(task):
        yield from walk(s0, (), p0, 0.0)


def brute_best_success(env, task, readings=(), turns=None):
    """``S*`` from the readings so far, by the posterior of :meth:`RepairEnv.posterior` and a recursion over
    actions and readings (independent of the DP's belief code)."""
    turns = env.max_turns if turns is None else turns
    b = env.posterior(task, readings)
    if turns == 0 or any(r.outcome == "damaged" for r in readings):
        return 0.0
    best = 0.0
    for a, name in enumerate(ACTIONS):
        part = PARTS.index(name.split("(")[1][:-1])
        if name.startswith("replace"):
            best = max(best, b[part])
            continue
        high = sum(b[f] * (env.hit if f == part else env.false_alarm) for f in range(len(PARTS)))
        value = sum(p * brute_best_success(env, task, readings + (Reading(a, o, turns - 1),), turns - 1)
                    for p, o in ((high, "high"), (1 - high, "normal")))
        best = max(best, value)
    return best


# ---------------------------------------------------------------------------------------------- environment
def test_repair_dynamics_and_texts():
    env = RepairEnv()
    task = RepairTask((60, 30, 10))
    assert [p for p, _ in env.initial_states(task)] == pytest.approx([0.6, 0.3, 0.1])
    s = RepairState(1, Reading(-1, "start", 6))  # the valve is faulty
    test_valve, test_pump = ACTIONS.index("test(valve)"), ACTIONS.index("test(pump)")
    assert {n.seen.outcome: p for p, n in env.transitions(task, s, test_valve)} == pytest.approx(
        {"high": 0.9, "normal": 0.1})
    assert {n.seen.outcome: p for p, n in env.transitions(task, s, test_pump)} == pytest.approx(
        {"high": 0.1, "normal": 0.9})
    [(_, fixed)] = env.transitions(task, s, ACTIONS.index("replace(valve)"))
    assert fixed.success and fixed.done and env.reward(fixed) == 1.0
    [(_, broken)] = env.transitions(task, s, ACTIONS.index("replace(filter)"))
    assert broken.damaged and not broken.done and env.hopeless(broken)
    [(_, still)] = env.transitions(task, broken, ACTIONS.index("replace(valve)"))  # irreversible
    assert not still.success and still.seen.outcome == "damaged"
    [(_, bad)] = env.transitions(task, s, None)
    assert bad.invalid and bad.done
    assert env.parse("swap(filter)") is not None and env.reply_action[env.parse("replace(part=pump)")] == 2
    assert env.parse("replace(pump) ") is None
    assert env.task_from_prompt(env.prompt(task)) == task and len(env.tasks()) == 12
    assert env.observation(task, Reading(0, "high", 1)) == "Pump sensor reads high. 1 turn left."
    assert (env.observation(task, Reading(4, "damaged", 0))
            == "Replaced the filter. The device is damaged. Out of turns.")
    assert "Fault rates: pump 60%, valve 30%, filter 10%. 6 turns left." in env.prompt(task)[-1]["content"]
    rng = random.Random(0)
    faults = [env.reset(task, rng).fault for _ in range(4000)]
    assert np.bincount(faults, minlength=3) / 4000 == pytest.approx([0.6, 0.3, 0.1], abs=0.03)
    traj = env.to_trajectory(task, ["test(valve)", "replace(valve)"],
                             [RepairState(1, Reading(1, "high", 5)), fixed]).validate()
    assert traj.reward == 1.0 and traj.messages[-1].content == "Replaced the valve. The device works."
    assert RepairEnv(**env.config()).config() == env.config()


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="priors"):
        RepairEnv(priors=[(50, 30, 10)])
    with pytest.raises(ValueError, match="'fix\\(pump\\)'"):
        RepairEnv(replies=[("fix pump", "fix(pump)", 1.0)])
    with pytest.raises(ValueError, match="unknown task 'maze'"):
        make_env("maze")
    with pytest.raises(ValueError, match="'size'.*'repair'"):
        make_env("repair", {"size": 5})
    assert isinstance(make_env("number_line", TASKS["number_line"].defaults), NumberLineEnv)
    assert spec_for_env(RepairEnv()).demonstrator is RepairDemonstrator


# ---------------------------------------------------------------------------------------------- belief DP
def test_belief_dp_matches_enumeration():
    env, beta = small_env(), 0.3
    for task in env.tasks():
        sol = solve(env, task, synthetic_oracle, beta)
        full = solve(env, task, synthetic_oracle, beta, prune=False)
        assert sol.v[()] == pytest.approx(full.v[()], abs=1e-12) and len(sol.logp) < len(full.logp)

        def soft(history):
            ref, ref_inv = ref_dist(task, history)
            if history not in sol.q:  # pruned (damaged: no success possible): pi* = P_ref
                return ref, ref_inv, ref, ref_inv
            pi, pi_inv = sol.soft_policy(history)
            assert pi.sum() + pi_inv == pytest.approx(1.0, abs=1e-12)
            return pi, pi_inv, ref, ref_inv

        def objective(policy):
            return sum(p * (r - beta * lr) for p, r, lr in enumerate_episodes(env, task, policy))

        # the soft-optimal policy over observation histories attains V*(root); perturbed policies do worse
        assert objective(soft) == pytest.approx(sol.v[()], abs=1e-9)
        rng = np.random.default_rng(0)
        for _ in range(3):
            noise = {}

            def perturbed(history):
                pi, pi_inv, ref, ref_inv = soft(history)
                w = np.append(pi, pi_inv) * np.exp(noise.setdefault(history, rng.normal(size=len(pi) + 1) * 0.3))
                w /= w.sum()
                return w[:-1], w[-1], ref, ref_inv

            assert objective(perturbed) < sol.v[()]
        ref_policy = lambda h: (*ref_dist(task, h), *ref_dist(task, h))  # noqa: E731
        assert sol.success_reference == pytest.approx(sum(p * r for p, r, _ in enumerate_episodes(env, task,
                                                                                                  ref_policy)))
        assert sol.success_soft == pytest.approx(sum(p * r for p, r, _ in enumerate_episodes(env, task, soft)))
        assert sol.success_optimal == pytest.approx(brute_best_success(env, task), abs=1e-12)
        assert sol.success_soft <= sol.success_optimal + 1e-12


def test_q_is_the_expected_return_of_the_soft_policy():
    """``Q*(h, y) = E[R - beta * sum_{t>0} log(pi*/P_ref) | h, y]``, the expectation over the hidden fault given
    the observations, checked by Monte Carlo from a history with an informative reading."""
    env, beta = small_env(max_turns=4), 0.2
    task = env.tasks()[0]
    sol = solve(env, task, synthetic_oracle, beta)
    h = ((env.parse("test(pump)"), Reading(0, "high", 3)),)
    for reply in ("test(valve)", "replace(pump)"):
        y = env.parse(reply)
        assert mc_q(env, task, sol, h, y, beta, 10000) == pytest.approx(sol.q[h][y], abs=0.025)
    # replacing is terminal or hopeless: Q* is the posterior of the part
    assert sol.q[h][env.parse("replace(pump)")] == pytest.approx(env.posterior(task, [h[0][1]])[0], abs=1e-12)


def mc_q(env, task, sol, h, y, beta, n, seed=1):
    """Monte-Carlo estimate of ``Q*(h, y)``: draw the fault from the belief at ``h``, play ``y`` then ``pi*``."""
    readings = [obs for _, obs in h]
    b = env.posterior(task, readings)
    rng, total = random.Random(seed), 0.0
    for _ in range(n):
        state = RepairState(rng.choices(range(3), weights=b)[0], readings[-1])
        history, reply, ret = h, y, 0.0
        while True:
            state = env.step(task, state, reply, rng)
            if state.done:
                ret += env.reward(state)
                break
            history = history + ((reply, env.observe(state)),)
            ref, ref_inv = ref_dist(task, history)
            pi, pi_inv = sol.soft_policy(history) if history in sol.q else (ref, ref_inv)
            reply = rng.choices([*range(len(pi)), None], weights=[*pi, pi_inv])[0]
            ret -= beta * math.log((pi_inv / ref_inv) if reply is None else (pi[reply] / ref[reply]))
            if reply is None:
                break
        total += ret
    return total / n


def state_tree_solve(env, task, oracle, beta):
    """The DP over ``(reply, next state)`` for a fully observed task, written directly on states (no beliefs):
    returns ``(logp, q, v, success_reference, success_soft, S*(root))``."""
    n = len(env.replies)
    nodes, stack = [], [((), env.initial_state(task))]
    while stack:
        h, s = stack.pop()
        if not s.done and env.best_success(task, s) > 0:
            nodes.append(h)
            stack.extend((h + ((y, t),), t) for y in range(n) for _, t in env.transitions(task, s, env.reply_action[y]))
    logp = dict(zip(nodes, np.asarray(oracle(task, nodes), dtype=np.float64)))
    q, v = {}, {}

    def visit(h, s):
        if s.done:
            return (env.reward(s),) * 3
        if h not in logp:
            return 0.0, 0.0, 0.0
        qs, sr, ss = np.zeros(n), np.zeros(n), np.zeros(n)
        for y in range(n):
            for p, t in env.transitions(task, s, env.reply_action[y]):
                a, b, c = visit(h + ((y, t),), t)
                qs[y] += p * a
                sr[y] += p * b
                ss[y] += p * c
        lp = logp[h]
        p_inv = max(0.0, 1.0 - float(np.exp(lp).sum()))
        terms = np.append(lp + qs / beta, np.log(p_inv) if p_inv > 0 else -np.inf)
        m = terms.max()
        q[h], v[h] = qs, float(beta * (m + np.log(np.sum(np.exp(terms - m)))))
        return v[h], float(np.exp(lp) @ sr), float(np.exp(lp + (qs - v[h]) / beta) @ ss)

    _, s_ref, s_soft = visit((), env.initial_state(task))
    return logp, q, v, s_ref, s_soft, env.best_success(task, env.initial_state(task))


@pytest.mark.parametrize("slip", [0.0, 0.3])
def test_fully_observed_special_case_is_the_state_tree(slip):
    """On the number line (observe(s) = s) the belief DP is the DP over states: same histories (oracle keys) in the
    same order, bit-identical values, and the mistake labels of the state-based S*."""
    env = NumberLineEnv(size=4, max_turns=3, max_distance=2, slip=slip,
                        replies=(("right", "right", 0.7), ("go right", "right", 0.3), ("left", "left", 0.6),
                                 ("go left", "left", 0.4)))
    oracle = lambda task, hs: synthetic_oracle(task, hs, n_replies=4)  # noqa: E731
    for task in [Task(0, 2), Task(3, 2), Task(1, 3)]:
        sol = solve(env, task, oracle, 0.3)
        logp, q, v, s_ref, s_soft, s_opt = state_tree_solve(env, task, oracle, 0.3)
        assert list(sol.logp) == list(logp) and list(sol.q) == list(q)
        assert all(sol.logp[h].tobytes() == logp[h].tobytes() and sol.q[h].tobytes() == q[h].tobytes()
                   and sol.v[h] == v[h] for h in q)
        assert (sol.success_reference, sol.success_soft, sol.success_optimal) == (s_ref, s_soft, s_opt)
        rng = random.Random(3)
        for _ in range(20):
            state, replies, states = env.initial_state(task), [], []
            while not state.done:
                replies.append(rng.randrange(4))
                state = env.step(task, state, replies[-1], rng)
                states.append(state)
            gaps = sol.annotate(replies, states)["optimal_success_advantage"]
            before = [env.initial_state(task), *states[:-1]]
            assert gaps == [env.action_success(task, s, env.reply_action[y]) - env.best_success(task, s)
                            for y, s in zip(replies, before)]


# ---------------------------------------------------------------------------------------------- mistake labels
def play(env, task, fault, plan):
    """``(replies, states)`` of a scripted episode: ``plan`` is ``[(reply text or None, outcome)]``."""
    state, replies, states = RepairState(fault, Reading(-1, "start", env.max_turns)), [], []
    for text, outcome in plan:
        y = None if text is None else env.parse(text)
        [state] = [s for _, s in env.transitions(task, state, None if y is None else env.reply_action[y])
                   if s.seen.outcome == outcome]
        replies.append(y)
        states.append(state)
    return replies, states


def test_mistake_labels_on_scripted_episodes():
    env = RepairEnv()
    task = RepairTask((60, 30, 10))
    sol = solve(env, task, RepairDemonstrator(env).history_logprobs, 0.04)
    assert sol.success_optimal == pytest.approx(brute_best_success(env, task), abs=1e-12)
    # replacing the likeliest part at once gives 0.6 where testing first gives S* = 0.88: decisive when it fails,
    # and after the damage nothing matters (A* = V* = 0)
    early = sol.annotate(*play(env, task, 2, [("replace(pump)", "damaged"), ("test(valve)", "normal"),
                                              ("replace(filter)", "damaged")]))
    assert early["mistake_turn"] == 0
    assert early["optimal_success_advantage"][0] == pytest.approx(0.6 - sol.success_optimal)
    assert early["exact_advantage"][1:] == [0.0, 0.0] and early["exact_value"][1:] == [0.0, 0.0]
    # the same call succeeding: no mistake label, though the action lost success probability
    lucky = sol.annotate(*play(env, task, 0, [("replace(part=pump)", "fixed")]))
    assert lucky["mistake_turn"] is None and lucky["optimal_success_advantage"][0] < -0.1
    # evidence for the valve, then the pump replaced: the mistake is turn 4, not the tests before it
    stubborn = sol.annotate(*play(env, task, 1, [("test(pump)", "normal"), ("test(pump)", "normal"),
                                                 ("test(valve)", "high"), ("test(valve)", "high"),
                                                 ("replace(pump)", "damaged"), ("replace(valve)", "damaged")]))
    assert stubborn["mistake_turn"] == 4 and min(stubborn["optimal_success_advantage"][:4]) > -0.1
    assert stubborn["exact_advantage"][4] < -0.5
    # testing to the end: the last test forfeits everything
    never = sol.annotate(*play(env, task, 1, [("test(pump)", "normal"), ("test(valve)", "high"),
                                              ("test(valve)", "high"), ("test(pump)", "normal"),
                                              ("test(valve)", "normal"), ("test(valve)", "high")]))
    assert never["mistake_turn"] == 5 and never["optimal_success_advantage"][5] < -0.8
    # an invalid reply ends the episode: S*(h, invalid) = 0
    invalid = sol.annotate(*play(env, task, 0, [("test(pump)", "high"), (None, "invalid")]))
    assert invalid["mistake_turn"] == 1 and invalid["reference_logprob"][1] is None


# ---------------------------------------------------------------------------------------------- demonstrator
def test_demonstrator_acts_on_observations_only():
    env = RepairEnv()
    demo = RepairDemonstrator(env)
    task = RepairTask((10, 30, 60))
    p = demo.reply_probs(task, [])
    assert p.sum() == pytest.approx(1.0)
    # spellings of one action keep the reply list's frequencies
    a = [env.parse(t) for t in ("replace(filter)", "swap(filter)", "replace(part=filter)")]
    assert p[a] / p[a].sum() == pytest.approx([0.70, 0.25, 0.05])
    # evidence moves it: two high valve readings make replace(valve) likelier than at the start
    valve = [env.parse("replace(part=valve)"), env.parse("replace(valve)"), env.parse("swap(valve)")]
    seen = [Reading(1, "high", 5), Reading(1, "high", 4)]
    assert demo.reply_probs(task, seen)[valve].sum() > 2 * p[valve].sum()
    assert demo.history_logprobs(task, [((1, seen[0]), (1, seen[1]))])[0] == pytest.approx(
        np.log(demo.reply_probs(task, seen)))
    rng = random.Random(0)
    for _ in range(50):
        replies, states = demo.episode(task, rng)
        assert states[-1].done and all(not s.done for s in states[:-1]) and len({s.fault for s in states}) == 1


@pytest.mark.parametrize("name", ["demo_repair", "demo_repair_quick"])
def test_repair_configs(name):
    from progadv_trl.envs.demo import load_config

    cfg = load_config(name)
    env = make_env(cfg.task, cfg.env)
    assert cfg.task == "repair" and isinstance(env, RepairEnv)
    names = [r.name for r in cfg.runs]
    assert names[0] == "grpo-beta0.04" and len(set(names)) == len(names) >= 2
    if name == "demo_repair":  # the settings sweep: the per-sequence loss against the token-level ones
        assert {r.loss_type for r in cfg.runs} == {"grpo", "dapo", "dr_grpo"}
        assert {r.beta for r in cfg.runs} == {0.04, 0.2, 0.5}


# ---------------------------------------------------------------------------------------------- LM pieces
@pytest.fixture(scope="module")
def repair_model(tmp_path_factory):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from progadv_trl.tiny import build_model, build_tokenizer, default_corpus

    env = small_env()
    path = tmp_path_factory.mktemp("repairlm")
    tok = build_tokenizer(corpus=default_corpus() + env.corpus())
    build_model(tok, path, hidden_size=32, seed=0)
    return env, AutoTokenizer.from_pretrained(path), AutoModelForCausalLM.from_pretrained(path).eval()


def test_codec_renders_observation_histories(repair_model):
    from progadv_trl.rendering import TrajectoryTokenizer

    env, tok, _ = repair_model
    codec = ChatCodec(tok, env)
    task = env.tasks()[0]
    replies, states = play(env, task, 1, [("test(valve)", "high"), ("swap(pump)", "damaged"),
                                          ("test(pump)", "normal")])
    traj = env.to_trajectory(task, [env.replies[y] for y in replies], states)
    ids = TrajectoryTokenizer(tok)(traj).input_ids
    history = tuple((y, env.observe(s)) for y, s in zip(replies[:2], states[:2]))
    prefix = codec.history_ids(task, history)
    assert ids[: len(prefix)] == prefix and ids[len(prefix):].count(codec.eos_id) >= 1


def test_sample_episodes_are_labelled(repair_model):
    from progadv_trl.envs.sampling import sample_episodes

    env, tok, model = repair_model
    trajs = sample_episodes(model, tok, env, 16, temperature=1.0, seed=1, reference=model, beta=0.5)
    assert len(trajs) == 16 and len({t.group for t in trajs}) == 2
    for t in trajs:
        t.validate()
        meta = t.metadata
        assert len(meta["exact_advantage"]) == len(t.steps) == len(meta["outcomes"])
        assert meta["fault"] in PARTS and set(meta["task"]["prior"]) == set(PARTS)
        assert t.mistake_step is None or t.reward == 0.0


@pytest.mark.slow
def test_repair_quick_demo_runs_end_to_end(tmp_path):
    from progadv_trl.envs.demo import run_demo

    metrics = run_demo(tmp_path, config_path="demo_repair_quick")
    assert metrics["config"]["task"] == "repair"
    assert set(metrics["runs"]) == {"grpo-beta0.04", "dapo-beta0"}
    exact = metrics["exact"]["grpo-beta0.04"]
    assert exact["n_tasks"] == len(make_env("repair", metrics["config"]["env"]).tasks())
    assert 0 <= exact["success_reference"] <= exact["success_kl_optimal"] <= exact["success_optimal"] <= 1
    assert (tmp_path / "report" / "table.md").is_file()
