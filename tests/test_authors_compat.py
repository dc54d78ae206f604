"""``compat="authors"`` against an independent float64 re-statement of the paper code's scoring.

The paper code (deeplearning-wisc/progress-advantage, ``pa/trajectory.py`` and ``pa/scoring.py``) renders each
message to a text of its own, encodes every text on its own (no special tokens), concatenates the ids after BOS,
and scores a message by the token mean of each model's log-probs over all tokens of its text (the ``\\n`` separator
and the ``[role]: `` tag included); a step is ``beta * (policy mean - reference mean)``, an empty span counts 0.
The re-statement below is written from those conventions, with full ``[L, V]`` logits in float64, and shares no code
with the library. The library runs in float32 through its fused kernel: they must agree to 1e-4.
"""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from progadv_trl import load_trajectories
from progadv_trl.scorer import ProgressAdvantageScorer
from progadv_trl.tiny import build_model, build_tokenizer

from conftest import SHARED_DATA

BETA = 0.5
TOL = 1e-4


# ----------------------------------------------------------------------------- the paper's conventions, restated


def tau2_texts(messages):
    """Per message: (text, is_action). Assistant: content plus ``tool_call(name, str(args))`` lines, stripped."""
    out = []
    for i, msg in enumerate(messages):
        sep = "" if i == 0 else "\n"
        role = msg.get("role", "")
        content = str(msg.get("content") or "")
        if role != "assistant":
            out.append((f"{sep}[{role}]: {content}", False))
            continue
        lines = [f"tool_call({tc.get('name', '')}, {str(tc.get('arguments', {}))})"
                 for tc in (msg.get("tool_calls") or []) if tc]
        action = content + ("\n" + "\n".join(lines) if lines else "")
        action = action.strip() or "[assistant action]"
        out.append((f"{sep}[assistant]: {action}", True))
    return out


def whowhen_texts(history, split):
    """Per history entry: (``[role]: content`` unstripped, is_action). The question is not rendered."""
    out = []
    for i, h in enumerate(history):
        sep = "" if i == 0 else "\n"
        content = str(h.get("content") or "")
        first_human = split == "Hand-Crafted" and i == 0 and h["role"].lower() == "human"
        out.append((f"{sep}[{h['role']}]: {content}", bool(content.strip()) and not first_human))
    return out


def message_logprob_means(model, tokenizer, rendered, max_length):
    """Per message: the mean log-prob of its tokens (None for context), and its number of scored tokens."""
    ids = [] if tokenizer.bos_token_id is None else [tokenizer.bos_token_id]
    spans = []
    for text, _ in rendered:
        piece = tokenizer.encode(text, add_special_tokens=False)
        spans.append((len(ids), len(ids) + len(piece)))
        ids += piece
    cut = max(0, len(ids) - max_length)
    ids = ids[cut:]
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].to(torch.float64)
    logprobs = torch.log_softmax(logits, dim=-1)
    # token t (t >= 1) is predicted at position t - 1
    token_lp = logprobs[:-1].gather(1, torch.tensor(ids[1:]).unsqueeze(1)).squeeze(1)
    out = []
    for (start, end), (_, is_action) in zip(spans, rendered):
        if not is_action:
            out.append((None, 0))
            continue
        lo, hi = max(start - cut, 1), max(end - cut, 1)  # token positions kept and predicted
        values = token_lp[lo - 1:hi - 1]
        out.append((float(values.mean()) if values.numel() else 0.0, values.numel()))
    return out


def paper_steps(policy, reference, rendered, max_length=16384):
    """Per action, in order: (beta * (policy mean - reference mean), policy token count)."""
    pol = message_logprob_means(policy[0], policy[1], rendered, max_length)
    ref = message_logprob_means(reference[0], reference[1], rendered, max_length)
    return [(BETA * (p - r), n) for (p, n), (r, _), (_, act) in zip(pol, ref, rendered) if act]


# ----------------------------------------------------------------------------------------------------- fixtures

TOOL_ARGS = {"origin": "Paris", "destination": "Rome", "date": "2026-11-30", "passengers": 2, "flexible": True,
             "cabin": None, "budget": 95.5, "names": ["Ann", "Bob"], "prefs": {"seat": "window", "meal": "veg"}}

TAU2_SIMULATIONS = [
    {"id": "t1", "task_id": "task-1", "reward_info": {"reward": 1.0}, "messages": [
        {"role": "assistant", "content": "Hi! How can I help you today?", "turn_idx": 0},
        {"role": "user", "content": "Find the cheapest flight from Paris to Rome on Monday for two people."},
        {"role": "assistant", "content": "I will search for flights first.",
         "tool_calls": [{"id": "c1", "name": "search_flights", "arguments": TOOL_ARGS, "requestor": "assistant"}]},
        {"role": "tool", "content": "three flights found, prices 120, 95 and 143 euros.", "id": "c1"},
        {"role": "assistant", "content": None,
         "tool_calls": [{"id": "c2", "name": "book", "arguments": {"flight_id": "AF95", "seats": 2}},
                        {"id": "c3", "name": "get_order", "arguments": {"order_id": "W123"}}]},
        {"role": "tool", "content": "booked", "id": "c2"},
        {"role": "tool", "content": "shipped", "id": "c3"},
        {"role": "assistant", "content": "  The cheapest flight costs 95 euros. I book it now.\n\n"},
    ]},
    {"id": "t2", "task_id": "task-1", "reward_info": {"reward": 0.0}, "messages": [
        {"role": "user", "content": "Cancel my order W123, the payment failed."},
        {"role": "assistant", "content": ""},
        {"role": "user", "content": ""},
        {"role": "assistant", "content": "   "},
        {"role": "assistant", "content": "\nOk.", "tool_calls": [{"name": "cancel", "arguments": {}}]},
        {"role": "tool", "content": "error"},
        {"role": "assistant", "content": "The order was cancelled. Please check the card number and try again."},
    ]},
]

JSONL_MULTI_AGENT = {"id": "m1", "reward": 1.0, "messages": [
    {"role": "user", "content": "Find martial arts schools near the stock exchange."},
    {"role": "assistant", "name": "Orchestrator", "content": "WebSurfer, please search the web."},
    {"role": "assistant", "name": "WebSurfer", "content": "I typed the query and clicked the first result.",
     "tool_calls": [{"name": "click", "arguments": {"index": 1, "double": False}}]},
    {"role": "assistant", "name": "Orchestrator", "content": "The answer is 42."},
]}

HAND_CRAFTED = {"question": "Where can I take martial arts classes?", "mistake_step": "2", "mistake_agent": "WebSurfer",
                "ground_truth": "x", "history": [
    {"role": "human", "content": "Where can I take martial arts classes near the stock exchange?"},
    {"role": "Orchestrator (thought)", "content": "Initial plan: search the web.  \n"},
    {"role": "Orchestrator (-> WebSurfer)", "content": "Please search for martial arts schools."},
    {"role": "WebSurfer", "content": "  "},
    {"role": "WebSurfer", "content": "I typed the query into the search bar and clicked the first result."},
    {"role": "Orchestrator (thought)", "content": "The page shows a map. Done."},
]}

ALGORITHM_GENERATED = {"question": "What is the sum of the even addresses?", "mistake_step": "1",
                       "mistake_agent": "Excel_Expert", "ground_truth": "42", "history": [
    {"role": "assistant", "name": "Excel_Expert", "content": "You are given: (1) a task. Step 1: read the spreadsheet."},
    {"role": "user", "name": "Computer_terminal", "content": "exitcode: 0 (execution succeeded)\nCode output: 42\n"},
    {"role": "assistant", "name": "Verification_Expert", "content": ""},
    {"role": "user", "name": "Computer_terminal", "content": "No code blocks found."},
    {"role": "assistant", "name": "Verification_Expert", "content": "The final answer is correct. TERMINATE"},
]}


@pytest.fixture(scope="module")
def models(tiny_dir, tmp_path_factory):
    """Float32 paths for the scorer and float64 (model, tokenizer) pairs for the re-statement."""
    other = tmp_path_factory.mktemp("other_tok")
    tok_b = build_tokenizer(vocab_size=400)
    build_model(tok_b, other / "reference", seed=5)

    def load(path):
        return (AutoModelForCausalLM.from_pretrained(path, dtype=torch.float64).eval(),
                AutoTokenizer.from_pretrained(path))

    return {"policy": load(tiny_dir / "policy"), "reference": load(tiny_dir / "reference"),
            "other_reference": load(other / "reference"), "other_dir": other / "reference"}


def _scorer(tiny_dir, reference, **kw):
    return ProgressAdvantageScorer.from_models(tiny_dir / "policy", reference, compat="authors", beta=BETA, **kw)


def _check(result, expected):
    got = [s.advantage for s in result.steps]
    want = [v for v, _ in expected]
    assert [s.n_tokens for s in result.steps] == [n for _, n in expected]
    assert max(abs(a - b) for a, b in zip(got, want)) < TOL, (got, want)
    assert got == pytest.approx(want, abs=TOL)
    assert result.score == pytest.approx(sum(want) / len(want), abs=TOL)  # step_agg mean over every action


@pytest.fixture(scope="module")
def tau2_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("tau2") / "airline.json"
    path.write_text(json.dumps({"info": {}, "simulations": TAU2_SIMULATIONS}))
    return path


@pytest.fixture(scope="module")
def whowhen_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("ww")
    for split, log in (("Hand-Crafted", HAND_CRAFTED), ("Algorithm-Generated", ALGORITHM_GENERATED)):
        (root / split).mkdir()
        (root / split / "1.json").write_text(json.dumps(log))
    return root


# -------------------------------------------------------------------------------------------------------- tests


def test_tau2_tool_calls_empty_actions_and_text_steps(tiny_dir, models, tau2_file):
    trajs = load_trajectories(tau2_file, format="tau2")
    results = _scorer(tiny_dir, tiny_dir / "reference").score(trajs)
    for sim, result in zip(TAU2_SIMULATIONS, results):
        _check(result, paper_steps(models["policy"], models["reference"], tau2_texts(sim["messages"])))


def test_reference_with_its_own_tokenizer(tiny_dir, models, tau2_file):
    """The paper code tokenizes each model's input with that model's tokenizer."""
    trajs = load_trajectories(tau2_file, format="tau2")
    scorer = _scorer(tiny_dir, models["other_dir"])
    assert scorer.reference_tokenizer is not None
    for sim, result in zip(TAU2_SIMULATIONS, scorer.score(trajs)):
        _check(result, paper_steps(models["policy"], models["other_reference"], tau2_texts(sim["messages"])))


def test_multi_agent_names_render_the_role(tiny_dir, models):
    """Outside Who&When the paper code renders ``[role]``: an agent's name does not appear."""
    (traj,) = load_trajectories([JSONL_MULTI_AGENT], format="dataset")
    (result,) = _scorer(tiny_dir, tiny_dir / "reference").score([traj])
    _check(result, paper_steps(models["policy"], models["reference"], tau2_texts(JSONL_MULTI_AGENT["messages"])))


@pytest.mark.parametrize("split, log", [("Hand-Crafted", HAND_CRAFTED), ("Algorithm-Generated", ALGORITHM_GENERATED)])
def test_whowhen_logs(tiny_dir, models, whowhen_dir, split, log):
    (traj,) = load_trajectories(whowhen_dir / split, format="whowhen")
    (result,) = _scorer(tiny_dir, tiny_dir / "reference").score([traj])
    rendered = whowhen_texts(log["history"], split)
    _check(result, paper_steps(models["policy"], models["reference"], rendered))
    offset = traj.metadata["history_offset"]
    assert [s.message_index - offset for s in result.steps] == [i for i, (_, a) in enumerate(rendered) if a]


def test_left_truncation(tiny_dir, models, tau2_file):
    """Both cut the token sequence from the left (BOS included) and score what is left of each span."""
    traj = load_trajectories(tau2_file, format="tau2")[0]
    (result,) = _scorer(tiny_dir, tiny_dir / "reference", max_length=60).score([traj])
    expected = paper_steps(models["policy"], models["reference"], tau2_texts(TAU2_SIMULATIONS[0]["messages"]), 60)
    assert result.truncated is not None and expected[0][1] == 0
    _check(result, expected)


@pytest.mark.skipif(not (SHARED_DATA / "who_and_when").is_dir(), reason="Who&When data not available")
@pytest.mark.parametrize("tid", ["Hand-Crafted/1", "Algorithm-Generated/1"])
def test_released_whowhen_logs(tiny_dir, models, tid):
    split, stem = tid.split("/")
    path = SHARED_DATA / "who_and_when" / split / f"{stem}.json"
    (traj,) = load_trajectories(path, format="whowhen")
    (result,) = _scorer(tiny_dir, tiny_dir / "reference", max_length=1024).score([traj])
    log = json.loads(path.read_text(encoding="utf-8"))
    _check(result, paper_steps(models["policy"], models["reference"], whowhen_texts(log["history"], split), 1024))


def test_compat_given_as_an_override_takes_its_mean_default(tiny_dir):
    """``from_models(config=..., compat="authors")`` (the CLI's ``--compat authors``) aggregates by mean, not sum."""
    from progadv_trl import ProgressAdvantageConfig

    def token_agg(**kw):
        return ProgressAdvantageScorer.from_models(tiny_dir / "policy", tiny_dir / "reference", **kw).config.token_agg

    assert token_agg(compat="authors") == "mean"
    assert token_agg(config=ProgressAdvantageConfig(), compat="authors") == "mean"
    assert token_agg(config=ProgressAdvantageConfig(), compat="authors", token_agg="min") == "min"
    assert token_agg(config=ProgressAdvantageConfig(token_agg="last"), compat="authors") == "last"
