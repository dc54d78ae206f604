"""``progadv view``: one self-contained HTML page to look at scored trajectories (no server, nothing fetched).

:func:`parse_scores` reads the lines ``progadv score`` writes, :func:`match_scores` pairs them with the input
trajectories by ``id``, and :func:`render_view` turns the pairs into the page (data in, HTML string out).

The page holds a table of every trajectory (sortable by score, reward and each baseline; filterable by group and
outcome) and, for the row clicked, its messages: each action message is coloured by its value on a diverging scale
centred at 0, and the labelled mistake (``mistake_step`` of the input) and the predicted one (the configured
attribution rule, :func:`progadv_trl.selection.predict_mistake`) are marked. A message's value is the sum of its steps'
advantages (one step per message unless a step separator was used). With ``--details`` scores a per-token heat map
of ``beta * (log pi - log pi_ref)`` is drawn (lazily, by the page's script) from the embedded token data.

Every text of the trajectories is untrusted: it is HTML-escaped in the markup and inserted with ``textContent`` by
the script; the embedded JSON has ``<``, ``>`` and ``&`` written as ``\\u`` escapes, so it cannot close its element.
"""

from __future__ import annotations

import html
import json
import math
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .data import ProgadvDataError, Trajectory
from .selection import ATTRIBUTION_METHODS, predict_mistake

METHOD = "progress_advantage"
#: Colour of a value of -1 and +1 on the diverging scale (0 is white).
NEGATIVE, POSITIVE, ZERO = (214, 96, 77), (67, 147, 195), (255, 255, 255)
#: The per-token heat map uses 2 * HEAT_LEVELS + 1 colours.
HEAT_LEVELS = 10


# ---------------------------------------------------------------------------------------------------- reading
@dataclass
class ScoreLine:
    """One line of a ``progadv score`` output: its fields as written, and where it was read."""

    id: str
    line: int
    data: dict[str, Any]

    @property
    def where(self) -> str:
        return f"{self.id!r} (line {self.line})"


def _number(x: Any) -> bool:
    return x is None or (isinstance(x, (int, float)) and not isinstance(x, bool))


def parse_scores(lines: Iterable[str], source: str = "<scores>") -> list[ScoreLine]:
    """The records of a ``progadv score`` output (blank lines skipped), checked field by field.

    Raises:
        ProgadvDataError: a line that is not a score record, or an id used twice, naming the line and the field.
    """
    out: list[ScoreLine] = []
    seen: dict[str, int] = {}
    for n, text in enumerate(lines, 1):
        if not text.strip():
            continue

        def fail(msg: str, field: str | None = None, rec: Any = f"line {n}") -> None:
            raise ProgadvDataError(msg, source=source, record=rec, field=field)

        try:
            obj = json.loads(text)
        except ValueError as e:
            fail(f"not valid JSON ({e})")
        if not isinstance(obj, dict):
            fail("a score record is a JSON object; is this the output of `progadv score`?")
        rid = obj.get("id")
        if isinstance(rid, bool) or not isinstance(rid, (str, int)):
            fail("missing or not a string", "id")
        rec = f"{str(rid)!r} (line {n})"
        if str(rid) in seen:
            fail(f"duplicate id (first on line {seen[str(rid)]})", "id", rec)
        seen[str(rid)] = n
        if "score" not in obj or not _number(obj["score"]):
            fail("missing or not a number", "score", rec)
        steps = obj.get("steps")
        if not isinstance(steps, list) or not steps:
            fail("missing or not a non-empty list", "steps", rec)
        for j, s in enumerate(steps):
            if not isinstance(s, dict):
                fail("not an object", f"steps[{j}]", rec)
            m = s.get("message_index")
            if isinstance(m, bool) or not isinstance(m, int):
                fail("missing or not an integer", f"steps[{j}].message_index", rec)
            if "advantage" not in s or not _number(s["advantage"]):
                fail("missing or not a number", f"steps[{j}].advantage", rec)
        baselines = obj.get("baselines", {})
        if not isinstance(baselines, dict) or not all(_number(v) for v in baselines.values()):
            fail("not an object of baseline name -> number", "baselines", rec)
        if not _number(obj.get("beta")):
            fail("not a number", "beta", rec)
        if obj.get("tokens") is not None:
            _check_tokens(obj["tokens"], lambda msg, f: fail(msg, f"tokens.{f}" if f else "tokens", rec))
        out.append(ScoreLine(str(rid), n, obj))
    return out


def read_scores(path: str) -> tuple[list[ScoreLine], dict[str, Any] | None]:
    """The score lines of a ``progadv score`` output and the scoring config of its settings record
    (``<path>.progadv.json``; ``None`` when there is none, e.g. scores written from Python)."""
    from .outputs import SIDECAR_SUFFIX

    try:
        with open(path, encoding="utf-8") as f:
            lines = parse_scores(f, source=path)
    except UnicodeDecodeError as e:
        raise ProgadvDataError(f"not UTF-8 text ({e.reason} at byte {e.start})", source=path) from None
    if not lines:
        raise ProgadvDataError("no score records (is this the output of `progadv score`?)", source=path)
    sidecar = path + SIDECAR_SUFFIX
    try:
        with open(sidecar, encoding="utf-8") as f:
            record = json.load(f)
    except FileNotFoundError:
        return lines, None
    except (OSError, ValueError) as e:
        raise ProgadvDataError(f"the settings record is unreadable ({e})", source=sidecar) from None
    settings = record.get("settings") if isinstance(record, dict) else None
    config = settings.get("config") if isinstance(settings, dict) else None
    if not isinstance(config, dict):
        raise ProgadvDataError("not a settings record of `progadv score` (no settings.config object)",
                               source=sidecar, field="settings.config")
    return lines, config


def _check_tokens(tokens: Any, fail: Callable[[str, str], None]) -> None:
    if not isinstance(tokens, dict):
        fail("not an object", "")
    ids = tokens.get("input_ids")
    if not isinstance(ids, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
        fail("missing or not a list of integers", "input_ids")
    for key in ("step_index", "policy_logprob", "reference_logprob"):
        values = tokens.get(key)
        if key == "reference_logprob" and "reference_input_ids" in tokens:
            continue  # on the reference's own tokens
        if not isinstance(values, list) or len(values) != len(ids):
            fail(f"missing or not a list of {len(ids)} values (one per input_ids)", key)
        if key == "step_index" and not all(isinstance(i, int) and not isinstance(i, bool) for i in values):
            fail("not a list of integers", key)
        if key != "step_index" and not all(_number(v) for v in values):
            fail("not a list of numbers", key)


def match_scores(trajectories: Sequence[Trajectory], scores: Sequence[ScoreLine], *, scores_source: str = "<scores>",
                 input_source: str = "<input>") -> list[tuple[Trajectory, ScoreLine]]:
    """Pair every score line with its input trajectory by ``id`` (in the order of the scores).

    Raises:
        ProgadvDataError: a score without a trajectory, a trajectory without a score, a trajectory changed since it
            was scored (its ``input_sha256``), or a step on a message that is not one of the trajectory's actions.
    """
    from .outputs import record_sha256

    by_id = {str(t.id): t for t in trajectories}
    scored = {s.id for s in scores}
    for s in scores:
        if s.id not in by_id:
            raise ProgadvDataError(f"the score of id {s.id!r} has no trajectory in {input_source} (scores and input "
                                   f"are matched by id: was it scored from another input?)", source=scores_source,
                                   record=s.where, field="id")
    for t in trajectories:
        if str(t.id) not in scored:
            raise ProgadvDataError(f"trajectory {str(t.id)!r} has no score in {scores_source} (view the input it was "
                                   f"scored from, or score the missing trajectories)", source=input_source,
                                   record=t.source_record if t.source_record is not None else t.id, field="id")
    pairs = []
    for s in scores:
        t = by_id[s.id]
        digest = s.data.get("input_sha256")
        if isinstance(digest, str) and digest != record_sha256(t.to_dict()):
            raise ProgadvDataError(f"trajectory {s.id!r} of {input_source} changed since it was scored (its "
                                   f"input_sha256 differs); score it again", source=scores_source, record=s.where,
                                   field="input_sha256")
        actions = set(t.steps)
        for j, step in enumerate(s.data["steps"]):
            if step["message_index"] not in actions:
                raise ProgadvDataError(f"message {step['message_index']} is not an action of trajectory {s.id!r} "
                                       f"(actions: {sorted(actions)})", source=scores_source, record=s.where,
                                       field=f"steps[{j}].message_index")
        pairs.append((t, s))
    return pairs


# ---------------------------------------------------------------------------------------------------- values
def message_values(steps: Sequence[Mapping[str, Any]]) -> tuple[list[int], list[float]]:
    """Action message indices (sorted) and each one's value: the sum of its steps' advantages (``nan`` when none of
    its steps has a value)."""
    total: dict[int, float] = {}
    for s in steps:
        m, a = s["message_index"], s["advantage"]
        prev = total.get(m, math.nan)
        total[m] = prev if a is None else (a if math.isnan(prev) else prev + a)
    actions = sorted(total)
    return actions, [total[m] for m in actions]


def colour(t: float) -> str:
    """CSS colour of ``t`` in [-1, 1] on the diverging scale (``nan``: light grey)."""
    if math.isnan(t):
        return "#eeeeee"
    t = max(-1.0, min(1.0, t))
    end = NEGATIVE if t < 0 else POSITIVE
    r, g, b = (round(z + abs(t) * (e - z)) for z, e in zip(ZERO, end))
    return f"#{r:02x}{g:02x}{b:02x}"


def _scale(values: Iterable[float | None]) -> float:
    """The largest |value| (1.0 when there is none or it is 0): the end of a colour scale."""
    m = max((abs(v) for v in values if v is not None and math.isfinite(v)), default=0.0)
    return m if m > 0 else 1.0


def _fmt(v: Any, sign: bool = False) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "—"
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return str(v)
    return f"{v:+.4g}" if sign else f"{v:.4g}"


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def _round(v: float | None, digits: int = 4) -> float | None:
    return None if v is None or not math.isfinite(v) else round(v, digits)


@dataclass
class _View:
    """What the page shows of one trajectory."""

    index: int
    traj: Trajectory
    score: ScoreLine
    actions: list[int]
    values: list[float]
    predicted: int
    outcome: str


# ---------------------------------------------------------------------------------------------------- the page
def _e(x: Any) -> str:
    return html.escape(str(x), quote=True)


def _script_json(obj: Any) -> str:
    """JSON safe inside a ``<script>`` element: no ``<``, ``>`` or ``&`` characters (values are finite already)."""
    text = json.dumps(obj, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def _legend(scale: float, label: str) -> str:
    swatches = "".join(f'<span style="background:{colour(k / HEAT_LEVELS)}"></span>'
                       for k in range(-HEAT_LEVELS, HEAT_LEVELS + 1))
    ticks = "".join(f"<span>{_fmt(scale * f, sign=f != 0)}</span>" for f in (-1, -0.5, 0, 0.5, 1))
    return (f'<div class="legend"><span class="legend-label">{_e(label)}</span><span class="scale">'
            f'<span class="bar">{swatches}</span><span class="ticks">{ticks}</span></span></div>')


def _ranks(views: Sequence[_View], method: str) -> dict[int, int]:
    """Rank (1 = highest) of each trajectory's ``method`` score within its group; groups of one are left out."""
    groups: dict[Any, list[_View]] = {}
    for v in views:
        if v.traj.group is not None:
            groups.setdefault(v.traj.group, []).append(v)
    out = {}
    for members in groups.values():
        if len(members) < 2:
            continue
        scored = sorted(((s, v.index) for v in members if (s := _method_score(v, method)) is not None), reverse=True)
        for k, (s, i) in enumerate(scored):  # ties share the best rank
            out[i] = out[scored[k - 1][1]] if k and scored[k - 1][0] == s else k + 1
    return out


def _method_score(v: _View, method: str) -> float | None:
    s = v.score.data["score"] if method == METHOD else v.score.data.get("baselines", {}).get(method)
    return None if s is None or not math.isfinite(s) else s


def _arguments(call) -> str:
    if isinstance(call.arguments, str):
        return call.arguments
    return json.dumps(call.arguments, ensure_ascii=False, indent=1)


def _message_html(i: int, m, view: _View, scale: float, attribution: str) -> str:
    classes = ["msg", f"role-{_e(m.role)}"]
    style, info, badges = "", "", []
    if i in view.actions:
        k = view.actions.index(i)
        value = view.values[k]
        running = sum(0.0 if math.isnan(x) else x for x in view.values[:k + 1])
        classes.append("action")
        style = f' style="background:{colour(value / scale if not math.isnan(value) else math.nan)}"'
        parts = [s for s in view.score.data["steps"] if s["message_index"] == i]
        info = (f'<span class="val" data-value="{_e(value)}">action {k} · advantage <b>{_fmt(value, True)}</b>'
                f' · running sum {_fmt(running, True)}</span>')
        if len(parts) > 1:
            info += "".join(f'<span class="part">part {_e(s.get("part", j))}: {_fmt(s["advantage"], True)}</span>'
                            for j, s in enumerate(parts))
    if i == view.traj.mistake_step:
        classes.append("mark-label")
        badges.append('<span class="badge label">✗ labelled mistake</span>')
    if i == view.predicted:
        classes.append("mark-pred")
        badges.append(f'<span class="badge pred">◆ predicted mistake ({_e(attribution)})</span>')
    who = _e(m.role) + (f' <span class="name">{_e(m.name)}</span>' if m.name else "")
    calls = "".join(f'<div class="call"><span class="call-name">→ {_e(c.name)}</span>'
                    f"<pre>{_e(_arguments(c))}</pre></div>" for c in m.tool_calls)
    return (f'<div class="{" ".join(classes)}" data-message="{i}"{style}><div class="head"><span class="role">{who}'
            f'</span><span class="idx">message {i}</span>{info}{"".join(badges)}</div>'
            f'<div class="content">{_e(m.content)}</div>{calls}</div>')


def _section_html(view: _View, group_sizes: Mapping[Any, int], methods: Sequence[str],
                  ranks: Mapping[str, Mapping[int, int]], scale: float, attribution: str) -> str:
    t, d = view.traj, view.score.data
    head = (f'<h2>Trajectory <span class="tid">{_e(view.score.id)}</span></h2><div class="facts">'
            f'<span class="outcome {view.outcome}">{view.outcome}</span>'
            f"<span>group <b>{_e(t.group) if t.group is not None else '—'}</b></span>"
            f"<span>reward <b>{_fmt(t.reward)}</b></span><span>beta {_fmt(d.get('beta'))}</span>"
            f"<span>{_count(len(view.actions), 'action message')}, {_count(len(d['steps']), 'step')}</span></div>")
    cells = "".join(f"<th>{_e(m)}</th>" for m in methods)
    vals = "".join(f"<td>{_fmt(_method_score(view, m))}</td>" for m in methods)
    rank = "".join(f"<td>{_e(ranks[m].get(view.index, '—'))}</td>" for m in methods)
    n_group = group_sizes.get(t.group, 1) if t.group is not None else 1
    scores = (f'<table class="side"><tr><th></th>{cells}</tr><tr><th>score</th>{vals}</tr>'
              + (f"<tr><th>rank in group (of {n_group})</th>{rank}</tr>" if n_group > 1 else "") + "</table>")
    label = t.mistake_step
    hit = "" if label is None else (' <b class="hit">✓ hit</b>' if label == view.predicted
                                    else ' <b class="miss">✗ miss</b>')
    attr = (f'<p class="attr">labelled mistake: <b>{"message " + str(label) if label is not None else "none"}</b>'
            f" · predicted ({_e(attribution)}): <b>message {view.predicted}</b>{hit}</p>")
    trunc = ""
    if d.get("truncated"):
        tr = d["truncated"]
        lost = ", ".join(f"message {_e(s.get('message_index'))} ({_e(s.get('tokens_kept'))}/{_e(s.get('tokens'))} "
                         f"tokens kept)" for s in tr.get("steps_cut", []) if isinstance(s, dict))
        trunc = (f'<p class="trunc">Truncated: {_e(tr.get("tokens_cut"))} tokens cut from the left (limit '
                 f'{_e(tr.get("max_tokens"))}){"; steps cut: " + lost if lost else ""}.</p>')
    messages = "".join(_message_html(i, m, view, scale, attribution) for i, m in enumerate(t.messages))
    tokens = ""
    if d.get("tokens") is not None:
        n = len(d["tokens"]["input_ids"])
        tokens = (f'<details class="tokens-box" open><summary>Per-token heat map ({n} tokens; '
                  f"beta·(log π − log π_ref) per scored token, context in grey)</summary>{_token_legend(d)}"
                  f'<div class="tokens" data-i="{view.index}"></div></details>')
    return (f'<section class="traj" id="t{view.index}" data-id="{_e(view.score.id)}" hidden>{head}{scores}{attr}'
            f'{trunc}<div class="messages">{messages}</div>{tokens}</section>')


def _token_values(d: Mapping[str, Any]) -> list[float | None] | None:
    """``beta * (log pi - log pi_ref)`` per scored token (``None`` for context), or ``None`` when the reference has
    its own tokens (no per-token pairing)."""
    tok = d["tokens"]
    if "reference_input_ids" in tok:
        return None
    beta = d.get("beta") if d.get("beta") is not None else 1.0
    return [None if s < 0 or a is None or b is None else beta * (a - b)
            for s, a, b in zip(tok["step_index"], tok["policy_logprob"], tok["reference_logprob"])]


def _token_legend(d: Mapping[str, Any]) -> str:
    values = _token_values(d)
    if values is None:
        return ('<p class="note">The reference tokenizes differently: the tokens show the policy\'s log-probs only '
                "(no per-token log-ratio).</p>")
    return _legend(_scale(values), "token value")


def _token_data(d: Mapping[str, Any]) -> dict[str, Any] | None:
    if d.get("tokens") is None:
        return None
    tok, values = d["tokens"], _token_values(d)
    return {"ids": tok["input_ids"], "step": tok["step_index"],
            "lp": [_round(v) for v in tok["policy_logprob"]],
            "lr": None if values is None else [_round(v) for v in tok["reference_logprob"]],
            "v": None if values is None else [_round(v, 5) for v in values],
            "scale": None if values is None else _scale(values)}


def render_view(pairs: Sequence[tuple[Trajectory, ScoreLine]], *, config: Mapping[str, Any] | None = None,
                token_text: Callable[[int], str] | None = None, title: str = "progadv view",
                sources: Mapping[str, str] | None = None) -> str:
    """The HTML page of ``pairs`` (from :func:`match_scores`).

    Args:
        pairs: (trajectory, its score line), in the order the table starts in.
        config: the scoring config the scores were made with (the ``<scores>.progadv.json`` settings record):
            ``attribution``, ``attribution_threshold`` and ``success_threshold`` are used (default: running_sum,
            None, 1.0).
        token_text: token id -> its text (the policy tokenizer's decoding); ``None``: tokens are shown as ids.
        title: the page title.
        sources: label -> file name, shown under the title (e.g. ``{"scores": ..., "input": ...}``).
    """
    config = dict(config or {})
    attribution = config.get("attribution") or "running_sum"
    if attribution not in ATTRIBUTION_METHODS:
        raise ProgadvDataError(f"unknown attribution method {attribution!r} (expected one of "
                               f"{', '.join(ATTRIBUTION_METHODS)})", field="attribution")
    threshold = config.get("attribution_threshold")
    success_threshold = config.get("success_threshold", 1.0)
    success_threshold = 1.0 if success_threshold is None else success_threshold

    views = []
    for i, (t, s) in enumerate(pairs):
        actions, values = message_values(s.data["steps"])
        pos = predict_mistake(values, method=attribution, threshold=threshold)
        ok = t.success(success_threshold)
        outcome = "unlabelled" if ok is None else "success" if ok else "failure"
        views.append(_View(i, t, s, actions, values, actions[pos], outcome))

    baselines: list[str] = []
    for v in views:
        baselines += [b for b in v.score.data.get("baselines", {}) if b not in baselines]
    methods = [METHOD, *baselines]
    ranks = {m: _ranks(views, m) for m in methods}
    scale = _scale(x for v in views for x in v.values)
    groups = sorted({v.traj.group for v in views if v.traj.group is not None}, key=str)
    has_unlabelled = any(v.outcome == "unlabelled" for v in views)

    rows = [{"i": v.index, "id": v.score.id, "group": v.traj.group, "outcome": v.outcome, "reward": v.traj.reward,
             "score": _method_score(v, METHOD), "baselines": {b: _method_score(v, b) for b in baselines},
             "steps": len(v.actions), "mistake": v.traj.mistake_step, "predicted": v.predicted,
             "hit": None if v.traj.mistake_step is None else v.traj.mistake_step == v.predicted} for v in views]
    texts = None
    if token_text is not None:
        used = sorted({i for v in views if v.score.data.get("tokens") for i in v.score.data["tokens"]["input_ids"]})
        texts = {str(i): token_text(i) for i in used}
    data = {"rows": rows, "groups": groups, "tokens": [_token_data(v.score.data) for v in views], "texts": texts,
            "levels": HEAT_LEVELS}

    heat_css = "".join(f".h{k + HEAT_LEVELS}{{background:{colour(k / HEAT_LEVELS)}}}"
                       for k in range(-HEAT_LEVELS, HEAT_LEVELS + 1))
    head_cells = ['<th data-key="i">#</th>', '<th data-key="id">id</th>', '<th data-key="group">group</th>',
                  '<th data-key="outcome">outcome</th>', '<th data-key="reward">reward</th>',
                  f'<th data-key="score" title="{METHOD}">score</th>', '<th data-key="steps">actions</th>',
                  '<th data-key="mistake">labelled</th>', '<th data-key="predicted">predicted</th>',
                  '<th data-key="hit">hit</th>', *(f'<th data-key="b:{_e(b)}">{_e(b)}</th>' for b in baselines)]
    group_options = "".join(f'<option value="{k}">{_e(g)}</option>' for k, g in enumerate(groups))
    outcomes = ["success", "failure"] + (["unlabelled"] if has_unlabelled else [])
    outcome_options = "".join(f'<option value="{o}">{o}</option>' for o in outcomes)
    n_success = sum(v.outcome == "success" for v in views)
    n_failure = sum(v.outcome == "failure" for v in views)
    labelled = [v for v in views if v.traj.mistake_step is not None]
    hits = sum(v.traj.mistake_step == v.predicted for v in labelled)
    src = " · ".join(f"{_e(k)}: <code>{_e(p)}</code>" for k, p in (sources or {}).items())
    summary = (f"{len(views)} trajectories ({n_success} success, {n_failure} failure, "
               f"{len(views) - n_success - n_failure} unlabelled) · attribution {_e(attribution)}"
               + (f" (threshold {_fmt(threshold)})" if threshold is not None else "")
               + (f" · predicted = labelled mistake in {hits}/{len(labelled)}" if labelled else "")
               + f" · success means reward ≥ {_fmt(success_threshold)}")
    group_sizes = Counter(v.traj.group for v in views if v.traj.group is not None)
    sections = "".join(_section_html(v, group_sizes, methods, ranks, scale, attribution) for v in views)
    return _PAGE.format(
        title=_e(title), css=_CSS + heat_css, sources=src, summary=summary,
        legend=_legend(scale, "action message advantage"), head="".join(head_cells), groups=group_options,
        outcomes=outcome_options, no_group='<option value="__none__">(no group)</option>' if any(
            v.traj.group is None for v in views) else "", sections=sections, data=_script_json(data), script=_SCRIPT)


_CSS = """
body{font:14px/1.4 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:0;color:#222;background:#fafafa}
header{padding:10px 16px;background:#fff;border-bottom:1px solid #ddd}
h1{font-size:18px;margin:0 0 4px}h2{font-size:16px;margin:4px 0}
.sub{color:#555;font-size:12px}.sub code{font-size:12px}
.controls{display:flex;gap:18px;align-items:center;flex-wrap:wrap;margin-top:6px}
.legend{display:inline-flex;gap:8px;align-items:center;font-size:12px}
.scale{display:inline-flex;flex-direction:column}
.bar{display:flex}.bar span{width:12px;height:12px;border:0}
.ticks{display:flex;justify-content:space-between;width:252px;font-size:11px;color:#444}
.marks-key span{margin-right:10px}
#list{max-height:38vh;overflow:auto;background:#fff;border-bottom:1px solid #ddd}
table{border-collapse:collapse;font-size:12px}
#traj-table{width:100%}
#traj-table th{position:sticky;top:0;background:#eef;cursor:pointer;user-select:none;white-space:nowrap;
  padding:4px 6px;border-bottom:1px solid #ccd;text-align:left}
#traj-table th.sorted-asc::after{content:" ▲"}#traj-table th.sorted-desc::after{content:" ▼"}
#traj-table td{padding:3px 6px;border-bottom:1px solid #eee;white-space:nowrap;font-variant-numeric:tabular-nums}
#traj-table td.text{max-width:16em;overflow:hidden;text-overflow:ellipsis}
#traj-table tbody tr{cursor:pointer}#traj-table tbody tr:hover{background:#f3f3ff}
#traj-table tbody tr.current{background:#dde3ff}
.outcome{padding:1px 6px;border-radius:8px;font-size:11px}
.outcome.success{background:#d9f2d9}.outcome.failure{background:#f8d7d3}.outcome.unlabelled{background:#eee}
main{padding:8px 16px 40px}
.facts{display:flex;gap:14px;flex-wrap:wrap;font-size:13px;margin-bottom:6px}
table.side td,table.side th{border:1px solid #ddd;padding:2px 6px;text-align:right;font-variant-numeric:tabular-nums}
table.side th{background:#f4f4f4;font-weight:600}
.attr{margin:6px 0}.hit{color:#1a7f37}.miss{color:#b42318}
.trunc,.note{color:#8a4b00}
.messages{display:flex;flex-direction:column;gap:10px;max-width:1100px}
.msg{border:1px solid #ccc;border-radius:6px;padding:6px 10px;background:#fff}
.msg.role-system,.msg.role-developer{background:#f2f2f2;color:#444}
.msg.role-user{background:#fffbe8}.msg.role-tool{background:#f0f6f0;font-size:13px}
.msg.action{border-color:#666}
.msg.mark-label{border:3px solid #111}
.msg.mark-pred{box-shadow:0 0 0 2px #fff,0 0 0 7px #8e44ad}
.head{display:flex;gap:10px;align-items:baseline;flex-wrap:wrap;font-size:12px;margin-bottom:3px}
.role{font-weight:700;text-transform:uppercase;letter-spacing:.03em}.name{text-transform:none;font-weight:400}
.idx{color:#555}.val{color:#111}.part{background:rgba(255,255,255,.6);border-radius:4px;padding:0 4px}
.badge{border-radius:4px;padding:0 6px;color:#fff;font-weight:600}
.badge.label{background:#111}.badge.pred{background:#8e44ad}
.content{white-space:pre-wrap;word-break:break-word;max-height:24em;overflow:auto}
.call{margin-top:4px}.call-name{font-family:ui-monospace,monospace;font-weight:600}
.call pre{margin:2px 0 0;background:rgba(255,255,255,.6);padding:4px;border-radius:4px;white-space:pre-wrap}
.tokens-box{margin-top:14px;max-width:1100px}.tokens-box summary{cursor:pointer;font-weight:600}
.tokens{font-family:ui-monospace,monospace;font-size:12px;line-height:1.9;white-space:pre-wrap;
  word-break:break-all;background:#fff;border:1px solid #ddd;padding:6px;margin-top:6px}
.tk{border-right:1px solid rgba(0,0,0,.12)}.tk.ctx{color:#999}
.tk.ids{padding:0 2px}
"""

_SCRIPT = r"""
(function () {
  "use strict";
  var D = JSON.parse(document.getElementById("progadv-data").textContent);
  var rows = D.rows, order = rows.slice(), sortKey = "i", sortDir = 1, current = -1;
  var tbody = document.querySelector("#traj-table tbody");
  var groupSel = document.getElementById("group-filter"), outcomeSel = document.getElementById("outcome-filter");
  function fmt(v) {
    if (v === null || v === undefined) return "\u2014";
    if (typeof v === "boolean") return v ? "\u2713" : "\u2717";
    if (typeof v === "number") return String(Number(v.toPrecision(4)));
    return String(v);
  }
  function value(r, key) { return key.indexOf("b:") === 0 ? r.baselines[key.slice(2)] : r[key]; }
  function cmp(a, b) {
    var x = value(a, sortKey), y = value(b, sortKey);
    var nx = x === null || x === undefined, ny = y === null || y === undefined;
    if (nx || ny) return nx && ny ? a.i - b.i : (nx ? 1 : -1);
    if (typeof x === "number" && typeof y === "number") return sortDir * (x - y) || a.i - b.i;
    return sortDir * String(x).localeCompare(String(y), undefined, {numeric: true}) || a.i - b.i;
  }
  function visible(r) {
    var g = groupSel.value, o = outcomeSel.value;
    if (g === "__none__" ? r.group !== null : g !== "" && r.group !== D.groups[+g]) return false;
    return o === "" || r.outcome === o;
  }
  var keys = Array.prototype.map.call(document.querySelectorAll("#traj-table th"), function (th) {
    return th.dataset.key; });
  function build() {
    order.sort(cmp);
    var frag = document.createDocumentFragment(), shown = 0;
    order.forEach(function (r) {
      if (!visible(r)) return;
      shown++;
      var tr = document.createElement("tr");
      tr.dataset.i = r.i;
      tr.className = "row" + (r.i === current ? " current" : "");
      keys.forEach(function (k) {
        var td = document.createElement("td"), v = value(r, k);
        if (k === "outcome") { var s = document.createElement("span"); s.className = "outcome " + v;
          s.textContent = v; td.appendChild(s); }
        else td.textContent = k === "i" ? String(v + 1) : fmt(v);
        if (k === "id" || k === "group") { td.className = "text"; td.title = fmt(v); }
        tr.appendChild(td);
      });
      tr.addEventListener("click", function () { show(r.i); });
      frag.appendChild(tr);
    });
    tbody.textContent = "";
    tbody.appendChild(frag);
    document.getElementById("count").textContent = shown + " of " + rows.length + " shown";
    document.querySelectorAll("#traj-table th").forEach(function (th) {
      th.classList.toggle("sorted-asc", th.dataset.key === sortKey && sortDir > 0);
      th.classList.toggle("sorted-desc", th.dataset.key === sortKey && sortDir < 0);
    });
  }
  function tokens(i, box) {
    var t = D.tokens[i], frag = document.createDocumentFragment();
    for (var k = 0; k < t.ids.length; k++) {
      var span = document.createElement("span"), id = t.ids[k], step = t.step[k];
      span.textContent = D.texts ? D.texts[id] : String(id) + " ";
      span.className = "tk" + (D.texts ? "" : " ids");
      var tip = "id " + id + (step >= 0 ? " \u00b7 step " + step : " \u00b7 context") +
        " \u00b7 log \u03c0 " + fmt(t.lp[k]);
      if (t.v && step >= 0 && t.v[k] !== null) {
        var b = Math.max(-D.levels, Math.min(D.levels, Math.round(D.levels * t.v[k] / t.scale)));
        span.className += " h" + (b + D.levels);
        tip += " \u00b7 log \u03c0_ref " + fmt(t.lr[k]) + " \u00b7 value " + fmt(t.v[k]);
      } else if (step < 0) span.className += " ctx";
      span.title = tip;
      frag.appendChild(span);
    }
    box.appendChild(frag);
  }
  function show(i) {
    if (current >= 0) document.getElementById("t" + current).hidden = true;
    current = i;
    var sec = document.getElementById("t" + i);
    sec.hidden = false;
    var box = sec.querySelector(".tokens");
    if (box && !box.dataset.done) { box.dataset.done = "1"; tokens(i, box); }
    document.querySelectorAll("#traj-table tbody tr").forEach(function (tr) {
      tr.classList.toggle("current", +tr.dataset.i === i); });
    if (history.replaceState) history.replaceState(null, "", "#row-" + (i + 1));
  }
  document.querySelectorAll("#traj-table th").forEach(function (th) {
    th.addEventListener("click", function () {
      var k = th.dataset.key;
      if (k === sortKey) sortDir = -sortDir;
      else { sortKey = k; sortDir = k === "i" || k === "id" || k === "group" ? 1 : -1; }  // numbers: highest first
      build();
    });
  });
  groupSel.addEventListener("change", build);
  outcomeSel.addEventListener("change", build);
  document.addEventListener("keydown", function (ev) {
    if ((ev.key !== "ArrowDown" && ev.key !== "ArrowUp") || ev.target.tagName === "SELECT") return;
    var trs = Array.prototype.slice.call(tbody.children), at = trs.findIndex(function (tr) {
      return +tr.dataset.i === current; });
    var next = trs[at + (ev.key === "ArrowDown" ? 1 : -1)];
    if (next) { ev.preventDefault(); show(+next.dataset.i); next.scrollIntoView({block: "nearest"}); }
  });
  build();
  var m = /^#row-(\d+)$/.exec(location.hash), first = tbody.children[0];
  if (m && +m[1] >= 1 && +m[1] <= rows.length) {
    show(+m[1] - 1);
    var tr = tbody.querySelector("tr.current");
    if (tr) document.getElementById("list").scrollTop = tr.offsetTop - 40;
  } else if (first) show(+first.dataset.i);
})();
"""

_PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{title}</title>
<style>{css}</style></head>
<body>
<header>
<h1>{title}</h1>
<div class="sub">{sources}</div>
<div class="sub">{summary}</div>
<div class="controls">
<label>group <select id="group-filter"><option value="">all</option>{groups}{no_group}</select></label>
<label>outcome <select id="outcome-filter"><option value="">all</option>{outcomes}</select></label>
<span id="count" class="sub"></span>
{legend}
<span class="marks-key sub"><span><b>✗</b> black border: labelled mistake</span>
<span><b style="color:#8e44ad">◆</b> purple ring: predicted mistake</span></span>
</div>
</header>
<div id="list"><table id="traj-table"><thead><tr>{head}</tr></thead><tbody></tbody></table></div>
<main>
<noscript><p>The table and the token heat maps need JavaScript.</p></noscript>
{sections}
</main>
<script type="application/json" id="progadv-data">{data}</script>
<script>{script}</script>
</body></html>
"""
