"""A multi-turn agent task with stochastic transitions: walk on a short number line to a goal.

State: position ``pos`` on ``0..size-1``, a goal, turns left. Each assistant turn is ONE reply string from a finite
list of paraphrases of two actions (``"right"``, ``"move right"``, ``"go right"``, ...); any other reply ends the
episode as a failure. A move succeeds with probability ``1 - slip`` and otherwise leaves the agent where it is (moves
into a wall do nothing). The episode succeeds (reward 1) when the goal is reached within ``max_turns`` turns.

After every reply the environment answers with an observation (role ``"user"``, context, never scored), also after
the last one, so that a rendered conversation always ends with an observation.

The unregularised optimum is a function of the state only: ``S*(pos, k)`` = the best success probability with ``k``
turns left, ``S*(pos, k, a) = sum_{pos'} P(pos' | pos, a) S*(pos', k-1)``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache

from ..data import Message, Trajectory
from .chance import draw

ACTIONS = ("left", "right")
# (reply string, action, frequency in the demonstrations): value-irrelevant preferences of very different strength
DEFAULT_REPLIES = (
    ("right", "right", 0.70), ("move right", "right", 0.20), ("go right", "right", 0.08), ("step right", "right", 0.02),
    ("move left", "left", 0.70), ("left", "left", 0.20), ("go left", "left", 0.08), ("step left", "left", 0.02),
)
_OBS = re.compile(r"You are at (\d+)\. Goal (\d+)\. (\d+) turns? left\.")


@dataclass(frozen=True)
class Task:
    start: int
    goal: int

    @property
    def key(self) -> str:
        return f"s{self.start}-g{self.goal}"


@dataclass(frozen=True)
class State:
    pos: int
    turns_left: int
    success: bool = False
    invalid: bool = False

    @property
    def done(self) -> bool:
        return self.success or self.invalid or self.turns_left == 0


class NumberLineEnv:
    """The task family and its dynamics.

    Args:
        size: positions ``0..size-1``.
        max_turns: turn budget.
        slip: probability that a move leaves the agent in place.
        max_distance: tasks have ``1 <= |goal - start| <= max_distance``.
        replies: ``(text, action, demo_frequency)`` triples; the valid replies are exactly these texts.
    """

    def __init__(self, size: int = 5, max_turns: int = 4, slip: float = 0.2, max_distance: int = 3,
                 replies=DEFAULT_REPLIES):
        self.size, self.max_turns, self.slip, self.max_distance = size, max_turns, slip, max_distance
        self.replies = tuple(r[0] for r in replies)
        self.reply_action = tuple(ACTIONS.index(r[1]) for r in replies)
        self.reply_frequency = tuple(float(r[2]) for r in replies)
        self._index = {text: i for i, text in enumerate(self.replies)}
        if len(self._index) != len(self.replies):
            raise ValueError("reply strings must be distinct")

    def config(self) -> dict:
        """Constructor arguments (JSON-ready): ``NumberLineEnv(**env.config())`` rebuilds the task family."""
        replies = [[t, ACTIONS[a], f] for t, a, f in zip(self.replies, self.reply_action, self.reply_frequency)]
        return {"size": self.size, "max_turns": self.max_turns, "slip": self.slip,
                "max_distance": self.max_distance, "replies": replies}

    # ------------------------------------------------------------------ tasks and texts
    def tasks(self) -> list[Task]:
        return [Task(s, g) for s in range(self.size) for g in range(self.size)
                if 1 <= abs(g - s) <= self.max_distance]

    def system_prompt(self) -> str:
        return (f"You walk on a number line from 0 to {self.size - 1}. Reach the goal. "
                "Each turn reply with one move: left or right. A move can slip.")

    def initial_state(self, task: Task) -> State:
        return State(task.start, self.max_turns)

    # the interface the exact DP, the codec and the sampler use (shared with the partially observed tasks)
    actions = ACTIONS

    def initial_states(self, task: Task) -> list[tuple[float, State]]:
        """``[(probability, state)]`` at the start: here one, fully determined by the task."""
        return [(1.0, self.initial_state(task))]

    def reset(self, task: Task, rng) -> State:
        """The start state of an episode (nothing to draw: ``rng`` is not used)."""
        return self.initial_state(task)

    @staticmethod
    def observe(state: State) -> State:
        """What the policy sees after a step, as a history element: the whole state (the task is fully observed)."""
        return state

    def episode_metadata(self, task: Task, states: list[State]) -> dict:
        """JSON-ready facts of an episode for ``Trajectory.metadata``: the task and the positions after each turn."""
        return {"task": {"start": task.start, "goal": task.goal}, "positions": [s.pos for s in states]}

    def observation(self, task: Task, state: State) -> str:
        """The text of an observation (:meth:`observe` of a state: here the state itself)."""
        if state.invalid:
            return "Invalid reply. Episode over."
        if state.success:
            return f"You reached the goal at {task.goal}."
        if state.turns_left == 0:
            return f"Out of turns at {state.pos}. Goal {task.goal}."
        turns = "turn" if state.turns_left == 1 else "turns"
        return f"You are at {state.pos}. Goal {task.goal}. {state.turns_left} {turns} left."

    def prompt(self, task: Task) -> list[dict]:
        """The conversation before the first action (chat messages)."""
        return [{"role": "system", "content": self.system_prompt()},
                {"role": "user", "content": self.observation(task, self.initial_state(task))}]

    def task_from_prompt(self, messages: list[dict]) -> Task:
        """Inverse of :meth:`prompt` (TRL hands a rollout function the prompt messages only)."""
        m = _OBS.search(messages[-1]["content"])
        if m is None:
            raise ValueError(f"not a number-line prompt: {messages[-1]['content']!r}")
        return Task(int(m.group(1)), int(m.group(2)))

    def parse(self, text: str) -> int | None:
        """Index of a valid reply, or ``None``."""
        return self._index.get(text)

    # ------------------------------------------------------------------ dynamics
    def transitions(self, task: Task, state: State, action: int | None) -> list[tuple[float, State]]:
        """``[(probability, next_state)]`` for an action index (``None``: an invalid reply); same states merged."""
        if state.done:
            raise ValueError("the episode is over")
        if action is None:
            return [(1.0, State(state.pos, state.turns_left - 1, invalid=True))]
        step = 1 if ACTIONS[action] == "right" else -1
        out: dict[State, float] = {}
        for p, pos in ((1.0 - self.slip, min(max(state.pos + step, 0), self.size - 1)), (self.slip, state.pos)):
            if p > 0:
                nxt = State(pos, state.turns_left - 1, success=pos == task.goal)
                out[nxt] = out.get(nxt, 0.0) + p
        return [(p, s) for s, p in out.items()]

    def step(self, task: Task, state: State, reply: int | None, rng) -> State:
        """Sample the next state after reply ``reply`` (an index of :attr:`replies`, ``None``: invalid) with ``rng``
        (a ``random.Random``)."""
        return draw(self.transitions(task, state, None if reply is None else self.reply_action[reply]), rng)

    @staticmethod
    def reward(state: State) -> float:
        return 1.0 if state.success else 0.0

    # ------------------------------------------------------------------ unregularised optimum
    def best_success(self, task: Task, state: State) -> float:
        """``S*(state)``: the highest success probability any policy reaches from ``state``."""
        return _best_success(self, task, state)

    def action_success(self, task: Task, state: State, action: int | None) -> float:
        """``S*(state, a)``: success probability of ``a`` now and optimal play after (``None``: invalid reply)."""
        return sum(p * (self.reward(s) if s.done else self.best_success(task, s))
                   for p, s in self.transitions(task, state, action))

    # ------------------------------------------------------------------ rendering
    def to_trajectory(self, task: Task, replies: list[str], states: list[State], **fields) -> Trajectory:
        """Messages: system, first observation, then (reply, observation) per turn. ``states[t]`` follows
        ``replies[t]``."""
        msgs = [Message(m["role"], m["content"]) for m in self.prompt(task)]
        for reply, state in zip(replies, states, strict=True):
            msgs += [Message("assistant", reply), Message("user", self.observation(task, state))]
        return Trajectory(msgs, reward=self.reward(states[-1]) if states else 0.0, **fields)

    def corpus(self) -> list[str]:
        """Texts of this task family, for training a tokenizer."""
        lines = [self.system_prompt(), *self.replies, "Invalid reply. Episode over."]
        for task in self.tasks():
            for k in range(self.max_turns + 1):
                for pos in range(self.size):
                    lines.append(self.observation(task, State(pos, k, success=pos == task.goal)))
        return lines


@lru_cache(maxsize=None)
def _best_success(env: NumberLineEnv, task: Task, state: State) -> float:
    if state.done:
        return env.reward(state)
    return max(env.action_success(task, state, a) for a in range(len(ACTIONS)))
