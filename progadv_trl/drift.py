"""How far the policy moved from its reference: pure functions on tensors, and the decay detector.

Token statistics are over the action tokens of the held-out rollouts, with ``r_t = log pi(a_t) - log pi_ref(a_t)``:

* log-ratio mean, std and quantiles of ``r_t``;
* exact ``KL(pi || pi_ref)`` per token (full vocabulary, from the fused kernel): mean and max;
* the sample estimates TRL and others use: ``k1 = mean(r_t)`` and ``k3 = mean(exp(-r_t) + r_t - 1)``
  (unbiased for the KL only when the tokens were sampled from the current policy);
* relative weight drift ``||theta - theta_ref|| / ||theta_ref||``.
"""

from __future__ import annotations

import math
from typing import Iterable

import torch

QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.95)


def token_drift(log_ratio: torch.Tensor, kl: torch.Tensor | None = None) -> dict[str, float]:
    """Drift statistics of ``[T]`` action-token log-ratios (and exact per-token KL ``[T]``, when known)."""
    r = log_ratio.double()
    r = r[~torch.isnan(r)]
    if r.numel() == 0:
        return {}
    out = {"log_ratio/mean": r.mean().item(), "log_ratio/std": r.std(unbiased=False).item(),
           "kl_k1": r.mean().item(), "kl_k3": (torch.exp(-r) + r - 1).mean().item(), "n_tokens": int(r.numel())}
    for q, v in zip(QUANTILES, torch.quantile(r, torch.tensor(QUANTILES, dtype=torch.float64)).tolist()):
        out[f"log_ratio/p{int(round(q * 100)):02d}"] = v
    if kl is not None:
        k = kl.double()
        k = k[~torch.isnan(k)]
        if k.numel():
            out["kl/mean"], out["kl/max"] = k.mean().item(), k.max().item()
    return out


@torch.no_grad()
def weight_drift(pairs: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> float:
    """``||theta - theta_ref|| / ||theta_ref||`` over matched ``(theta, theta_ref)`` tensors (Frobenius, fp64)."""
    num = den = 0.0
    for p, r in pairs:
        r64 = r.detach().to(torch.float64, copy=False)
        num += (p.detach().to(device=r.device, dtype=torch.float64) - r64).pow(2).sum().item()
        den += r64.pow(2).sum().item()
    return math.sqrt(num / den) if den > 0 else float("nan")


class DecayDetector:
    """Tracks the best value of a quality metric and says when the current one falls ``margin`` below it."""

    def __init__(self, margin: float = 0.05, best_value: float | None = None, best_step: int | None = None):
        self.margin, self.best_value, self.best_step = margin, best_value, best_step

    def update(self, step: int, value: float) -> tuple[bool, str | None]:
        """Returns ``(is_new_best, warning or None)``; NaN values are ignored."""
        if value is None or math.isnan(value):
            return False, None
        if self.best_value is None or value > self.best_value:
            self.best_value, self.best_step = value, step
            return True, None
        if value < self.best_value - self.margin:
            return False, (f"progress-advantage signal decayed: {value:.3f} at step {step} is more than "
                           f"{self.margin:g} below its best {self.best_value:.3f} at step {self.best_step}")
        return False, None

    def state_dict(self) -> dict:
        return {"margin": self.margin, "best_value": self.best_value, "best_step": self.best_step}
