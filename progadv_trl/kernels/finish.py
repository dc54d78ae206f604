"""The finishing step shared by both backends: folded accumulators -> per-token statistics.

A backend folds the policy logits ``zp`` (and the reference's ``zr``) over the vocabulary. With ``e_j = exp(zp_j - m)``
for some per-row ``m``, it returns ``logZp = log sum_j exp zp_j``, ``S = sum e``, ``A = sum e * zp``,
``B = sum e * zr``, ``mean_j zp_j``, the ``k`` largest ``zp`` and ``logZr``, as far as the :class:`Plan` asks; then::

    logprob         = zp[target] - logZp
    entropy         = logZp - A / S                       = -sum p log p
    kl              = (A - B) / S - logZp + logZr         = KL(p || r), exact over the full vocabulary
    self_certainty  = logZp - mean_j zp_j - log V         = KL(U || p)
    topk_confidence = logZp - mean(top-k zp)              = -(1/k) sum of the k largest log p_j
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .constants import POLICY_STATS, REFERENCE_STATS, STATS


@dataclass(frozen=True)
class Plan:
    """What a fold must accumulate for the statistics ``want`` (over a vocabulary of ``vocab``)."""

    want: frozenset[str]
    vocab: int
    policy: bool  # logZp: any policy statistic, or kl
    reference: bool  # logZr: ref_logprob or kl (two-model calls only)
    a: bool  # A: entropy, kl
    b: bool  # B: kl
    mean: bool  # mean_j zp_j: self_certainty
    top_k: int  # the k largest zp (k clamped to V): topk_confidence; else 0

    @classmethod
    def of(cls, want: set[str], has_reference: bool, top_k: int, vocab: int) -> Plan:
        return cls(want=frozenset(want), vocab=vocab, policy=bool(want & {*POLICY_STATS, "kl"}),
                   reference=has_reference and bool(want & set(REFERENCE_STATS)), a=bool(want & {"entropy", "kl"}),
                   b="kl" in want, mean="self_certainty" in want,
                   top_k=min(top_k, vocab) if "topk_confidence" in want else 0)


@dataclass
class Folded:
    """A fold's results, ``[N]`` fp32 each (``top``: ``[N, k]``); ``None`` where the plan did not ask for them."""

    log_z: torch.Tensor | None = None
    s: torch.Tensor | None = None
    a: torch.Tensor | None = None
    b: torch.Tensor | None = None
    mean: torch.Tensor | None = None
    top: torch.Tensor | None = None
    ref_log_z: torch.Tensor | None = None


def log_prob(target_logits: torch.Tensor, log_z: torch.Tensor) -> torch.Tensor:
    """``z[target] - logZ``, ``[N]``."""
    return target_logits - log_z


def entropy(log_z: torch.Tensor, a: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """``logZp - A / S = -sum_j p_j log p_j``, ``[N]``."""
    return log_z - a / s


def kl_divergence(log_z: torch.Tensor, ref_log_z: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
                  s: torch.Tensor) -> torch.Tensor:
    """``(A - B) / S - logZp + logZr = KL(p || r)``, ``[N]``."""
    return (a - b) / s - log_z + ref_log_z


def self_certainty(log_z: torch.Tensor, mean_logits: torch.Tensor, vocab: int) -> torch.Tensor:
    """``logZp - mean_j zp_j - log V = KL(U || p)``, ``[N]``."""
    return log_z - mean_logits - math.log(vocab)


def topk_confidence(log_z: torch.Tensor, top_logits: torch.Tensor) -> torch.Tensor:
    """``logZp - mean(top-k zp)`` from the ``[N, k]`` largest logits, ``[N]``."""
    return log_z - top_logits.mean(-1)


def finish(plan: Plan, folded: Folded, target_logits: torch.Tensor | None = None,
           ref_target_logits: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """``{stat: [N]}`` with exactly the keys of ``plan.want``, in :data:`STATS` order.

    ``target_logits`` / ``ref_target_logits``: ``zp[target]`` / ``zr[target]``, needed for logprob / ref_logprob.
    """
    want, f = plan.want, folded
    out = {}
    if "logprob" in want:
        out["logprob"] = log_prob(target_logits, f.log_z)
    if "ref_logprob" in want:
        out["ref_logprob"] = log_prob(ref_target_logits, f.ref_log_z)
    if "entropy" in want:
        out["entropy"] = entropy(f.log_z, f.a, f.s)
    if "kl" in want:
        out["kl"] = kl_divergence(f.log_z, f.ref_log_z, f.a, f.b, f.s)
    if "self_certainty" in want:
        out["self_certainty"] = self_certainty(f.log_z, f.mean, plan.vocab)
    if "topk_confidence" in want:
        out["topk_confidence"] = topk_confidence(f.log_z, f.top)
    return {key: out[key] for key in STATS if key in out}
