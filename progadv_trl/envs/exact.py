"""The exact KL-regularised optimum of an episode task, by dynamic programming over the tree of HISTORIES.

An LM conditions on the whole conversation, so ``P_ref(y | h)`` depends on the history ``h`` (replies and
observations so far), not only on the environment state. The tree branches on every valid reply string ``y`` and
every distinct next observation ``o``; at each non-terminal node an *oracle* gives ``log P_ref(y | h)`` for all valid
replies, and the remaining mass ``P_inv(h) = 1 - sum_y P_ref(y | h)`` is an invalid reply (the episode ends, reward 0).

The policy sees observations, not states: a history carries a *belief* ``b_h(s)`` over the environment states
consistent with it (the start states weighted by the task's prior, then Bayes' rule at every observation). With
``P(s', o | h, y) = sum_s b_h(s) P(s' | s, a(y)) [observe(s') = o]``, reward ``R`` at the end and KL coefficient
``beta``, bottom-up:

    Q*(h, y) = sum_o P(o | h, y) * (E[R | h, y, o] if o ends the episode else V*(h + (y, o)))
    V*(h)    = beta * log( sum_y P_ref(y | h) exp(Q*(h, y) / beta) + P_inv(h) )      (Q = 0 for invalid)
    A*(h, y) = Q*(h, y) - V*(h)

The soft-optimal policy ``pi*(y | h) = P_ref(y | h) exp(A*(h, y) / beta)`` sums to one (invalid included). The
unregularised optimum is the best success probability from the belief, ``S*(h) = max_a sum_o P(o | h, a) *
(E[R | ...] or S*(h + (a, o)))``. Where no policy can succeed any more (``S*(h) = 0``) every Q and V is exactly 0,
so those subtrees are not queried. A fully observed task (``observe(s) = s``) has one-state beliefs, and the DP
reduces to the tree over ``(reply, next state)``. Paraphrases of one action lead to different histories, so their A*
can differ; their priors differ a lot.

What an environment provides: ``replies``, ``reply_action`` (reply index -> action index), ``actions``,
``initial_states(task) -> [(p, state)]``, ``transitions(task, state, action) -> [(p, state')]`` (``action=None``: an
invalid reply), ``observe(state)`` (the hashable history element; it must tell whether the episode ended),
``reward(state)``, ``state.done``; optionally ``hopeless(state)`` (no continuation can succeed; a shortcut for S*).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np

History = tuple  # ((reply_index, observation), ...): what the policy saw
Belief = tuple  # ((probability, state), ...): the states consistent with a history, probabilities summing to one
Oracle = Callable[[object, Sequence[History]], np.ndarray]  # -> [n_histories, n_replies] of log P_ref(y | h)


def _logsumexp(x: np.ndarray) -> float:
    m = np.max(x)
    return float(m) if not np.isfinite(m) else float(m + np.log(np.sum(np.exp(x - m))))


class Beliefs:
    """Belief updates and the unregularised optimum ``S*`` of one task, keyed by ACTION-observation histories
    ``((action, observation), ...)`` (paraphrases of an action share them)."""

    def __init__(self, env, task):
        self.env, self.task = env, task
        self._hopeless = getattr(env, "hopeless", None)
        self._branches: dict = {}
        self._best: dict = {}

    def root(self) -> Belief:
        return tuple(self.env.initial_states(self.task))

    def branches(self, key: tuple, belief: Belief, action: int | None) -> list[tuple]:
        """``[(o, P(o | h, a), belief after o, terminal)]`` in first-seen order; ``terminal`` is
        ``sum_{s'} P(s', o | h, a) R(s')`` when ``o`` ends the episode, else ``None``."""
        memo = (key, action)
        if memo in self._branches:
            return self._branches[memo]
        env, groups = self.env, {}
        for b, s in belief:
            for p, nxt in env.transitions(self.task, s, action):
                g = groups.setdefault(env.observe(nxt), {})
                g[nxt] = g.get(nxt, 0.0) + b * p
        out = []
        for obs, g in groups.items():
            mass = sum(g.values())
            done = {s.done for s in g}
            if len(done) > 1:
                raise ValueError(f"observation {obs!r} does not tell whether the episode ended")
            terminal = sum(m * env.reward(s) for s, m in g.items()) if done.pop() else None
            out.append((obs, mass, tuple((m / mass, s) for s, m in g.items()), terminal))
        self._branches[memo] = out
        return out

    def after(self, key: tuple, belief: Belief, action: int | None, obs) -> Belief:
        """The belief after ``action`` and observation ``obs``."""
        for o, _, nxt, _ in self.branches(key, belief, action):
            if o == obs:
                return nxt
        raise ValueError(f"observation {obs!r} is impossible after action {action} at {key}")

    def best_success(self, key: tuple, belief: Belief) -> float:
        """``S*(h)``: the highest success probability any policy reaches from the belief of a live history."""
        if key not in self._best:
            if self._hopeless is not None and all(self._hopeless(s) for _, s in belief):
                self._best[key] = 0.0
            else:
                self._best[key] = max(self.action_success(key, belief, a) for a in range(len(self.env.actions)))
        return self._best[key]

    def action_success(self, key: tuple, belief: Belief, action: int | None) -> float:
        """``S*(h, a)``: success probability of ``a`` now and optimal play after (``None``: an invalid reply)."""
        total = 0
        for obs, mass, nxt, terminal in self.branches(key, belief, action):
            total += terminal if terminal is not None else mass * self.best_success(key + ((action, obs),), nxt)
        return total


@dataclass
class ExactSolution:
    """``Q*``, ``V*`` and ``log P_ref`` at every queried history of one task, plus success probabilities at the root
    (``success_reference``: following ``P_ref``; ``success_soft``: following ``pi*``; ``success_optimal``: ``S*``)."""

    env: object
    task: object
    beta: float
    logp: dict = field(default_factory=dict)
    q: dict = field(default_factory=dict)
    v: dict = field(default_factory=dict)
    success_reference: float = 0.0
    success_soft: float = 0.0
    success_optimal: float = 0.0
    beliefs: Beliefs | None = field(default=None, repr=False, compare=False)

    def value(self, history: History) -> float:
        return self.v.get(history, 0.0)

    def advantage(self, history: History, reply: int | None) -> float:
        """``A*(h, y)``; ``reply=None`` is an invalid reply (``Q = 0``). Zero where success is impossible."""
        if history not in self.q:
            return 0.0
        return (0.0 if reply is None else float(self.q[history][reply])) - self.v[history]

    def soft_policy(self, history: History) -> tuple[np.ndarray, float]:
        """``(pi*(y | h) for the valid replies, pi*(invalid | h))``."""
        a = self.q[history] - self.v[history]
        p = np.exp(self.logp[history])
        return p * np.exp(a / self.beta), max(0.0, 1.0 - p.sum()) * np.exp(-self.v[history] / self.beta)

    def annotate(self, replies: Sequence[int | None], states: Sequence, margin: float = 0.1) -> dict:
        """Per-step exact values along one episode (``states[t]`` follows ``replies[t]``; the history holds their
        observations).

        Returns ``exact_advantage`` (``A*(h_t, y_t)``), ``reference_logprob`` (``log P_ref(y_t | h_t)``, ``None`` for
        an invalid reply or where not queried), ``exact_value`` (``V*(h_t)``), ``optimal_success_advantage``
        (``S*(h_t, a_t) - S*(h_t)``, unregularised, from the belief) and ``mistake_turn``: the first turn whose
        action loses more than ``margin`` of success probability against the best action, if the episode failed
        (else ``None``).
        """
        env = self.env
        tree = self.beliefs or Beliefs(env, self.task)
        history: History = ()
        key, belief, state = (), tree.root(), None
        out = {"exact_advantage": [], "reference_logprob": [], "exact_value": [], "optimal_success_advantage": []}
        mistake = None
        for t, (reply, nxt) in enumerate(zip(replies, states, strict=True)):
            action = None if reply is None else env.reply_action[reply]
            gap = tree.action_success(key, belief, action) - tree.best_success(key, belief)
            if mistake is None and gap < -margin:
                mistake = t
            out["exact_advantage"].append(self.advantage(history, reply))
            out["exact_value"].append(self.value(history))
            lp = self.logp.get(history)
            out["reference_logprob"].append(None if lp is None or reply is None else float(lp[reply]))
            out["optimal_success_advantage"].append(gap)
            obs = env.observe(nxt)
            belief = tree.after(key, belief, action, obs)
            history, key, state = history + ((reply, obs),), key + ((action, obs),), nxt
        out["mistake_turn"] = None if state is not None and env.reward(state) > 0 else mistake
        return out


def solve(env, task, oracle: Oracle, beta: float, *, prune: bool = True) -> ExactSolution:
    """Solve one task exactly (see the module docstring); ``oracle(task, histories)`` is called once."""
    if beta <= 0:
        raise ValueError(f"beta must be positive, got {beta}")
    n_replies = len(env.replies)
    tree = Beliefs(env, task)
    root = tree.root()

    def live(key: tuple, belief: Belief) -> bool:
        return not belief[0][1].done and (not prune or tree.best_success(key, belief) > 0)

    nodes: list[History] = []
    stack: list[tuple[History, tuple, Belief]] = [((), (), root)]
    while stack:
        history, key, belief = stack.pop()
        if live(key, belief):
            nodes.append(history)
            for y in range(n_replies):
                a = env.reply_action[y]
                stack.extend((history + ((y, o),), key + ((a, o),), nxt) for o, _, nxt, _ in
                             tree.branches(key, belief, a))
    logp = np.asarray(oracle(task, nodes), dtype=np.float64) if nodes else np.zeros((0, n_replies))
    if logp.shape != (len(nodes), n_replies):
        raise ValueError(f"oracle returned shape {logp.shape}, expected {(len(nodes), n_replies)}")
    sol = ExactSolution(env, task, beta, logp=dict(zip(nodes, logp)), beliefs=tree)

    def visit(history: History, key: tuple, belief: Belief) -> tuple[float, float, float]:
        """``(V*(h), success under P_ref, success under pi*)`` from a non-terminal ``h`` on."""
        if history not in sol.logp:
            return 0.0, 0.0, 0.0
        q, s_ref, s_soft = np.zeros(n_replies), np.zeros(n_replies), np.zeros(n_replies)
        for y in range(n_replies):
            a = env.reply_action[y]
            for obs, mass, nxt, terminal in tree.branches(key, belief, a):
                if terminal is not None:
                    q[y] += terminal
                    s_ref[y] += terminal
                    s_soft[y] += terminal
                    continue
                v, sr, ss = visit(history + ((y, obs),), key + ((a, obs),), nxt)
                q[y] += mass * v
                s_ref[y] += mass * sr
                s_soft[y] += mass * ss
        lp = sol.logp[history]
        p_inv = max(0.0, 1.0 - float(np.exp(lp).sum()))
        terms = np.append(lp + q / beta, np.log(p_inv) if p_inv > 0 else -np.inf)
        v = beta * _logsumexp(terms)
        sol.q[history], sol.v[history] = q, v
        pi = np.exp(lp + (q - v) / beta)
        return v, float(np.exp(lp) @ s_ref), float(pi @ s_soft)

    _, sol.success_reference, sol.success_soft = visit((), (), root)
    sol.success_optimal = tree.best_success((), root)
    return sol


class ExactSolver:
    """Solutions per task, computed on first use with one oracle and ``beta``."""

    def __init__(self, env, oracle: Oracle, beta: float):
        self.env, self.oracle, self.beta = env, oracle, beta
        self._cache: dict = {}

    def __call__(self, task) -> ExactSolution:
        if task not in self._cache:
            self._cache[task] = solve(self.env, task, self.oracle, self.beta)
        return self._cache[task]
