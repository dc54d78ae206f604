"""The attribution study (rule x method tables, validation split, rule choice, calibration, blame profile) on
synthetic labelled episodes whose answers are known."""

import math

import pytest

from progadv_trl.data import Message, Trajectory
from progadv_trl.envs.attribution_study import (blame_profile, calibration, choose_rule, compare_rules,
                                                method_names, split_groups, turn_values)
from progadv_trl.envs.evaluation import EXACT, ORACLE
from progadv_trl.trajectory_scores import METHOD, TrajectoryScore


def episode(i, group, mistake, n_turns=4, exact=None, gap=None):
    """A failed episode of ``n_turns`` turns with its decisive mistake at turn ``mistake`` (``None``: succeeded).

    Label rows: ``A*`` is -1 at the mistake, 0 elsewhere; the success gap -0.5 at the mistake, 0 elsewhere; success
    is impossible after the mistake (``V* = 0``)."""
    msgs = [Message("system", "s"), Message("user", "o")]
    for _ in range(n_turns):
        msgs += [Message("assistant", "right"), Message("user", "o")]
    m = mistake if mistake is not None else n_turns
    meta = {"exact_advantage": exact or [-1.0 if t == m else 0.0 for t in range(n_turns)],
            "optimal_success_advantage": gap or [-0.5 if t == m else 0.0 for t in range(n_turns)],
            "exact_value": [0.5 if t <= m else 0.0 for t in range(n_turns)],
            "replies": [1 if t == m else 0 for t in range(n_turns)]}
    return Trajectory(msgs, id=f"e{i}", group=group, reward=0.0 if mistake is not None else 1.0,
                      mistake_step=None if mistake is None else 2 + 2 * mistake, metadata=meta)


def scored(traj, **values):
    """A TrajectoryScore with per-turn ``values`` (method -> [T]) for the assistant messages of ``traj``."""
    n = len(traj.metadata["exact_advantage"])
    return TrajectoryScore(id=traj.id, scores={name: 0.0 for name in values}, steps=[],
                           action_messages=[2 + 2 * t for t in range(n)], action_values=dict(values))


def pa_values(mistake, n_turns=4, before=0.1, at=-1.0, after=-0.4):
    """Progress-advantage-like values: slightly positive before the mistake, very negative at it, mildly negative
    after it (so the running sum keeps falling to the last turn)."""
    return [before if t < mistake else at if t == mistake else after for t in range(n_turns)]


def study_set(n_groups=8, per_group=2):
    """Failures with mistakes at every turn 0..3 (cycled), in groups, plus one success per group."""
    trajs, results = [], []
    for g in range(n_groups):
        for k in range(per_group + 1):
            i = len(trajs)
            m = None if k == per_group else (g + k) % 4
            t = episode(i, f"g{g}", m)
            values = pa_values(3 if m is None else m)
            late = [0.0, 0.0, 0.0, -1.0]  # blames the last turn whatever happened
            trajs.append(t)
            results.append(scored(t, **{METHOD: values, "late": late}))
    return trajs, results


def test_split_groups_is_a_deterministic_half_half_split_of_whole_groups():
    trajs, _ = study_set(n_groups=7)
    val, test = split_groups(trajs, seed=0)
    assert split_groups(trajs, seed=0) == (val, test)
    assert sorted(val + test) == list(range(len(trajs))) and not set(val) & set(test)
    assert val == sorted(val) and test == sorted(test)
    val_groups, test_groups = {trajs[i].group for i in val}, {trajs[i].group for i in test}
    assert not val_groups & test_groups and (len(val_groups), len(test_groups)) == (4, 3)
    assert {tuple(split_groups(trajs, seed=s)[0]) for s in range(10)} != {tuple(val)}  # the seed matters
    single = [episode(i, None, 0) for i in range(5)]  # no group: each episode is its own group
    assert [len(x) for x in split_groups(single)] == [3, 2]


def test_compare_rules_known_accuracies_and_offsets():
    trajs, results = study_set()
    everything = list(range(len(trajs)))
    table = compare_rules(trajs, results, evaluate_idx=everything)
    assert list(table) == [METHOD, "late", EXACT, ORACLE] == method_names(trajs, results)
    pa = table[METHOD]
    # 16 failures, mistakes at turns 0..3 four times each; the running sum bottoms out at the last turn
    assert pa["running_sum"]["n"] == 16
    assert pa["running_sum"]["offset_histogram"] == {0: 4, 1: 4, 2: 4, 3: 4}
    assert pa["running_sum"]["accuracy"] == 0.25 and pa["running_sum"]["mae"] == 1.5
    assert (pa["running_sum"]["too_early"], pa["running_sum"]["too_late"]) == (0.0, 0.75)
    for rule in ("step", "change_point", "first_below"):
        assert pa[rule]["accuracy"] == 1.0 and pa[rule]["offset_histogram"] == {0: 16}
    # every threshold <= -0.4 is right here (under -1 the fallback, the step argmin, is the mistake): the fit takes
    # the smallest candidate, 0.5 below the lowest value
    assert pa["first_below"]["threshold"] == -1.5
    assert pa["running_sum"]["threshold"] is None
    assert table["late"]["step"]["offset_histogram"] == {3: 4, 2: 4, 1: 4, 0: 4}
    assert table[EXACT]["running_sum"]["accuracy"] == 1.0  # A* is 0 after the mistake here
    assert table[ORACLE]["first_below"]["accuracy"] == 1.0


def test_threshold_rules_are_fitted_on_validation_unless_asked():
    trajs = [episode(i, f"g{i // 2}", 2) for i in range(16)]
    val, test = split_groups(trajs)
    # validation: only thresholds in (-0.3, -0.2] blame turn 2 first (the fallback argmin is turn 3): the fit is
    # the midpoint -0.25; test: the turns before the mistake at -0.27 (below it), the mistake at -3
    results = [scored(t, **{METHOD: [0.0, -0.2, -0.3, -0.5] if i in val else [-0.27, -0.27, -3.0, 0.0]})
               for i, t in enumerate(trajs)]
    row = compare_rules(trajs, results, [METHOD], ["first_below", "step"], evaluate_idx=test)[METHOD]
    assert row["first_below"]["threshold"] == pytest.approx(-0.25)
    assert row["first_below"]["accuracy"] == 0.0 and row["first_below"]["offset_histogram"] == {-2: len(test)}
    assert row["step"]["accuracy"] == 1.0  # a rule without a threshold is not affected
    val_row = compare_rules(trajs, results, [METHOD], ["first_below"], evaluate_idx=val)[METHOD]["first_below"]
    assert val_row["accuracy"] == 1.0
    in_sample = compare_rules(trajs, results, [METHOD], ["first_below"], evaluate_idx=test, fit_idx=test)
    assert in_sample[METHOD]["first_below"]["accuracy"] == 1.0


def test_choose_rule_accuracy_then_mae_then_order():
    def row(acc, mae):
        return {"accuracy": acc, "mae": mae, "n": 10, "offset_histogram": {}}

    table = {METHOD: {"running_sum": row(0.5, 1.0), "step": row(0.7, 0.6), "change_point": row(0.7, 0.4),
                      "first_below": row(math.nan, math.nan)}}
    assert choose_rule(table) == "change_point"  # ties on accuracy -> lower MAE
    table[METHOD]["threshold"] = row(0.7, 0.4)
    assert choose_rule(table) == "threshold"  # full tie -> ATTRIBUTION_METHODS order (threshold before change_point)
    assert choose_rule({"b": {"step": row(0.1, 2.0)}}, method="b") == "step"
    with pytest.raises(KeyError, match="'missing'"):
        choose_rule(table, method="missing")
    with pytest.raises(ValueError, match="finite accuracy"):
        choose_rule({METHOD: {"step": row(math.nan, math.nan)}})


def test_calibration_separates_clear_from_close_calls():
    trajs, results = [], []
    for i in range(8):
        t = episode(i, f"g{i}", 1)
        clear = i % 2 == 0
        # clear: the mistake alone is low (margin 2, right); close: a later turn is 0.05 lower (margin 0.05, wrong)
        trajs.append(t)
        results.append(scored(t, **{METHOD: [0.0, -2.0, 0.0, 0.0] if clear else [0.0, -1.0, -1.05, 0.0]}))
    single = episode(8, "g8", 0, n_turns=1)
    trajs.append(single)
    results.append(scored(single, **{METHOD: [-0.1]}))
    cal = calibration(trajs, results, rule="step", n_bins=2)
    assert cal["edges"] == [pytest.approx(1.025)]  # the median of four 0.05 and four 2.0 margins
    assert [(b["n"], b["accuracy"]) for b in cal["bins"]] == [(4, 0.0), (4, 1.0)]
    assert cal["single_turn"] == {"n": 1, "accuracy": 1.0}
    same_bins = calibration(trajs, results, rule="step", edges=[0.01, 10.0])
    assert [b["n"] for b in same_bins["bins"]] == [0, 8, 0] and math.isnan(same_bins["bins"][0]["accuracy"])


def test_blame_profile_explains_a_late_running_sum():
    trajs, results = study_set()
    prof = blame_profile(trajs, results, rule="running_sum")
    assert (prof["n"], prof["n_wrong"]) == (16, 12)
    assert prof["last_turn"] == 1.0 and prof["after_mistake"] == 0.75 and prof["before_mistake"] == 0.0
    assert prof["wrong_blamed_dead"] == 1.0  # every miss blames a turn after success became impossible
    assert prof["blamed_is_loss"] == 0.25  # only the hits blame the losing action
    assert prof["wrong_blamed_replies"] == {0: 12}
    assert prof["mean_value"] == {"before": pytest.approx(0.1), "at": -1.0, "after_live": pytest.approx(math.nan,
                                  nan_ok=True), "after_dead": pytest.approx(-0.4)}
    assert prof["frac_negative"]["at"] == 1.0 and prof["frac_negative"]["before"] == 0.0
    assert blame_profile(trajs, results, rule="step")["n_wrong"] == 0


def test_turn_values_follow_the_action_messages():
    t = episode(0, "g", 1, n_turns=2)
    res = TrajectoryScore(id="e0", scores={METHOD: 0.0}, steps=[], action_messages=[0, 2, 4],
                          action_values={METHOD: [9.0, -1.0, 0.5]})  # message 0 counted as an action
    assert turn_values(t, res, METHOD).tolist() == [-1.0, 0.5]
    assert turn_values(t, res, EXACT).tolist() == [0.0, -1.0]
    with pytest.raises(KeyError, match="'e0'.*'late'"):
        turn_values(t, res, "late")


def test_bad_input_is_named():
    trajs, results = study_set(n_groups=2)
    with pytest.raises(ValueError, match="trajectories but"):
        compare_rules(trajs, results[:-1])
    with pytest.raises(ValueError, match="'median'"):
        compare_rules(trajs, results, rules=["median"])
