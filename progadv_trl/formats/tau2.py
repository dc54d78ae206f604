"""tau2-bench results: a JSON file ``{"simulations": [{"id", "task_id", "messages", "reward_info": {"reward"}, ...}]}``.
Each simulation is one trajectory: id = simulation id, group = ``task_id``, reward = ``reward_info.reward``, every
other simulation field in metadata. Records are named by their index in ``simulations``, plus the simulation id.
Fields and an example: ``docs/formats.md``.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from ..data import Trajectory
from .reading import read_json_file
from .records import MISSING, Context, nameable, parse_messages, parse_reward, parse_str_id, type_name


def iter_tau2(path: Path, src: str, data: Any = MISSING) -> Iterator[tuple[Trajectory, Context]]:
    """The simulations of the tau2 results file ``path`` (``data``: its contents, when already read)."""
    if data is MISSING:
        data = read_json_file(path, src)
    top = Context(src, None)
    if not isinstance(data, Mapping):
        top.fail(f"a tau2 results file must be a JSON object with 'simulations', got {type_name(data)}")
    sims = data.get("simulations", MISSING)
    if sims is MISSING:
        top.fail("missing simulations", "simulations")
    if not isinstance(sims, list):
        top.fail(f"simulations must be a list, got {type_name(sims)}", "simulations")
    for i, sim in enumerate(sims):
        ctx = Context(src, i)
        if not isinstance(sim, Mapping):
            ctx.fail(f"a simulation must be an object, got {type_name(sim)}", f"simulations[{i}]")
        if nameable(sim.get("id")):
            ctx.rec = f"{i} (id {sim['id']!r})"
        messages = parse_messages(sim.get("messages", MISSING), ctx, "messages")
        reward_info = sim.get("reward_info")
        if reward_info is None:
            reward = None
        elif isinstance(reward_info, Mapping):
            reward = parse_reward(reward_info.get("reward"), ctx, "reward_info.reward")
        else:
            ctx.fail(f"reward_info must be an object, got {type_name(reward_info)}", "reward_info")
        traj = Trajectory(messages=messages, id=parse_str_id(sim.get("id"), ctx, "id"),
                          group=parse_str_id(sim.get("task_id"), ctx, "task_id"), reward=reward,
                          metadata={k: v for k, v in sim.items() if k not in ("id", "task_id", "messages")})
        yield traj, ctx
