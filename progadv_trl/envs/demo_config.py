"""The demo's configuration: one dataclass, read from YAML (the packaged ``demo`` and ``demo_quick`` configs,
``progadv_trl/configs/demo.yaml`` and ``progadv_trl/configs/demo_quick.yaml``).

The built-in defaults equal ``demo.yaml`` and :meth:`DemoConfig.quick` equals ``demo_quick.yaml`` (a test checks
both), so ``progadv demo`` and ``progadv demo --config demo`` run the same.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class RunConfig:
    """One GRPO run from the reference, with the progress-advantage callback attached.

    ``beta`` / ``loss_type``: TRL's KL coefficient and loss (``beta=0``, ``"dapo"`` is TRL's default).
    ``scale_rewards`` / ``use_bias_correction_kl``: the ``GRPOConfig`` fields of those names (TRL's defaults
    ``"group"`` and ``True``).
    ``exact_beta``: the beta of the exact ``A*`` the run's episodes are compared with; ``None`` means the run's own
    beta (a beta-0 run must name one: it has no KL-regularised optimum of its own).
    ``eval_steps``: the callback evaluates every this many steps. ``checkpoints``: steps whose policy is saved and
    evaluated on its own fresh episodes (the last step is always added).
    """

    name: str
    beta: float
    loss_type: str = "grpo"
    scale_rewards: str = "group"
    use_bias_correction_kl: bool = True
    steps: int = 150
    learning_rate: float = 1e-3
    prompts_per_step: int = 8
    num_generations: int = 8
    eval_steps: int = 25
    checkpoints: list[int] = field(default_factory=list)
    exact_beta: float | None = None

    def __post_init__(self):
        if self.beta < 0 or self.steps < 1 or self.eval_steps < 1:
            raise ValueError(f"run {self.name!r}: need beta >= 0, steps >= 1, eval_steps >= 1")
        if self.exact_beta is None:
            if self.beta <= 0:
                raise ValueError(f"run {self.name!r}: a beta-0 run needs exact_beta (the A* it is compared with)")
            self.exact_beta = self.beta
        self.checkpoints = sorted({int(s) for s in self.checkpoints if 0 < s < self.steps} | {self.steps})

    @property
    def score_beta(self) -> float:
        """The beta the scorer multiplies the log-ratio by: the trainer's, 1.0 for a beta-0 run."""
        return self.beta if self.beta > 0 else 1.0


@dataclass
class DemoConfig:
    """Everything the demo does, with the default (10-minute) settings.

    ``task``: the built-in task (:mod:`~progadv_trl.envs.tasks`: ``number_line`` or ``repair``).
    ``env``: that task's environment arguments (:class:`~progadv_trl.envs.number_line.NumberLineEnv`,
    :class:`~progadv_trl.envs.repair.RepairEnv`). ``reference``:
    :func:`~progadv_trl.envs.pretrain.train_reference` arguments. ``callback_episodes``: the callback's fixed
    held-out set, sampled from the reference before training (seed ``seed + 10000``). ``eval_episodes``: episodes
    sampled from each evaluated policy (seed ``seed + 20000``, the same for every policy), in groups of
    ``group_size`` per task. ``reference_episodes``: episodes sampled from the reference (seed ``seed + 30000``),
    scored by every evaluated policy: their failures hold the decisive mistakes; they are split by group into a
    validation half (where attribution rules are chosen and thresholds fitted) and a test half.
    ``reference_candidates``: references the final policy is also scored against (``alpha:a``: the weights
    ``theta_ref + a (theta - theta_ref)``; ``previous:k``: the policy ``k`` evaluations before the end), compared
    with the initial reference on the reference's episodes, chosen on the validation half by AUROC.
    ``reward_models``: training-set sizes (episodes of the reference, seed ``seed + 40000``, labelled) of the
    trained reward-model baselines, an ORM and a PRM per size (:mod:`~progadv_trl.envs.reward_models`), each
    trained for ``reward_model_steps`` optimizer steps; ``[]``: none.
    ``plot_episodes``: episodes drawn in the advantage plot. ``bootstrap``: resamples of the 95% intervals of the
    final tables (0: none).
    """

    seed: int = 0
    temperature: float = 1.0
    task: str = "number_line"
    env: dict = field(default_factory=lambda: {"size": 5, "max_turns": 4, "slip": 0.2, "max_distance": 3})
    reference: dict = field(default_factory=lambda: {"steps": 900, "n_demos": 3000})
    callback_episodes: int = 128
    eval_episodes: int = 256
    reference_episodes: int = 512
    group_size: int = 8
    runs: list[RunConfig] = field(default_factory=lambda: [
        RunConfig("grpo-beta0.04", beta=0.04, loss_type="grpo", steps=300, eval_steps=25,
                  checkpoints=[25, 50, 100, 200]),
        RunConfig("dapo-beta0", beta=0.0, loss_type="dapo", steps=100, eval_steps=25, checkpoints=[50],
                  exact_beta=0.04)])
    reference_candidates: list[str] = field(default_factory=lambda: ["alpha:-1", "alpha:-0.5", "alpha:0.5",
                                                                      "previous:1"])
    reward_models: list[int] = field(default_factory=lambda: [64, 256, 1024])
    reward_model_steps: int = 300
    plot_episodes: int = 4
    bootstrap: int = 200

    def __post_init__(self):
        self.runs = [r if isinstance(r, RunConfig) else RunConfig(**r) for r in self.runs]
        if len({r.name for r in self.runs}) != len(self.runs):
            raise ValueError("run names must be distinct")

    @classmethod
    def quick(cls) -> "DemoConfig":
        """The ``--quick`` settings: a smoke test of every phase in about 2 minutes (the numbers mean little)."""
        return cls(env={"size": 4, "max_turns": 3, "slip": 0.2, "max_distance": 2},
                   reference={"steps": 150, "n_demos": 600}, callback_episodes=32, eval_episodes=64,
                   reference_episodes=64, reference_candidates=["alpha:-1", "previous:1"], reward_models=[32],
                   reward_model_steps=10,
                   runs=[RunConfig("grpo-beta0.04", beta=0.04, steps=12, eval_steps=6, checkpoints=[6],
                                   prompts_per_step=4),
                         RunConfig("dapo-beta0", beta=0.0, loss_type="dapo", steps=6, eval_steps=6,
                                   prompts_per_step=4, exact_beta=0.04)],
                   plot_episodes=2, bootstrap=20)

    @classmethod
    def from_yaml(cls, path: str | Path) -> "DemoConfig":
        import yaml

        data = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
        unknown = set(data) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"{path}: unknown demo config keys {sorted(unknown)}")
        return cls(**data)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def reference_key(self) -> str:
        """Hash of what determines the reference checkpoint (its cache folder name)."""
        key = {"env": self.env, "reference": self.reference, "seed": self.seed}
        if self.task != "number_line":  # number-line cache names predate the task field
            key["task"] = self.task
        return _hash(key)

    def run_key(self, run: RunConfig) -> str:
        """Hash of what determines a trained run, its name and checkpoint list aside (its folder is reused when this
        matches and every checkpoint asked for was saved)."""
        settings = {k: v for k, v in dataclasses.asdict(run).items() if k not in ("name", "checkpoints")}
        return _hash({"reference": self.reference_key(), "run": settings,
                      "temperature": self.temperature, "callback_episodes": self.callback_episodes})

    def oracle_key(self) -> str:
        """Hash of what determines the reference's reply probabilities (the exact DP's cache file name)."""
        return _hash({"reference": self.reference_key(), "temperature": self.temperature})


def _hash(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:12]
