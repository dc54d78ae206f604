"""The settings, as dataclasses readable from YAML: :class:`ScoringConfig` (what an exported scorer is) and
:class:`ProgressAdvantageConfig` (a scoring config plus the callback's and monitor's training-time settings)."""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import numbers
import os
import re
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .advantage import STEP_AGGREGATIONS, TOKEN_AGGREGATIONS
from .baselines import BASELINES
from .selection import ATTRIBUTION_METHODS, DEFAULT_ATTRIBUTION, THRESHOLD_METHODS

CONFIG_VERSION = 1
RENDERINGS = ("chat_template", "plain")
COMPAT_MODES = ("authors",)
BACKENDS = ("auto", "torch", "triton")
BEST_EXPORTS = ("end", "every_best", "none")

# Bounds of the numeric settings (declared per field in its metadata: ``gt``/``ge``/``le``; every float must be finite).
# Log-probs are float32 and a step advantage is ``beta * sum(log pi - log pi_ref)`` over at most ``max_length`` tokens.
# Within the temperature bounds below a token's log-ratio stays below ~1e4 in magnitude (logit gaps of real models
# are O(1e2), divided by T >= 1e-2), and ``max_length`` is at most INT_MAX ~ 2.1e9 tokens, so
# ``|beta * sum| <= 1e6 * 1e4 * 2.1e9 ~ 2e19``: 19 orders of magnitude below float32's 3.4e38, so no score can
# overflow to inf (``beta=1e38`` does). Useful betas are KL coefficients, O(1e-3 .. 1); 1e6 is far above any of them.
BETA_MAX = 1e6
# Sampling temperatures of RL runs are O(1). Above 1e2 the log-ratios shrink toward float32 rounding (at T=1e30 every
# score is exactly 0.0); below 1e-2 the logits/T exceed ~1e4 and one logit decides every log-prob.
TEMPERATURE_MIN, TEMPERATURE_MAX = 1e-2, 1e2
INT_MAX = 2**31 - 1  # token counts, lengths and sizes: torch indexes and the kernels' int32 offsets
SEED_MAX = 2**63 - 1
CLASS_SOURCE = "ProgressAdvantageConfig"
_SURROGATE = re.compile("[\ud800-\udfff]")


class ConfigError(ValueError):
    """A bad setting. The message names where it came from (a config file, a command-line flag, or the class) and
    the field, e.g. ``run.yaml: field 'beta': expected a finite number in (0, 1e+06], got float inf``."""

    def __init__(self, problem: str, *, source: str | None = None, field: str | None = None,
                 label: str | None = None):
        self.problem, self.source, self.field = problem, source, field
        self.label = label or (f"field {field!r}" if field is not None else None)
        where = ": ".join(x for x in (source, self.label) if x)
        super().__init__(f"{where}: {problem}" if where else problem)


def _show(value: Any) -> str:
    """``type value`` for messages: short, and safe for any value (huge ints, deep nesting, lone surrogates)."""
    if value is None:
        return "null"
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 200:
        return f"an integer of {value.bit_length()} bits"
    try:
        text = ascii(value) if isinstance(value, str) and _SURROGATE.search(value) else repr(value)
    except (ValueError, RecursionError):
        text = "..."
    return f"{type(value).__name__} {text[:60]}{'...' if len(text) > 60 else ''}"


def _describe(tp: Any) -> str:
    """The expected type, in words, from a field's annotation."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        words = [_describe(a) for a in args if a is not type(None)]
        return " or ".join(words + (["null"] if type(None) in args else []))
    if origin is list:
        return f"a list of {_describe(typing.get_args(tp)[0]).split(' ', 1)[1]}s"
    return {bool: "a boolean (true or false)", int: "an integer", float: "a number", str: "a string"}.get(tp, str(tp))


_NO = object()


def _conform(value: Any, tp: Any, allow_path: bool) -> Any:
    """``value`` as a ``tp`` (``int``/``float``/``str``/``bool``/``list[...]``/``X | None``/``Any``), or ``_NO``.

    Strict: a bool is only ``True``/``False`` (not ``"false"``, not ``0``); an int is no bool and no float; a float
    is any real number but a bool (ints become floats); a string is text (or a path, where ``allow_path``)."""
    if tp is Any:
        return value
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(tp):
            out = _conform(value, arg, allow_path)
            if out is not _NO:
                return out
        return _NO
    if tp is type(None):
        return None if value is None else _NO
    if tp is bool:
        return value if isinstance(value, bool) else _NO
    if tp is int:
        return int(value) if isinstance(value, numbers.Integral) and not isinstance(value, bool) else _NO
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            return _NO
        try:
            return float(value)
        except OverflowError:  # a 400-digit integer: outside every range, reported as such
            return math.inf if value > 0 else -math.inf
    if tp is str:
        if allow_path and isinstance(value, os.PathLike):
            return value
        return value if isinstance(value, str) else _NO
    if origin is list:
        if not isinstance(value, (list, tuple)):
            return _NO
        items = [_conform(v, typing.get_args(tp)[0], False) for v in value]
        return _NO if any(v is _NO for v in items) else items
    raise TypeError(f"no rule for the config annotation {tp!r}")  # pragma: no cover (a new kind of field)


def _suggest(word: Any, options) -> str:
    if not isinstance(word, str):
        return ""
    lowered = {str(o).lower(): o for o in options}
    close = difflib.get_close_matches(word.lower(), list(lowered), n=1, cutoff=0.6)
    return f" (did you mean {lowered[close[0]]!r}?)" if close else ""


def _has_range(meta: Mapping) -> bool:
    return any(k in meta for k in ("gt", "ge", "le"))


def _range_text(meta: Mapping) -> str:
    def num(x):
        return str(x) if isinstance(x, int) and abs(x) < 10**6 else (f"2^{x.bit_length()}-1" if isinstance(x, int)
                                                                         else f"{x:g}")

    lo = f"({num(meta['gt'])}" if "gt" in meta else (f"[{num(meta['ge'])}" if "ge" in meta else "(-inf")
    hi = f"{num(meta['le'])}]" if "le" in meta else "inf)"
    return f"{lo}, {hi}"


def _hint(value: Any, tp: Any) -> str:
    """How to write what a string given for a number, a boolean or a list most likely meant. YAML reads quoted values,
    and exponents without a dot or a signed exponent (``1e-3``, ``1.0e9``), as text."""
    if not isinstance(value, str):
        return ""
    kinds = (tp, *typing.get_args(tp))
    if typing.get_origin(tp) is list:
        return f" (write a list, e.g. [{', '.join(x.strip() for x in value.split(','))}])"
    try:
        number = float(value)
    except ValueError:
        number = None
    if number is not None and math.isfinite(number):
        if int in kinds and number.is_integer() and abs(number) <= 2**63:
            return f" (write it as a YAML integer, without quotes: {int(number)})"
        if float in kinds:
            mantissa, exponent = repr(number), ""
            if "e" in mantissa:
                mantissa, exponent = mantissa.split("e")
                exponent = "e" + (exponent if exponent[0] in "+-" else "+" + exponent)
            mantissa = mantissa if "." in mantissa else mantissa + ".0"
            return f" (write it as a YAML number, without quotes: {mantissa}{exponent})"
    if bool in kinds and value.strip().lower() in ("true", "false", "yes", "no", "on", "off", "1", "0"):
        return " (a quoted boolean is text: write true or false without quotes)"
    return ""


def _fields(config_class: type | None = None) -> dict[str, tuple[Any, Mapping]]:
    """Field name -> (resolved annotation, metadata) of ``config_class`` (default: every field of
    :class:`ProgressAdvantageConfig`): the single source of every check."""
    config_class = config_class or ProgressAdvantageConfig
    if config_class not in _FIELDS:
        hints = typing.get_type_hints(config_class)
        _FIELDS[config_class] = {f.name: (hints[f.name], f.metadata) for f in dataclasses.fields(config_class)}
    return _FIELDS[config_class]


_FIELDS: dict[type, dict[str, tuple[Any, Mapping]]] = {}


def check_value(name: str, value: Any, *, source: str | None = CLASS_SOURCE, label: str | None = None,
                config_class: type | None = None) -> Any:
    """Check one setting against its field's annotation and metadata (type, finiteness, range, choices, non-empty)
    and return it normalised (an int given for a float field becomes a float). The one check every source goes
    through: the dataclass itself, :meth:`ProgressAdvantageConfig.from_dict` / ``from_file`` and the ``progadv`` flags.

    Raises:
        ConfigError: naming ``source`` and the field (or ``label``, e.g. the flag).
    """
    fields = _fields(config_class)
    if name not in fields and name in _fields():
        raise ConfigError(f"a training setting of the callback/monitor ({CLASS_SOURCE}), not a scoring one: scorers "
                          f"and the score/rank/attribute/evaluate commands do not take it", source=source,
                          label=label or f"field {name!r}")
    if name not in fields:
        raise ConfigError(f"unknown field{_suggest(name, fields)}; known: {', '.join(fields)}", source=source,
                          label=label or f"field {name!r}")
    tp, meta = fields[name]

    def fail(problem: str):
        raise ConfigError(problem, source=source, field=name, label=label)

    out = _conform(value, tp, bool(meta.get("path")))
    if out is _NO:
        fail(f"expected {_describe(tp)}, got {_show(value)}{_hint(value, tp)}")
    items = out if isinstance(out, list) else [out]
    for item in items:
        if isinstance(item, str):
            if _SURROGATE.search(item):
                fail(f"{_show(item)} is not valid text (it holds a lone surrogate code point)")
            if meta.get("nonempty") and item == "":
                fail("expected a non-empty string, got ''")
        if isinstance(item, float) and not math.isfinite(item):
            fail(f"expected a finite number{' in ' + _range_text(meta) if _has_range(meta) else ''}, "
                 f"got {_show(value)}")
        if isinstance(item, (int, float)) and not isinstance(item, bool) and _has_range(meta):
            if ("gt" in meta and not item > meta["gt"]) or ("ge" in meta and not item >= meta["ge"]) or (
                    "le" in meta and not item <= meta["le"]):
                fail(f"expected {'an integer' if isinstance(item, int) else 'a number'} in {_range_text(meta)}, "
                     f"got {_show(value)}")
    choices = meta.get("choices") or meta.get("item_choices")
    if choices is not None:
        for item in items:
            if item is not None and item not in choices:
                fail(f"expected one of {', '.join(map(str, choices))}, got {_show(item)}{_suggest(item, choices)}")
    return out


def check_settings(values: Any, *, source: str | None = CLASS_SOURCE, labels: Mapping[str, str] | None = None,
                   config_class: type | None = None) -> dict[str, Any]:
    """:func:`check_value` for each named setting: the checked, normalised values, with the keys as given."""
    if not isinstance(values, Mapping):
        raise ConfigError(f"expected a mapping of config fields, got {_show(values)}", source=source)
    return {k: check_value(k, v, source=source, label=(labels or {}).get(k), config_class=config_class)
            for k, v in values.items()}


def decode_escapes(text: str, *, source: str | None = None, label: str | None = None) -> str:
    r"""Turn backslash escapes (``\n``, ``\t``, ``\r``, ``\\``, ``\0``, ``\xHH``, ``\uXXXX``, ``\UXXXXXXXX``, ...)
    into their characters and leave everything else as typed: unlike ``unicode_escape``, non-ASCII text such as
    ``§`` or ``→`` is kept. An unknown escape (``\q``) is kept as typed; a malformed one is an error."""
    simple = {"n": "\n", "t": "\t", "r": "\r", "0": "\0", "\\": "\\", "'": "'", '"': '"', "a": "\a", "b": "\b",
              "f": "\f", "v": "\v"}
    widths = {"x": 2, "u": 4, "U": 8}
    out, i = [], 0
    while i < len(text):
        ch = text[i]
        if ch != "\\":
            out.append(ch)
            i += 1
            continue
        if i + 1 == len(text):
            raise ConfigError("ends with a lone backslash (write \\\\ for a backslash)", source=source, label=label)
        nxt = text[i + 1]
        if nxt in simple:
            out.append(simple[nxt])
            i += 2
        elif nxt in widths:
            escape = text[i:i + 2 + widths[nxt]]
            digits = escape[2:]
            if len(digits) != widths[nxt] or not all(c in "0123456789abcdefABCDEF" for c in digits):
                raise ConfigError(f"malformed escape {escape!r}: \\{nxt} takes {widths[nxt]} hex digits",
                                  source=source, label=label)
            code = int(digits, 16)
            if code > 0x10FFFF or 0xD800 <= code <= 0xDFFF:
                raise ConfigError(f"escape {escape!r} is not a Unicode character", source=source, label=label)
            out.append(chr(code))
            i += len(escape)
        else:  # not an escape we know: keep the backslash, as Python does
            out.append(ch)
            i += 1
    return "".join(out)


@dataclass
class ScoringConfig:
    r"""
    Configuration of progress-advantage scoring: everything an exported scorer is (``progadv_config.json`` holds
    exactly these fields).

    Every field is checked on construction against its annotation and metadata (:func:`check_value`): booleans must
    be ``True``/``False``, integers no floats or booleans, numbers finite and within their field's range, names one of
    their choices. :meth:`from_file` / :meth:`from_dict` name the file and the field in their errors;
    :meth:`merged` replaces only the settings it is given.

    Parameters:
        beta (`float`, *optional*, defaults to `1.0`):
            Scale of the log-ratio, ``A_t = beta * (log pi - log pi_ref)``. Use the trainer's KL coefficient; with a
            beta-0 run (TRL's GRPO default, DAPO) keep 1.0. It changes no ranking, AUROC or argmin. In ``(0, 1e6]``
            (see ``BETA_MAX``: no score can overflow).
        temperature (`float`, *optional*, defaults to `1.0`):
            Both models' logits are divided by it, as TRL does with its generation temperature. In ``[0.01, 100]``.
        token_agg (`str` or `None`, *optional*, defaults to `None`):
            How a step's token advantages are aggregated: ``"sum"``, ``"mean"``, ``"last"``, ``"min"``, ``"max"``.
            ``None`` means ``"sum"`` (the turn-level advantage), or ``"mean"`` under ``compat="authors"``.
        step_agg (`str`, *optional*, defaults to `"mean"`):
            How step advantages make a trajectory score: ``"mean"``, ``"sum"``, ``"last"``, ``"min"``, ``"max"``,
            ``"bottom10"``.
        cumulative (`bool`, *optional*, defaults to `False`):
            Aggregate the running sums of step advantages (the ImplicitPRM q-value view) instead of the steps.
        compat (`str` or `None`, *optional*, defaults to `None`):
            ``"authors"`` reproduces the paper code: plain rendering, each model's log-probs aggregated separately
            and then subtracted, mean/mean unless aggregations are given.
        rendering (`str`, *optional*, defaults to `"chat_template"`):
            ``"chat_template"`` (each model's own template) or ``"plain"`` (``[role]: content`` lines, BOS first).
        step_separator (`str` or `None`, *optional*, defaults to `None`):
            Split each action's content into several steps at this separator (e.g. ``"\n\n"``), as process reward
            models do with flat completions.
        max_length (`int`, *optional*, defaults to `16384`):
            Longer trajectories are truncated from the left; the output records what was cut.
        baselines (`list[str]`, *optional*, defaults to `[]`):
            Baselines to report beside the score (see ``progadv_trl.baselines.BASELINES``), or ``["all"]``.
        top_k (`int`, *optional*, defaults to `20`):
            k of the DeepConf token confidence.
        deepconf_window (`int`, *optional*, defaults to `2048`):
            Sliding-window length (tokens) of DeepConf's bottom-10% and lowest-window scores.
        deepconf_tail (`int`, *optional*, defaults to `2048`):
            Number of final tokens of DeepConf's tail score.
        success_threshold (`float`, *optional*, defaults to `1.0`):
            A trajectory succeeded when its reward is at least this.
        attribution (`str`, *optional*, defaults to `"change_point"`):
            Failure attribution (:func:`~progadv_trl.selection.predict_mistake`): ``"running_sum"`` (argmin of the
            running sum of step advantages), ``"step"`` (argmin of the step advantage), ``"change_point"`` (where the
            running sum's largest drop begins), ``"threshold"`` (earliest running sum below
            ``attribution_threshold``) or ``"first_below"`` (earliest step advantage below ``attribution_threshold``).
        attribution_threshold (`float` or `None`, *optional*, defaults to `None`):
            Threshold for ``attribution="threshold"`` or ``"first_below"``, fitted on held-out data
            (:func:`~progadv_trl.selection.fit_attribution_threshold`).
        batch_size (`int`, *optional*, defaults to `8`):
            Trajectories per forward pass (they are sorted by length first).
        chunk_size (`int` or `None`, *optional*, defaults to `None`):
            Vocabulary chunk of the fused statistics kernel; ``None`` picks one for the device.
        backend (`str`, *optional*, defaults to `"auto"`):
            Fused-kernel implementation: ``"torch"`` (tiled PyTorch fold, validated on CPU and CUDA), ``"triton"``
            (fused Triton matmul, CUDA only, opt-in until it has passed its tests on GPU hardware) or ``"auto"``
            (today the same as ``"torch"`` on every device).
        seed (`int`, *optional*, defaults to `0`):
            Seed of the random baseline.
    """

    beta: float = field(default=1.0, metadata={"help": "Scale of the log-ratio (the trainer's KL coefficient; 1.0 for beta-0 runs).", "gt": 0, "le": BETA_MAX})
    temperature: float = field(default=1.0, metadata={"help": "Sampling temperature the logits are divided by.", "ge": TEMPERATURE_MIN, "le": TEMPERATURE_MAX})
    token_agg: str | None = field(default=None, metadata={"help": "Token aggregation within a step (None: sum, or mean under compat='authors').", "choices": TOKEN_AGGREGATIONS})
    step_agg: str = field(default="mean", metadata={"help": "Step aggregation over a trajectory.", "choices": STEP_AGGREGATIONS})
    cumulative: bool = field(default=False, metadata={"help": "Aggregate running sums of step advantages (ImplicitPRM view)."})
    compat: str | None = field(default=None, metadata={"help": "'authors' reproduces the paper code's conventions.", "choices": COMPAT_MODES})
    rendering: str = field(default="chat_template", metadata={"help": "How messages become text.", "choices": RENDERINGS})
    step_separator: str | None = field(default=None, metadata={"help": "Split each action's content into steps at this separator.", "nonempty": True})
    max_length: int = field(default=16384, metadata={"help": "Left-truncate trajectories longer than this many tokens.", "ge": 2, "le": INT_MAX})
    baselines: list[str] = field(default_factory=list, metadata={"help": "Baselines to report beside progress advantage, or 'all'.", "item_choices": (*BASELINES, "all")})
    top_k: int = field(default=20, metadata={"help": "k of DeepConf's token confidence.", "ge": 1, "le": INT_MAX})
    deepconf_window: int = field(default=2048, metadata={"help": "DeepConf sliding-window length in tokens.", "ge": 1, "le": INT_MAX})
    deepconf_tail: int = field(default=2048, metadata={"help": "DeepConf tail length in tokens.", "ge": 1, "le": INT_MAX})
    success_threshold: float = field(default=1.0, metadata={"help": "Success means reward >= this."})
    attribution: str = field(default=DEFAULT_ATTRIBUTION, metadata={"help": "Failure attribution rule: running_sum, step, change_point, or threshold / first_below (these two need attribution_threshold).", "choices": ATTRIBUTION_METHODS})
    attribution_threshold: float | None = field(default=None, metadata={"help": "Threshold for attribution='threshold' or 'first_below', fitted on held-out data."})
    batch_size: int = field(default=8, metadata={"help": "Trajectories per forward pass.", "ge": 1, "le": INT_MAX})
    chunk_size: int | None = field(default=None, metadata={"help": "Vocabulary chunk of the fused kernel.", "ge": 1, "le": INT_MAX})
    backend: str = field(default="auto", metadata={"help": "Fused-kernel backend ('auto' is 'torch' everywhere today).", "choices": BACKENDS})
    seed: int = field(default=0, metadata={"help": "Seed of the random baseline.", "ge": 0, "le": SEED_MAX})

    def __post_init__(self):
        # One check for every field, from its annotation and metadata (see check_value); then the cross-field rules.
        cls = type(self)
        for name in _fields(cls):
            setattr(self, name, check_value(name, getattr(self, name), source=cls.__name__, config_class=cls))
        if "all" in self.baselines:
            self.baselines = list(BASELINES)
        self.baselines = list(dict.fromkeys(self.baselines))
        if self.token_agg is None:
            self.token_agg = "mean" if self.compat == "authors" else "sum"
        if self.compat == "authors":
            self.rendering = "plain"
        if self.attribution in THRESHOLD_METHODS and self.attribution_threshold is None:
            raise ConfigError(f"a number is needed when attribution is {self.attribution!r}", source=cls.__name__,
                              field="attribution_threshold")

    @property
    def per_model_aggregation(self) -> bool:
        """The authors aggregate each model's log-probs over a step, then subtract."""
        return self.compat == "authors"

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready fields."""
        return {"config_version": CONFIG_VERSION, **{f.name: getattr(self, f.name) for f in dataclasses.fields(self)}}

    def merged(self, overrides: Mapping[str, Any], *, source: str | None = None) -> "ScoringConfig":
        """A copy with the settings ``overrides`` names replaced (checked) and every other one kept.

        Settings derived from ``compat`` follow a change of it unless named too: a ``token_agg`` still at the old
        mode's default becomes the new mode's default, and leaving ``compat="authors"`` gives back the default
        rendering (that mode forces ``"plain"``)."""
        source = source or type(self).__name__
        named = check_settings(overrides, source=source, config_class=type(self))
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        if "compat" in named and named["compat"] != self.compat:
            if "token_agg" not in named and self.token_agg == ("mean" if self.compat == "authors" else "sum"):
                values["token_agg"] = None
            if "rendering" not in named and self.compat == "authors":
                values["rendering"] = next(f.default for f in dataclasses.fields(self) if f.name == "rendering")
        values.update(named)
        try:
            return type(self)(**values)
        except ConfigError as e:  # a cross-field rule: name where the overrides came from
            raise ConfigError(e.problem, source=source, field=e.field, label=e.label) from None

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str = "config") -> "ScoringConfig":
        """A config from the fields ``data`` names (the others keep their defaults), each checked; errors name
        ``source`` (e.g. the file) and the field."""
        return cls.from_settings(read_settings(data, source, config_class=cls), source)

    @classmethod
    def from_settings(cls, settings: Mapping[str, Any], source: str | None = None) -> "ScoringConfig":
        """The defaults with ``settings`` (named fields) applied."""
        source = source or cls.__name__
        try:
            return cls(**check_settings(settings, source=source, config_class=cls))
        except ConfigError as e:
            raise ConfigError(e.problem, source=source, field=e.field, label=e.label) from None

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> "ScoringConfig":
        """Read a YAML or JSON file (see :func:`read_config_file`): the fields it names over the defaults."""
        return cls.from_settings(read_config_file(path), str(path))


SCORING_FIELDS = tuple(f.name for f in dataclasses.fields(ScoringConfig))


@dataclass
class ProgressAdvantageConfig(ScoringConfig):
    r"""
    Configuration of the callback and the monitor: every :class:`ScoringConfig` field (how held-out rollouts are
    scored and what the exported scorer is) plus the training-time settings below, which are never exported.

    Parameters:
        heldout (`str`, `datasets.Dataset`, `list` or `None`, *optional*, defaults to `None`):
            Fixed labelled rollouts scored at every evaluation: a file or folder for
            :func:`~progadv_trl.load_trajectories`, a dataset, or a list of trajectories.
        heldout_prompts (`str`, `datasets.Dataset`, `list` or `None`, *optional*, defaults to `None`):
            Held-out prompts: at every evaluation the current policy completes each ``eval_num_generations`` times
            through the trainer's own generation (vLLM when it uses it; its chat template and sampling settings),
            split over ranks, and the trainer's reward functions label the completions as they label training ones.
        eval_num_generations (`int` or `None`, *optional*, defaults to `None`):
            Completions per held-out prompt; ``None`` means the trainer's ``num_generations``.
        eval_steps (`int` or `None`, *optional*, defaults to `None`):
            Evaluate every this many optimizer steps (and at train begin and end); ``None`` means the trainer's
            resolved evaluation interval when ``eval_strategy="steps"`` (fractions of ``max_steps`` included), else
            its resolved ``logging_steps``.
        reference_placement (`str`, *optional*, defaults to `"auto"`):
            Where a snapshot reference (beta-0 runs, ``sync_ref_model``) lives: ``"device"`` (beside the policy),
            ``"cpu"``, or ``"disk"`` (safetensors, loaded for each evaluation). ``"auto"`` is ``"device"``, or
            ``"disk"`` when the models are sharded (FSDP2, ZeRO-3). The snapshot is also written to disk once so that
            a resumed run keeps the initial reference.
        reference_cache (`bool`, *optional*, defaults to `True`):
            Remember the reference's hidden states on the fixed held-out rollouts: one reference forward for the whole
            run. With ``reference_placement="disk"`` the snapshot is then not even loaded again after the first
            evaluation (only its LM head is kept, and weight drift is read from its safetensors file by file).
        follow_sync_ref_model (`bool`, *optional*, defaults to `False`):
            With ``sync_ref_model=True``, use TRL's moving reference instead of the initial policy.
        also_temperature_one (`bool`, *optional*, defaults to `False`):
            Also log the signal quality at temperature 1.0 (``progadv/t1/...``) when the trainer samples at another.
        quality_metric (`str`, *optional*, defaults to `"auroc"`):
            The metric that defines the best evaluation and the decay warning: ``"auroc"``, ``"spearman"``,
            ``"best_of_n"`` or ``"attribution_accuracy"``.
        decay_margin (`float`, *optional*, defaults to `0.05`):
            Warn when the quality metric falls this far below its best value.
        log_baselines (`bool`, *optional*, defaults to `True`):
            Log each baseline's metrics beside progress advantage (``progadv/baseline/<name>/<metric>``).
        export (`bool`, *optional*, defaults to `True`):
            Export the final scorer (``<export_dir>/scorer``) at train end and the best one (``scorer-best``).
        export_dir (`str` or `None`, *optional*, defaults to `None`):
            Where the exported scorers and the snapshot reference go; relative paths are inside ``output_dir``.
            ``None`` means ``<output_dir>/_progadv``, which ``Trainer.push_to_hub`` does not upload (it skips names
            starting with ``_``). Name a folder without the underscore to upload the scorers with the model.
        best_export (`str`, *optional*, defaults to `"end"`):
            When the best scorer is written: ``"end"`` keeps the best policy's trainable weights in CPU memory (only
            the adapter under PEFT) and writes ``scorer-best`` once, at train end; ``"every_best"`` writes it at every
            new best (survives a crash, costs a full copy of the weights per new best); ``"none"`` never.
        reference_candidates (`list[str]`, *optional*, defaults to `[]`):
            Other references to compare with the run's at every evaluation: ``"previous:k"`` (the policy as it was
            ``k`` evaluations ago), ``"alpha:a"`` (the weight-space blend ``theta_ref + a * (theta - theta_ref)``,
            ``a != 1``), ``"initial"`` (the run's reference, always compared). Each is logged under
            ``progadv/reference/<name>/{val,test}/<metric>`` with names ``initial``, ``previous_<k>``, ``alpha_<a>``
            (``-`` written ``neg``, ``.`` written ``p``: ``alpha:-0.5`` is ``alpha_neg0p5``); the one with the best
            validation ``quality_metric`` is ``progadv/reference/chosen`` and is exported with the scorers. Full
            (non-PEFT, unsharded) models only. ``[]`` computes nothing extra.
        validation_fraction (`float`, *optional*, defaults to `0.5`):
            With ``reference_candidates``: the share of held-out groups (whole groups, assigned by a hash of the
            group id) on which the reference is chosen; the other groups report its quality.
    """

    heldout: Any = field(default=None, metadata={"help": "Fixed labelled held-out rollouts (path, dataset or list)."})
    heldout_prompts: Any = field(default=None, metadata={"help": "Held-out prompts the current policy completes (through the trainer's own generation) at each evaluation."})
    eval_num_generations: int | None = field(default=None, metadata={"help": "Completions per held-out prompt (default: the trainer's num_generations).", "ge": 1, "le": INT_MAX})
    eval_steps: int | None = field(default=None, metadata={"help": "Evaluate every this many steps (default: trainer's eval_steps, else logging_steps).", "ge": 1, "le": INT_MAX})
    reference_placement: str = field(default="auto", metadata={"help": "Where a snapshot reference lives ('auto': device, or disk when sharded).", "choices": ("auto", "device", "cpu", "disk")})
    reference_cache: bool = field(default=True, metadata={"help": "Cache the reference's hidden states on fixed held-out rollouts."})
    follow_sync_ref_model: bool = field(default=False, metadata={"help": "With sync_ref_model, follow TRL's moving reference."})
    also_temperature_one: bool = field(default=False, metadata={"help": "Also log signal quality at temperature 1.0."})
    quality_metric: str = field(default="auroc", metadata={"help": "Metric defining the best evaluation.", "choices": ("auroc", "spearman", "best_of_n", "attribution_accuracy")})
    decay_margin: float = field(default=0.05, metadata={"help": "Warn when quality falls this far below its best.", "ge": 0})
    log_baselines: bool = field(default=True, metadata={"help": "Log the baselines' metrics too."})
    export: bool = field(default=True, metadata={"help": "Export the final and the best scorer."})
    export_dir: str | None = field(default=None, metadata={"help": "Where scorers and the snapshot reference go (default: <output_dir>/_progadv, not pushed to the Hub).", "nonempty": True, "path": True})
    best_export: str = field(default="end", metadata={"help": "When the best scorer is written.", "choices": BEST_EXPORTS})
    reference_candidates: list[str] = field(default_factory=list, metadata={"help": "Other references compared at each evaluation: 'previous:k', 'alpha:a', 'initial'; the best on validation groups is exported."})
    validation_fraction: float = field(default=0.5, metadata={"help": "Share of held-out groups the reference is chosen on (the rest report it).", "gt": 0})

    def __post_init__(self):
        super().__post_init__()
        from .reference_candidates import parse_candidates

        try:
            parse_candidates(self.reference_candidates)
        except ValueError as e:
            raise ConfigError(str(e), source=type(self).__name__, field="reference_candidates") from None
        if not self.validation_fraction < 1:
            raise ConfigError(f"expected a number in (0, 1), got {self.validation_fraction!r}",
                              source=type(self).__name__, field="validation_fraction")

    def scoring(self) -> ScoringConfig:
        """The scoring part: what an exported scorer holds."""
        return ScoringConfig(**{name: getattr(self, name) for name in SCORING_FIELDS})

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready fields; held-out data given as objects (datasets, lists) is recorded as ``None``."""
        out = super().to_dict()
        if out["export_dir"] is not None:
            out["export_dir"] = str(out["export_dir"])
        for key in ("heldout", "heldout_prompts"):
            if not isinstance(out[key], (str, type(None))):
                out[key] = None
        return out


TRAINING_FIELDS = tuple(f.name for f in dataclasses.fields(ProgressAdvantageConfig) if f.name not in SCORING_FIELDS)


def as_scoring(config: ScoringConfig | None) -> ScoringConfig:
    """The scoring config of ``config`` (the defaults for ``None``; the scoring part of a
    :class:`ProgressAdvantageConfig`)."""
    if config is None:
        return ScoringConfig()
    return config.scoring() if isinstance(config, ProgressAdvantageConfig) else config


def scoring_settings(settings: Mapping[str, Any]) -> dict[str, Any]:
    """The scoring fields of ``settings`` (a training run's file may also hold the callback's fields: they do not
    change a score, so scoring leaves them out)."""
    return {k: v for k, v in settings.items() if k in SCORING_FIELDS}


def read_settings(data: Any, source: str, *, config_class: type | None = None) -> dict[str, Any]:
    """The settings a mapping names (``config_version`` checked and dropped), each checked; nothing else added."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"expected a mapping of config fields, got {_show(data)}", source=source)
    data = dict(data)
    version = data.pop("config_version", CONFIG_VERSION)
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise ConfigError(f"expected a positive integer, got {_show(version)}", source=source, field="config_version")
    if version > CONFIG_VERSION:
        raise ConfigError(f"{version!r} is newer than this progadv-trl supports ({CONFIG_VERSION}); upgrade "
                          f"progadv-trl", source=source, field="config_version")
    return check_settings(data, source=source, config_class=config_class)


class _UniqueKeyLoader:
    """A YAML safe loader that refuses a key given twice in one mapping (PyYAML keeps the last one silently)."""

    _cls = None

    @classmethod
    def get(cls):
        if cls._cls is None:
            import yaml

            class Loader(yaml.SafeLoader):
                def construct_mapping(self, node, deep=False):
                    keys = []
                    for key_node, _ in node.value:
                        if key_node.tag == "tag:yaml.org,2002:merge":  # '<<: *base' may be overridden by own keys
                            continue
                        key = self.construct_object(key_node, deep=True)
                        if key in keys:
                            raise yaml.constructor.ConstructorError(
                                None, None, f"duplicate key {key!r}", key_node.start_mark)
                        keys.append(key)
                    return super().construct_mapping(node, deep=deep)

            cls._cls = Loader
        return cls._cls


def _json_pairs(pairs):
    out = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"duplicate key {key!r}")
        out[key] = value
    return out


def read_config_file(path: str | os.PathLike) -> dict[str, Any]:
    """The settings a YAML or JSON config file names, checked (type, range, choices) but not merged with anything:
    apply them over the defaults (:meth:`ProgressAdvantageConfig.from_settings`) or over a loaded scorer's config
    (:meth:`ProgressAdvantageConfig.merged`), so that the fields the file does not name keep their values.

    The fields sit at the top level or under a ``progadv:`` section (then every other top-level key is ignored, as in
    a ``progadv train`` run file). ``.json`` files are JSON, every other file YAML; UTF-8, a byte-order mark allowed.
    A key given twice is an error.

    Raises:
        ConfigError: naming the file and the field. ``OSError`` when the file cannot be read.
    """
    import yaml

    src = str(path)
    is_json = src.lower().endswith(".json")
    raw = Path(path).read_bytes()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise ConfigError(f"not valid UTF-8 (byte offset {e.start})", source=src) from None
    try:
        data = (json.loads(text, object_pairs_hook=_json_pairs) if is_json
                else yaml.load(text, Loader=_UniqueKeyLoader.get()))  # noqa: S506 (a SafeLoader subclass)
    except RecursionError:
        raise ConfigError(f"not valid {'JSON' if is_json else 'YAML'}: nested too deeply", source=src) from None
    except (ValueError, yaml.YAMLError) as e:
        detail = " ".join(str(e).split())
        raise ConfigError(f"not valid {'JSON' if is_json else 'YAML'}: {detail[:300]}", source=src) from None
    if data is None:
        raise ConfigError("empty: no config fields (expected a mapping such as 'progadv: {beta: 0.04}')", source=src)
    if isinstance(data, Mapping) and "progadv" in data:
        section = data["progadv"]
        if section is None:
            return {}
        if not isinstance(section, Mapping):
            raise ConfigError(f"expected a mapping of config fields, got {_show(section)}", source=src,
                              field="progadv")
        data = section
    elif not isinstance(data, Mapping):
        raise ConfigError(f"expected a mapping of config fields (at the top or under 'progadv:'), got {_show(data)}",
                          source=src)
    return read_settings(data, src)
