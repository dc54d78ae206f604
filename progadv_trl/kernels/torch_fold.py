"""Torch backend of :mod:`.fused_stats`: the online fold over vocabulary chunks, on any device.

For each vocabulary chunk (and block of rows) the fold computes the logit tile(s) with one fp32 GEMM per model, then
updates running per-token accumulators with an online log-sum-exp (rescaled whenever the running maximum grows).
The scale factors are folded into the fp32 hidden states and bias before the GEMM (:class:`.heads.Head`). Without
softcap the logits are linear in ``h``, so ``mean_j zp_j = h . mean_j W_j + mean_j b_j`` needs no pass over the tiles.

The ``k`` largest logits stream too: values at or above a lower bound of each row's k-th largest logit go to a small
per-row pool (whole blocks below it are skipped), and one top-k of the pool at the end gives the k largest.
"""

from __future__ import annotations

import math

import torch

from .finish import Folded, Plan
from .heads import Head

# Default tile: ``_TILE_ELEMENTS`` fp32 logits per model (4 MiB), at most ``_MAX_ROWS`` rows per block
_TILE_ELEMENTS = 1 << 20
_MAX_ROWS = 2048
_MIN_CHUNK = 256
# Streaming top-k: a lower bound of the k-th largest logit prunes whole blocks of ``_TOPK_GROUP`` logits; the
# survivors go to a per-row pool of ``_TOPK_POOL * k`` values (torch.topk has a large per-row cost on CPU, so it
# only runs when a row's pool overflows, mostly on the first chunk, and once at the end)
_TOPK_GROUP = 32
_TOPK_POOL = 8


class _Tiles:
    """fp32 logit tiles of one head: weight chunks (a reused buffer unless the weight is fp32) and their logits."""

    def __init__(self, head: Head):
        self.head = head
        self._weight_buf = None

    def weight(self, start: int, end: int) -> torch.Tensor:
        """``W[start:end]`` as fp32 (a view when the weight already is fp32, else a reused buffer)."""
        w = self.head.weight[start:end]
        if w.dtype == torch.float32:
            return w
        if self._weight_buf is None:  # the first chunk is the largest
            self._weight_buf = torch.empty(w.numel(), device=w.device, dtype=torch.float32)
        return self._weight_buf[: w.numel()].view(w.shape).copy_(w)

    def logits(self, w: torch.Tensor, start: int, rows: slice, out: torch.Tensor) -> torch.Tensor:
        """Transformed fp32 logits of ``rows`` against the weight tile ``w`` (vocabulary from ``start``), into ``out``."""
        head = self.head
        h = head.hidden[rows]
        if head.bias is None:
            torch.mm(h, w.t(), out=out)
        else:
            torch.addmm(head.bias[start:start + w.shape[0]], h, w.t(), out=out)
        if head.post is not None:
            out.tanh_().mul_(head.post)
        return out


class _Fold:
    """Running per-token accumulators over vocabulary chunks for one model.

    Always the online log-sum-exp (``m``, ``S``); optionally ``A = sum e z``, ``B = sum e z_other``, the logit sum
    and a pool ``[N, _TOPK_POOL * k]`` of candidates for the k largest logits (``count`` filled per row).
    """

    def __init__(self, n, device, *, a=False, b=False, zsum=False, top_k=0):
        def zeros():
            return torch.zeros(n, device=device, dtype=torch.float32)

        self.m = torch.full((n,), -math.inf, device=device)
        self.s = zeros()
        self.a = zeros() if a else None
        self.b = zeros() if b else None
        self.zsum = zeros() if zsum else None
        self.k = top_k
        if top_k:
            self.pool = torch.full((n, _TOPK_POOL * top_k), -math.inf, device=device)
            self.count = torch.zeros(n, device=device, dtype=torch.long)
            self.tau = torch.full((n,), -math.inf, device=device)

    def update(self, rows: slice, z: torch.Tensor, scratch: torch.Tensor | None, other: torch.Tensor | None = None):
        """Fold the logit tile ``z`` ``[n, c]`` of ``rows``; ``z`` (and ``scratch``, ``other``) are overwritten.

        ``other`` is the other model's tile (for ``B``), ``scratch`` a spare tile (needed when ``A`` or ``B`` is kept).
        """
        chunk_max = self._update_topk(rows, z) if self.k else z.amax(-1)
        if self.zsum is not None:
            self.zsum[rows] += z.sum(-1)
        m_old = self.m[rows]
        m_new = torch.maximum(m_old, chunk_max)
        rescale = torch.exp(m_old - m_new)
        m_old.copy_(m_new)
        m_new = m_new.unsqueeze(-1)
        if self.a is None and self.b is None:
            e = z.sub_(m_new).exp_()
        else:
            e = torch.sub(z, m_new, out=scratch).exp_()
        self.s[rows].mul_(rescale).add_(e.sum(-1))
        if self.a is not None:
            self.a[rows].mul_(rescale).add_(z.mul_(e).sum(-1))
        if self.b is not None:
            self.b[rows].mul_(rescale).add_(e.mul_(other).sum(-1))

    def _update_topk(self, rows: slice, z: torch.Tensor) -> torch.Tensor:
        """Append the tile's logits that may be among the row's k largest to the row's pool; returns the row max.

        ``tau`` is a lower bound of each row's final k-th largest logit (the k-th largest of its pool at the last
        compaction), so only values ``>= tau`` are kept, and whole blocks of ``_TOPK_GROUP`` logits below it are
        skipped. A row whose pool would overflow is compacted to the top-k of (pool, tile row) instead.
        """
        n, c = z.shape
        g = _TOPK_GROUP if c % _TOPK_GROUP == 0 else c
        pool, count, tau = self.pool[rows], self.count[rows], self.tau[rows]
        blocks = z.view(n, c // g, g)
        block_max = blocks.amax(-1)
        chunk_max = block_max.amax(-1)
        row, block = (block_max >= tau.unsqueeze(-1)).nonzero().unbind(-1)  # row-major, so rows ascend
        if row.numel() == 0:
            return chunk_max
        vals = blocks[row, block]
        keep = vals >= tau[row].unsqueeze(-1)
        vals, row = vals[keep], row.unsqueeze(-1).expand(-1, g)[keep]
        new = torch.bincount(row, minlength=n)
        over = (count + new > pool.shape[1]).nonzero().squeeze(-1)
        if over.numel():
            top = torch.cat([pool[over], z[over]], -1).topk(self.k, -1, sorted=False).values
            pool[over] = torch.cat([top, top.new_full((over.numel(), pool.shape[1] - self.k), -math.inf)], -1)
            count[over] = self.k
            tau[over] = top.amin(-1)
            new[over] = 0
            stay = new[row] > 0
            vals, row = vals[stay], row[stay]
        first = torch.cumsum(new, 0) - new  # index in ``vals`` of each row's first new value
        pool[row, count[row] + torch.arange(row.numel(), device=row.device) - first[row]] = vals
        count += new
        return chunk_max

    def top_k_values(self) -> torch.Tensor:
        return self.pool.topk(self.k, -1, sorted=False).values

    def log_z(self) -> torch.Tensor:
        return self.m + torch.log(self.s)


def _block_sizes(n: int, vocab: int, chunk_size: int | None) -> tuple[int, int]:
    """(vocabulary chunk, row block). Default: 4 MiB fp32 tiles, up to 2048 rows, chunks a multiple of the top-k group."""
    if chunk_size is not None:
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be positive, got {chunk_size}")
        chunk = min(chunk_size, vocab)
        return chunk, max(1, min(n, _TILE_ELEMENTS // chunk))
    rows = max(1, min(n, _MAX_ROWS))
    chunk = max(_MIN_CHUNK, _TILE_ELEMENTS // rows // _TOPK_GROUP * _TOPK_GROUP)
    return min(chunk, vocab), rows


def fold(policy: Head, reference: Head | None, plan: Plan, chunk_size: int | None = None) -> Folded:
    """Fold what ``plan`` asks for over vocabulary chunks of ``chunk_size`` columns (``None``: a CPU-friendly size)."""
    n, vocab, device = policy.hidden.shape[0], policy.vocab, policy.hidden.device
    linear_mean = policy.softcap is None
    p_fold = _Fold(n, device, a=plan.a, b=plan.b, zsum=plan.mean and not linear_mean,
                   top_k=plan.top_k) if plan.policy else None
    r_fold = _Fold(n, device) if plan.reference else None
    p_tiles, r_tiles = _Tiles(policy), _Tiles(reference) if plan.reference else None

    chunk, row_block = _block_sizes(n, vocab, chunk_size)
    # Tiles: policy logits, reference logits, scratch for exp(zp - m) when A or B is kept
    need_scratch = p_fold is not None and p_fold.a is not None
    buf = torch.empty(1 + int(plan.reference) + int(need_scratch), row_block * chunk, device=device,
                      dtype=torch.float32)
    for start in range(0, vocab if n else 0, chunk):
        end = min(start + chunk, vocab)
        w_p = p_tiles.weight(start, end) if plan.policy else None
        w_r = r_tiles.weight(start, end) if plan.reference else None
        for r0 in range(0, n, row_block):
            rows = slice(r0, min(r0 + row_block, n))
            shape = (rows.stop - r0, end - start)
            size = shape[0] * shape[1]
            z_r = r_tiles.logits(w_r, start, rows, buf[1, :size].view(shape)) if plan.reference else None
            if plan.policy:
                z_p = p_tiles.logits(w_p, start, rows, buf[0, :size].view(shape))
                p_fold.update(rows, z_p, buf[-1, :size].view(shape) if need_scratch else None, z_r)
            if plan.reference:
                r_fold.update(rows, z_r, None)

    out = Folded()
    if p_fold is not None:
        out.log_z, out.s, out.a, out.b = p_fold.log_z(), p_fold.s, p_fold.a, p_fold.b
        if plan.mean:
            out.mean = policy.mean_logits() if linear_mean else p_fold.zsum / vocab
        if plan.top_k:
            out.top = p_fold.top_k_values()
    if r_fold is not None:
        out.ref_log_z = r_fold.log_z()
    return out
