"""``progadv view``: the HTML page of scored trajectories, from real score files of the tiny models."""

import json
import shutil
import subprocess
import tempfile
from html.parser import HTMLParser

import pytest

from progadv_trl.cli import main
from progadv_trl.data import Message, ToolCall, Trajectory
from progadv_trl.formats import save_trajectories
from progadv_trl.viewer import match_scores, message_values, parse_scores, render_view

from conftest import cli_models, sample_trajectories

PWNED = 'document.body.setAttribute("data-pwned","{}")'
BASELINES = ["self_certainty", "policy_logprob"]


def hostile() -> Trajectory:
    """A trajectory whose every text tries to run script in the page."""
    return Trajectory([Message("user", f"<script>{PWNED.format(1)}</script> & more"),
                       Message("assistant", "ok </div></section><b>bold?</b>",
                               (ToolCall(f'<img src=x onerror=\'{PWNED.format(2)}\'>', {"q": "</pre><i>x</i>"}),)),
                       Message("tool", "<!-- comment --> <style>body{display:none}</style>"),
                       Message("assistant", "done", name="<u>agent</u>")],
                      id=f'h"></script><script>{PWNED.format(3)}</script>', group="<b>g3</b>")


@pytest.fixture(scope="module")
def scored(tiny_dir, tmp_path_factory):
    """Input, ``--details`` scores and ``attribute`` output of the sample trajectories plus a hostile one."""
    root = tmp_path_factory.mktemp("view")
    trajs = sample_trajectories() + [hostile()]
    save_trajectories(root / "in.jsonl", trajs)
    models = cli_models(tiny_dir)
    assert main(["score", *models, "--input", str(root / "in.jsonl"), "--output", str(root / "scores.jsonl"),
                 "--details", "--baselines", ",".join(BASELINES)]) == 0
    assert main(["attribute", *models, "--input", str(root / "in.jsonl"),
                 "--output", str(root / "attribution.jsonl")]) == 0
    return root


def _lines(path):
    return [json.loads(x) for x in path.read_text().splitlines()]


def _view(scored, out, *extra):
    return main(["view", "--scores", str(scored / "scores.jsonl"), "--input", str(scored / "in.jsonl"),
                 "--output", str(out), *extra])


class _Page(HTMLParser):
    """Sections (trajectories) with their messages' classes, table headers, select options and the data."""

    def __init__(self):
        super().__init__()
        self.sections, self.headers, self.options, self.rows = {}, [], {}, []
        self._section = self._select = self._data = None
        self.data_text, self.scripts, self.body = "", 0, {}

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "body":
            self.body = a
        if tag == "section":
            self._section = a["data-id"]
            self.sections[self._section] = {"messages": {}, "text": ""}
        if tag == "div" and "data-message" in a and self._section is not None:
            self.sections[self._section]["messages"][int(a["data-message"])] = a["class"].split()
        if tag == "th" and "data-key" in a:
            self.headers.append(a["data-key"])
        if tag == "select":
            self._select = a["id"]
            self.options[self._select] = []
        if tag == "option" and self._select:
            self.options[self._select].append(a["value"])
        if tag == "tr" and "data-i" in a:
            self.rows.append(a)
        if tag == "script":
            self.scripts += 1
            self._data = a.get("id") == "progadv-data"

    def handle_endtag(self, tag):
        if tag == "section":
            self._section = None
        if tag == "select":
            self._select = None
        if tag == "script":
            self._data = False

    def handle_data(self, data):
        if self._section is not None:
            self.sections[self._section]["text"] += data
        if self._data:
            self.data_text += data


def _parse(text: str) -> _Page:
    page = _Page()
    page.feed(text)
    return page


def test_page_holds_every_trajectory_its_step_values_and_both_marks(scored, tmp_path):
    assert _view(scored, tmp_path / "view.html") == 0
    page = _parse((tmp_path / "view.html").read_text())
    scores, attribution = _lines(scored / "scores.jsonl"), _lines(scored / "attribution.jsonl")
    assert list(page.sections) == [s["id"] for s in scores]
    for s, a in zip(scores, attribution):
        section = page.sections[s["id"]]
        for step in s["steps"]:  # one step per message here: the shown value is the step's advantage
            assert f"advantage {step['advantage']:+.4g}" in section["text"]
        marked = {i for i, c in section["messages"].items() if "mark-pred" in c}
        assert marked == {a["predicted_step"]}  # the same message `progadv attribute` predicts
        labelled = {i for i, c in section["messages"].items() if "mark-label" in c}
        assert labelled == ({a["mistake_step"]} if a["mistake_step"] is not None else set())
        assert {i for i, c in section["messages"].items() if "action" in c} == {x["message_index"] for x in s["steps"]}
    data = json.loads(page.data_text)
    assert [r["id"] for r in data["rows"]] == [s["id"] for s in scores]
    assert [r["outcome"] for r in data["rows"]] == ["success", "failure", "success", "failure", "unlabelled"]
    assert [r["predicted"] for r in data["rows"]] == [a["predicted_step"] for a in attribution]
    assert [r["score"] for r in data["rows"]] == [s["score"] for s in scores]
    assert [r["baselines"] for r in data["rows"]] == [s["baselines"] for s in scores]
    # tokens as ids without --tokenizer; every token of the details is there, its value beta*(lp - lr)
    assert data["texts"] is None
    for s, t in zip(scores, data["tokens"]):
        tok = s["tokens"]
        assert t["ids"] == tok["input_ids"] and t["step"] == tok["step_index"]
        k = next(k for k, st in enumerate(tok["step_index"]) if st >= 0)
        assert t["v"][k] == pytest.approx(tok["policy_logprob"][k] - tok["reference_logprob"][k], abs=1e-5)


def test_every_text_is_escaped(scored, tmp_path):
    assert _view(scored, tmp_path / "view.html") == 0
    text = (tmp_path / "view.html").read_text()
    page = _parse(text)
    assert page.scripts == 2  # the data and the page's own script, nothing from the trajectory
    assert "data-pwned" not in page.body
    assert "<b>bold?</b>" not in text and "<img" not in text and "<style>body" not in text
    assert "&lt;script&gt;" in text and "&lt;b&gt;bold?&lt;/b&gt;" in text
    section = page.sections[hostile().id]  # the id round-trips through an attribute
    assert f"<script>{PWNED.format(1)}</script> & more" in section["text"]
    assert "<u>agent</u>" in section["text"] and "</pre><i>x</i>" in section["text"]
    assert json.loads(page.data_text)["rows"][-1]["id"] == hostile().id


def test_sort_and_filter_controls(scored, tmp_path):
    assert _view(scored, tmp_path / "view.html") == 0
    page = _parse((tmp_path / "view.html").read_text())
    assert {"score", "reward", "group", "outcome", *(f"b:{b}" for b in BASELINES)} <= set(page.headers)
    groups = json.loads(page.data_text)["groups"]
    assert groups == ["<b>g3</b>", "g1", "g2"]
    assert page.options["group-filter"] == ["", "0", "1", "2"]
    assert page.options["outcome-filter"] == ["", "success", "failure", "unlabelled"]


def test_tokens_decoded_with_the_tokenizer(scored, tiny_dir, tmp_path):
    from transformers import AutoTokenizer

    assert _view(scored, tmp_path / "view.html", "--tokenizer", str(tiny_dir / "policy")) == 0
    texts = json.loads(_parse((tmp_path / "view.html").read_text()).data_text)["texts"]
    tok = AutoTokenizer.from_pretrained(tiny_dir / "policy")
    ids = {i for s in _lines(scored / "scores.jsonl") for i in s["tokens"]["input_ids"]}
    assert set(texts) == {str(i) for i in ids}
    assert all(texts[str(i)] == tok.decode([i]) for i in ids)


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_mismatched_ids_are_errors_naming_the_id_and_line(scored, tmp_path, capsys):
    scores = _lines(scored / "scores.jsonl")
    extra = dict(scores[1], id="zz")
    _write(tmp_path / "more.jsonl", [*scores, extra])
    out = tmp_path / "view.html"
    assert main(["view", "--scores", str(tmp_path / "more.jsonl"), "--input", str(scored / "in.jsonl"),
                 "--output", str(out)]) == 1
    err = capsys.readouterr().err
    assert "'zz' (line 6)" in err and "field 'id'" in err and "has no trajectory" in err and not out.exists()

    _write(tmp_path / "fewer.jsonl", scores[:2] + scores[3:])
    assert main(["view", "--scores", str(tmp_path / "fewer.jsonl"), "--input", str(scored / "in.jsonl"),
                 "--output", str(out)]) == 1
    err = capsys.readouterr().err
    assert "trajectory 'c' has no score" in err and "record 3 (line 3)" in err and "field 'id'" in err

    changed = sample_trajectories() + [hostile()]
    changed[3].messages[1] = Message("assistant", "The answer is 6.")
    save_trajectories(tmp_path / "changed.jsonl", changed)
    assert main(["view", "--scores", str(scored / "scores.jsonl"), "--input", str(tmp_path / "changed.jsonl"),
                 "--output", str(out)]) == 1
    err = capsys.readouterr().err
    assert "'d' (line 4)" in err and "input_sha256" in err and "changed since it was scored" in err


@pytest.mark.parametrize("line, field", [('{"id": "a", "score": 1.0}', "field 'steps'"),
                                         ('{"id": "a", "score": "x", "steps": []}', "field 'score'"),
                                         ('[1, 2]', "a score record is a JSON object"),
                                         ('{"id": "a", "score": 0.5, "steps": [{"message_index": 2}]}',
                                          "field 'steps[0].advantage'"),
                                         ("{not json", "not valid JSON")])
def test_bad_score_lines_name_the_line_and_field(line, field):
    with pytest.raises(ValueError) as e:
        parse_scores(['{"id": "b", "score": 0.1, "steps": [{"message_index": 1, "advantage": -0.2}]}', line],
                     source="s.jsonl")
    assert "s.jsonl" in str(e.value) and "line 2" in str(e.value) and field in str(e.value)


def test_duplicate_score_id_is_an_error():
    row = '{"id": "b", "score": 0.1, "steps": [{"message_index": 1, "advantage": -0.2}]}'
    with pytest.raises(ValueError, match=r"line 3.*duplicate id \(first on line 1\)"):
        parse_scores([row, "", row], source="s.jsonl")


def test_output_goes_through_output_file(scored, tmp_path, capsys):
    out = tmp_path / "view.html"
    assert _view(scored, out) == 0
    assert _view(scored, out) == 2 and "--overwrite" in capsys.readouterr().err
    assert _view(scored, out, "--overwrite") == 0
    before = (scored / "scores.jsonl").read_bytes()
    assert main(["view", "--scores", str(scored / "scores.jsonl"), "--input", str(scored / "in.jsonl"),
                 "--output", str(scored / "scores.jsonl"), "--overwrite"]) == 2
    assert "same file as --scores" in capsys.readouterr().err
    assert (scored / "scores.jsonl").read_bytes() == before


def test_message_value_sums_parts_and_the_configured_rule_predicts():
    traj = Trajectory([Message("user", "q"), Message("assistant", "a\n\nb"), Message("tool", "r"),
                       Message("assistant", "c")], id="p", reward=0.0, mistake_step=3)
    steps = [{"message_index": 1, "advantage": -1.0, "part": 0}, {"message_index": 1, "advantage": 0.25, "part": 1},
             {"message_index": 3, "advantage": -0.5}]
    assert message_values(steps) == ([1, 3], [-0.75, -0.5])
    lines = parse_scores([json.dumps({"id": "p", "score": -0.4, "steps": steps})])
    pairs = match_scores([traj], lines)
    # running sums -0.75, -1.25: the running-sum rule picks message 3, the step rule message 1, a threshold of -0.5
    # the first running sum below it (message 1)
    for config, predicted in (({}, 3), ({"attribution": "step"}, 1),
                              ({"attribution": "threshold", "attribution_threshold": -0.5}, 1)):
        page = _parse(render_view(pairs, config=config))
        classes = page.sections["p"]["messages"]
        assert [i for i, c in classes.items() if "mark-pred" in c] == [predicted]
        assert "part 1: +0.25" in page.sections["p"]["text"]
    # a success threshold from the settings record decides the outcome
    assert json.loads(_parse(render_view(pairs, config={"success_threshold": 0.0})).data_text)["rows"][0][
        "outcome"] == "success"


def _chromium():
    return next((p for p in (shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome")) if p), None)


def _dump_dom(page_path) -> str:
    with tempfile.TemporaryDirectory() as profile:
        run = subprocess.run([_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                              "--no-first-run", "--disable-background-networking", "--disable-component-update",
                              "--disable-sync", f"--user-data-dir={profile}", "--dump-dom",
                              f"file://{page_path}"], capture_output=True, text=True, timeout=180)
    assert run.returncode == 0, run.stderr[-2000:]
    return run.stdout


@pytest.mark.slow
@pytest.mark.skipif(_chromium() is None, reason="chromium is not installed (apt-get install chromium): the page's "
                    "script is not run in a browser here")
def test_headless_chromium_builds_the_table_sorts_and_filters(scored, tmp_path):
    out = tmp_path / "view.html"
    assert _view(scored, out) == 0
    scores = _lines(scored / "scores.jsonl")
    text = _dump_dom(out)
    dom = _parse(text)
    assert [int(r["data-i"]) for r in dom.rows] == list(range(len(scores)))  # every trajectory has its row
    assert "data-pwned" not in dom.body  # no text of the trajectories ran
    assert "current" in dom.rows[0]["class"].split()
    # the shown trajectory's token heat map was built: one span per token, scored ones coloured
    first = text[text.index('id="t0"'):text.index('id="t1"')]
    assert first.count('class="tk') == len(scores[0]["tokens"]["input_ids"])
    assert first.count('class="tk ids h') == sum(s >= 0 for s in scores[0]["tokens"]["step_index"])

    # sort by score (first click: highest first), then keep only failures; the script records the row order
    probe = """<script>
    function order() { return Array.prototype.map.call(document.querySelectorAll('#traj-table tbody tr'),
      function (tr) { return tr.dataset.i; }).join(','); }
    document.querySelector('th[data-key="score"]').click();
    document.body.dataset.byScore = order();
    var f = document.getElementById('outcome-filter'); f.value = 'failure'; f.dispatchEvent(new Event('change'));
    document.body.dataset.failures = order();
    document.querySelector('th[data-key="b:policy_logprob"]').click();
    document.querySelector('th[data-key="b:policy_logprob"]').click();
    document.body.dataset.byBaselineUp = order();
    </script></body>"""
    probed = tmp_path / "probe.html"
    probed.write_text(out.read_text().replace("</body>", probe))
    body = _parse(_dump_dom(probed)).body
    by_score = sorted(range(len(scores)), key=lambda i: -scores[i]["score"])
    assert body["data-by-score"] == ",".join(map(str, by_score))
    failures = [i for i in by_score if scores[i]["id"] in ("b", "d")]
    assert body["data-failures"] == ",".join(map(str, failures))
    up = sorted(failures, key=lambda i: scores[i]["baselines"]["policy_logprob"])
    assert body["data-by-baseline-up"] == ",".join(map(str, up))
