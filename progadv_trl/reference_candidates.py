"""Candidate references compared during training, and the one the data chooses.

The run's reference is not always the best one to score against. With ``reference_candidates`` the monitor also scores
its held-out rollouts against

* ``previous:k``: the policy as it was ``k`` evaluations ago (progress since then), kept as a CPU copy of its
  parameters (``max k`` copies in all: each evaluation's copy serves ``previous:1`` next time, ``previous:2`` after);
* ``alpha:a``: the weight-space blend ``theta_ref + a * (theta - theta_ref)`` (:mod:`progadv_trl.reference_blend`).

Every candidate is built in turn in one reused model (a copy of the reference's architecture, on the policy's device),
so the memory they add is one model plus the ``previous`` copies on CPU. The held-out groups are split once per
evaluation, by a hash of the group id, into a validation part (choose) and a test part (report); the chosen candidate
is the best on validation by ``quality_metric`` (ties: the earlier one, ``initial`` first).

Logged names keep to ``[A-Za-z0-9_]``: ``initial``, ``previous_<k>``, ``alpha_<a>`` with ``a`` written by ``%g``,
``-`` as ``neg`` and ``.`` as ``p`` (``alpha:-1`` is ``alpha_neg1``, ``alpha:0.5`` is ``alpha_0p5``).
"""

from __future__ import annotations

import hashlib
import logging
import math
from collections import deque
from dataclasses import dataclass
from typing import Any, Sequence

import torch

from .models import ModelView, is_peft_model, strip_wrappers, unwrap
from .reference_blend import blend_into_, check_alpha, cpu_copy, load_weights_, model_like, nbytes
from .sharding import UnsupportedSetupError, sharding_of

logger = logging.getLogger(__name__)
METRICS = ("auroc", "spearman", "best_of_n", "attribution_accuracy")
INITIAL = "initial"


@dataclass(frozen=True)
class Candidate:
    """One candidate reference: ``kind`` is ``"initial"``, ``"previous"`` (``value`` = k) or ``"alpha"`` (``value`` =
    a); ``name`` is its logger-safe name, ``spec`` the text it was given as."""

    kind: str
    value: float | int | None
    name: str
    spec: str


def _alpha_name(alpha: float) -> str:
    return "alpha_" + format(alpha, "g").replace("-", "neg").replace("+", "").replace(".", "p")


def parse_candidate(spec: Any) -> Candidate:
    """``"initial"``, ``"previous:k"`` (k >= 1) or ``"alpha:a"`` (finite, a != 0, a != 1) as a :class:`Candidate`."""
    if not isinstance(spec, str):
        raise ValueError(f"expected a string such as 'previous:1' or 'alpha:-1', got {spec!r}")
    kind, _, arg = spec.strip().partition(":")
    kind = kind.strip().lower()
    if kind == INITIAL and not arg:
        return Candidate(INITIAL, None, INITIAL, spec)
    if kind == "previous":
        try:
            k = int(arg)
        except ValueError:
            k = 0
        if k < 1:
            raise ValueError(f"{spec!r}: expected 'previous:k' with an integer k >= 1 (the policy k evaluations ago)")
        return Candidate("previous", k, f"previous_{k}", spec)
    if kind == "alpha":
        try:
            alpha = float(arg)
        except ValueError:
            raise ValueError(f"{spec!r}: expected 'alpha:a' with a number a") from None
        try:
            alpha = check_alpha(alpha, "alpha")
        except ValueError as e:
            raise ValueError(f"{spec!r}: {e}") from None
        if alpha == 0.0:
            raise ValueError(f"{spec!r}: alpha 0 is the run's reference itself; it is always compared as 'initial'")
        return Candidate("alpha", alpha, _alpha_name(alpha), spec)
    raise ValueError(f"{spec!r}: expected 'initial', 'previous:k' or 'alpha:a' (e.g. 'previous:1', 'alpha:-1', "
                     "'alpha:0.5')")


def parse_candidates(specs: Sequence[Any]) -> list[Candidate]:
    """The candidates in order, ``initial`` first (added when not given); a candidate given twice is an error."""
    out = [Candidate(INITIAL, None, INITIAL, INITIAL)]
    for spec in specs:
        c = parse_candidate(spec)
        if c.kind == INITIAL:
            continue
        if any(o.name == c.name for o in out):
            raise ValueError(f"{spec!r}: given twice (as {next(o.spec for o in out if o.name == c.name)!r})")
        out.append(c)
    return out


def split_groups(trajectories: Sequence, fraction: float) -> tuple[list[int], list[int]]:
    """Indices of the validation and test parts: whole groups (a trajectory without a group is a group of its own),
    ordered by the SHA-256 of the group id, the first ``round(fraction * n)`` groups (at least one, and one left for
    test when there are two or more) in validation. Deterministic, and a group keeps its side while the others
    change only through their number."""
    keys = [f"group:{t.group}" if t.group is not None else f"id:{t.id}" for t in trajectories]
    groups = sorted(set(keys), key=lambda k: hashlib.sha256(k.encode("utf-8")).hexdigest())
    n_val = len(groups) if len(groups) < 2 else min(max(round(fraction * len(groups)), 1), len(groups) - 1)
    val = set(groups[:n_val])
    return [i for i, k in enumerate(keys) if k in val], [i for i, k in enumerate(keys) if k not in val]


def candidate_metrics(name: str, results: Sequence, val: Sequence[int], test: Sequence[int], config) -> dict:
    """``progadv/reference/<name>/{val,test}/<metric>`` of one candidate's results (NaN where undefined: a part
    without both outcomes, or scores all tied, as when the candidate equals the policy)."""
    from .trajectory_scores import METHOD, evaluation_table

    out = {}
    for part, idx in (("val", val), ("test", test)):
        subset = [results[i] for i in idx]
        tied = len({r.score for r in subset}) <= 1
        row = {} if not subset else evaluation_table(subset, [], attribution=config.attribution,
                                                     threshold=config.attribution_threshold)[METHOD]
        for col in METRICS:
            value = row.get(col, float("nan"))
            out[f"progadv/reference/{name}/{part}/{col}"] = float("nan") if tied or value is None else float(value)
    return out


def choose(candidates: Sequence[Candidate], metrics: dict, quality_metric: str) -> Candidate:
    """The candidate with the best finite validation ``quality_metric`` (ties and no finite value: the earliest)."""
    best, best_value = candidates[0], -math.inf
    for c in candidates:
        value = metrics.get(f"progadv/reference/{c.name}/val/{quality_metric}", float("nan"))
        if value is not None and math.isfinite(value) and value > best_value:
            best, best_value = c, value
    return best


class ReferenceCandidates:
    """The candidates of one monitor: the earlier policies it keeps, the model it builds each candidate in, and the
    candidate chosen last.

    Args:
        specs: ``config.reference_candidates``.
    """

    def __init__(self, specs: Sequence[str]):
        self.candidates = parse_candidates(specs)
        depth = max([c.value for c in self.candidates if c.kind == "previous"], default=0)
        self._previous: deque[tuple[int, dict[str, torch.Tensor]]] = deque(maxlen=depth)
        self._buffer: torch.nn.Module | None = None
        self.chosen: Candidate = self.candidates[0]
        self.chosen_previous: tuple[int, dict[str, torch.Tensor]] | None = None  # a previous:k choice's policy

    # ------------------------------------------------------------------ memory
    @property
    def buffer_bytes(self) -> int:
        """Bytes of the reused candidate model (on the policy's device; 0 before the first evaluation)."""
        return 0 if self._buffer is None else nbytes(self._buffer)

    @property
    def previous_bytes(self) -> int:
        """Bytes of the earlier policies kept on CPU."""
        return sum(nbytes(w) for _, w in self._previous)

    # ------------------------------------------------------------------ building
    def check(self, policy, reference_view) -> None:
        """Refuse set-ups the candidates cannot be built in: sharded or PEFT models (``reference_view`` may be
        ``None``: the policy alone is checked)."""
        for name, model in (("policy", policy), ("reference", None if reference_view is None else
                                                 reference_view.model)):
            model = strip_wrappers(model) if model is not None else None
            kind = sharding_of(model)
            if kind is not None:
                raise UnsupportedSetupError(
                    f"progadv: reference_candidates is not supported with {kind}-sharded models (a candidate needs a "
                    f"whole copy of the model); set reference_candidates=[] and compare references afterwards with "
                    f"`progadv evaluate --reference-alpha`")
            if model is not None and (is_peft_model(model) or getattr(reference_view, "adapter", None) is not None):
                raise UnsupportedSetupError(
                    f"progadv: reference_candidates needs full (non-PEFT) models; the {name} is a PEFT adapter. Set "
                    f"reference_candidates=[] (or merge the adapter and score afterwards with --reference-alpha)")

    def _model(self, like: torch.nn.Module) -> torch.nn.Module:
        if self._buffer is None:
            self._buffer = model_like(unwrap(like))
        return self._buffer

    def available(self, candidate: Candidate) -> bool:
        return candidate.kind != "previous" or len(self._previous) >= candidate.value

    def previous(self, candidate: Candidate) -> tuple[int, dict[str, torch.Tensor]]:
        """``(step, weights)`` of the policy ``k`` evaluations ago."""
        return self._previous[-candidate.value]

    @torch.no_grad()
    def view(self, candidate: Candidate, policy, reference_model,
             weights: dict[str, torch.Tensor] | None = None) -> ModelView:
        """``candidate`` built in the reused model (``weights``: an earlier policy's, else the one ``k`` evaluations
        ago); ``initial`` is the reference itself. The view is valid until the next call."""
        if candidate.kind == INITIAL:
            return ModelView(reference_model)
        target = self._model(reference_model)
        if candidate.kind == "alpha":
            blend_into_(target, unwrap(reference_model), unwrap(policy), candidate.value)
        else:
            load_weights_(target, weights if weights is not None else self.previous(candidate)[1])
        return ModelView(target)

    def remember(self, policy, step: int) -> None:
        """Keep this evaluation's policy for the ``previous`` candidates (the oldest beyond the deepest k dropped)."""
        if self._previous.maxlen:
            self._previous.append((int(step), cpu_copy(unwrap(policy))))

    def provenance(self, candidate: Candidate, step: int | None = None) -> dict:
        """What an export records about its reference candidate."""
        out: dict[str, Any] = {"reference_candidate": candidate.name}
        if candidate.kind == "alpha":
            out["reference_alpha"] = candidate.value
        elif candidate.kind == "previous":
            out["reference_previous"] = candidate.value
            out["reference_step"] = step
        return out
