"""One LM head and its logit transform, as both backends of the fused statistics take it."""

from __future__ import annotations

import torch


class Head:
    """An LM head ``W`` (``[V, H]``, any dtype, optional bias ``[V]``) and final hidden states ``[N, H]``.

    Logits (TRL's ``_torch_transform`` order)::

        z = (h @ W.T + b) * logit_scale;  z = softcap * tanh(z / softcap) if softcap;  z = z / temperature

    written as ``z = post * tanh(pre * y)`` with softcap, ``z = pre * y`` without (``y = h @ W.T + b``). ``hidden``
    and ``bias`` are fp32 with ``pre`` folded in; ``raw_hidden`` and ``raw_bias`` are the inputs as given.
    """

    def __init__(self, hidden, weight, bias, temperature, logit_scale, softcap, name):
        if hidden.dim() != 2 or weight.dim() != 2:
            raise ValueError(f"{name}: hidden must be [N, H] and weight [V, H], got {tuple(hidden.shape)} and "
                             f"{tuple(weight.shape)}")
        if hidden.shape[1] != weight.shape[1]:
            raise ValueError(f"{name}: hidden width {hidden.shape[1]} != weight width {weight.shape[1]}")
        if bias is not None and tuple(bias.shape) != (weight.shape[0],):
            raise ValueError(f"{name}: bias must be [{weight.shape[0]}], got {tuple(bias.shape)}")
        if softcap is not None and softcap <= 0:
            raise ValueError(f"{name}: softcap must be positive, got {softcap}")
        self.softcap = softcap
        pre = logit_scale / (temperature if softcap is None else softcap)
        self.post = None if softcap is None else softcap / temperature
        self.pre, self.raw_hidden, self.raw_bias = pre, hidden, bias
        self.hidden = hidden.float() * pre if pre != 1.0 else hidden.float().contiguous()
        self.bias = None if bias is None else bias.float() * pre
        self.weight = weight
        self.vocab = weight.shape[0]

    def target_logits(self, targets: torch.Tensor, block: int = 4096) -> torch.Tensor:
        """``z[i, targets[i]]`` for every row, ``[N]`` fp32, without a vocabulary-wide tile."""
        out = torch.empty(targets.shape[0], device=targets.device, dtype=torch.float32)
        for r0 in range(0, targets.shape[0], block):
            t = targets[r0:r0 + block]
            w = self.weight.index_select(0, t).float()
            out[r0:r0 + block] = torch.linalg.vecdot(self.hidden[r0:r0 + block], w)
        if self.bias is not None:
            out += self.bias[targets]
        if self.post is not None:
            out.tanh_().mul_(self.post)
        return out

    def mean_logits(self) -> torch.Tensor:
        """``mean_j z_j`` per row, ``[N]``; only valid without softcap (the logits are then linear in ``h``)."""
        w_mean = self.weight.sum(0, dtype=torch.float32) / self.vocab
        mean = self.hidden @ w_mean
        if self.bias is not None:
            mean += self.bias.mean()
        return mean
