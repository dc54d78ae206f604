"""TRL stepwise-supervision data (formats.stepwise) and the ProcessBench first-error metrics."""

import json
import math
import os

import numpy as np
import pytest

from progadv_trl.cli import main
from progadv_trl.data import ProgadvDataError
from progadv_trl.formats import STEP_SEPARATOR, load_trajectories, save_trajectories
from progadv_trl.metrics import (
    NO_ERROR,
    PROCESSBENCH_COLUMNS,
    evaluate_methods,
    first_error_step,
    fit_first_error_threshold,
    predict_first_error,
    processbench_metrics,
    processbench_predictions,
)

from conftest import cli_models

ROWS = [
    {"prompt": "Which is larger, 9.8 or 9.11?", "completions": ["9.8 = 9.80 and 9.80 > 9.11.", "So 9.8 is larger."],
     "labels": [True, True]},
    {"prompt": "Which is larger, 9.8 or 9.11?", "completions": ["11 > 8, so 9.11 > 9.8.", "So 9.11 is larger."],
     "labels": [False, False]},
    {"prompt": [{"role": "system", "content": "Think step by step."}, {"role": "user", "content": "What is 2 + 3?"}],
     "completions": ["2 + 3 = 5.", "Check: 5 - 3 = 2.", "The answer is 5."], "labels": [True, True, True]},
    {"prompt": "What is 4 * 3?", "completions": ["4 * 3 = 4 + 4 + 4.", "4 + 4 + 4 = 13.", "The answer is 13."],
     "labels": [True, False, False], "id": "mul"},
    {"prompt": "What is 10 - 7?", "completions": ["10 - 7 = 3.", "The answer is 3."], "labels": [True, True]},
    {"prompt": "What is 6 / 2?", "completions": ["6 / 2 = 4.", "The answer is 4."], "labels": [False, False]},
]


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def _plain(rows):
    """Rows every datasets source can hold (one prompt type, no extra columns)."""
    return [{k: r[k] for k in ("prompt", "completions", "labels")} for r in rows if isinstance(r["prompt"], str)]


def _check(trajs, rows):
    assert len(trajs) == len(rows)
    for t, r in zip(trajs, rows):
        first = next((i for i, ok in enumerate(r["labels"]) if not ok), None)
        assert t.messages[-1].role == "assistant" and t.messages[-1].content == STEP_SEPARATOR.join(r["completions"])
        assert t.steps == (len(t.messages) - 1,)
        assert t.metadata["step_labels"] == r["labels"] and t.metadata["first_error_step"] == first
        assert t.metadata["step_separator"] == STEP_SEPARATOR
        assert t.reward == (1.0 if first is None else 0.0) and t.mistake_step is None


# ------------------------------------------------------------------------------------------------------- loading
def test_jsonl_file_string_and_conversational_prompts(tmp_path):
    trajs = load_trajectories(_write_jsonl(tmp_path / "prm.jsonl", ROWS))
    _check(trajs, ROWS)
    assert [m.role for m in trajs[2].messages] == ["system", "user", "assistant"]
    assert trajs[0].messages[0].content == ROWS[0]["prompt"] and trajs[0].messages[0].role == "user"
    assert [t.id for t in trajs] == ["0", "1", "2", "mul", "4", "5"]
    assert trajs[0].group == trajs[1].group == "0" and trajs[2].group == "2"  # grouped by prompt, as TRL rows
    assert load_trajectories(tmp_path / "prm.jsonl", "stepwise") == trajs
    # saved as our JSONL and read back: the same trajectories, still scored one step per completion
    save_trajectories(tmp_path / "ours.jsonl", trajs)
    assert load_trajectories(tmp_path / "ours.jsonl") == trajs


def test_json_file_list_or_lines(tmp_path):
    (tmp_path / "list.json").write_text(json.dumps(ROWS), encoding="utf-8")
    _check(load_trajectories(tmp_path / "list.json"), ROWS)
    _check(load_trajectories(tmp_path / "list.json", "stepwise"), ROWS)
    _write_jsonl(tmp_path / "lines.json", ROWS)  # Dataset.to_json writes one row per line
    _check(load_trajectories(tmp_path / "lines.json"), ROWS)


def test_datasets_in_memory_saved_and_parquet(tmp_path):
    datasets = pytest.importorskip("datasets")
    rows = _plain(ROWS)
    ds = datasets.Dataset.from_list(rows)
    _check(load_trajectories(ds), rows)
    _check(load_trajectories(datasets.Dataset.from_list([ROWS[2]])), [ROWS[2]])  # conversational prompt
    ds.save_to_disk(str(tmp_path / "saved"))
    _check(load_trajectories(tmp_path / "saved"), rows)
    datasets.DatasetDict({"train": ds, "test": ds.select([0, 1])}).save_to_disk(str(tmp_path / "dict"))
    _check(load_trajectories(f"{tmp_path / 'dict'}:test"), rows[:2])
    with pytest.raises(ProgadvDataError, match=r"dict: the dataset has splits \['train', 'test'\]; name one"):
        load_trajectories(tmp_path / "dict")
    with pytest.raises(ProgadvDataError, match="no split 'dev'"):
        load_trajectories(f"{tmp_path / 'dict'}:dev")
    (tmp_path / "pq" / "data").mkdir(parents=True)
    ds.to_parquet(str(tmp_path / "pq" / "data" / "train-00000-of-00001.parquet"))
    _check(load_trajectories(tmp_path / "pq"), rows)
    _check(load_trajectories(tmp_path / "pq" / "data" / "train-00000-of-00001.parquet", "stepwise"), rows)


def _hub_cache(tmp_path, repo_id: str, rows) -> str:
    """A local ``datasets`` cache holding ``repo_id`` as ``load_dataset`` leaves it after a download."""
    from datasets.packaged_modules.json.json import Json

    cache = tmp_path / "hf-cache"
    src = _write_jsonl(tmp_path / "hub-rows.jsonl", rows)
    name = repo_id.split("/")[1]
    builder = Json(cache_dir=str(cache), dataset_name=name, config_name="default", hash="0" * 16,
                   data_files={"train": [str(src)], "test": [str(src)]})
    builder.download_and_prepare()
    config_dir = os.path.dirname(os.path.dirname(builder.cache_dir))  # <cache>/<name>/default-<id>
    target = cache / repo_id.replace("/", "___") / "default"
    target.parent.mkdir(parents=True)
    os.rename(config_dir, target)
    return str(cache)


def test_hub_dataset_id_from_the_local_cache_offline(tmp_path, monkeypatch):
    datasets = pytest.importorskip("datasets")
    rows = _plain(ROWS)
    cache = _hub_cache(tmp_path, "someone/tiny-prm", rows)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", cache)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    _check(load_trajectories("someone/tiny-prm:test"), rows)
    with pytest.raises(ProgadvDataError, match=r"someone/tiny-prm: the dataset has splits"):
        load_trajectories("someone/tiny-prm")
    with pytest.raises(ProgadvDataError, match=r"someone/absent: no such file or directory, and no Hugging Face Hub "
                                               r"dataset of that name could be loaded: ConnectionError"):
        load_trajectories("someone/absent")
    with pytest.raises(ProgadvDataError, match=r"missing\.jsonl: no such file or directory"):
        load_trajectories("someone/missing.jsonl")  # a file name, never a Hub id


# ------------------------------------------------------------------------------------------------------ bad rows
_OK = ROWS[3]
BAD_ROWS = [
    ("labels-not-bools", dict(_OK, labels=[1, 0, 0]), "labels[0]", "must be true or false, got int"),
    ("labels-string", dict(_OK, labels="TFF"), "labels", "must be a list"),
    ("length-mismatch", dict(_OK, labels=[True, False]), "labels", "labels has 2 entries but completions has 3"),
    ("empty-completions", dict(_OK, completions=[], labels=[]), "completions", "completions is empty"),
    ("empty-step", dict(_OK, completions=["a", " ", "c"]), "completions[1]", "empty"),
    ("step-not-string", dict(_OK, completions=["a", {"content": "b"}, "c"]), "completions[1]", "must be a string"),
    ("step-holds-separator", dict(_OK, completions=["a", "b\n\nc", "d"]), "completions[1]", "holds the step separator"),
    ("step-runs-into-separator", dict(_OK, completions=["a\n", "b", "c"]), "completions[0]", "runs into"),
    ("prompt-number", dict(_OK, prompt=3), "prompt", "must be a string or a list of messages"),
    ("prompt-bad-role", dict(_OK, prompt=[{"role": "robot", "content": "x"}]), "prompt[0].role", "unknown role"),
    ("mistake-step-column", dict(_OK, mistake_step=1), "mistake_step", "remove mistake_step"),
    ("loader-metadata-key", dict(_OK, metadata={"step_labels": [True]}), "metadata.step_labels", "filled by"),
]


@pytest.mark.parametrize("case, row, field, reason", BAD_ROWS, ids=[c[0] for c in BAD_ROWS])
def test_bad_rows_name_record_and_field(tmp_path, case, row, field, reason):
    path = _write_jsonl(tmp_path / f"{case}.jsonl", [ROWS[0], row])
    with pytest.raises(ProgadvDataError) as info:
        load_trajectories(path)
    err = info.value
    assert (err.source, err.record, err.field) == (str(path), "2 (line 2)", field), str(err)
    assert reason in err.reason, str(err)
    with pytest.raises(ProgadvDataError) as info:  # a list of rows: the row index (and its id)
        load_trajectories([ROWS[0], row])
    assert (info.value.record, info.value.field) == ("1 (id 'mul')", field)


def test_missing_labels_with_format_stepwise(tmp_path):
    row = {k: v for k, v in ROWS[0].items() if k != "labels"}
    with pytest.raises(ProgadvDataError, match=r"record 1 \(line 1\), field 'labels': missing labels"):
        load_trajectories(_write_jsonl(tmp_path / "x.jsonl", [row]), "stepwise")


# ------------------------------------------------------------------------------------- one scored step per element
@pytest.mark.parametrize("rendering", ["chat_template", "plain"])
def test_one_scored_step_per_completion(tiny_dir, tmp_path, rendering):
    from progadv_trl import ProgressAdvantageScorer
    from progadv_trl.rendering import TrajectoryTokenizer

    trajs = load_trajectories(_write_jsonl(tmp_path / "prm.jsonl", ROWS))
    scorer = ProgressAdvantageScorer.from_models(tiny_dir / "policy", tiny_dir / "reference", rendering=rendering,
                                                 step_separator=STEP_SEPARATOR, baselines=["policy_logprob"])
    tokenize = TrajectoryTokenizer(scorer.tokenizer, rendering, STEP_SEPARATOR)
    for t, r, res in zip(trajs, ROWS, scorer.score(trajs)):
        n = len(r["completions"])
        assert len(res.steps) == n and [s.part for s in res.steps] == list(range(n))
        assert all(s.message_index == len(t.messages) - 1 and s.n_tokens > 0 for s in res.steps)
        assert len(res.step_values["policy_logprob"]) == n and res.step_labels == r["labels"]
        texts = tokenize(t).step_texts
        assert len(texts) == n
        for i, (text, step) in enumerate(zip(texts, r["completions"])):
            # each span is its step's text and the separator after it (the last: the end of the turn); the first
            # also holds what the policy generated before the content (Qwen3's empty think block; plain: the tag)
            tail = STEP_SEPARATOR if i < n - 1 else (scorer.tokenizer.eos_token if rendering == "chat_template" else "")
            head = ("\n[assistant]: " if rendering == "plain" else "<think>\n\n</think>\n\n") if i == 0 else ""
            assert text == head + step + tail, (i, text)


def test_labels_that_do_not_match_the_scored_steps_are_an_error(tiny_dir, tmp_path):
    from progadv_trl import ProgressAdvantageScorer

    trajs = load_trajectories(_write_jsonl(tmp_path / "prm.jsonl", ROWS[:2]))
    scorer = ProgressAdvantageScorer.from_models(tiny_dir / "policy", tiny_dir / "reference", baselines=[])
    with pytest.raises(ValueError, match=r"trajectory '0' has 2 step labels but was scored as 1 steps"):
        scorer.evaluate(scorer.score(trajs))


# ---------------------------------------------------------------------------------------------- metric functions
def test_first_error_step():
    assert first_error_step([True, False, False]) == 1
    assert first_error_step([False]) == 0
    assert first_error_step([True, True]) == NO_ERROR == -1


def test_predict_first_error_by_hand():
    v = [1.0, -3.0, 2.5, -1.0, -0.5]  # running sum q = [1, -2, 0.5, -0.5, -1]
    assert predict_first_error(v, 0.0, "step") == 1
    assert predict_first_error(v, -3.0, "step") == NO_ERROR  # nothing strictly below
    assert predict_first_error([0.0, 1.0, -1.0, -0.5], 0.0, "step") == 2
    assert predict_first_error([0.0, 1.0, -1.0, -0.5], 0.0, "running_sum") == 3  # q = [0, 1, 0, -0.5]
    assert predict_first_error(v, -1.5, "running_sum") == 1
    assert predict_first_error(v, -2.0, "running_sum") == NO_ERROR
    assert predict_first_error(v, 0.5, "threshold") == 1
    assert predict_first_error(v, 2.0, "threshold") == 0
    assert predict_first_error(v, 0.75, "threshold") == 1
    assert predict_first_error(v, -2.0, "threshold") == NO_ERROR
    assert predict_first_error([float("nan"), 1.0], 5.0, "step") == 1  # NaN steps are never picked
    assert predict_first_error([float("nan")] * 2, 5.0, "step") == NO_ERROR
    assert predict_first_error([2.0, float("nan"), -3.0], 0.0, "threshold") == 2  # NaN adds 0 to the running sum
    with pytest.raises(ValueError, match="no steps"):
        predict_first_error([], 0.0)
    with pytest.raises(ValueError, match="unknown attribution rule 'median'"):
        predict_first_error([1.0], 0.0, "median")


def test_processbench_metrics_by_hand():
    res = processbench_metrics([1, NO_ERROR, 2, NO_ERROR], [1, 2, NO_ERROR, NO_ERROR])
    assert (res["error_acc"], res["correct_acc"], res["f1"]) == (0.5, 0.5, 0.5)
    assert (res["n_error"], res["n_correct"]) == (2, 2)
    res = processbench_metrics([0, 3, NO_ERROR, 1], [0, 3, NO_ERROR, NO_ERROR])
    assert (res["error_acc"], res["correct_acc"]) == (1.0, 0.5) and res["f1"] == pytest.approx(2 / 3)
    assert processbench_metrics([0, 0], [1, NO_ERROR])["f1"] == 0.0
    only_errors = processbench_metrics([0], [0])
    assert only_errors["error_acc"] == 1.0 and math.isnan(only_errors["correct_acc"]) and math.isnan(only_errors["f1"])
    with pytest.raises(ValueError, match="differ in length"):
        processbench_metrics([0], [])


def test_fit_first_error_threshold_by_hand():
    values = [[0.0, -2.0], [-1.0, 3.0], [0.5, 0.2], [-3.0, 1.0]]
    labels = [1, NO_ERROR, NO_ERROR, 1]
    # right for t in: (-2, inf), (-inf, -1], (-inf, 0.2], never (argmin 0, label 1); candidates -2.5 -1.5 -0.4 0.7
    # give F1 0, 2/3, 1/2, 0
    assert fit_first_error_threshold(values, labels, "step") == -1.5
    assert fit_first_error_threshold(values + [[1.0]], labels + [None], "step") == -1.5  # unlabelled: skipped
    with pytest.raises(ValueError, match="no labelled trajectory"):
        fit_first_error_threshold([[1.0]], [None])


@pytest.mark.slow
@pytest.mark.parametrize("rule", ["step", "running_sum", "threshold"])
def test_fitted_threshold_has_the_best_f1(rule):
    rng = np.random.default_rng(0)
    values = [rng.normal(size=rng.integers(1, 6)).round(1) for _ in range(40)]
    labels = [int(rng.integers(-1, len(v))) for v in values]
    t = fit_first_error_threshold(values, labels, rule)

    def f1(thr):
        return processbench_metrics([predict_first_error(v, thr, rule) for v in values], labels)["f1"]

    grid = np.linspace(-6, 6, 2401)  # steps of 0.005: between every pair of the 0.1-rounded values
    assert f1(t) == pytest.approx(max(f1(g) for g in grid))


def test_processbench_predictions_cross_fit_and_given():
    values = [[-1.0], [2.0], [-1.0], [2.0]]
    labels = [0, NO_ERROR, 0, NO_ERROR]
    # fold [0, 2] (errors) gets the threshold fitted on [1, 3] (correct only: 1.5); fold [1, 3] the one fitted on
    # [0, 2] (errors only: -0.5): every prediction right
    assert processbench_predictions(values, labels, "step") == [0, NO_ERROR, 0, NO_ERROR]
    assert processbench_predictions(values, labels, "step", threshold=3.0) == [0, 0, 0, 0]
    assert processbench_predictions(values[:1] + [[1.0]], labels[:1] + [None], "step") == [None, None]  # < 2 labelled


def test_evaluate_methods_processbench_columns():
    values = [[-1.0, 0.5], [2.0, 1.0], [0.3, -2.0], [1.0, 1.5]]
    methods = {"m": {"scores": [0.0, 1.0, 0.0, 1.0], "step_values": values, "process_threshold": 0.0}}
    table = evaluate_methods(methods, success=[False, True, False, True], first_errors=[0, NO_ERROR, 1, NO_ERROR])
    row = table["m"]
    assert (row["processbench_error_acc"], row["processbench_correct_acc"], row["processbench_f1"]) == (1.0, 1.0, 1.0)
    # predictions [0, none, 1, none]: of the erroneous 0, 2 and 3 only 2 is right
    table = evaluate_methods(methods, success=[False, True, False, True], first_errors=[1, NO_ERROR, 1, 0])
    assert table["m"]["processbench_error_acc"] == pytest.approx(1 / 3)
    assert table["m"]["processbench_correct_acc"] == 1.0 and table["m"]["processbench_f1"] == pytest.approx(0.5)
    assert not set(PROCESSBENCH_COLUMNS) & set(evaluate_methods(methods, success=[False, True, False, True])["m"])
    with pytest.raises(ValueError, match="first_errors has 2 entries, expected 4"):
        evaluate_methods(methods, success=[False, True, False, True], first_errors=[0, 1])


# ----------------------------------------------------------------------------------------------- progadv evaluate
def test_cli_evaluate_reports_processbench_columns(tiny_dir, tmp_path, capsys):
    from progadv_trl import ProgressAdvantageScorer

    path = _write_jsonl(tmp_path / "prm.jsonl", ROWS)
    out = tmp_path / "metrics.json"
    baselines = "policy_logprob,neg_entropy"
    assert main(["evaluate", *cli_models(tiny_dir), "--input", str(path), "--output", str(out),
                 "--baselines", baselines]) == 0
    printed = capsys.readouterr().out
    assert all(c in printed for c in PROCESSBENCH_COLUMNS)
    written = json.loads(out.read_text())
    assert written["config"]["step_separator"] == STEP_SEPARATOR  # taken from the input
    table = written["table"]
    assert list(table) == ["progress_advantage", "policy_logprob", "neg_entropy"]
    # the same numbers as the Python API with the separator given by hand
    scorer = ProgressAdvantageScorer.from_models(tiny_dir / "policy", tiny_dir / "reference",
                                                 step_separator=STEP_SEPARATOR, baselines=baselines.split(","))
    expected = scorer.evaluate(scorer.score(load_trajectories(path)))
    for method, row in expected.items():
        for column in PROCESSBENCH_COLUMNS:
            assert 0.0 <= row[column] <= 1.0
            assert table[method][column] == pytest.approx(row[column]), (method, column)


def test_cli_evaluate_refuses_another_separator_for_stepwise_input(tiny_dir, tmp_path, capsys):
    path = _write_jsonl(tmp_path / "prm.jsonl", ROWS)
    rc = main(["evaluate", *cli_models(tiny_dir), "--input", str(path), "--step-separator", "\\n"])
    assert rc == 2 and "stepwise" in capsys.readouterr().err
