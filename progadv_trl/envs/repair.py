"""A partially observed agent task with noisy tool readings and an irreversible mistake: diagnose and repair.

A device is down because exactly one of three parts (pump, valve, filter) is faulty. Which one is hidden: it is drawn
at the start from the task's prior, which the prompt shows ("Fault rates: pump 50%, valve 30%, filter 20%"). Each
assistant turn is ONE tool call from a finite list of spellings:

* ``test(pump)`` / ``test(valve)``: the part's sensor reads "high" with probability ``hit`` (0.9) if the part is
  faulty and ``false_alarm`` (0.1) if it works; a fresh reading every time. The filter has no sensor.
* ``replace(pump)`` (also ``replace(part=pump)``, ``swap(pump)``; likewise for valve and filter): replacing the
  faulty part repairs the device (reward 1, the episode ends); replacing a working part damages the device for good:
  the episode goes on, but no later action can succeed.

Any other reply ends the episode as a failure; after ``max_turns`` turns (default 6) the episode ends. The policy
sees only the observations (the readings and outcomes), never the fault, so the exact DP
(:mod:`~progadv_trl.envs.exact`) runs over observation histories with a belief over the fault. Only the two tests
lead to histories that can still succeed and are not over, so the DP tree has ``sum_{d < max_turns} 4^d`` histories
per task (1365 at 6 turns).
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from ..data import Message, Trajectory
from .chance import draw

PARTS = ("pump", "valve", "filter")
SENSORS = ("pump", "valve")
ACTIONS = tuple(f"test({p})" for p in SENSORS) + tuple(f"replace({p})" for p in PARTS)
# (reply string, action, frequency in the demonstrations among the spellings of that action)
DEFAULT_REPLIES = (
    ("test(pump)", "test(pump)", 1.0), ("test(valve)", "test(valve)", 1.0),
    ("replace(pump)", "replace(pump)", 0.70), ("replace(part=pump)", "replace(pump)", 0.25),
    ("swap(pump)", "replace(pump)", 0.05),
    ("replace(part=valve)", "replace(valve)", 0.70), ("replace(valve)", "replace(valve)", 0.25),
    ("swap(valve)", "replace(valve)", 0.05),
    ("replace(filter)", "replace(filter)", 0.70), ("swap(filter)", "replace(filter)", 0.25),
    ("replace(part=filter)", "replace(filter)", 0.05),
)
# fault rates in percent (pump, valve, filter): every ordering of a clear and of a vague prior
# (not too clear: replacing the likeliest part at once must do worse than the reference's testing; otherwise GRPO
# settles there)
DEFAULT_PRIORS = ((50, 30, 20), (50, 20, 30), (30, 50, 20), (20, 50, 30), (30, 20, 50), (20, 30, 50),
                  (40, 35, 25), (40, 25, 35), (35, 40, 25), (25, 40, 35), (35, 25, 40), (25, 35, 40))
_PRIOR = re.compile(r"Fault rates: pump (\d+)%, valve (\d+)%, filter (\d+)%\.")


@dataclass(frozen=True)
class RepairTask:
    prior: tuple[int, ...]  # fault rate of each part in percent, in PARTS order

    @property
    def key(self) -> str:
        return "-".join(f"{p}{r}" for p, r in zip(PARTS, self.prior))


class Reading(NamedTuple):
    """What the policy sees after a turn (the element of a history): the action (``None``: an invalid reply, ``-1``:
    the start), its outcome (``"high"``/``"normal"`` for a test, ``"fixed"``/``"damaged"`` for a replacement,
    ``"invalid"``, ``"start"``) and the turns left."""

    action: int | None
    outcome: str
    turns_left: int

    @property
    def done(self) -> bool:
        return self.outcome in ("fixed", "invalid") or self.turns_left == 0


class RepairState(NamedTuple):
    """The full state: the faulty part and whether the device is damaged (hidden), and the last reading (seen).
    Named tuples: the exact DP hashes many of them."""

    fault: int
    seen: Reading
    damaged: bool = False

    @property
    def turns_left(self) -> int:
        return self.seen.turns_left

    @property
    def success(self) -> bool:
        return self.seen.outcome == "fixed"

    @property
    def invalid(self) -> bool:
        return self.seen.outcome == "invalid"

    @property
    def done(self) -> bool:
        return self.seen.done


class RepairEnv:
    """The task family and its dynamics.

    Args:
        max_turns: turn budget.
        hit: probability that a faulty part's sensor reads high.
        false_alarm: probability that a working part's sensor reads high.
        priors: the tasks: fault rates ``(pump, valve, filter)`` in percent, each summing to 100.
        replies: ``(text, action, demo_frequency)`` triples (actions: ``test(pump)``, ``test(valve)``,
            ``replace(pump)``, ``replace(valve)``, ``replace(filter)``); the valid replies are exactly these texts.
    """

    actions = ACTIONS

    def __init__(self, max_turns: int = 6, hit: float = 0.9, false_alarm: float = 0.1, priors=DEFAULT_PRIORS,
                 replies=DEFAULT_REPLIES):
        if max_turns < 1 or not 0 <= false_alarm <= 1 or not 0 <= hit <= 1:
            raise ValueError(f"need max_turns >= 1 and probabilities in [0, 1], got max_turns={max_turns}, "
                             f"hit={hit}, false_alarm={false_alarm}")
        self.max_turns, self.hit, self.false_alarm = max_turns, float(hit), float(false_alarm)
        self.priors = tuple(tuple(int(x) for x in p) for p in priors)
        for p in self.priors:
            if len(p) != len(PARTS) or min(p) < 0 or sum(p) != 100:
                raise ValueError(f"priors: {list(p)} is not {len(PARTS)} fault rates in percent summing to 100")
        for r in replies:
            if r[1] not in ACTIONS:
                raise ValueError(f"replies: {r[0]!r} has action {r[1]!r}, not one of {list(ACTIONS)}")
        self.replies = tuple(r[0] for r in replies)
        self.reply_action = tuple(ACTIONS.index(r[1]) for r in replies)
        self.reply_frequency = tuple(float(r[2]) for r in replies)
        self._index = {text: i for i, text in enumerate(self.replies)}
        if len(self._index) != len(self.replies):
            raise ValueError("reply strings must be distinct")
        # action -> ("test", part) or ("replace", part)
        self._kind = [(a.split("(")[0], PARTS.index(a.split("(")[1].rstrip(")"))) for a in ACTIONS]

    def config(self) -> dict:
        """Constructor arguments (JSON-ready): ``RepairEnv(**env.config())`` rebuilds the task family."""
        replies = [[t, ACTIONS[a], f] for t, a, f in zip(self.replies, self.reply_action, self.reply_frequency)]
        return {"max_turns": self.max_turns, "hit": self.hit, "false_alarm": self.false_alarm,
                "priors": [list(p) for p in self.priors], "replies": replies}

    # ------------------------------------------------------------------ tasks and texts
    def tasks(self) -> list[RepairTask]:
        return [RepairTask(p) for p in self.priors]

    def system_prompt(self) -> str:
        return ("Repair the device: one part is faulty, pump, valve or filter. Reply with one tool call per turn. "
                f"test(pump), test(valve): a faulty part reads high {self.hit:.0%} of the time, a working one "
                f"{self.false_alarm:.0%}; the filter has no sensor. replace(pump), replace(valve), replace(filter): "
                "replacing a working part damages the device for good.")

    def initial_states(self, task: RepairTask) -> list[tuple[float, RepairState]]:
        """``[(probability, state)]`` at the start: the fault drawn from the task's prior."""
        start = Reading(-1, "start", self.max_turns)
        return [(r / sum(task.prior), RepairState(i, start)) for i, r in enumerate(task.prior) if r > 0]

    def reset(self, task: RepairTask, rng: random.Random) -> RepairState:
        """The start state of an episode: the fault drawn with ``rng`` from the task's prior."""
        return draw(self.initial_states(task), rng)

    @staticmethod
    def observe(state: RepairState) -> Reading:
        """What the policy sees of a state (a history element): the last reading, not the fault."""
        return state.seen

    def observation(self, task: RepairTask, reading: Reading) -> str:
        """The text of a reading (the prompt's last message for the start reading)."""
        if reading.outcome == "invalid":
            return "Invalid reply. Episode over."
        k = reading.turns_left
        tail = "Out of turns." if k == 0 else f"{k} turn{'s' if k != 1 else ''} left."
        if reading.outcome == "start":
            rates = ", ".join(f"{p} {r}%" for p, r in zip(PARTS, task.prior))
            return f"The device is down. Fault rates: {rates}. {tail}"
        kind, part = self._kind[reading.action]
        if kind == "test":
            return f"{PARTS[part].capitalize()} sensor reads {reading.outcome}. {tail}"
        if reading.outcome == "fixed":
            return f"Replaced the {PARTS[part]}. The device works."
        return f"Replaced the {PARTS[part]}. The device is damaged. {tail}"

    def prompt(self, task: RepairTask) -> list[dict]:
        """The conversation before the first action (chat messages)."""
        return [{"role": "system", "content": self.system_prompt()},
                {"role": "user", "content": self.observation(task, Reading(-1, "start", self.max_turns))}]

    def task_from_prompt(self, messages: list[dict]) -> RepairTask:
        """Inverse of :meth:`prompt` (TRL hands a rollout function the prompt messages only)."""
        m = _PRIOR.search(messages[-1]["content"])
        if m is None:
            raise ValueError(f"not a repair prompt: {messages[-1]['content']!r}")
        return RepairTask(tuple(int(g) for g in m.groups()))

    def parse(self, text: str) -> int | None:
        """Index of a valid reply, or ``None``."""
        return self._index.get(text)

    # ------------------------------------------------------------------ dynamics
    def transitions(self, task: RepairTask, state: RepairState,
                    action: int | None) -> list[tuple[float, RepairState]]:
        """``[(probability, next_state)]`` for an action index (``None``: an invalid reply)."""
        if state.done:
            raise ValueError("the episode is over")
        k = state.turns_left - 1
        if action is None:
            return [(1.0, RepairState(state.fault, Reading(None, "invalid", k), state.damaged))]
        kind, part = self._kind[action]
        if kind == "test":
            high = self.hit if part == state.fault else self.false_alarm
            return [(p, RepairState(state.fault, Reading(action, outcome, k), state.damaged))
                    for p, outcome in ((high, "high"), (1.0 - high, "normal")) if p > 0]
        if part == state.fault and not state.damaged:
            return [(1.0, RepairState(state.fault, Reading(action, "fixed", k)))]
        return [(1.0, RepairState(state.fault, Reading(action, "damaged", k), True))]

    def step(self, task: RepairTask, state: RepairState, reply: int | None, rng: random.Random) -> RepairState:
        """Sample the next state after reply ``reply`` (an index of :attr:`replies`, ``None``: invalid) with ``rng``."""
        return draw(self.transitions(task, state, None if reply is None else self.reply_action[reply]), rng)

    @staticmethod
    def reward(state: RepairState) -> float:
        return 1.0 if state.success else 0.0

    @staticmethod
    def hopeless(state: RepairState) -> bool:
        """A damaged device: no continuation can succeed (lets the DP skip those subtrees)."""
        return state.damaged

    def posterior(self, task: RepairTask, readings) -> np.ndarray:
        """``P(fault | readings)`` over PARTS after a sequence of :class:`Reading` (tests update it; a damaged
        replacement of part ``c`` rules ``c`` out)."""
        b = np.array(task.prior, dtype=float)
        for r in readings:
            if r.action is None or r.action < 0:
                continue
            kind, part = self._kind[r.action]
            if kind == "test":
                like = np.full(len(PARTS), self.false_alarm if r.outcome == "high" else 1 - self.false_alarm)
                like[part] = self.hit if r.outcome == "high" else 1 - self.hit
                b = b * like
            elif r.outcome == "damaged":
                b[part] = 0.0
        return b / b.sum() if b.sum() > 0 else np.full(len(PARTS), 1 / len(PARTS))

    # ------------------------------------------------------------------ rendering
    def episode_metadata(self, task: RepairTask, states: list[RepairState]) -> dict:
        """JSON-ready facts of an episode for ``Trajectory.metadata``: the task, the hidden fault and the outcome of
        each turn."""
        return {"task": {"prior": dict(zip(PARTS, task.prior))},
                "fault": PARTS[states[0].fault] if states else None, "outcomes": [s.seen.outcome for s in states]}

    def to_trajectory(self, task: RepairTask, replies: list[str], states: list[RepairState], **fields) -> Trajectory:
        """Messages: system, first observation, then (reply, observation) per turn. ``states[t]`` follows
        ``replies[t]``."""
        msgs = [Message(m["role"], m["content"]) for m in self.prompt(task)]
        for reply, state in zip(replies, states, strict=True):
            msgs += [Message("assistant", reply), Message("user", self.observation(task, state.seen))]
        return Trajectory(msgs, reward=self.reward(states[-1]) if states else 0.0, **fields)

    def corpus(self) -> list[str]:
        """Texts of this task family, for training a tokenizer."""
        lines = [self.system_prompt(), *self.replies, "Invalid reply. Episode over."]
        for task in self.tasks():
            lines.append(self.observation(task, Reading(-1, "start", self.max_turns)))
        for k in range(self.max_turns):
            for a, (kind, _) in enumerate(self._kind):
                for outcome in (("high", "normal") if kind == "test" else ("fixed", "damaged")):
                    lines.append(self.observation(self.tasks()[0], Reading(a, outcome, k)))
        return lines


class RepairDemonstrator:
    """``P(reply | observation history)`` of imperfect demonstrations of the repair task.

    The demonstrator tracks the exact posterior ``b`` over the faulty part (:meth:`RepairEnv.posterior`) but acts
    with a favourite part and no sense of the turn budget but a rough one:
    ``P(a) ∝ exp(skill * log-odds(b_c) + bias * [c == favourite] + (urgency if last turn else -patience))`` for
    ``a = replace(c)`` and ``P(a) ∝ 1`` for each test; then a spelling of the action with the reply list's
    frequencies.

    Args:
        env: the task family.
        skill: weight of the posterior log-odds in the decision to replace (higher: acts more on the evidence).
        bias: extra log-weight of replacing the favourite part, whatever the evidence.
        favourite: the favourite part.
        patience: log-weight taken from every replacement before the last turn.
        urgency: log-weight added to every replacement on the last turn.
    """

    def __init__(self, env: RepairEnv, skill: float = 1.0, bias: float = 1.0, favourite: str = "pump",
                 patience: float = 1.5, urgency: float = 2.0):
        if favourite not in PARTS:
            raise ValueError(f"favourite must be one of {list(PARTS)}, got {favourite!r}")
        self.env, self.skill, self.bias, self.favourite = env, skill, bias, favourite
        self.patience, self.urgency = patience, urgency

    def describe(self) -> dict:
        return {"demonstrator": "RepairDemonstrator", "skill": self.skill, "bias": self.bias,
                "favourite": self.favourite, "patience": self.patience, "urgency": self.urgency}

    def action_probs(self, task: RepairTask, readings) -> np.ndarray:
        """``P(action | readings)``; ``readings``: the :class:`Reading` of every turn so far."""
        env = self.env
        b = np.clip(env.posterior(task, readings), 1e-6, 1 - 1e-6)
        last_turn = (readings[-1].turns_left if readings else env.max_turns) == 1
        logits = np.zeros(len(ACTIONS))
        for a, (kind, part) in enumerate(env._kind):
            if kind == "replace":
                logits[a] = (self.skill * np.log(b[part] / (1 - b[part])) + self.bias * (PARTS[part] == self.favourite)
                             + (self.urgency if last_turn else -self.patience))
        p = np.exp(logits - logits.max())
        return p / p.sum()

    def reply_probs(self, task: RepairTask, readings) -> np.ndarray:
        pa = self.action_probs(task, readings)
        freq, act = np.array(self.env.reply_frequency), np.array(self.env.reply_action)
        totals = np.array([freq[act == a].sum() for a in range(len(ACTIONS))])
        return pa[act] * freq / np.where(totals[act] > 0, totals[act], 1.0)

    def history_logprobs(self, task: RepairTask, histories) -> np.ndarray:
        """``log P(reply | h)`` for observation histories ``((reply, reading), ...)``: an exact-DP oracle that
        stands for a reference which learned the demonstrations perfectly."""
        with np.errstate(divide="ignore"):
            return np.array([np.log(self.reply_probs(task, [r for _, r in h])) for h in histories])

    def episode(self, task: RepairTask, rng: random.Random) -> tuple[list[int], list[RepairState]]:
        state, replies, states = self.env.reset(task, rng), [], []
        while not state.done:
            y = rng.choices(range(len(self.env.replies)), weights=self.reply_probs(task, [s.seen for s in states]))[0]
            state = self.env.step(task, state, y, rng)
            replies.append(y)
            states.append(state)
        return replies, states
