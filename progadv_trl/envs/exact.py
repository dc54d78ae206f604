"""The exact KL-regularised optimum of an episode task, by dynamic programming over the tree of HISTORIES.

An LM conditions on the whole conversation, so ``P_ref(y | h)`` depends on the history ``h`` (replies and
observations so far), not only on the environment state. The tree branches on every valid reply string ``y`` and
every distinct next state; at each non-terminal node an *oracle* gives ``log P_ref(y | h)`` for all valid replies,
and the remaining mass ``P_inv(h) = 1 - sum_y P_ref(y | h)`` is an invalid reply (the episode ends, reward 0).
Bottom-up, for reward ``R`` at the end and KL coefficient ``beta``:

    Q*(h, y) = sum_{s'} P(s' | s(h), a(y)) * (R(s') if s' is terminal else V*(h + (y, s')))
    V*(h)    = beta * log( sum_y P_ref(y | h) exp(Q*(h, y) / beta) + P_inv(h) )      (Q = 0 for invalid)
    A*(h, y) = Q*(h, y) - V*(h)

The soft-optimal policy ``pi*(y | h) = P_ref(y | h) exp(A*(h, y) / beta)`` sums to one (invalid included). Where no
policy can succeed any more (``S*(s) = 0``) every Q and V is exactly 0, so those subtrees are not queried.
Paraphrases of one action lead to different histories, so their A* differ slightly; their priors differ a lot.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np

from .number_line import NumberLineEnv, State, Task

History = tuple  # ((reply_index, next_state), ...)
Oracle = Callable[[Task, Sequence[History]], np.ndarray]  # -> [n_histories, n_replies] of log P_ref(y | h)


def _logsumexp(x: np.ndarray) -> float:
    m = np.max(x)
    return float(m) if not np.isfinite(m) else float(m + np.log(np.sum(np.exp(x - m))))


@dataclass
class ExactSolution:
    """``Q*``, ``V*`` and ``log P_ref`` at every queried history of one task, plus success probabilities at the root
    (``success_reference``: following ``P_ref``; ``success_soft``: following ``pi*``; ``success_optimal``: ``S*``)."""

    env: NumberLineEnv
    task: Task
    beta: float
    logp: dict = field(default_factory=dict)
    q: dict = field(default_factory=dict)
    v: dict = field(default_factory=dict)
    success_reference: float = 0.0
    success_soft: float = 0.0
    success_optimal: float = 0.0

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

    def annotate(self, replies: Sequence[int | None], states: Sequence[State], margin: float = 0.1) -> dict:
        """Per-step exact values along one episode (``states[t]`` follows ``replies[t]``).

        Returns ``exact_advantage`` (``A*(h_t, y_t)``), ``reference_logprob`` (``log P_ref(y_t | h_t)``, ``None`` for
        an invalid reply or where not queried), ``exact_value`` (``V*(h_t)``), ``optimal_success_advantage``
        (``S*(s_t, a_t) - S*(s_t)``, unregularised) and ``mistake_turn``: the first turn whose action loses more than
        ``margin`` of success probability against the best action, if the episode failed (else ``None``).
        """
        env, task = self.env, self.task
        history: History = ()
        state = env.initial_state(task)
        out = {"exact_advantage": [], "reference_logprob": [], "exact_value": [], "optimal_success_advantage": []}
        mistake = None
        for t, (reply, nxt) in enumerate(zip(replies, states, strict=True)):
            action = None if reply is None else env.reply_action[reply]
            gap = env.action_success(task, state, action) - env.best_success(task, state)
            if mistake is None and gap < -margin:
                mistake = t
            out["exact_advantage"].append(self.advantage(history, reply))
            out["exact_value"].append(self.value(history))
            lp = self.logp.get(history)
            out["reference_logprob"].append(None if lp is None or reply is None else float(lp[reply]))
            out["optimal_success_advantage"].append(gap)
            history, state = history + ((reply, nxt),), nxt
        out["mistake_turn"] = None if env.reward(state) > 0 else mistake
        return out


def solve(env: NumberLineEnv, task: Task, oracle: Oracle, beta: float, *, prune: bool = True) -> ExactSolution:
    """Solve one task exactly (see the module docstring); ``oracle(task, histories)`` is called once."""
    if beta <= 0:
        raise ValueError(f"beta must be positive, got {beta}")
    n_replies = len(env.replies)
    root_state = env.initial_state(task)

    def children(state: State, reply: int):
        return env.transitions(task, state, env.reply_action[reply])

    def live(state: State) -> bool:
        return not state.done and (not prune or env.best_success(task, state) > 0)

    nodes: list[History] = []
    stack: list[tuple[History, State]] = [((), root_state)]
    while stack:
        history, state = stack.pop()
        if live(state):
            nodes.append(history)
            stack.extend((history + ((y, s),), s) for y in range(n_replies) for _, s in children(state, y))
    logp = np.asarray(oracle(task, nodes), dtype=np.float64) if nodes else np.zeros((0, n_replies))
    if logp.shape != (len(nodes), n_replies):
        raise ValueError(f"oracle returned shape {logp.shape}, expected {(len(nodes), n_replies)}")
    sol = ExactSolution(env, task, beta, logp=dict(zip(nodes, logp)))

    def visit(history: History, state: State) -> tuple[float, float, float]:
        """``(V*(h), success under P_ref, success under pi*)`` from ``h`` on."""
        if state.done:
            r = env.reward(state)
            return r, r, r
        if history not in sol.logp:
            return 0.0, 0.0, 0.0
        q, s_ref, s_soft = np.zeros(n_replies), np.zeros(n_replies), np.zeros(n_replies)
        for y in range(n_replies):
            for p, nxt in children(state, y):
                v, sr, ss = visit(history + ((y, nxt),), nxt)
                q[y] += p * v
                s_ref[y] += p * sr
                s_soft[y] += p * ss
        lp = sol.logp[history]
        p_inv = max(0.0, 1.0 - float(np.exp(lp).sum()))
        terms = np.append(lp + q / beta, np.log(p_inv) if p_inv > 0 else -np.inf)
        v = beta * _logsumexp(terms)
        sol.q[history], sol.v[history] = q, v
        pi = np.exp(lp + (q - v) / beta)
        return v, float(np.exp(lp) @ s_ref), float(pi @ s_soft)

    _, sol.success_reference, sol.success_soft = visit((), root_state)
    sol.success_optimal = env.best_success(task, root_state)
    return sol


class ExactSolver:
    """Solutions per task, computed on first use with one oracle and ``beta``."""

    def __init__(self, env: NumberLineEnv, oracle: Oracle, beta: float):
        self.env, self.oracle, self.beta = env, oracle, beta
        self._cache: dict[Task, ExactSolution] = {}

    def __call__(self, task: Task) -> ExactSolution:
        if task not in self._cache:
            self._cache[task] = solve(self.env, task, self.oracle, self.beta)
        return self._cache[task]
