"""Bundled example data: a flight-booking agent's trajectories, and single-turn GRPO prompts with their reward.

``example_trajectories`` (groups of 8 attempts at one booking task, successes and labelled failures) feeds the
examples, the tests and ``examples/flight_demo.py`` (the earlier built-in demo: tiny models trained on these
trajectories in seconds). ``progadv demo`` itself is the agent-environment demo, :mod:`progadv_trl.envs.demo`.
"""

from __future__ import annotations

import json
import random

from .data import Message, ToolCall, Trajectory

CITIES = ("Paris", "Rome", "Berlin", "Madrid", "Vienna", "Prague", "Lisbon", "Dublin", "Oslo", "Athens")
DAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday")
SYSTEM = "You are a travel agent. Use the tools search_flights and book_flight. Book exactly what the user asks."
FAILURES = ("wrong_flight", "wrong_passengers", "wrong_date", "no_booking")


def _attempt(rng: random.Random, task: dict, outcome: str) -> tuple[list[Message], int | None]:
    a, b, day, n, flights = task["from"], task["to"], task["day"], task["passengers"], task["flights"]
    cheapest = min(flights, key=lambda f: f["price"])
    search_day = rng.choice([d for d in DAYS if d != day]) if outcome == "wrong_date" else day
    msgs = [Message("system", SYSTEM),
            Message("user", f"Book the cheapest flight from {a} to {b} on {day} for {n} people."),
            Message("assistant", f"I will search for flights from {a} to {b} on {search_day}.",
                    (ToolCall("search_flights", {"from": a, "to": b, "date": search_day}),)),
            Message("tool", json.dumps(flights))]
    if outcome == "no_booking":
        msgs.append(Message("assistant", f"Flight {cheapest['id']} looks good. Your trip is all set."))
        return msgs, 4
    pick = max(flights, key=lambda f: f["price"]) if outcome == "wrong_flight" else cheapest
    people = n + rng.choice([-1, 1]) if outcome == "wrong_passengers" and n > 1 else (
        n + 1 if outcome == "wrong_passengers" else n)
    say = (f"The cheapest flight is {pick['id']} at {pick['price']} euros. I book it for {people} people."
           if outcome in ("success", "wrong_date") else f"I book flight {pick['id']} for {people} people.")
    msgs += [Message("assistant", say, (ToolCall("book_flight", {"flight": pick["id"], "passengers": people}),)),
             Message("tool", f"booked {pick['id']} for {people}, confirmation C{rng.randint(1000, 9999)}"),
             Message("assistant", f"Done: flight {pick['id']} is booked for {people} people.")]
    mistake = {"success": None, "wrong_date": 2, "wrong_flight": 4, "wrong_passengers": 4}[outcome]
    return msgs, mistake


def example_trajectories(n_groups: int = 24, group_size: int = 8, seed: int = 0) -> list[Trajectory]:
    """Groups of ``group_size`` attempts at one booking task each; about 40% succeed, failures carry
    ``mistake_step`` (the message index of the decisive wrong action)."""
    rng = random.Random(seed)
    out = []
    for g in range(n_groups):
        a, b = rng.sample(CITIES, 2)
        flights = [{"id": f"{a[:2].upper()}{rng.randint(100, 999)}", "price": rng.randint(60, 400)} for _ in range(3)]
        task = {"from": a, "to": b, "day": rng.choice(DAYS), "passengers": rng.randint(1, 4), "flights": flights}
        for k in range(group_size):
            outcome = "success" if rng.random() < 0.4 else rng.choice(FAILURES)
            msgs, mistake = _attempt(rng, task, outcome)
            out.append(Trajectory(msgs, id=f"g{g}-{k}", group=f"g{g}", reward=float(outcome == "success"),
                                  mistake_step=mistake, metadata={"outcome": outcome}))
    return out


def flight_prompts(n: int = 32, seed: int = 2) -> list[dict]:
    """Single-turn GRPO prompts from the booking task (system, user request and search results in the prompt), with
    the ``cheapest`` flight id as a column for :func:`reward_books_cheapest`."""
    rows = []
    for t in example_trajectories(n_groups=n, group_size=1, seed=seed):
        flights = next(json.loads(m.content) for m in t.messages if m.role == "tool" and m.content.startswith("["))
        rows.append({"prompt": [m.to_chat() for m in t.messages[:2]]
                     + [{"role": "user", "content": "Search results: " + json.dumps(flights)}],
                     "cheapest": min(flights, key=lambda f: f["price"])["id"]})
    return rows


def reward_books_cheapest(completions, cheapest, **kwargs) -> list[float]:
    """GRPO reward: 1.0 when the reply names the cheapest flight's id."""
    texts = [c[0]["content"] if isinstance(c, list) else c for c in completions]
    return [float(fid in text) for text, fid in zip(texts, cheapest)]
