"""The built-in agent tasks by name (``DemoConfig.task``): environment class, demonstrator and default settings.

* ``number_line``: :class:`~progadv_trl.envs.number_line.NumberLineEnv`, fully observed, 4 turns, slips;
* ``repair``: :class:`~progadv_trl.envs.repair.RepairEnv`, a hidden faulty part, noisy sensor readings, 6 turns,
  and an irreversible mistake (replacing a working part).

Every task's exact optimum comes from the same DP (:mod:`~progadv_trl.envs.exact`), its reference from the same
pretraining on its demonstrator's episodes (:func:`~progadv_trl.envs.pretrain.train_reference`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .number_line import NumberLineEnv
from .pretrain import NoisyDemonstrator
from .repair import RepairDemonstrator, RepairEnv


@dataclass(frozen=True)
class TaskSpec:
    """A built-in task: ``env_class(**env_kwargs)`` builds it; ``demonstrator(env, **kwargs)`` acts in its
    demonstrations (an object with ``episode(task, rng) -> (replies, states)`` and ``describe() -> dict``);
    ``defaults``: the constructor arguments of the demo's task family."""

    name: str
    env_class: type
    demonstrator: type
    defaults: dict = field(default_factory=dict)


TASKS = {
    "number_line": TaskSpec("number_line", NumberLineEnv, NoisyDemonstrator,
                            {"size": 5, "max_turns": 4, "slip": 0.2, "max_distance": 3}),
    "repair": TaskSpec("repair", RepairEnv, RepairDemonstrator, {"max_turns": 6, "hit": 0.9, "false_alarm": 0.1}),
}


def task_spec(name: str) -> TaskSpec:
    if name not in TASKS:
        raise ValueError(f"task: unknown task {name!r} (built-in tasks: {', '.join(TASKS)})")
    return TASKS[name]


def make_env(name: str, kwargs: dict | None = None):
    """The environment of task ``name`` built from ``kwargs`` (e.g. ``DemoConfig.env``); unknown arguments are
    refused with the task and the argument named."""
    import inspect

    spec = task_spec(name)
    kwargs = dict(kwargs or {})
    allowed = set(inspect.signature(spec.env_class).parameters)
    unknown = sorted(set(kwargs) - allowed)
    if unknown:
        raise ValueError(f"env: {unknown} are not arguments of the {name!r} task ({spec.env_class.__name__}: "
                         f"{', '.join(sorted(allowed))})")
    return spec.env_class(**kwargs)


def spec_for_env(env) -> TaskSpec:
    """The built-in task whose environment class ``env`` is an instance of."""
    for spec in TASKS.values():
        if isinstance(env, spec.env_class):
            return spec
    raise ValueError(f"{type(env).__name__} is not the environment of a built-in task ({', '.join(TASKS)})")
