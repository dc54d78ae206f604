"""The demo's report folder: ``metrics.json``, ``table.md``, ``drift.md``, ``signal_vs_step.png``,
``advantages_vs_exact.png``.

``runs`` maps a run name to ``{"history": callback history rows, "checkpoints": [{"step", **evaluation}], "final":
evaluation, "episodes", "results", "train_log"}`` (see :func:`~progadv_trl.envs.demo.evaluate_run` and
:func:`~progadv_trl.envs.evaluation.evaluate_episodes`). The plots need matplotlib, from the ``plots`` extra
(``pip install "progadv-trl[plots]"``), imported only when they are drawn; the tables need nothing more.

The tables are rendered from ``metrics.json`` alone (:func:`render_tables`), so committed tables can be checked
against committed metrics and regenerated::

    python -m progadv_trl.envs.report progadv-demo/report/metrics.json   # rewrites table.md and drift.md beside it
    python -m progadv_trl.envs.report run1/report/metrics.json run2/report/metrics.json   # runs side by side
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import numpy as np

from ..data import json_ready
from ..outputs import UsageError
from ..trajectory_scores import METHOD
from .evaluation import EXACT, ORACLE, best_baseline, interval, step_arrays

COLUMNS = (("spearman_exact", "Spearman A*"), ("spearman_exact_live", "Spearman A* (live)"),
           ("spearman_unregularised", "Spearman S*-gap"), ("auroc", "AUROC"), ("best_of_n", "best-of-8"),
           ("mean_success", "pass@1"), ("oracle", "pass@8"), ("attribution_accuracy", "attr. acc."),
           ("attribution_mae", "attr. MAE"))
LABELS = {METHOD: "**progress advantage**", EXACT: "exact A* (ceiling)",
          ORACLE: "S*(s,a) - S*(s) (oracle, unregularised)"}


def _cell(v) -> str:
    return "-" if v is None or (isinstance(v, float) and not math.isfinite(v)) else f"{v:.3f}"


def _cell_ci(v, ci) -> str:
    return _cell(v) if not ci or _cell(v) == "-" else f"{_cell(v)} [{ci[0]:.2f}, {ci[1]:.2f}]"


def markdown_table(table: dict, intervals: dict | None = None) -> str:
    """One row per method (progress advantage first, ceilings last), the :data:`COLUMNS`; with ``intervals``
    (method -> column -> [lo, hi]) each cell also shows its 95% bootstrap interval."""
    order = [METHOD, *[m for m in table if m not in (METHOD, EXACT, ORACLE)], EXACT, ORACLE]
    intervals = intervals or {}
    lines = ["| method | " + " | ".join(c[1] for c in COLUMNS) + " |", "|---|" + "---:|" * len(COLUMNS)]
    for m in order:
        cells = [_cell_ci(table[m].get(c), intervals.get(m, {}).get(c)) for c, _ in COLUMNS]
        lines.append(f"| {LABELS.get(m, m)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def run_header(run: dict, ev: dict, temperature: float, sampled_from: str = "the final policy") -> str:
    if sampled_from == "the final policy":
        kl = f"KL(policy || reference) {_cell(ev['kl_per_episode'])} nats per episode"
    else:  # the same estimator on another sampler's episodes: minus an estimate of KL(sampler || policy) there
        kl = f"mean log(policy / reference) {_cell(ev['kl_per_episode'])} nats per episode"
    return (f"Scored with beta={run['score_beta']} at T={temperature}; exact A* at beta={run['exact_beta']}. "
            f"{ev['n_episodes']} episodes sampled from {sampled_from} (groups of 8), success {ev['success']:.3f}, "
            f"{ev['n_steps']} steps ({ev['n_live_steps']} live: success still possible, valid reply), "
            f"{ev['n_failed']} failed, {ev['n_attribution_labelled']} with a labelled decisive mistake; {kl}.")


def target_checks(table: dict, draws: dict | None = None) -> list[dict]:
    """The targets on one table: ``[{"target", "value", "met", "interval"}]``. An absolute target is met by the
    estimate (``interval``: its 95% bootstrap interval). A "better than a baseline" target is met only when the 95%
    interval of the paired difference (progress advantage minus that baseline, over the same resamples) clears the
    margin; ``interval`` is then that difference's interval."""
    pa = table[METHOD]
    name_bo, bo = best_baseline(table, "best_of_n")
    name_au, au = best_baseline(table, "auroc")
    name_at, at = best_baseline(table, "attribution_accuracy")

    def own(col):
        return interval(draws[METHOD][col]) if draws else None

    def diff(col, other, scale=1.0):
        if not draws or other not in draws:
            return None
        return interval(draws[METHOD][col] - scale * draws[other][col])

    def clears(ci, point_ok, margin=0.0):
        return point_ok if ci is None else ci[0] > margin

    d_bo, d_au, d_at = diff("best_of_n", name_bo), diff("auroc", name_au), diff("attribution_accuracy", name_at, 2.0)
    checks = [
        ("Spearman(PA, A*) >= 0.6", pa["spearman_exact"], pa["spearman_exact"] >= 0.6, own("spearman_exact")),
        (f"best-of-8 >= best baseline ({name_bo} {bo:.3f}) + 0.05 (paired difference)", pa["best_of_n"],
         clears(d_bo, pa["best_of_n"] >= bo + 0.05, 0.05), d_bo),
        (f"best-of-8 >= 0.8 x pass@8 ({0.8 * pa['oracle']:.3f})", pa["best_of_n"],
         pa["best_of_n"] >= 0.8 * pa["oracle"], own("best_of_n")),
        ("AUROC >= 0.85", pa["auroc"], pa["auroc"] >= 0.85, own("auroc")),
        (f"AUROC > every baseline (best {name_au} {au:.3f}; paired difference)", pa["auroc"],
         clears(d_au, pa["auroc"] > au), d_au),
        (f"attribution accuracy >= 2 x best baseline ({name_at} {at:.3f}; paired difference)",
         pa["attribution_accuracy"], clears(d_at, pa["attribution_accuracy"] >= 2 * at), d_at),
    ]
    return [{"target": t, "value": float(v), "met": bool(ok), "interval": ci} for t, v, ok, ci in checks]


def _history_at(history: list[dict], step: int) -> dict:
    """The callback's evaluation at ``step`` (else the latest one before it)."""
    rows = [h for h in history if h["step"] <= step]
    return rows[-1] if rows else {}


def drift_table(metrics: dict) -> str:
    """Metrics at every checkpoint against the KL from the reference (from ``metrics.json``)."""
    head = ("| run | step | KL/token (callback set) | weight drift | AUROC (callback set) | success | KL/episode | "
            "Spearman A* | Spearman S*-gap | AUROC | best-of-8 | best baseline best-of-8 | attr. acc. |")
    lines = [head, "|---|---:|" + "---:|" * 11]
    for run in metrics["config"]["runs"]:
        r = metrics["runs"][run["name"]]
        for ck in r["checkpoints"]:
            h, t = _history_at(r["callback_history"], ck["step"]), ck["table"]
            name, bb = best_baseline(t, "best_of_n")
            cells = [h.get("progadv/kl/mean"), h.get("progadv/weight_drift"), h.get("progadv/auroc"), ck["success"],
                     ck["kl_per_episode"], t[METHOD]["spearman_exact"], t[METHOD]["spearman_unregularised"],
                     t[METHOD]["auroc"], t[METHOD]["best_of_n"], bb, t[METHOD]["attribution_accuracy"]]
            row = [_cell(c) for c in cells]
            row[9] = f"{row[9]} ({name})"
            lines.append(f"| {run['name']} | {ck['step']} | " + " | ".join(row) + " |")
    return "\n".join(lines)


PLOTS_EXTRA = 'pip install "progadv-trl[plots]"'


class MissingExtra(UsageError, ImportError):
    """An optional dependency is not installed; the message names the extra that brings it (the CLI exits 2)."""


def require_matplotlib() -> None:
    """Raise :class:`MissingExtra` (naming the ``plots`` extra) when matplotlib cannot be imported."""
    try:
        import matplotlib  # noqa: F401
    except ImportError as e:
        raise MissingExtra(f"the demo's plots need matplotlib, which is not installed: {PLOTS_EXTRA}") from e


def _pyplot():
    """``matplotlib.pyplot`` on the file-only Agg backend (see :func:`require_matplotlib`)."""
    require_matplotlib()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _plot_signal(path: Path, cfg, runs: dict) -> None:
    plt = _pyplot()
    fig, ax = plt.subplots(1, 3, figsize=(12, 3.4))
    for k, run in enumerate(cfg.runs):
        color, r = f"C{k}", runs[run.name]
        hist = r["history"]
        steps = [h["step"] for h in hist]
        ck = r["checkpoints"]
        ax[0].plot(steps, [h.get("progadv/auroc") for h in hist], "-", color=color,
                   label=f"{run.name}: callback (reference episodes)")
        ax[0].plot([c["step"] for c in ck], [c["table"][METHOD]["auroc"] for c in ck], "o--", color=color,
                   label=f"{run.name}: own episodes")
        ax[1].plot([c["step"] for c in ck], [c["table"][METHOD]["spearman_exact"] for c in ck], "o-", color=color,
                   label=f"{run.name}: vs A* (beta={run.exact_beta})")
        ax[1].plot([c["step"] for c in ck], [c["table"][METHOD]["spearman_unregularised"] for c in ck], "s:",
                   color=color, label=f"{run.name}: vs S*-gap")
        ax[2].plot(steps, [h.get("progadv/kl/mean") for h in hist], "-", color=color, label=run.name)
    ax[0].set(title="success-prediction AUROC", xlabel="GRPO step")
    ax[1].set(title="per-step Spearman (own episodes)", xlabel="GRPO step")
    ax[2].set(title="KL(policy || ref) per token (callback set)", xlabel="GRPO step")
    for a in ax:
        a.grid(alpha=0.3)
        a.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def _plot_advantages(path: Path, cfg, run, r: dict) -> None:
    plt = _pyplot()
    episodes, results = r["episodes"], r["results"]
    steps = step_arrays(episodes, results)
    fig, ax = plt.subplots(1, 2, figsize=(11, 3.6))
    live = steps["live"]
    ax[0].scatter(steps["exact"][live], steps[METHOD][live], s=6, alpha=0.4, label="live steps")
    ax[0].scatter(steps["exact"][~live], steps[METHOD][~live], s=6, alpha=0.4, color="gray",
                  label="success impossible / invalid reply")
    lo, hi = np.nanmin(steps["exact"]), np.nanmax(steps["exact"])
    ax[0].plot([lo, hi], [lo, hi], "k:", lw=1, label="y = x")
    ax[0].set(title=f"{run.name}: per-step advantage", xlabel=f"exact A* (beta={run.exact_beta})",
              ylabel=f"progress advantage (beta={run.score_beta})")
    ax[0].legend(fontsize=7)
    picked = [i for i, t in enumerate(episodes) if t.mistake_step is not None][: cfg.plot_episodes]
    from .evaluation import action_index

    for k, i in enumerate(picked):
        t, res = episodes[i], results[i]
        turns = np.arange(len(t.metadata["exact_advantage"]))
        pa = [res.action_values[METHOD][j] for j in action_index(t, res)]
        ax[1].plot(turns, pa, "o-", color=f"C{k}", label=f"episode {t.id}: PA")
        ax[1].plot(turns, t.metadata["exact_advantage"], "x--", color=f"C{k}", label="exact A*")
        m = (t.mistake_step - 2) // 2
        ax[1].axvline(m + 0.04 * k, color=f"C{k}", alpha=0.3)
    ax[1].set(title="failed episodes (vertical line: labelled mistake)", xlabel="turn", ylabel="advantage")
    ax[1].legend(fontsize=6, ncol=2)
    for a in ax:
        a.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def write_plots(report_dir: Path, cfg, runs: dict) -> list[str]:
    """The two PNGs (the advantage plot shows the first run with beta > 0); returns their names.

    Raises :class:`MissingExtra` without matplotlib."""
    _plot_signal(report_dir / "signal_vs_step.png", cfg, runs)
    main = next((r for r in cfg.runs if r.beta > 0), cfg.runs[0])
    _plot_advantages(report_dir / "advantages_vs_exact.png", cfg, main, runs[main.name])
    return ["signal_vs_step.png", "advantages_vs_exact.png"]


def _table_section(run: dict, ev: dict, checks: list[dict], temperature: float,
                   sampled_from: str = "the final policy"):
    def ci(c):
        return "" if not c.get("interval") else f" (95% interval {c['interval'][0]:.3f} to {c['interval'][1]:.3f})"

    lines = [f"- {'met' if c['met'] else 'MISSED'}: {c['target']}: {_cell(c['value'])}{ci(c)}" for c in checks]
    return (run_header(run, ev, temperature, sampled_from) + " Brackets: 95% bootstrap intervals over groups.\n\n"
            + markdown_table(ev["table"], ev.get("intervals")) + "\n\nTargets:\n" + "\n".join(lines))


def attribution_rules_table(rules: dict) -> str:
    """Attribution accuracy on the test half of the reference's episodes, per method and rule (threshold rules
    fitted on the validation half), and each method's rule chosen on the validation half with its test accuracy."""
    from ..selection import ATTRIBUTION_METHODS
    from .attribution_study import choose_rule

    names = list(ATTRIBUTION_METHODS)
    lines = ["| method | " + " | ".join(names) + " | chosen on validation: rule, test accuracy |",
             "|---|" + "---:|" * (len(names) + 1)]
    for m, row in rules["test"].items():
        try:
            chosen = choose_rule(rules["validation"], m)
            pick = f"{chosen}, {_cell(row[chosen]['accuracy'])}"
        except (KeyError, ValueError):
            pick = "-"
        cells = [_cell(row.get(r, {}).get("accuracy")) for r in names]
        lines.append(f"| {LABELS.get(m, m)} | " + " | ".join(cells) + f" | {pick} |")
    n_val = next(iter(rules["validation"].values()))[names[0]]["n"]
    n_test = next(iter(rules["test"].values()))[names[0]]["n"]
    return (f"Labelled failures: {n_val} in the validation half, {n_test} in the test half. Default rule of the "
            f"scorer: the configured `attribution`.\n\n" + "\n".join(lines))


CANDIDATE_COLUMNS = (("validation", "auroc", "val.: AUROC"), ("test", "auroc", "test: AUROC"),
                     ("test", "best_of_n", "test: best-of-8"), ("test", "spearman_exact", "test: Spearman A*"),
                     ("test", "attribution_accuracy", "test: attr. acc."))


def candidates_table(block: dict) -> str:
    """Progress advantage of the final policy against each candidate reference, on the validation and test halves
    of the reference's episodes; the chosen one (best validation AUROC) in bold."""
    lines = ["| reference | " + " | ".join(c[2] for c in CANDIDATE_COLUMNS) + " |",
             "|---|" + "---:|" * len(CANDIDATE_COLUMNS)]
    for name, halves in block["candidates"].items():
        label = f"**{name}** (chosen)" if name == block["chosen"] else name
        lines.append(f"| {label} | " + " | ".join(_cell(halves[h].get(c)) for h, c, _ in CANDIDATE_COLUMNS) + " |")
    return "\n".join(lines)


REF_TEST = "the reference (test half)"


def render_tables(metrics: dict) -> tuple[str, str]:
    """``(table.md, drift.md)`` from the content of ``metrics.json``: nothing else is read."""
    sections, temperature = [], metrics["config"]["temperature"]
    for run in metrics["config"]["runs"]:
        r = metrics["runs"][run["name"]]
        sections.append(
            f"### {run['name']}: beta={run['beta']}, loss_type={run['loss_type']}, {run['steps']} GRPO steps\n\n"
            f"#### Episodes of the final policy\n\n{_table_section(r, r['final'], r['targets'], temperature)}\n\n"
            f"#### Episodes of the reference (test half), scored by the same final scorer\n\n"
            f"{_table_section(r, r['final_on_reference'], r['targets_on_reference'], temperature, REF_TEST)}"
            + (f"\n\n#### Attribution rules on the reference's episodes (test half)\n\n"
               f"{attribution_rules_table(r['attribution_rules'])}" if r.get("attribution_rules") else "")
            + (f"\n\n#### Candidate references (reference's episodes; Spearman with A* of the initial reference)"
               f"\n\n{candidates_table(r['reference_candidates'])}" if r.get("reference_candidates") else ""))
    return "\n\n".join(sections) + "\n", drift_table(metrics) + "\n"


SETTINGS = ("beta", "loss_type", "scale_rewards", "use_bias_correction_kl", "learning_rate")


def run_settings(run) -> dict:
    """The GRPO settings of a run (a :class:`~progadv_trl.envs.demo_config.RunConfig` or its dict)."""
    return run if isinstance(run, dict) else dataclasses.asdict(run)


def train_window(train_log: list[dict], step: int, width: int = 10) -> dict:
    """Mean train reward and TRL's KL per token over the ``width`` optimizer steps up to ``step``."""
    rows = [x for x in train_log if step - width < x.get("step", 0) <= step] or train_log[max(0, step - width):step]

    def mean(key):
        v = [x[key] for x in rows if isinstance(x.get(key), (int, float))]
        return float(np.mean(v)) if v else None

    return {"reward": mean("reward"), "kl": mean("kl")}


def write_report(report_dir: Path, cfg, runs: dict, exact: dict, clock) -> dict:
    """Write every report file; returns ``{"metrics": metrics.json content, "text": the printed tables}``."""
    report_dir.mkdir(parents=True, exist_ok=True)
    metrics = {"config": cfg.to_dict(), "exact": exact, "runs": {}}
    for run in cfg.runs:
        r = runs[run.name]
        ev, ev_ref = r["final"], r["final_on_reference"]
        metrics["runs"][run.name] = {
            "beta": run.beta, "loss_type": run.loss_type, "score_beta": run.score_beta, "exact_beta": run.exact_beta,
            "final": ev, "targets": target_checks(ev["table"], r.get("draws")), "final_on_reference": ev_ref,
            "targets_on_reference": target_checks(ev_ref["table"], r.get("draws_on_reference")),
            "checkpoints": r["checkpoints"], "callback_history": r["history"],
            "attribution_rules": r.get("attribution_rules"),
            "final_on_reference_validation": r.get("final_on_reference_validation"),
            "reference_candidates": r.get("reference_candidates"),
            "reward_models": r.get("reward_models"),
            "train_reward_first_last10": [r["train_log"][0].get("reward"),
                                          float(np.mean([x.get("reward", np.nan) for x in r["train_log"][-10:]]))]
            if r["train_log"] else [None, None],
            "settings": {k: run_settings(run)[k] for k in SETTINGS},
            "train_at_checkpoints": {str(ck["step"]): train_window(r["train_log"], ck["step"])
                                     for ck in r["checkpoints"]}}
    metrics["plots"] = write_plots(report_dir, cfg, runs)
    metrics["seconds"] = {**clock.seconds, "total": clock.total}
    metrics = json.loads(json.dumps(json_ready(metrics)))  # the tables are rendered from exactly what is saved
    (report_dir / "metrics.json").write_text(json.dumps(metrics, indent=1), encoding="utf-8")
    text, drift = render_tables(metrics)
    (report_dir / "table.md").write_text(text, encoding="utf-8")
    (report_dir / "drift.md").write_text(drift, encoding="utf-8")
    return {"metrics": metrics, "text": text + "\nMetrics against training step (checkpoints):\n\n" + drift}


SEED_COLUMNS = (("final", "spearman_exact", "own: Spearman A*"), ("final", "auroc", "own: AUROC"),
                ("final", "best_of_n", "own: best-of-8"), ("final_on_reference", "spearman_exact", "ref.: Spearman A*"),
                ("final_on_reference", "auroc", "ref.: AUROC"), ("final_on_reference", "best_of_n", "ref.: best-of-8"),
                ("final_on_reference", "attribution_accuracy", "ref.: attr. acc."))


def seed_table(reports: list[dict]) -> str:
    """Several demo runs (``metrics.json`` contents, e.g. one per seed) side by side: per run and seed, progress
    advantage / the best baseline on that column / the exact-A* ceiling, on the final policy's own episodes ("own")
    and on the reference's episodes ("ref."); then the mean and range over the runs of progress advantage."""
    lines = ["| run | seed | " + " | ".join(c[2] for c in SEED_COLUMNS) + " |",
             "|---|---:|" + "---:|" * len(SEED_COLUMNS)]
    values: dict[tuple, list[float]] = {}
    for metrics in reports:
        for run in metrics["config"]["runs"]:
            r = metrics["runs"][run["name"]]
            cells = []
            for part, col, _ in SEED_COLUMNS:
                table = r[part]["table"]
                pa = table[METHOD][col]
                _, base = best_baseline(table, col)
                values.setdefault((run["name"], part, col), []).append(pa)
                cells.append(f"{_cell(pa)} / {_cell(base)} / {_cell(table[EXACT][col])}")
            lines.append(f"| {run['name']} | {metrics['config']['seed']} | " + " | ".join(cells) + " |")
    for name in dict.fromkeys(n for n, _, _ in values):
        cells = []
        for part, col, _ in SEED_COLUMNS:
            v = [x for x in values[(name, part, col)] if isinstance(x, (int, float)) and math.isfinite(x)]
            cells.append(f"{np.mean(v):.3f} ({min(v):.3f}-{max(v):.3f})" if v else "-")
        lines.append(f"| {name}: mean (range) | {len(reports)} runs | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _with_ci(value, ci) -> str:
    return _cell(value) if not ci else f"{_cell(value)} [{ci[0]:.2f}, {ci[1]:.2f}]"


def _chosen_attribution(rules: dict | None) -> str:
    if not rules:
        return "-"
    return f"{_cell(rules['test'][METHOD][rules['chosen']]['accuracy'])} ({rules['chosen']})"


def settings_table(metrics: dict) -> str:
    """One row per run and checkpoint of a settings sweep (``metrics.json`` of ``progadv demo --config
    demo_settings``): the run's GRPO settings, training-side quantities (train reward and TRL's KL per token over
    the last 10 steps, success and KL per episode of 256 fresh episodes, against the KL per episode of the
    KL-optimal policy pi* at the run's beta) and progress advantage's signal: per-step
    Spearman with A* and the slope of PA on A* (live steps) on the policy's own episodes; on the test half of the
    reference's episodes, Spearman with A*, success AUROC, best-of-8, attribution accuracy with the scorer's rule and
    with the rule chosen on the validation half. Final rows carry 95% bootstrap intervals."""
    head = ("| run | beta | scale_rewards | bias-corrected KL | loss | step | train reward | TRL KL/token | success | "
            "KL/episode | KL/episode of pi* | own: Spearman A* | own: slope PA on A* | ref.: Spearman A* | "
            "ref.: AUROC | ref.: best-of-8 | ref.: attr. acc. | ref.: attr. acc., rule chosen on validation |")
    lines = [head, "|---|---:|---|---|---|---:|" + "---:|" * 12]
    for run in metrics["config"]["runs"]:
        r = metrics["runs"][run["name"]]
        st = run_settings(run)
        for ck in r["checkpoints"]:
            final = ck["step"] == run["steps"]
            own = r["final"] if final else ck
            ref = r["final_on_reference"] if final else ck.get("on_reference")
            ci_own = own.get("intervals", {}).get(METHOD, {}) if final else {}
            ci_ref = (ref or {}).get("intervals", {}).get(METHOD, {}) if final else {}
            train = r.get("train_at_checkpoints", {}).get(str(ck["step"]), {})
            pa, pr = own["table"][METHOD], (ref or {}).get("table", {}).get(METHOD, {})
            cells = [_cell(train.get("reward")), _cell(train.get("kl")), _cell(own["success"]),
                     _cell(own["kl_per_episode"]),
                     _cell(metrics.get("exact", {}).get(run["name"], {}).get("kl_per_episode_kl_optimal")),
                     _with_ci(pa["spearman_exact"], ci_own.get("spearman_exact")), _cell(pa.get("slope_exact_live")),
                     _with_ci(pr.get("spearman_exact"), ci_ref.get("spearman_exact")),
                     _with_ci(pr.get("auroc"), ci_ref.get("auroc")),
                     _with_ci(pr.get("best_of_n"), ci_ref.get("best_of_n")),
                     _with_ci(pr.get("attribution_accuracy"), ci_ref.get("attribution_accuracy")),
                     _chosen_attribution(r.get("attribution_rules")) if final else "-"]
            lines.append(f"| {run['name']} | {st['beta']} | {st.get('scale_rewards', 'group')} | "
                         f"{st.get('use_bias_correction_kl', True)} | {st['loss_type']} | {ck['step']} | "
                         + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    import argparse

    parser = argparse.ArgumentParser(description="Re-render table.md and drift.md from a demo's metrics.json; with "
                                     "several, print them side by side (one row per run and seed).")
    parser.add_argument("metrics", nargs="+", help="the report's metrics.json (several: compare them)")
    parser.add_argument("--settings", action="store_true",
                        help="print the settings table (one row per run and checkpoint) of one metrics.json")
    args = parser.parse_args(argv)
    if args.settings:
        for p in args.metrics:
            print(settings_table(json.loads(Path(p).read_text(encoding="utf-8"))), end="")
        return
    if len(args.metrics) > 1:
        print(seed_table([json.loads(Path(p).read_text(encoding="utf-8")) for p in args.metrics]), end="")
        return
    path = Path(args.metrics[0])
    text, drift = render_tables(json.loads(path.read_text(encoding="utf-8")))
    (path.parent / "table.md").write_text(text, encoding="utf-8")
    (path.parent / "drift.md").write_text(drift, encoding="utf-8")
    print(f"wrote {path.parent / 'table.md'} and {path.parent / 'drift.md'}")


if __name__ == "__main__":  # pragma: no cover
    main()
