"""Which failure-attribution rule to default to, chosen on validation data: every rule x every method on the demo's
labelled number-line episodes, for the final scorer of each demo run.

    progadv demo --output-dir progadv-demo
    OMP_NUM_THREADS=1 python benchmarks/attribution_rules.py --demo-dir progadv-demo

Per run (the exported scorer ``<run>/_progadv/scorer``): 512 fresh episodes of the reference (seed 30000, like the
demo's ``on_reference`` set) and 512 of the run's own policy (seed 20000), in groups of 8, labelled with the exact
``A*`` at the run's ``exact_beta``. Each set is split half/half by group
(:func:`~progadv_trl.envs.attribution_study.split_groups`); threshold rules are fitted on the validation half;
the rule per method is chosen on validation (:func:`~progadv_trl.envs.attribution_study.choose_rule`) and read on
the test half. Also printed: the constant "most common mistake turn of validation" baseline, why the running sum
misses (:func:`~progadv_trl.envs.attribution_study.blame_profile`), the chosen rule's calibration, and how stable
the choice is over 10 group splits. About a minute at one thread (sampling and scoring dominate).
"""

import argparse
import math
import os
import time
from collections import Counter
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from progadv_trl.envs.attribution_study import (blame_profile, calibration, choose_rule, compare_rules,  # noqa: E402
                                                mistake_turn, split_groups)
from progadv_trl.selection import ATTRIBUTION_METHODS, THRESHOLD_METHODS  # noqa: E402
from progadv_trl.trajectory_scores import METHOD  # noqa: E402

N_EPISODES, REFERENCE_SEED, POLICY_SEED, N_SPLITS = 512, 30_000, 20_000, 10
SHORT = {"running_sum": "run.sum", "step": "step", "threshold": "thresh.", "change_point": "chg.pt",
         "first_below": "1st<thr"}


def scored_sets(demo_dir: Path, config: str | None):
    """``{run name: {"reference": (episodes, results), "policy": (episodes, results)}}`` and the env."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from progadv_trl.envs.codec import ChatCodec
    from progadv_trl.envs.demo import ExactLabels, load_config
    from progadv_trl.envs.number_line import NumberLineEnv
    from progadv_trl.envs.oracle import CachedOracle, LMReplyOracle
    from progadv_trl.envs.sampling import sample_episodes
    from progadv_trl.scorer import ProgressAdvantageScorer

    cfg = load_config(config)
    env = NumberLineEnv(**cfg.env)
    ref_dir = demo_dir / "cache" / f"reference-{cfg.reference_key()}"
    oracle_path = demo_dir / "cache" / f"oracle-{cfg.oracle_key()}.pkl"
    for p in (ref_dir, oracle_path):
        if not p.exists():
            raise SystemExit(f"{p} not found: run `progadv demo --output-dir {demo_dir}` with the same config first")
    tok = AutoTokenizer.from_pretrained(str(ref_dir))
    reference = AutoModelForCausalLM.from_pretrained(str(ref_dir)).eval()
    labels = ExactLabels(env, CachedOracle.load(oracle_path, LMReplyOracle(reference, ChatCodec(tok, env),
                                                                           cfg.temperature)))
    out, on_reference = {}, {}
    for run in cfg.runs:
        solver = labels.solver(run.exact_beta)
        if run.exact_beta not in on_reference:
            on_reference[run.exact_beta] = sample_episodes(reference, tok, env, N_EPISODES, cfg.temperature,
                                                           seed=REFERENCE_SEED, solver=solver,
                                                           group_size=cfg.group_size)
        scorer = ProgressAdvantageScorer.from_pretrained(demo_dir / run.name / "_progadv" / "scorer")
        own = sample_episodes(scorer.policy.model, scorer.tokenizer, env, N_EPISODES, cfg.temperature,
                              seed=POLICY_SEED, solver=solver, group_size=cfg.group_size)
        ref_eps = on_reference[run.exact_beta]
        out[run.name] = {"reference": (ref_eps, scorer.score(ref_eps)), "policy": (own, scorer.score(own))}
    return out, env


def fmt(x: float, digits: int = 3) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def print_table(title: str, table: dict) -> None:
    """Rows: methods; columns: rules; cells: accuracy (MAE)."""
    n = next(iter(next(iter(table.values())).values()))["n"]
    print(f"\n{title} ({n} labelled failures): accuracy (MAE in turns)")
    print("| method | " + " | ".join(SHORT[r] for r in ATTRIBUTION_METHODS) + " |")
    print("|---|" + "---:|" * len(ATTRIBUTION_METHODS))
    for m, rows in table.items():
        print(f"| {m} | " + " | ".join(f"{fmt(rows[r]['accuracy'])} ({fmt(rows[r]['mae'], 2)})"
                                       for r in ATTRIBUTION_METHODS) + " |")


def majority_baseline(trajs, val, test) -> tuple[int, float]:
    """The most common mistake turn on validation, and its accuracy on test."""
    counts = Counter(mistake_turn(trajs[i]) for i in val if mistake_turn(trajs[i]) is not None)
    turn = min(counts, key=lambda t: (-counts[t], t)) if counts else 0
    labelled = [mistake_turn(trajs[i]) for i in test if mistake_turn(trajs[i]) is not None]
    return turn, (sum(m == turn for m in labelled) / len(labelled) if labelled else math.nan)


def study(name: str, trajs, results, env) -> None:
    val, test = split_groups(trajs, seed=0)
    n_lab = [sum(mistake_turn(trajs[i]) is not None for i in idx) for idx in (val, test)]
    print(f"\n### {name}: {len(trajs)} episodes, {sum(t.success() for t in trajs) / len(trajs):.3f} success; labelled "
          f"failures: validation {n_lab[0]}, test {n_lab[1]}")
    if min(n_lab) < 2:
        print("too few labelled failures for a rule study")
        return
    valid = compare_rules(trajs, results, evaluate_idx=val, fit_idx=val)
    tested = compare_rules(trajs, results, evaluate_idx=test, fit_idx=val)
    print_table("validation (thresholds fitted here)", valid)
    print_table("test (thresholds fitted on validation)", tested)
    turn, acc = majority_baseline(trajs, val, test)
    print(f"\nconstant baseline: always blame turn {turn} (validation's most common mistake turn): test accuracy "
          f"{fmt(acc)}")
    print("\nrule chosen on validation -> its test accuracy; best threshold-free rule (no labels needed):")
    free_rules = [r for r in ATTRIBUTION_METHODS if r not in THRESHOLD_METHODS]
    for m in valid:
        rule = choose_rule(valid, m)
        free = choose_rule({m: {r: valid[m][r] for r in free_rules}}, m)
        print(f"  {m}: {rule} -> {fmt(tested[m][rule]['accuracy'])} (MAE {fmt(tested[m][rule]['mae'], 2)}); "
              f"threshold-free: {free} -> {fmt(tested[m][free]['accuracy'])}")

    print("\nprogress advantage, offset histograms (predicted - true turn), test half:")
    for r in ATTRIBUTION_METHODS:
        row = tested[METHOD][r]
        print(f"  {r}: {row['offset_histogram']} (too early {fmt(row['too_early'])}, too late {fmt(row['too_late'])}"
              f"{'' if row['threshold'] is None else ', threshold ' + fmt(row['threshold'], 4)})")
    prof = blame_profile(trajs, results, METHOD, "running_sum")
    replies = ", ".join(f"{'invalid' if k is None else repr(env.replies[k])}: {c}"
                        for k, c in prof["wrong_blamed_replies"].items())
    print(f"\nwhy running_sum misses (all {prof['n']} labelled failures, {prof['n_wrong']} misses): it blames the last "
          f"turn {fmt(prof['last_turn'])}, a turn after the mistake {fmt(prof['after_mistake'])}, before it "
          f"{fmt(prof['before_mistake'])}; {fmt(prof['wrong_blamed_dead'])} of misses blame a turn where success "
          f"was already impossible; blamed replies of misses: {replies}")
    mv, neg = prof["mean_value"], prof["frac_negative"]
    print("  mean progress advantage per turn (fraction < 0): " + ", ".join(
        f"{k} {fmt(mv[k])} ({fmt(neg[k], 2)})" for k in mv))
    print("  -> every turn after the mistake is negative on average, so the running sum keeps falling past it.")

    rule = choose_rule(valid, METHOD)
    thr = valid[METHOD][rule]["threshold"]
    cal_val = calibration(trajs, results, METHOD, rule, thr, indices=val)
    cal_test = calibration(trajs, results, METHOD, rule, thr, indices=test, edges=cal_val["edges"])
    margin = ("how far the threshold may move before the blame changes" if rule in THRESHOLD_METHODS
              else "second-lowest minus lowest rule value")
    print(f"\ncalibration of progress advantage + {rule} (margin: {margin}; bins: validation tertiles):")
    for bv, bt in zip(cal_val["bins"], cal_test["bins"]):
        print(f"  margin in ({fmt(bv['low'], 3)}, {fmt(bv['high'], 3)}]: validation {fmt(bv['accuracy'])} "
              f"(n={bv['n']}), test {fmt(bt['accuracy'])} (n={bt['n']})")
    print(f"  single-turn episodes: validation n={cal_val['single_turn']['n']}, test n={cal_test['single_turn']['n']}")

    picks, accs, free_picks, free_accs = Counter(), [], Counter(), []
    per_rule = {r: [] for r in ATTRIBUTION_METHODS}
    for seed in range(N_SPLITS):
        v, t = split_groups(trajs, seed=seed)
        tv = compare_rules(trajs, results, [METHOD], evaluate_idx=v, fit_idx=v)
        tt = compare_rules(trajs, results, [METHOD], evaluate_idx=t, fit_idx=v)
        r = choose_rule(tv)
        f = choose_rule({METHOD: {k: tv[METHOD][k] for k in free_rules}})
        picks[r] += 1
        free_picks[f] += 1
        accs.append(tt[METHOD][r]["accuracy"])
        free_accs.append(tt[METHOD][f]["accuracy"])
        for k in per_rule:
            per_rule[k].append(tt[METHOD][k]["accuracy"])
    print(f"\nover {N_SPLITS} group splits (seeds 0-{N_SPLITS - 1}), progress advantage: chosen {dict(picks)}, test "
          f"accuracy mean {fmt(sum(accs) / len(accs))} (min {fmt(min(accs))}, max {fmt(max(accs))}); threshold-free "
          f"chosen {dict(free_picks)}, test accuracy mean {fmt(sum(free_accs) / len(free_accs))} "
          f"(min {fmt(min(free_accs))}, max {fmt(max(free_accs))}); mean test accuracy per rule: "
          + ", ".join(f"{k} {fmt(sum(a) / len(a))}" for k, a in per_rule.items()))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--demo-dir", default="progadv-demo", help="the output dir of a finished `progadv demo`")
    p.add_argument("--config", help="the demo config it ran with (default: the built-in one)")
    args = p.parse_args()
    torch.set_num_threads(1)
    t0 = time.time()
    sets, env = scored_sets(Path(args.demo_dir), args.config)
    print(f"sampled and scored in {time.time() - t0:.0f}s")
    for run, kinds in sets.items():
        print(f"\n## {run}")
        for kind, (trajs, results) in kinds.items():
            study(f"{run}, episodes of the {kind}", trajs, results, env)
    print(f"\ntotal {time.time() - t0:.0f}s")


if __name__ == "__main__":
    main()
