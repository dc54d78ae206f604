"""Why GRPO's per-sequence loss makes the repair task's policy gamble: behaviour of each demo run's policy, and the
push each GRPO loss gives to opening with a replace.

    progadv demo --config demo_repair --output-dir progadv-demo-repair
    OMP_NUM_THREADS=1 python benchmarks/repair_length_bias.py --demo-dir progadv-demo-repair

For the reference and each run's policy at the given steps (default: the last): 32 episodes per task (12 tasks, in
groups of 8, seed 5), and per policy the success rate, the share of episodes whose first action is a replace (a
gamble: the fault is hidden), the success of those, the share with an unparseable reply, and the mean number of
policy tokens of successful and of failed episodes. A failure is long: after a wrong replace the device is damaged
and the episode goes on to the last turn.

Then, on the reference's episodes, the push of each loss on "open with a replace": with group advantages
``A_i = (r_i - mean_g) / std_g``, each episode's policy-gradient weight is ``w_i = A_i / L_i`` for ``loss_type="grpo"``
(each episode's token losses are averaged over its own length ``L_i``) and ``w_i = A_i / mean(L)`` for the token-level
losses (``"dapo"``, ``"dr_grpo"``, ``"bnpo"``: one normaliser for the batch); the push is
``sum_i w_i (1[i opens with a replace] - p_task)`` per group, averaged over groups (``p_task``: the share of the
task's episodes that open with a replace). Positive: the loss raises the probability of opening with a replace.
95% intervals by bootstrap over groups.

Last, for the runs named by ``--by-step-kind`` (default: ``dapo-no-bias-correction``), the mean progress advantage
of the run's exported scorer and the mean exact ``A*`` per kind of step (a test, a replace, an unparseable reply),
on the run's own episodes and on the reference's (``eval_episodes`` each, the demo's evaluation seed): where the
two disagree is where the log-ratio misreads a step. About five minutes at one thread.
"""

import argparse
import os
import random
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from progadv_trl.envs.repair import ACTIONS  # noqa: E402

N_BOOTSTRAP = 1000


def group_interval(values_by_group: np.ndarray, seed: int = 0) -> tuple[float, float, float]:
    """Mean over groups and its 95% bootstrap interval (groups resampled with replacement)."""
    from progadv_trl.envs.evaluation import interval

    rng = np.random.default_rng(seed)
    draws = rng.integers(0, len(values_by_group), (N_BOOTSTRAP, len(values_by_group)))
    low, high = interval(values_by_group[draws].mean(axis=1))
    return float(values_by_group.mean()), low, high


def action(env, reply) -> str:
    """The tool call a valid reply makes, whatever its spelling: ``"test(pump)"``, ``"replace(valve)"``, ..."""
    return ACTIONS[env.reply_action[reply]]


def opens_with_replace(env, episode) -> bool:
    first = episode.replies[0] if episode.replies else None
    return first is not None and action(env, first).startswith("replace")


def behaviour(env, episodes, group_size: int) -> dict:
    rewards = np.array([e.reward for e in episodes])
    gamble = np.array([opens_with_replace(env, e) for e in episodes])
    invalid = np.array([None in e.replies for e in episodes])
    unparseable = [t for e in episodes for r, t in zip(e.replies, e.texts) if r is None]
    tokens = np.array([sum(e.env_mask) for e in episodes])
    by_group = lambda x: x.reshape(-1, group_size).mean(axis=1)  # noqa: E731
    return {"success": group_interval(by_group(rewards.astype(float))),
            "opens with replace": group_interval(by_group(gamble.astype(float))),
            "success if it does": float(rewards[gamble].mean()) if gamble.any() else float("nan"),
            "success if it tests": float(rewards[~gamble].mean()) if (~gamble).any() else float("nan"),
            "unparseable reply": float(invalid.mean()),
            "unparseable, opening like a replace": (float(np.mean([t.startswith("replace") for t in unparseable]))
                                                    if unparseable else float("nan")),
            "tokens, successes": float(tokens[rewards == 1].mean()) if (rewards == 1).any() else float("nan"),
            "tokens, failures": float(tokens[rewards == 0].mean()) if (rewards == 0).any() else float("nan")}


def pushes(env, episodes, group_size: int) -> dict:
    """Per group, the push of each loss on opening with a replace (see the module docstring)."""
    rewards = np.array([e.reward for e in episodes]).reshape(-1, group_size)
    gamble = np.array([opens_with_replace(env, e) for e in episodes], dtype=float).reshape(-1, group_size)
    tokens = np.array([sum(e.env_mask) for e in episodes], dtype=float).reshape(-1, group_size)
    tasks = [episodes[g * group_size].task for g in range(len(rewards))]
    share = {t: gamble[[i for i, u in enumerate(tasks) if u == t]].mean() for t in set(tasks)}
    p = np.array([share[t] for t in tasks])[:, None]
    std = rewards.std(axis=1, ddof=1, keepdims=True)
    adv = (rewards - rewards.mean(axis=1, keepdims=True)) / (std + 1e-4)  # TRL: scale_rewards="group"
    sequence = (adv / tokens * (gamble - p)).sum(axis=1)
    token = (adv / tokens.mean() * (gamble - p)).sum(axis=1)
    return {'"grpo" (per-sequence mean)': group_interval(sequence, 1),
            '"dapo" / "dr_grpo" (token-level)': group_interval(token, 2)}


def step_kind(env, reply, turn: int) -> str:
    if reply is None:
        return "unparseable reply"
    kind = action(env, reply).split("(")[0]
    return kind + (" (first turn)" if turn == 0 else " (later turn)")


def by_step_kind(env, episodes, results) -> dict[str, tuple[int, float, float]]:
    """``{kind: (steps, mean progress advantage, mean exact A*)}`` over the assistant steps of labelled episodes."""
    rows: dict[str, list] = {}
    for episode, result in zip(episodes, results):
        exact = episode.metadata["exact_advantage"]
        for turn, (reply, step) in enumerate(zip(episode.metadata["replies"], result.steps)):
            if exact[turn] is not None:
                rows.setdefault(step_kind(env, reply, turn), []).append((step.advantage, exact[turn]))
    return {kind: (len(v), float(np.mean([a for a, _ in v])), float(np.mean([b for _, b in v])))
            for kind, v in sorted(rows.items())}


def main() -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from progadv_trl.envs.codec import ChatCodec
    from progadv_trl.envs.demo import load_config, prepare_reference
    from progadv_trl.envs.sampling import run_episodes
    from progadv_trl.envs.tasks import make_env

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--demo-dir", default="progadv-demo-repair")
    parser.add_argument("--config", default="demo_repair", help="the demo's config (name or YAML path)")
    parser.add_argument("--steps", type=int, nargs="*", help="checkpoint steps to read (default: each run's last)")
    parser.add_argument("--episodes-per-task", type=int, default=32)
    parser.add_argument("--seed", type=int, default=5)
    parser.add_argument("--by-step-kind", nargs="*", default=["dapo-no-bias-correction"],
                        help="runs whose scorer is read per kind of step (none: skip)")
    args = parser.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    cfg = load_config(args.config)
    if cfg.task != "repair":
        raise SystemExit(f"--config {args.config!r} is a {cfg.task!r} demo; this benchmark reads the repair task")
    demo = Path(args.demo_dir)
    env = make_env(cfg.task, cfg.env)
    policies = {"reference": prepare_reference(demo / "cache", env, cfg)}
    for run in cfg.runs:
        for step in args.steps or [run.steps]:
            folder = demo / run.name / "checkpoints" / f"step-{step}"
            if not folder.is_dir():
                raise SystemExit(f"{folder} is missing: run `progadv demo --config {args.config} --output-dir "
                                 f"{demo}` first")
            policies[f"{run.name} (loss {run.loss_type}), step {step}"] = folder

    tasks = [t for t in env.tasks() for _ in range(args.episodes_per_task)]
    rows, reference_episodes = [], None
    for name, folder in policies.items():
        model = AutoModelForCausalLM.from_pretrained(str(folder)).eval()
        codec = ChatCodec(AutoTokenizer.from_pretrained(str(folder)), env)
        episodes = run_episodes(model, codec, tasks, temperature=cfg.temperature,
                                generator=torch.Generator().manual_seed(args.seed), rng=random.Random(args.seed))
        reference_episodes = reference_episodes or episodes
        rows.append((name, behaviour(env, episodes, cfg.group_size)))

    ci = lambda v: f"{v[0]:.3f} [{v[1]:.2f}, {v[2]:.2f}]"  # noqa: E731
    print(f"## Behaviour ({len(tasks)} episodes per policy, seed {args.seed})\n")
    print("| policy | success | opens with a replace | success if it does | success if it tests | unparseable reply "
          "| of those replies, starting with \"replace\" | policy tokens: successes | failures |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name, b in rows:
        print(f"| {name} | {ci(b['success'])} | {ci(b['opens with replace'])} | {b['success if it does']:.3f} | "
              f"{b['success if it tests']:.3f} | {b['unparseable reply']:.3f} | "
              f"{b['unparseable, opening like a replace']:.3f} | {b['tokens, successes']:.1f} | "
              f"{b['tokens, failures']:.1f} |")
    print("\n## Push on opening with a replace, on the reference's episodes (positive: the loss makes it likelier)\n")
    print("| loss | push per group |")
    print("|---|---:|")
    for loss, value in pushes(env, reference_episodes, cfg.group_size).items():
        print(f"| {loss} | {value[0]:+.4f} [{value[1]:+.4f}, {value[2]:+.4f}] |")

    from progadv_trl import ProgressAdvantageScorer
    from progadv_trl.envs.demo import prepare_exact
    from progadv_trl.envs.sampling import sample_episodes

    runs = {run.name: run for run in cfg.runs}
    unknown = [name for name in args.by_step_kind if name not in runs]
    if unknown:
        raise SystemExit(f"--by-step-kind {unknown[0]!r}: no such run in {args.config!r} ({', '.join(runs)})")
    if args.by_step_kind:
        labels = prepare_exact(demo / "cache", env, policies["reference"], cfg)
        reference = AutoModelForCausalLM.from_pretrained(str(policies["reference"])).eval()
    for name in args.by_step_kind:
        scorer = ProgressAdvantageScorer.from_pretrained(demo / name / "_progadv" / "scorer")
        print(f"\n## {name}: progress advantage and exact A* by kind of step ({cfg.eval_episodes} episodes each)\n")
        print("| episodes of | step | steps | mean progress advantage | mean exact A* |")
        print("|---|---|---:|---:|---:|")
        for who, model in (("the run's policy", scorer.policy.model), ("the reference", reference)):
            episodes = sample_episodes(model, scorer.tokenizer, env, cfg.eval_episodes, cfg.temperature,
                                       seed=cfg.seed + 20_000, solver=labels.solver(runs[name].exact_beta),
                                       group_size=cfg.group_size)
            for kind, (n, pa, exact) in by_step_kind(env, episodes, scorer.score(episodes)).items():
                print(f"| {who} | {kind} | {n} | {pa:+.3f} | {exact:+.3f} |")


if __name__ == "__main__":
    main()
