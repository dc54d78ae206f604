"""``progadv demo``: progress advantage against the EXACT optimal advantage, on an agent task trained with TRL's GRPO.

Phases (each prints a line; the long ones show progress):

1. the reference: a tiny Qwen2 and its byte-level BPE tokenizer, built here and fine-tuned on imperfect, biased
   demonstrations of the number-line task (:mod:`~progadv_trl.envs.pretrain`);
2. the exact DP: ``log P_ref(y | h)`` of every valid reply after every history that can still succeed, then
   ``A*(h, y) = Q*(h, y) - V*(h)`` of the KL-regularised optimum per beta (:mod:`~progadv_trl.envs.exact`);
3. GRPO with ``beta > 0`` from the reference (TRL, ``rollout_func``) WITH
   :class:`~progadv_trl.ProgressAdvantageCallback` attached: it scores a fixed held-out set (episodes the reference
   sampled before training, labelled with the exact values) every ``eval_steps`` and exports the scorer; the policy
   is saved at the configured checkpoints;
4. the same with ``beta = 0`` and ``loss_type="dapo"`` (TRL's default), read with beta = 1;
5. every checkpoint samples fresh episodes (fixed seed, groups of 8 per task), labelled with the exact ``A*``; the
   final policy's are scored by the EXPORTED scorer (``_progadv/scorer``) with every baseline;
6. the report folder (:mod:`~progadv_trl.envs.report`): ``metrics.json``, ``table.md``, ``drift.md`` and plots.

The reference and the reference's reply probabilities are cached under ``<output_dir>/cache/`` by a hash of what
determines them, so a rerun with the same settings skips phases 1-2; everything else is recomputed.
"""

from __future__ import annotations

import math
import os
import shutil
import time
import warnings
from pathlib import Path

from .demo_config import DemoConfig, RunConfig

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")


class PhaseClock:
    """Wall time per phase (seconds), printed as ``[i/n] message (Xs)``."""

    def __init__(self, n_phases: int):
        self.n, self.i, self.start, self.last, self.seconds = n_phases, 0, time.time(), time.time(), {}

    def done(self, name: str, message: str) -> None:
        now = time.time()
        self.i += 1
        self.seconds[name] = round(now - self.last, 1)
        self.last = now
        print(f"[{self.i}/{self.n}] {message} ({self.seconds[name]:.0f}s)", flush=True)

    @property
    def total(self) -> float:
        return round(time.time() - self.start, 1)


# ---------------------------------------------------------------------------------------------- phases 1-2
def prepare_reference(cache: Path, env, cfg: DemoConfig) -> Path:
    """The reference checkpoint folder, trained unless cached under ``cache/reference-<hash>``."""
    from .pretrain import train_reference

    ref_dir = cache / f"reference-{cfg.reference_key()}"
    if not (ref_dir / "model.safetensors").exists():
        tmp = cache / f"{ref_dir.name}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        train_reference(tmp, env, seed=cfg.seed, progress=True, **cfg.reference)
        tmp.rename(ref_dir)
    return ref_dir


class ExactLabels:
    """Exact solutions of every task at any beta, sharing one cached reply-probability table (the DP's only
    model queries)."""

    def __init__(self, env, oracle):
        self.env, self.oracle, self._solvers = env, oracle, {}

    def solver(self, beta: float):
        from .exact import ExactSolver

        if beta not in self._solvers:
            self._solvers[beta] = ExactSolver(self.env, self.oracle, beta)
        return self._solvers[beta]

    def summary(self, beta: float) -> dict:
        """Mean over tasks of the success when following ``P_ref``, the KL-optimal ``pi*`` at ``beta`` and the best
        policy, and of ``KL(pi* || P_ref)`` per episode: ``(E_pi*[R] - V*(root)) / beta``, since
        ``V*(root) = E_pi*[R] - beta KL(pi* || P_ref)``."""
        import numpy as np

        sols = [self.solver(beta)(t) for t in self.env.tasks()]
        return {"beta": beta, "n_tasks": len(sols),
                "success_reference": float(np.mean([s.success_reference for s in sols])),
                "success_kl_optimal": float(np.mean([s.success_soft for s in sols])),
                "success_optimal": float(np.mean([s.success_optimal for s in sols])),
                "kl_per_episode_kl_optimal": float(np.mean([(s.success_soft - s.value(())) / beta for s in sols]))}


def prepare_exact(cache: Path, env, ref_dir: Path, cfg: DemoConfig) -> ExactLabels:
    """Solve every task at every run's ``exact_beta``; reply probabilities cached in ``cache/oracle-<hash>.pkl``."""
    from tqdm.auto import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .codec import ChatCodec
    from .oracle import CachedOracle, LMReplyOracle

    path = cache / f"oracle-{cfg.oracle_key()}.pkl"
    tok = AutoTokenizer.from_pretrained(str(ref_dir))
    model = AutoModelForCausalLM.from_pretrained(str(ref_dir)).eval()
    lm = LMReplyOracle(model, ChatCodec(tok, env), cfg.temperature)
    oracle = CachedOracle.load(path, lm) if path.exists() else CachedOracle(lm)
    labels = ExactLabels(env, oracle)
    for beta in sorted({r.exact_beta for r in cfg.runs}):
        solver = labels.solver(beta)
        for task in tqdm(env.tasks(), desc=f"exact DP (beta={beta})", mininterval=2.0,
                         disable=oracle.n_queried == 0 and path.exists()):
            solver(task)
    if oracle.n_queried:
        oracle.save(path)
    return labels


# ---------------------------------------------------------------------------------------------- phases 3-4
def _callbacks():
    """Two small ``TrainerCallback`` classes, defined lazily so that importing this module does not import TRL."""
    from transformers import TrainerCallback

    class PolicySnapshots(TrainerCallback):
        """Save the policy (and tokenizer) to ``<folder>/step-<n>`` after the listed optimizer steps."""

        def __init__(self, folder: Path, steps):
            self.folder, self.steps = Path(folder), set(steps)

        def on_step_end(self, args, state, control, model=None, processing_class=None, **kwargs):
            if state.global_step in self.steps and state.is_world_process_zero:
                target = self.folder / f"step-{state.global_step}"
                getattr(model, "module", model).save_pretrained(str(target))
                processing_class.save_pretrained(str(target))

    class ProgressLine(TrainerCallback):
        """One printed line per progress-advantage evaluation: train reward, TRL's KL, the callback's AUROC."""

        def __init__(self, name: str, every: int):
            self.name, self.every, self.t0 = name, every, time.time()

        def on_log(self, args, state, control, logs=None, **kwargs):
            step = state.global_step
            if not logs or "loss" not in logs or (step % self.every and step < state.max_steps):
                return
            kl = f" kl {logs['kl']:.4f}" if "kl" in logs else ""
            auroc = logs.get("progadv/auroc")
            print(f"      {self.name} step {step}/{state.max_steps}: reward {logs.get('reward', float('nan')):.3f}"
                  f"{kl}, progadv AUROC on held-out {auroc if auroc is None else round(auroc, 3)} "
                  f"({time.time() - self.t0:.0f}s)", flush=True)

    return PolicySnapshots, ProgressLine


def train_run(run: RunConfig, ref_dir: Path, run_dir: Path, env, heldout, cfg: DemoConfig):
    """GRPO from the reference with the progress-advantage callback; returns the trainer.

    Writes ``run_dir/progadv-history.jsonl``, ``run_dir/_progadv/scorer`` and ``run_dir/checkpoints/step-<n>``.
    """
    from ..callback import ProgressAdvantageCallback
    from ..config import ProgressAdvantageConfig
    from .training import train_grpo

    shutil.rmtree(run_dir, ignore_errors=True)
    trainer = train_grpo(ref_dir, run_dir, env=env, beta=run.beta, loss_type=run.loss_type, max_steps=run.steps,
                         scale_rewards=run.scale_rewards, use_bias_correction_kl=run.use_bias_correction_kl,
                         learning_rate=run.learning_rate, num_generations=run.num_generations,
                         prompts_per_step=run.prompts_per_step, temperature=cfg.temperature, seed=cfg.seed,
                         train=False)
    snapshots, progress = _callbacks()
    trainer.add_callback(ProgressAdvantageCallback(trainer=trainer, config=ProgressAdvantageConfig(
        heldout=heldout, eval_steps=run.eval_steps, baselines=["all"])))
    every_eval = range(run.eval_steps, run.steps + 1, run.eval_steps)  # later analyses read any evaluation's policy
    trainer.add_callback(snapshots(run_dir / "checkpoints", sorted({*run.checkpoints, *every_eval})))
    trainer.add_callback(progress(run.name, run.eval_steps))
    trainer.train()
    return trainer


TRAINED = "trained-run.json"


def mark_trained(run_dir: Path, key: str, train_log: list[dict]) -> None:
    """Record that ``run_dir`` holds a finished run with settings hash ``key`` (and its training log)."""
    import json

    (run_dir / TRAINED).write_text(json.dumps({"key": key, "train_log": train_log}), encoding="utf-8")


def trained_run(run_dir: Path, key: str, checkpoints) -> list[dict] | None:
    """The training log of a finished run in ``run_dir`` with settings hash ``key`` and every checkpoint in
    ``checkpoints`` saved, else ``None`` (the run is trained again)."""
    import json

    marker = run_dir / TRAINED
    if not marker.is_file():
        return None
    data = json.loads(marker.read_text(encoding="utf-8"))
    needed = [run_dir / "_progadv" / "scorer", run_dir / "progadv-history.jsonl",
              *[run_dir / "checkpoints" / f"step-{s}" for s in checkpoints]]
    return data["train_log"] if data.get("key") == key and all(p.exists() for p in needed) else None


def read_history(run_dir: Path) -> list[dict]:
    """The callback's evaluations (``progadv-history.jsonl``), one dict per evaluation."""
    import json

    path = run_dir / "progadv-history.jsonl"
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


# ---------------------------------------------------------------------------------------------- phase 5
def evaluate_policy(scorer, env, solver, cfg: DemoConfig):
    """Fresh episodes of the scorer's policy (seed ``cfg.seed + 20000``), labelled exactly and scored.

    Returns ``(episodes, results, evaluation)`` (see :func:`~progadv_trl.envs.evaluation.evaluate_episodes`).
    """
    from .evaluation import evaluate_episodes
    from .sampling import sample_episodes

    episodes = sample_episodes(scorer.policy.model, scorer.tokenizer, env, cfg.eval_episodes, cfg.temperature,
                               seed=cfg.seed + 20_000, solver=solver, group_size=cfg.group_size)
    results = scorer.score(episodes)
    return episodes, results, evaluate_episodes(episodes, results)


def evaluate_run(run: RunConfig, run_dir: Path, ref_dir: Path, env, labels: ExactLabels, cfg: DemoConfig,
                 reference_episodes, extra_rows=None) -> dict:
    """Every checkpoint of a run on its own episodes; the last one through the exported scorer. Every checkpoint
    also scores ``reference_episodes`` (fresh episodes of the reference, labelled at ``run.exact_beta``): a policy
    near the KL optimum rarely makes a decisive mistake, so its own failures are mostly slips (luck), while the
    reference's episodes hold many mistakes. Those are split by group (:func:`~.attribution_study.split_groups`)
    into a validation half, where choices are made (attribution rules and thresholds, settings, references), and a
    test half, which the tables report. ``extra_rows(episodes, results)``: adds methods to scored results (the
    trained reward models).

    Returns ``{"checkpoints": [{"step", **evaluation, "on_reference", "on_reference_validation"}], "final":
    evaluation, "final_on_reference": evaluation (test half), "final_on_reference_validation", "attribution_rules",
    "episodes", "results"}`` (the final policy's episodes and scores, for the plots).
    """
    from ..scorer import ProgressAdvantageScorer
    from .attribution_study import split_groups
    from .evaluation import bootstrap, evaluate_episodes, intervals

    solver = labels.solver(run.exact_beta)
    val, test = split_groups(reference_episodes, seed=cfg.seed)
    ref_val, ref_test = [reference_episodes[i] for i in val], [reference_episodes[i] for i in test]
    add_rows = extra_rows or (lambda episodes, results: results)
    out: dict = {"checkpoints": []}
    for step in run.checkpoints:
        if step == run.steps:
            scorer = ProgressAdvantageScorer.from_pretrained(run_dir / "_progadv" / "scorer")
        else:
            scorer = ProgressAdvantageScorer.from_models(
                run_dir / "checkpoints" / f"step-{step}", ref_dir, beta=run.score_beta, temperature=cfg.temperature,
                token_agg="sum", baselines=["all"])
        episodes, results, _ = evaluate_policy(scorer, env, solver, cfg)
        results = add_rows(episodes, results)
        reference_results = add_rows(reference_episodes, scorer.score(reference_episodes))
        out["checkpoints"].append({
            "step": step, **evaluate_episodes(episodes, results),
            "on_reference": evaluate_episodes(ref_test, [reference_results[i] for i in test]),
            "on_reference_validation": evaluate_episodes(ref_val, [reference_results[i] for i in val])})
    final = out["checkpoints"][-1]
    test_results = [reference_results[i] for i in test]
    out.update(final={k: v for k, v in final.items() if not k.startswith("on_reference") and k != "step"},
               final_on_reference=final["on_reference"], final_on_reference_validation=final["on_reference_validation"],
               episodes=episodes, results=results,
               attribution_rules=attribution_rules(reference_episodes, reference_results, cfg.seed),
               reference_candidates=reference_candidates(run, run_dir, ref_dir, cfg, reference_episodes,
                                                         reference_results, (val, test)))
    if cfg.bootstrap:  # 95% intervals over resampled groups for the final tables ("better than": paired draws)
        out["draws"] = bootstrap(episodes, results, n=cfg.bootstrap, seed=cfg.seed)
        out["draws_on_reference"] = bootstrap(ref_test, test_results, n=cfg.bootstrap, seed=cfg.seed)
        out["final"]["intervals"] = intervals(out["draws"])
        out["final_on_reference"]["intervals"] = intervals(out["draws_on_reference"])
    return out


def train_reward_models(ref_dir: Path, cfg: DemoConfig, episodes) -> dict:
    """``{"orm@<n>": model, "prm@<n>": model}`` for each size ``n`` of ``cfg.reward_models``, trained from the
    reference on the first ``n`` of ``episodes`` (labelled reference episodes, disjoint from every evaluated set)."""
    from .reward_models import RewardModelConfig, train_orm, train_prm

    config = RewardModelConfig(max_steps=cfg.reward_model_steps, seed=cfg.seed)
    models = {}
    for n in cfg.reward_models:
        models[f"orm@{n}"] = train_orm(ref_dir, episodes[:n], config)
        models[f"prm@{n}"] = train_prm(ref_dir, episodes[:n], config)
    return models


def reference_candidates(run: RunConfig, run_dir: Path, ref_dir: Path, cfg: DemoConfig, episodes, initial_results,
                         halves) -> dict:
    """The final policy scored against each of ``cfg.reference_candidates`` and the initial reference on
    ``episodes``: per candidate the progress-advantage row on the validation and the test half; ``chosen``: the best
    validation AUROC (ties: the initial reference first)."""
    from ..scorer import ProgressAdvantageScorer
    from ..trajectory_scores import METHOD
    from .evaluation import evaluate_episodes

    val, test = halves
    policy = run_dir / "checkpoints" / f"step-{run.steps}"

    def rows(results) -> dict:
        return {half: evaluate_episodes([episodes[i] for i in idx], [results[i] for i in idx])["table"][METHOD]
                for half, idx in (("validation", val), ("test", test))}

    out = {"initial": rows(initial_results)}
    for name in cfg.reference_candidates:
        kind, _, value = name.partition(":")
        if kind == "alpha":
            kwargs = {"reference": ref_dir, "reference_alpha": float(value)}
        elif kind == "previous":
            step = run.steps - int(value) * run.eval_steps
            if step <= 0:
                continue
            kwargs = {"reference": run_dir / "checkpoints" / f"step-{step}"}
        else:
            raise ValueError(f"reference_candidates: unknown candidate {name!r} (alpha:<a> or previous:<k>)")
        scorer = ProgressAdvantageScorer.from_models(policy, beta=run.score_beta, temperature=cfg.temperature,
                                                     token_agg="sum", **kwargs)
        out[name] = rows(scorer.score(episodes))
    def validation_auroc(name):
        a = out[name]["validation"]["auroc"]
        return a if isinstance(a, float) and math.isfinite(a) else -math.inf

    chosen = max(out, key=lambda n: (validation_auroc(n), n == "initial"))
    return {"candidates": out, "chosen": chosen}


def attribution_rules(episodes, results, seed: int) -> dict:
    """Every attribution rule for every method on a validation / test split of ``episodes`` (by group): thresholds
    fitted and the rule for progress advantage chosen on validation, accuracies reported on test, with the chosen
    rule's calibration (:mod:`~progadv_trl.envs.attribution_study`)."""
    from .attribution_study import calibration, choose_rule, compare_rules, split_groups

    val, test = split_groups(episodes, seed=seed)
    on_val = compare_rules(episodes, results, evaluate_idx=val, fit_idx=val)
    on_test = compare_rules(episodes, results, evaluate_idx=test, fit_idx=val)
    rule = choose_rule(on_val)
    threshold = on_val["progress_advantage"][rule].get("threshold")
    cal = calibration(episodes, results, rule=rule, threshold=threshold, indices=val)
    return {"validation": on_val, "test": on_test, "chosen": rule, "threshold": threshold,
            "calibration_validation": cal,
            "calibration_test": calibration(episodes, results, rule=rule, threshold=threshold, indices=test,
                                            edges=cal["edges"])}


# ---------------------------------------------------------------------------------------------- the demo
def load_config(config_path: str | os.PathLike | None = None, quick: bool = False) -> DemoConfig:
    """``config_path`` (a YAML file or a packaged config's name, ``demo``) when given, else the built-in default
    (``quick``: the ``--quick`` settings)."""
    if config_path is not None:
        from ..configs import resolve

        return DemoConfig.from_yaml(resolve(config_path))
    return DemoConfig.quick() if quick else DemoConfig()


def run_demo(output_dir: str | os.PathLike = "progadv-demo", *, config_path: str | os.PathLike | None = None,
             quick: bool = False, config: DemoConfig | None = None) -> dict:
    """Run every phase (see the module docstring) and write the report to ``<output_dir>/report``.

    Returns the content of ``metrics.json``. Raises :class:`~progadv_trl.envs.report.MissingExtra` at once when
    matplotlib (the ``plots`` extra) is not installed.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .report import require_matplotlib, write_report
    from .sampling import sample_episodes
    from .tasks import make_env

    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    # TRL 1.16 calls transformers' renamed gradient_checkpointing API every step: one FutureWarning per call
    warnings.filterwarnings("ignore", message=r".*gradient_checkpointing.*", category=FutureWarning)
    require_matplotlib()  # before any training, not after it
    cfg = config or load_config(config_path, quick)
    out, n_phases = Path(output_dir), 2 + 2 * len(cfg.runs) + 1 + bool(cfg.reward_models)
    cache = out / "cache"
    cache.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    env, clock = make_env(cfg.task, cfg.env), PhaseClock(n_phases)

    ref_dir = prepare_reference(cache, env, cfg)
    clock.done("reference", f"reference: tiny Qwen2 fine-tuned on noisy demonstrations -> {ref_dir}")
    labels = prepare_exact(cache, env, ref_dir, cfg)
    exact = {r.name: labels.summary(r.exact_beta) for r in cfg.runs}
    s = next(iter(exact.values()))
    clock.done("exact_dp", f"exact DP over {len(labels.oracle.table)} histories of {s['n_tasks']} tasks; mean "
                           f"success: reference {s['success_reference']:.3f}, KL-optimal (beta={s['beta']}) "
                           f"{s['success_kl_optimal']:.3f}, optimal {s['success_optimal']:.3f}")

    reference = AutoModelForCausalLM.from_pretrained(str(ref_dir)).eval()
    tok = AutoTokenizer.from_pretrained(str(ref_dir))
    sampled: dict = {}

    def reference_episodes(n: int, seed: int, beta: float):
        """Episodes of the reference labelled at ``beta``; sampled once per ``(n, seed, beta)`` (runs share them)."""
        if (n, seed, beta) not in sampled:
            sampled[n, seed, beta] = sample_episodes(reference, tok, env, n, cfg.temperature, seed=seed,
                                                     solver=labels.solver(beta), group_size=cfg.group_size)
        return sampled[n, seed, beta]

    runs = {}
    for run in cfg.runs:
        train_log, reused = trained_run(out / run.name, cfg.run_key(run), run.checkpoints), True
        if train_log is None:
            heldout = reference_episodes(cfg.callback_episodes, cfg.seed + 10_000, run.exact_beta)
            trainer = train_run(run, ref_dir, out / run.name, env, heldout, cfg)
            train_log, reused = [r for r in trainer.state.log_history if "loss" in r], False
            mark_trained(out / run.name, cfg.run_key(run), train_log)
        runs[run.name] = {"train_log": train_log, "history": read_history(out / run.name)}
        clock.done(f"train_{run.name}", f"GRPO {run.name} (beta={run.beta}, loss={run.loss_type}): {run.steps} "
                                        f"steps{' (reused: trained earlier with these settings)' if reused else ''}"
                                        f", callback history {out / run.name / 'progadv-history.jsonl'}")
    reward_models = train_reward_models(ref_dir, cfg, reference_episodes(
        max(cfg.reward_models), cfg.seed + 40_000, cfg.runs[0].exact_beta)) if cfg.reward_models else {}
    if reward_models:
        clock.done("reward_models", f"trained reward models: {', '.join(reward_models)}")

    def extra_rows(episodes, results):
        from .reward_models import add_reward_model_rows

        add_reward_model_rows(episodes, results, reward_models)
        return results

    for run in cfg.runs:
        on_reference = reference_episodes(cfg.reference_episodes, cfg.seed + 30_000, run.exact_beta)
        runs[run.name].update(evaluate_run(run, out / run.name, ref_dir, env, labels, cfg, on_reference,
                                           extra_rows if reward_models else None))
        runs[run.name]["reward_models"] = {name: m.info for name, m in reward_models.items()}
        final = runs[run.name]["final"]
        clock.done(f"evaluate_{run.name}", f"{run.name}: {len(run.checkpoints)} checkpoints x "
                                           f"{cfg.eval_episodes} fresh episodes; final success "
                                           f"{final['success']:.3f}, KL/episode {final['kl_per_episode']:.3f}")
    report = write_report(out / "report", cfg, runs, exact, clock)
    clock.done("report", f"report -> {out / 'report'}")
    print()
    print(report["text"])
    print(f"\nreport: {out / 'report'} (metrics.json, table.md, drift.md, *.png); total {clock.total:.0f}s")
    return report["metrics"]
