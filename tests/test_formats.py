"""Tests for progadv_trl.formats: our JSONL, TRL rows, tau2 files, Who&When logs, and bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from progadv_trl.data import Message, ProgadvDataError, ToolCall, Trajectory
from progadv_trl.formats import (FORMATS, AgentAttribution, iter_trajectories, load_trajectories,
                                 save_trajectories, whowhen_agent)

WHOWHEN = Path(__file__).resolve().parents[2] / "shared" / "data" / "who_and_when"


def _write_lines(path: Path, records) -> Path:
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in records) + "\n", encoding="utf-8")
    return path


def _ok(i=0, **extra):
    rec = {"id": f"t{i}", "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}],
           "reward": 1.0}
    rec.update(extra)
    return rec


# ------------------------------------------------------------------------------------------------------ our JSONL


def test_round_trip_jsonl(tmp_path):
    trajs = [
        Trajectory(
            messages=[Message("system", "be brief"), Message("user", "weather in Paris?"),
                      Message("assistant", "", tool_calls=(ToolCall("get_weather", {"city": "Paris"}, id="c1"),)),
                      Message("tool", '{"temp": 21}', name="get_weather"),
                      Message("assistant", "21 °C, sunny", name="agent-A")],
            id="a", group="g1", reward=1.0, mistake_step=None, metadata={"seed": 3, "tags": ["x"]}),
        Trajectory(
            messages=[Message("user", "q"),
                      Message("assistant", "call", tool_calls=(ToolCall("f", '{"raw": "string args"}'),)),
                      Message("assistant", "done")],
            id="b", group="g1", reward=0.0, mistake_step=2, action_indices=(1, 2)),
    ]
    path = tmp_path / "runs.jsonl"
    save_trajectories(path, trajs)
    assert not [p for p in tmp_path.iterdir() if p.name != "runs.jsonl"]  # no temp file left behind
    back = load_trajectories(path)
    assert back == trajs
    assert back[1].messages[1].tool_calls[0].arguments == '{"raw": "string args"}'
    assert load_trajectories(path, "jsonl", limit=1) == trajs[:1]


def test_save_is_atomic_and_validates(tmp_path):
    path = tmp_path / "out.jsonl"
    save_trajectories(path, [Trajectory([Message("user", "u"), Message("assistant", "a")], id="x")])
    before = path.read_bytes()
    bad = Trajectory([Message("user", "only a user")], id="y")
    with pytest.raises(ProgadvDataError, match="out.jsonl"):
        save_trajectories(path, [bad])
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.jsonl"]


def test_jsonl_details(tmp_path):
    path = _write_lines(tmp_path / "d.jsonl", [
        "",
        {"messages": [{"role": "user", "content": "q"},
                      {"role": "assistant", "content": None,
                       "tool_calls": [{"type": "function", "id": "c9", "function": {"name": "f", "arguments": "{}"}}]},
                      {"role": "tool", "content": "ok"}, {"role": "assistant", "content": "fine"}],
         "reward": True, "mistake_step": "3", "run": 7},
        "   ",
        {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}], "reward": None},
    ])
    a, b = load_trajectories(path)
    assert (a.id, b.id) == ("0", "1")  # 0-based position when there is no id
    assert a.messages[1] == Message("assistant", "", tool_calls=(ToolCall("f", "{}", id="c9"),))
    assert a.reward == 1.0 and a.mistake_step == 3 and a.metadata == {"run": 7}
    assert b.reward is None and b.steps == (1,)
    it = iter_trajectories(path)
    assert next(it).id == "0"


def test_streaming_yields_before_a_bad_record(tmp_path):
    path = _write_lines(tmp_path / "s.jsonl", [_ok(0), _ok(1), "{broken"])
    it = iter_trajectories(path)
    assert [next(it).id, next(it).id] == ["t0", "t1"]
    with pytest.raises(ProgadvDataError, match=r"s\.jsonl, record 3 \(line 3\)"):
        next(it)
    assert len(load_trajectories(path, limit=2)) == 2


def test_list_of_trajectories_and_dicts():
    t = Trajectory([Message("user", "u"), Message("assistant", "a")])
    out = load_trajectories([t, Trajectory([Message("user", "u"), Message("assistant", "b")], id="z")])
    assert [o.id for o in out] == ["0", "z"] and t.id is None  # the caller's object is not mutated
    assert load_trajectories([_ok(0), _ok(1)], "dataset")[1].id == "t1"
    with pytest.raises(ProgadvDataError, match=r"<list>, record 0, field 'messages'"):
        load_trajectories([Trajectory([Message("user", "u")])])


# ------------------------------------------------------------------------------------------------------------ TRL

STANDARD = [
    {"prompt": "2+2?", "completion": "4", "reward": 1.0},
    {"prompt": "2+2?", "completion": "5", "reward": 0.0},
    {"prompt": "3+3?", "completion": "6", "reward": 1.0},
    {"prompt": "2+2?", "completion": "four", "reward": 1.0},
]
CONVERSATIONAL = [
    {"prompt": [{"role": "system", "content": "sys"}, {"role": "user", "content": "Paris weather?"}],
     "completion": [{"role": "assistant", "content": "It is sunny."}], "score": 0.5},
    {"prompt": [{"role": "system", "content": "sys"}, {"role": "user", "content": "Rome weather?"}],
     "completion": [{"role": "assistant", "content": "Rainy."}], "score": 1.0},
    {"prompt": [{"role": "system", "content": "sys"}, {"role": "user", "content": "Paris weather?"}],
     "completion": [{"role": "assistant", "content": "No idea."}], "score": 0.0},
]


def _check_standard(trajs):
    assert [t.group for t in trajs] == ["0", "0", "2", "0"]
    assert [t.reward for t in trajs] == [1.0, 0.0, 1.0, 1.0]
    assert trajs[1].messages == [Message("user", "2+2?"), Message("assistant", "5")]
    assert [t.id for t in trajs] == ["0", "1", "2", "3"]


def _check_conversational(trajs):
    assert [t.group for t in trajs] == ["0", "1", "0"]
    assert [t.reward for t in trajs] == [0.5, 1.0, 0.0]
    assert [m.role for m in trajs[0].messages] == ["system", "user", "assistant"]
    assert trajs[2].messages[-1].content == "No idea." and trajs[2].steps == (2,)


def test_trl_list_of_dicts():
    _check_standard(load_trajectories(STANDARD))
    _check_standard(load_trajectories(STANDARD, "trl"))
    _check_conversational(load_trajectories(CONVERSATIONAL, "dataset"))


def test_trl_dataset():
    datasets = pytest.importorskip("datasets")
    _check_standard(load_trajectories(datasets.Dataset.from_list(STANDARD)))
    _check_conversational(load_trajectories(datasets.Dataset.from_list(CONVERSATIONAL), "trl"))
    msgs = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a", "name": "bot"}]
    ours = datasets.Dataset.from_list([_ok(0, group=None), _ok(1, group="g", messages=msgs)])
    out = load_trajectories(ours)  # Arrow fills the keys a struct lacks with None: read as absent
    assert [t.group for t in out] == [None, "g"] and out[0].messages[1].name is None
    assert out[1].messages[1].name == "bot" and out[1].messages[0].tool_calls == ()


def test_trl_jsonl_file(tmp_path):
    _check_standard(load_trajectories(_write_lines(tmp_path / "std.jsonl", STANDARD)))
    _check_conversational(load_trajectories(_write_lines(tmp_path / "conv.jsonl", CONVERSATIONAL)))
    rows = [dict(STANDARD[0], group="explicit", id="r0"), dict(STANDARD[1], extra=1)]
    a, b = load_trajectories(_write_lines(tmp_path / "g.jsonl", rows), "trl")
    assert (a.id, a.group, b.group, b.metadata) == ("r0", "explicit", "0", {"extra": 1})


# ----------------------------------------------------------------------------------------------------------- tau2


def test_tau2(tmp_path):
    sims = [
        {"id": "sim-1", "task_id": "7", "trial": 0, "termination_reason": "user_stop",
         "reward_info": {"reward": 1.0, "db_check": {"db_match": True}},
         "messages": [
             {"role": "assistant", "content": "Hi! How can I help?", "turn_idx": 0},
             {"role": "user", "content": "Cancel order #W1.", "tool_calls": None},
             {"role": "assistant", "content": None,
              "tool_calls": [{"id": "tc1", "name": "cancel_order", "arguments": {"order_id": "#W1"},
                              "requestor": "assistant"}]},
             {"role": "tool", "id": "tc1", "content": '{"status": "cancelled"}', "requestor": "assistant"},
             {"role": "assistant", "content": "Done."}]},
        {"id": "sim-2", "task_id": 7, "trial": 1,
         "messages": [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "bye"}]},
    ]
    path = tmp_path / "results.json"
    path.write_text(json.dumps({"info": {"domain": "retail"}, "simulations": sims}), encoding="utf-8")
    a, b = load_trajectories(path)
    assert (a.id, a.group, a.reward, b.id, b.group, b.reward) == ("sim-1", "7", 1.0, "sim-2", "7", None)
    assert a.steps == (0, 2, 4) and a.messages[3].role == "tool"
    assert a.messages[2].tool_calls == (ToolCall("cancel_order", {"order_id": "#W1"}, id="tc1"),)
    assert a.metadata["trial"] == 0 and a.metadata["termination_reason"] == "user_stop"
    assert "messages" not in a.metadata and "info" not in a.metadata
    assert load_trajectories(path, "tau2") == [a, b]


# ------------------------------------------------------------------------------------------------------- Who&When


@pytest.fixture(scope="module")
def whowhen():
    if not WHOWHEN.is_dir():
        pytest.skip(f"Who&When data not found at {WHOWHEN}")
    return {t.id: t for t in load_trajectories(WHOWHEN)}


def test_whowhen_counts_and_order(whowhen):
    ids = list(whowhen)
    assert sum(i.startswith("Hand-Crafted/") for i in ids) == 58
    assert sum(i.startswith("Algorithm-Generated/") for i in ids) == 126
    assert ids[:3] == ["Hand-Crafted/1", "Hand-Crafted/2", "Hand-Crafted/3"] and ids[9] == "Hand-Crafted/10"
    assert ids[58] == "Algorithm-Generated/1"
    assert len(load_trajectories(WHOWHEN / "Hand-Crafted")) == 58
    assert len(load_trajectories(WHOWHEN / "Algorithm-Generated", "whowhen")) == 126
    (single,) = load_trajectories(WHOWHEN / "Algorithm-Generated" / "15.json")
    assert single == whowhen["Algorithm-Generated/15"]


@pytest.mark.parametrize("tid, step, name, agent, prefix", [
    ("Hand-Crafted/1", 12, "WebSurfer", "WebSurfer", "I clicked 'NY Jidokwan Taekwondo'."),
    ("Hand-Crafted/20", 3, "Orchestrator (-> WebSurfer)", "Orchestrator",
     "Please search for the paper titled 'multiwavelength observations of fast radio bursts'"),
    ("Algorithm-Generated/1", 1, "Excel_Expert", "Excel_Expert", "You are given: (1) a task and advises"),
    ("Algorithm-Generated/15", 7, "Verification_Expert", "Verification_Expert",
     "It appears there is an issue with variable scope"),
])
def test_whowhen_mistake_step(whowhen, tid, step, name, agent, prefix):
    t = whowhen[tid]
    assert t.mistake_step == step and step in t.steps
    m = t.messages[step]
    assert (m.role, m.name, whowhen_agent(m)) == ("assistant", name, agent)
    assert m.content.startswith(prefix)
    assert t.metadata["mistake_step_raw"] == str(step - t.metadata["history_offset"])


def test_whowhen_mapping(whowhen):
    hc, ag = whowhen["Hand-Crafted/1"], whowhen["Algorithm-Generated/1"]
    assert hc.messages[0].role == "user" and hc.messages[0].content.startswith("Where can I take martial arts")
    assert ag.messages[0] == Message("user", ag.metadata["question"])
    assert (hc.metadata["history_offset"], ag.metadata["history_offset"]) == (0, 1)
    assert hc.reward == ag.reward == 0.0 and hc.group is None
    assert {"mistake_agent", "question", "ground_truth", "subset", "mistake_reason"} <= set(hc.metadata)
    for t in whowhen.values():
        assert 0 not in t.steps and all(t.messages[i].content.strip() for i in t.steps)
        assert t.steps == tuple(i for i in range(1, len(t.messages)) if t.messages[i].content.strip())
    # the two empty messages of the benchmark are not steps
    assert 8 not in whowhen["Algorithm-Generated/36"].steps and 6 not in whowhen["Algorithm-Generated/99"].steps
    agree = sum(whowhen_agent(t.messages[t.mistake_step]) == t.metadata["mistake_agent"] for t in whowhen.values())
    assert agree == 178  # 6 of 184 agent labels differ from the speaker of the labelled step


def test_whowhen_agent():
    assert whowhen_agent(Message("assistant", "x", name="Orchestrator (thought)")) == "Orchestrator"
    assert whowhen_agent(Message("assistant", "x", name="Orchestrator (-> WebSurfer)")) == "Orchestrator"
    assert whowhen_agent(Message("assistant", "x", name="Computer_terminal")) == "Computer_terminal"
    assert whowhen_agent(Message("user", "x")) == "user"


def test_agent_attribution_names_the_speaker_and_counts_labelled_hits():
    def log(tid, mistake_agent):
        msgs = [Message("user", "q"), Message("assistant", "a", name="Orchestrator (thought)"),
                Message("assistant", "b", name="WebSurfer")]
        return Trajectory(msgs, id=tid, metadata={} if mistake_agent is None else {"mistake_agent": mistake_agent})

    agents = AgentAttribution()
    seen = list(agents.remember([log("a", "WebSurfer"), log(7, "WebSurfer"), log("c", None)]))
    assert [t.id for t in seen] == ["a", 7, "c"]
    assert agents.predict("a", 2) == ("WebSurfer", "WebSurfer")
    assert agents.predict(7, 1) == ("Orchestrator", "WebSurfer")  # ids are matched as strings
    assert agents.predict("c", 2) == ("WebSurfer", None)  # unlabelled: not counted
    assert (agents.hits, agents.labelled) == (1, 2)
    with pytest.raises(KeyError):
        agents.predict("a", 2)  # forgotten once predicted


# ------------------------------------------------------------------------------------------------------ bad input

MSGS = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
BAD_JSONL = [
    # (case id, lines, record, field)
    ("malformed-json", [_ok(0), _ok(1), '{"messages": ['], "3 (line 3)", None),
    ("not-an-object", [_ok(0), "[1, 2]"], "2 (line 2)", None),
    ("missing-messages", [_ok(0), {"id": "x", "reward": 1.0}], "2 (line 2)", "messages"),
    ("messages-not-list", [{"messages": "hello"}], "1 (line 1)", "messages"),
    ("message-not-object", [{"messages": [MSGS[0], "hi"]}], "1 (line 1)", "messages[1]"),
    ("missing-role", [{"messages": [{"content": "q"}, MSGS[1]]}], "1 (line 1)", "messages[0].role"),
    ("missing-content", [{"messages": [MSGS[0], {"role": "assistant"}]}], "1 (line 1)", "messages[1].content"),
    ("null-content", [{"messages": [MSGS[0], {"role": "assistant", "content": None}]}], "1 (line 1)",
     "messages[1].content"),
    ("content-int", [{"messages": [MSGS[0], {"role": "assistant", "content": 3}]}], "1 (line 1)",
     "messages[1].content"),
    ("unknown-role", [_ok(0), _ok(1), {"messages": MSGS + [{"role": "robot", "content": "x"}]}], "3 (line 3)",
     "messages[2].role"),
    ("nan-reward", [_ok(0), '{"messages": %s, "reward": NaN}' % json.dumps(MSGS)], "2 (line 2)", "reward"),
    ("inf-reward", ['{"messages": %s, "reward": -Infinity}' % json.dumps(MSGS)], "1 (line 1)", "reward"),
    ("string-reward", [_ok(0, reward="high")], "1 (line 1)", "reward"),
    ("mistake-step-text", [_ok(0, mistake_step="two")], "1 (line 1)", "mistake_step"),
    ("mistake-step-float", [_ok(0, mistake_step=1.5)], "1 (line 1)", "mistake_step"),
    ("mistake-step-out-of-range", [_ok(0, mistake_step=5)], "1 (line 1)", "mistake_step"),
    ("mistake-step-not-action", [_ok(0, mistake_step=0)], "1 (line 1)", "mistake_step"),
    ("no-assistant", [{"messages": [MSGS[0]]}], "1 (line 1)", "messages"),
    ("duplicate-id", [_ok(0), _ok(1), _ok(0)], "3 (line 3)", "id"),
    ("id-float", [_ok(0, id=1.5)], "1 (line 1)", "id"),
    ("tool-calls-not-list", [{"messages": [MSGS[0], {"role": "assistant", "content": "", "tool_calls": {}}]}],
     "1 (line 1)", "messages[1].tool_calls"),
    ("tool-args-int", [{"messages": [MSGS[0], {"role": "assistant", "content": None,
                                               "tool_calls": [{"name": "f", "arguments": 3}]}]}],
     "1 (line 1)", "messages[1].tool_calls[0].arguments"),
    ("tool-no-name", [{"messages": [MSGS[0], {"role": "assistant", "content": None,
                                              "tool_calls": [{"type": "function", "function": {"arguments": {}}}]}]}],
     "1 (line 1)", "messages[1].tool_calls[0].function.name"),
    ("metadata-list", [_ok(0, metadata=[1])], "1 (line 1)", "metadata"),
    ("action-indices-bad", [_ok(0, action_indices=["1"])], "1 (line 1)", "action_indices"),
    ("blank-lines-counted-apart", ["", _ok(0), "", {"messages": 5}], "2 (line 4)", "messages"),
    ("trl-completion-type", [{"prompt": "p", "completion": "c"}, {"prompt": "p", "completion": [1]}],
     "2 (line 2)", "completion"),
    ("trl-bad-role", [{"prompt": [{"role": "human", "content": "p"}], "completion": [MSGS[1]]}], "1 (line 1)",
     "prompt[0].role"),
]


@pytest.mark.parametrize("case, lines, record, field", BAD_JSONL, ids=[c[0] for c in BAD_JSONL])
def test_bad_jsonl(tmp_path, case, lines, record, field):
    path = _write_lines(tmp_path / f"{case}.jsonl", lines)
    with pytest.raises(ProgadvDataError) as info:
        load_trajectories(path)
    msg = str(info.value)
    assert f"{case}.jsonl" in msg and f"record {record}" in msg, msg
    if field is not None:
        assert f"field '{field}'" in msg, msg
    assert info.value.record == record and info.value.field == field


def test_bad_utf8(tmp_path):
    path = tmp_path / "latin.jsonl"
    path.write_bytes(json.dumps(_ok(0)).encode() + b"\n" + '{"messages": "caf\xe9"}'.encode("latin-1") + b"\n")
    with pytest.raises(ProgadvDataError, match=r"latin\.jsonl, record 2 \(line 2\): line is not valid UTF-8"):
        load_trajectories(path)


def test_empty_and_unknown(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n  \n", encoding="utf-8")
    with pytest.raises(ProgadvDataError, match=r"empty\.jsonl: empty source"):
        load_trajectories(empty)
    assert load_trajectories(empty, limit=0) == []
    other = _write_lines(tmp_path / "pref.jsonl", [{"chosen": "a", "rejected": "b"}])
    with pytest.raises(ProgadvDataError, match=r"pref\.jsonl, record 1 \(line 1\): cannot tell the format") as info:
        load_trajectories(other)
    assert all(f in str(info.value) for f in FORMATS)
    with pytest.raises(ProgadvDataError, match="no such file"):
        load_trajectories(tmp_path / "missing.jsonl")
    with pytest.raises(ProgadvDataError, match="unknown format"):
        load_trajectories(empty, "csv")
    with pytest.raises(ProgadvDataError, match=r"<list>, record 1 \(id 't1'\), field 'reward'"):
        load_trajectories([_ok(0), dict(_ok(1), reward=float("nan"))])
    with pytest.raises(ProgadvDataError, match=r"<list>: empty source"):
        load_trajectories([])


def test_bad_tau2(tmp_path):
    path = tmp_path / "tau.json"
    sims = [{"id": "s1", "task_id": "1", "messages": MSGS},
            {"id": "s2", "task_id": "1", "messages": [{"role": "robot", "content": "x"}]}]
    path.write_text(json.dumps({"simulations": sims}), encoding="utf-8")
    with pytest.raises(ProgadvDataError, match=r"tau\.json, record 1 \(id 's2'\), field 'messages\[0\]\.role'"):
        load_trajectories(path)
    path.write_text(json.dumps({"simulations": [dict(sims[0], reward_info={"reward": "x"})]}), encoding="utf-8")
    with pytest.raises(ProgadvDataError, match=r"record 0 \(id 's1'\), field 'reward_info\.reward'"):
        load_trajectories(path)
    path.write_text('{"simulations": [', encoding="utf-8")
    with pytest.raises(ProgadvDataError, match=r"tau\.json: malformed JSON"):
        load_trajectories(path)


def test_bad_whowhen(tmp_path):
    folder = tmp_path / "Algorithm-Generated"
    folder.mkdir()
    log = {"question": "q?", "mistake_step": "1", "mistake_agent": "B", "ground_truth": "x",
           "history": [{"content": "plan", "name": "A", "role": "assistant"},
                       {"content": "  ", "name": "B", "role": "user"}]}
    (folder / "5.json").write_text(json.dumps(log), encoding="utf-8")
    with pytest.raises(ProgadvDataError, match=r"5\.json, record Algorithm-Generated/5, field 'mistake_step'.*empty"):
        load_trajectories(tmp_path)
    (folder / "5.json").write_text(json.dumps(dict(log, mistake_step="one")), encoding="utf-8")
    with pytest.raises(ProgadvDataError, match=r"5\.json, record Algorithm-Generated/5, field 'mistake_step'"):
        load_trajectories(folder / "5.json")
    (folder / "5.json").write_text(json.dumps(dict(log, history=[{"role": "assistant"}])), encoding="utf-8")
    with pytest.raises(ProgadvDataError, match=r"5\.json, record Algorithm-Generated/5, field 'history\[0\]\.content'"):
        load_trajectories(folder)
    (folder / "5.json").write_text(json.dumps(dict(log, mistake_step="0")), encoding="utf-8")
    (t,) = load_trajectories(folder)
    assert (t.id, t.mistake_step, t.steps, t.messages[1].name) == ("Algorithm-Generated/5", 1, (1,), "A")


# ------------------------------------------------------------------------------ text, huge numbers, deep nesting


def _deep(levels: int) -> dict:
    out: dict = {}
    cur = out
    for _ in range(levels):
        cur["k"] = {}
        cur = cur["k"]
    return out


_A = {"role": "assistant", "content": "a"}
HOSTILE_JSONL = [
    # (case, raw line, field): each was a traceback (TypeError in the tokenizer, UnicodeEncodeError on output,
    # OverflowError, ValueError, RecursionError) or a usage exit instead of bad data naming file, line and field
    ("surrogate-content", '{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a\\ud800"}]}',
     "messages[1].content"),
    ("surrogate-name", '{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a", '
     '"name": "\\udfff"}]}', "messages[1].name"),
    ("surrogate-id", '{"id": "\\ud800x", "messages": [{"role": "user", "content": "q"}, %s]}' % json.dumps(_A), "id"),
    ("surrogate-metadata-key", '{"messages": [{"role": "user", "content": "q"}, %s], "metadata": {"\\udc80": 1}}'
     % json.dumps(_A), "metadata"),
    ("surrogate-extra-column", '{"messages": [{"role": "user", "content": "q"}, %s], "note": ["\\ud800"]}'
     % json.dumps(_A), "metadata.note[0]"),
    ("reward-400-digits", '{"messages": [{"role": "user", "content": "q"}, %s], "reward": %s}'
     % (json.dumps(_A), "9" * 400), "reward"),
    ("reward-5000-digits", '{"messages": [{"role": "user", "content": "q"}, %s], "reward": %s}'
     % (json.dumps(_A), "9" * 5000), None),
    ("mistake-step-5000-digits", '{"messages": [{"role": "user", "content": "q"}, %s], "mistake_step": "%s"}'
     % (json.dumps(_A), "9" * 5000), "mistake_step"),
    ("metadata-900-deep", json.dumps({"messages": [{"role": "user", "content": "q"}, _A], "metadata": _deep(900)}),
     "metadata.k.k.k..."),
    ("tool-arguments-900-deep", json.dumps({"messages": [{"role": "user", "content": "q"}, {
        "role": "assistant", "content": None, "tool_calls": [{"name": "f", "arguments": _deep(900)}]}]}),
     "messages[1].tool_calls[0].arguments.k.k.k..."),
]


@pytest.mark.parametrize("case, line, field", HOSTILE_JSONL, ids=[c[0] for c in HOSTILE_JSONL])
def test_hostile_records_are_bad_data_with_file_line_and_field(tmp_path, case, line, field):
    path = tmp_path / f"{case}.jsonl"
    path.write_text(json.dumps(_ok(0)) + "\n" + line + "\n", encoding="utf-8")
    with pytest.raises(ProgadvDataError) as info:
        load_trajectories(path)
    assert info.value.source == str(path) and info.value.record == "2 (line 2)", str(info.value)
    if field is not None and field.endswith("..."):  # a long path is cut short in the message
        assert info.value.field.startswith(field[:-3]) and "more than 100 levels" in str(info.value)
    else:
        assert info.value.field == field, str(info.value)
    assert len(str(info.value)) < 400


def test_hostile_rows_from_python_are_bad_data():
    with pytest.raises(ProgadvDataError, match=r"<list>, record 1, field 'id'"):
        load_trajectories([_ok(0), dict(_ok(1), id=10**5000)])  # used to raise ValueError printing the id
    with pytest.raises(ProgadvDataError, match=r"<list>, record 0 \(id 't0'\), field 'messages\[1\]\.content'"):
        load_trajectories([dict(_ok(0), messages=[MSGS[0], {"role": "assistant", "content": "\udc00"}])])
    bad = Trajectory([Message("user", "q"), Message("assistant", "a")], id="big", reward=10**400)
    with pytest.raises(ProgadvDataError, match=r"field 'reward'"):
        load_trajectories([bad])  # used to raise OverflowError in validate
    deep = Trajectory([Message("user", "q"), Message("assistant", "a")], id="deep", metadata=_deep(100))
    with pytest.raises(ProgadvDataError, match=r"field 'metadata"):
        load_trajectories([deep])
    assert load_trajectories([Trajectory([Message("user", "q"), Message("assistant", "a")], id="ok",
                                         metadata=_deep(99))])[0].id == "ok"


def test_trajectories_remember_where_they_were_read(tmp_path):
    path = _write_lines(tmp_path / "where.jsonl", ["", _ok(0), _ok(1)])
    a, b = load_trajectories(path)
    assert (b.source, b.source_record) == (str(path), "2 (line 3)")
    err = b.error("the chat template failed", "messages")
    assert str(err) == f"{path}, record 2 (line 3), field 'messages': the chat template failed"
    # not data: equality, repr and to_dict ignore it, and a hand-built trajectory names its id
    assert b == Trajectory(b.messages, id=b.id, reward=b.reward) and "line" not in repr(b)
    assert "source" not in b.to_dict()
    hand = Trajectory([Message("user", "q"), Message("assistant", "a")], id="h")
    assert str(hand.error("boom", "messages")) == "record h, field 'messages': boom"
    objs = [hand]
    (loaded,) = load_trajectories(objs)
    assert loaded.source == "<list>" and hand.source is None  # the caller's object is not modified
