"""Trajectory -> tokens, with every token either context (-1) or in exactly one step.

Two renderings:

* ``"chat_template"``: the model's own chat template renders the whole conversation once. A step's span starts after
  the assistant header the template writes (``<|im_start|>assistant\\n`` for Qwen; the policy never sampled it) and
  ends after the end-of-turn token (``<|im_end|>``; the policy did sample it), so it holds everything the policy
  generated for that turn: reasoning block, content, rendered tool calls.
* ``"plain"``: the paper authors' convention, exactly (``compat="authors"`` uses it): each message becomes one text,
  ``"\\n"`` (except the first) + ``[role]: `` + body, and is tokenized on its own (no special tokens); the ids are
  concatenated after BOS (when the tokenizer has one). An assistant message's body is its content, then one
  ``tool_call(name, arguments)`` line per tool call (the arguments as Python's ``str()`` prints them: a dict with
  single quotes), the whole stripped, or ``[assistant action]`` when nothing is left; other messages' bodies are their
  content as is. Who&When logs from :func:`~progadv_trl.formats.load_trajectories` render their ``history`` only (not
  the prepended question), with each entry's original role string as the tag and the content unstripped. A step's span
  is every token of its message's text, separator and tag included.

Either way each step's text is tokenized on its own (the chat template's text is cut into segments at span boundaries),
so a step's tokens decode exactly to its text, whatever the tokenizer merges across boundaries. A ``step_separator``
cuts a step's text into parts, each tokenized on its own (in ``"plain"`` the first part holds the separator and the
tag). Long sequences are cut from the left (BOS included) and the cut is recorded.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .data import Message, Trajectory


@dataclass
class TokenizedTrajectory:
    """One trajectory as one model's tokens.

    Attributes:
        input_ids: ``[L]`` token ids.
        step_index: ``[L]`` the step ordinal each token belongs to, ``-1`` for context.
        steps: per step ordinal, ``(message_index, part)``; ``part`` > 0 only with a step separator.

    Positions are named as in ``docs/formats.md`` ("Words for positions"): a *message index* points into
    ``Trajectory.messages``, a *step* is a ``(message_index, part)`` pair, a *step ordinal* its position in ``steps``.
        tokens_cut: tokens removed from the left by truncation.
        max_tokens: the length limit that applied (``max_length``, or the model's context when shorter).
        step_texts: the rendered text of each step (before truncation).
    """

    input_ids: list[int]
    step_index: list[int]
    steps: list[tuple[int, int]]
    tokens_cut: int = 0
    step_texts: list[str] = field(default_factory=list)
    full_step_lengths: list[int] = field(default_factory=list)
    max_tokens: int | None = None

    @property
    def step_token_counts(self) -> list[int]:
        counts = [0] * len(self.steps)
        for s in self.step_index:
            if s >= 0:
                counts[s] += 1
        return counts

    def truncation(self) -> dict | None:
        """What truncation removed, or ``None``: tokens cut and the steps that lost all or some of their tokens."""
        if not self.tokens_cut:
            return None
        kept = self.step_token_counts
        lost = [{"message_index": m, "part": p, "tokens_kept": k, "tokens": n}
                for (m, p), k, n in zip(self.steps, kept, self.full_step_lengths) if k < n]
        return {"tokens_cut": self.tokens_cut, "max_tokens": self.max_tokens, "steps_cut": lost}


def _split_parts(start: int, end: int, content_start: int, content: str, separator: str | None) -> list[int]:
    """Cut points of a step span [start, end): after each separator inside the content."""
    cuts = [start]
    if separator:
        pos = 0
        while True:
            found = content.find(separator, pos)
            if found < 0:
                break
            pos = found + len(separator)
            if pos < len(content):  # a trailing separator does not open an empty step
                cuts.append(content_start + pos)
    return cuts + [end]


ACTION_PLACEHOLDER = "[assistant action]"
_WHOWHEN_SUBSETS = ("Hand-Crafted", "Algorithm-Generated")


def _tool_call_line(call) -> str:
    return f"tool_call({call.name}, {call.arguments})"  # str(): a dict prints with single quotes


def _whowhen_roles(traj: Trajectory) -> tuple[int, list[str]] | None:
    """``(history_offset, original role per history entry)`` of a Who&When log read by the loader, else ``None``."""
    meta = traj.metadata
    offset = meta.get("history_offset")
    if meta.get("subset") not in _WHOWHEN_SUBSETS or not isinstance(offset, int) or offset < 0:
        return None
    roles = meta.get("history_roles")
    if not (isinstance(roles, list) and len(roles) == len(traj.messages) - offset):  # older exports: names
        roles = [m.name or m.role for m in traj.messages[offset:]]
    return offset, roles


def plain_texts(traj: Trajectory) -> list[tuple[int, str, int]]:
    """The ``"plain"`` rendering: ``(message_index, text, body_start)`` per rendered message, in order."""
    steps = set(traj.steps)
    whowhen = _whowhen_roles(traj)
    out: list[tuple[int, str, int]] = []
    for i, m in enumerate(traj.messages):
        if whowhen is not None:
            offset, roles = whowhen
            if i < offset and i not in steps:  # the question the loader prepends: not in the log's history
                continue
            tag, body = (roles[i - offset] if i >= offset else m.role), m.content
        elif m.role == "assistant":
            calls = "\n".join(_tool_call_line(c) for c in m.tool_calls)
            tag, body = m.role, (m.content + ("\n" + calls if calls else "")).strip() or ACTION_PLACEHOLDER
        else:
            tag, body = m.role, m.content
        head = f"{chr(10) if out else ''}[{tag}]: "
        out.append((i, head + body, len(head)))
    return out


def _plain_segments(traj: Trajectory, separator: str | None) -> list[tuple[str, int, int]]:
    """Segments ``(text, message_index, part)`` with message_index -1 for context (BOS is added by the caller)."""
    steps = set(traj.steps)
    segs: list[tuple[str, int, int]] = []
    for i, text, body_start in plain_texts(traj):
        if i not in steps:
            segs.append((text, -1, 0))
            continue
        cuts = _split_parts(0, len(text), body_start, text[body_start:], separator)
        segs.extend((text[a:b], i, p) for p, (a, b) in enumerate(zip(cuts, cuts[1:])))
    return segs


def generation_header(tokenizer) -> str:
    """The text a chat template writes before an assistant turn (its generation prompt), e.g. ``<|im_start|>assistant\\n``."""
    probe = [{"role": "user", "content": "x"}]
    without = tokenizer.apply_chat_template(probe, tokenize=False)
    with_prompt = tokenizer.apply_chat_template(probe, tokenize=False, add_generation_prompt=True)
    return with_prompt[len(without):] if with_prompt.startswith(without) else ""


def _chat_segments(traj: Trajectory, tokenizer, separator: str | None, header: str) -> list[tuple[str, int, int]]:
    chat = [m.to_chat() for m in traj.messages]
    tools = traj.metadata.get("tools") if isinstance(traj.metadata.get("tools"), list) else None
    try:
        full = tokenizer.apply_chat_template(chat, tools=tools, tokenize=False)
    except Exception as e:  # Jinja errors: name the record, not the template internals
        raise traj.error(f"the chat template failed to render this trajectory: {type(e).__name__}: {e}",
                         field="messages") from None
    eos = tokenizer.eos_token or ""
    steps = set(traj.steps)
    segs: list[tuple[str, int, int]] = []
    cursor = prev_end = 0
    for i, m in enumerate(traj.messages):
        if i not in steps:
            found = full.find(m.content, cursor) if m.content else -1
            if found >= 0:
                cursor = found + len(m.content)
            continue
        hpos = full.find(header, cursor) if header else -1
        start = hpos + len(header) if hpos >= 0 else cursor
        c = full.find(m.content, start)
        if c < 0:
            raise traj.error(
                "the chat template does not render this action's content verbatim; score it with rendering='plain'",
                field=f"messages[{i}].content")
        if hpos < 0:
            start = c
        content_end = c + len(m.content)
        next_header = full.find(header, content_end) if header else -1
        end = full.find(eos, content_end) if eos else -1
        if end >= 0 and (next_header < 0 or end < next_header):
            end += len(eos)
        else:
            end = content_end
        if start > prev_end:
            segs.append((full[prev_end:start], -1, 0))
        cuts = _split_parts(start, end, c, m.content, separator)
        segs.extend((full[a:b], i, p) for p, (a, b) in enumerate(zip(cuts, cuts[1:])))
        cursor = prev_end = end
    if prev_end < len(full):
        segs.append((full[prev_end:], -1, 0))
    return segs


class TrajectoryTokenizer:
    """Renders and tokenizes trajectories for one tokenizer.

    Args:
        tokenizer: a Hugging Face tokenizer.
        rendering: ``"chat_template"`` or ``"plain"``.
        step_separator: split actions into several steps at this separator.
        max_length: keep at most this many tokens (the rightmost ones).
    """

    def __init__(self, tokenizer, rendering: str = "chat_template", step_separator: str | None = None,
                 max_length: int = 16384):
        if rendering == "chat_template" and not getattr(tokenizer, "chat_template", None):
            raise ValueError(f"tokenizer {getattr(tokenizer, 'name_or_path', '') or type(tokenizer).__name__!r} has "
                             "no chat template: set tokenizer.chat_template or use rendering='plain'")
        self.tokenizer = tokenizer
        self.rendering = rendering
        self.step_separator = step_separator
        self.max_length = max_length
        self._header = generation_header(tokenizer) if rendering == "chat_template" else ""

    def segments(self, traj: Trajectory) -> list[tuple[str, int, int]]:
        if self.rendering == "plain":
            return _plain_segments(traj, self.step_separator)
        return _chat_segments(traj, self.tokenizer, self.step_separator, self._header)

    def __call__(self, traj: Trajectory) -> TokenizedTrajectory:
        bos = self.tokenizer.bos_token_id if self.rendering == "plain" else None
        ids: list[int] = [] if bos is None else [bos]
        step_index: list[int] = [-1] * len(ids)
        steps: list[tuple[int, int]] = []
        texts: list[str] = []
        lengths: list[int] = []
        for text, message_index, part in self.segments(traj):
            if not text:
                continue
            seg_ids = self.tokenizer(text, add_special_tokens=False)["input_ids"]
            if message_index >= 0:
                steps.append((message_index, part))
                texts.append(text)
                lengths.append(len(seg_ids))
            ids.extend(seg_ids)
            step_index.extend([len(steps) - 1 if message_index >= 0 else -1] * len(seg_ids))
        cut = max(0, len(ids) - self.max_length)
        return TokenizedTrajectory(ids[cut:], step_index[cut:], steps, cut, texts, lengths, self.max_length)


def same_tokenization(a, b) -> bool:
    """Whether two tokenizers turn text into the same ids (same class, vocabulary, specials and chat template)."""
    if a is b:
        return True
    return (type(a) is type(b) and a.get_vocab() == b.get_vocab() and a.bos_token == b.bos_token
            and a.eos_token == b.eos_token and getattr(a, "chat_template", None) == getattr(b, "chat_template", None))
