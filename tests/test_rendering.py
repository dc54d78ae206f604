"""Tokens and steps: every token is context or in exactly one step, and a step's tokens decode to its text."""

import pytest

from progadv_trl.data import Message, ToolCall, Trajectory
from progadv_trl.rendering import TrajectoryTokenizer, generation_header, same_tokenization
from progadv_trl.tiny import build_tokenizer

from conftest import sample_trajectories


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


def _step_ids(out, s):
    return [i for i, k in zip(out.input_ids, out.step_index) if k == s]


@pytest.mark.parametrize("rendering", ["chat_template", "plain"])
@pytest.mark.parametrize("separator", [None, "\n\n"])
def test_step_tokens_decode_to_step_text(tok, rendering, separator):
    for traj in sample_trajectories():
        out = TrajectoryTokenizer(tok, rendering, separator)(traj)
        assert len(out.input_ids) == len(out.step_index)
        assert sorted({m for m, _ in out.steps}) == list(traj.steps)
        for s, text in enumerate(out.step_texts):
            assert tok.decode(_step_ids(out, s)) == text
        # each action's content lies inside its step(s), in order
        for m in traj.steps:
            joined = "".join(t for (mi, _), t in zip(out.steps, out.step_texts) if mi == m)
            assert traj.messages[m].content in joined
        # steps are contiguous and ordered
        seen = [k for k in out.step_index if k >= 0]
        assert seen == sorted(seen)


def test_chat_template_span_is_what_the_policy_generates(tok):
    traj = sample_trajectories()[0]
    out = TrajectoryTokenizer(tok)(traj)
    first, last = out.step_texts
    assert first.startswith("I will search for flights first.")
    assert '<tool_call>\n{"name": "search"' in first and first.endswith("<|im_end|>")
    assert "<|im_start|>" not in first  # the header was written by the template, not sampled
    assert last.endswith("The cheapest flight costs 95 euros. I book it now.<|im_end|>")
    # context: the full token sequence is exactly the chat template's rendering
    assert tok.decode(out.input_ids) == tok.apply_chat_template([m.to_chat() for m in traj.messages], tokenize=False)
    assert generation_header(tok) == "<|im_start|>assistant\n"


def test_plain_rendering_is_the_authors_convention(tok):
    traj = sample_trajectories()[1]
    out = TrajectoryTokenizer(tok, "plain")(traj)
    assert tok.decode(out.input_ids) == (
        "<|endoftext|>[user]: Book the cheapest flight.\n[assistant]: I book the first flight.\n"
        "[tool]: booked, 120 euros\n[assistant]: Done.")
    assert out.input_ids[0] == tok.bos_token_id
    # a step is all of its message's text: separator, tag and body; each message is tokenized on its own
    assert out.step_texts == ["\n[assistant]: I book the first flight.", "\n[assistant]: Done."]
    pieces = ["[user]: Book the cheapest flight.", "\n[assistant]: I book the first flight.",
              "\n[tool]: booked, 120 euros", "\n[assistant]: Done."]
    assert out.input_ids == [tok.bos_token_id] + [i for p in pieces for i in tok.encode(p, add_special_tokens=False)]


def test_plain_tool_calls_and_empty_actions(tok):
    call = ToolCall("search", {"query": "flights", "n": 2, "ok": True, "x": None})
    traj = Trajectory([Message("user", "q"), Message("assistant", "  I search.\n", (call,)),
                       Message("assistant", "", (call, ToolCall("book", '{"id": 1}'))),
                       Message("assistant", " \n"), Message("tool", "  raw  ", (call,))])
    out = TrajectoryTokenizer(tok, "plain")(traj)
    assert out.step_texts == [
        "\n[assistant]: I search.\n\ntool_call(search, {'query': 'flights', 'n': 2, 'ok': True, 'x': None})",
        "\n[assistant]: tool_call(search, {'query': 'flights', 'n': 2, 'ok': True, 'x': None})\n"
        "tool_call(book, {\"id\": 1})",
        "\n[assistant]: [assistant action]"]
    assert tok.decode(out.input_ids).endswith("\n[tool]:   raw  ")  # context: content as is, tool calls not shown


def test_separator_splits_content_into_parts(tok):
    traj = sample_trajectories()[3]
    out = TrajectoryTokenizer(tok, "plain", "\n\n")(traj)
    assert out.steps == [(1, 0), (1, 1)]
    assert out.step_texts == ["\n[assistant]: Step 1: add.\n\n", "The answer is 5."]


def test_left_truncation_is_recorded(tok):
    traj = sample_trajectories()[0]
    full = TrajectoryTokenizer(tok)(traj)
    cut = TrajectoryTokenizer(tok, max_length=len(full.input_ids) - 5)(traj)
    assert cut.input_ids == full.input_ids[5:] and cut.tokens_cut == 5
    assert full.truncation() is None
    short = TrajectoryTokenizer(tok, max_length=8)(traj)
    info = short.truncation()
    assert info["tokens_cut"] == len(full.input_ids) - 8
    assert info["steps_cut"][0]["message_index"] == 2 and info["steps_cut"][0]["tokens_kept"] == 0


def test_tokenizer_without_chat_template(tok):
    bare = build_tokenizer(chat_template=None)
    with pytest.raises(ValueError, match="no chat template"):
        TrajectoryTokenizer(bare)
    TrajectoryTokenizer(bare, "plain")  # plain needs none


def test_who_and_when_style_agents(tok):
    # outside Who&When, plain renders the role (as the paper code's tau2 rendering): names do not appear
    traj = Trajectory([Message("user", "q"), Message("assistant", "plan", name="Orchestrator (thought)"),
                       Message("assistant", ""), Message("assistant", "page text", name="WebSurfer")],
                      action_indices=(1, 3))
    out = TrajectoryTokenizer(tok, "plain")(traj)
    assert out.step_texts == ["\n[assistant]: plan", "\n[assistant]: page text"]
    out = TrajectoryTokenizer(tok)(traj)
    assert [m for m, _ in out.steps] == [1, 3]
    # a Who&When log (as the loader builds it): the history only, each entry's original role, content unstripped
    meta = {"subset": "Algorithm-Generated", "history_offset": 1, "history_roles": ["assistant", "user", "user"]}
    traj = Trajectory([Message("user", "the question"), Message("assistant", "plan ", name="Expert"),
                       Message("assistant", " ", name="Computer_terminal"),
                       Message("assistant", "ok", name="Computer_terminal")], metadata=meta, action_indices=(1, 3))
    out = TrajectoryTokenizer(tok, "plain")(traj)
    assert tok.decode(out.input_ids) == "<|endoftext|>[assistant]: plan \n[user]:  \n[user]: ok"
    assert out.step_texts == ["[assistant]: plan ", "\n[user]: ok"]


def test_same_tokenization(tok):
    assert same_tokenization(tok, tok)
    other = build_tokenizer(vocab_size=400)
    assert not same_tokenization(tok, other)
