"""Per-token statistics of one or two causal-LM heads, fused and chunked over the vocabulary.

Given final hidden states ``h`` (``[N, H]``) and an LM head ``W`` (``[V, H]``, optional bias ``b``), every statistic
is folded online over vocabulary chunks, so no ``[N, V]`` logits tensor is ever built. For each chunk (and block of
rows) the fold computes the logit tile(s) with one fp32 GEMM per model, then updates running per-token accumulators
with an online log-sum-exp (rescaled whenever the running maximum grows).

Logits of one model at one position (same order as TRL's ``_torch_transform``)::

    z = (h @ W.T + b) * logit_scale;  z = softcap * tanh(z / softcap) if softcap;  z = z / temperature

With ``e_j = exp(zp_j - m)`` (``m`` the running max of the policy logits) the fold keeps ``S = sum e``,
``A = sum e * zp`` and ``B = sum e * zr``, from which::

    logprob         = zp[target] - logZp                  logZp = m + log S
    entropy         = logZp - A / S                       = -sum p log p
    kl              = (A - B) / S - logZp + logZr         = KL(p || r), exact over the full vocabulary
    self_certainty  = logZp - mean_j zp_j - log V         = KL(U || p)
    topk_confidence = logZp - mean(top-k zp)              = -(1/k) sum of the k largest log p_j

``topk_confidence`` streams too: values at or above a lower bound of each row's k-th largest logit go to a small
per-row pool (whole blocks below it are skipped), and one top-k of the pool at the end gives the k largest.

The scale factors are folded into the fp32 hidden states and bias before the GEMM (mathematically the same
transform). Without softcap the logits are linear in ``h``, so ``mean_j zp_j = h . mean_j W_j + mean_j b_j``
needs no pass over the tiles.

``backend="triton"`` runs the same fold fused into a Triton matmul on CUDA (:mod:`.triton_fold`, which lists what it
supports). It is opt-in: it has passed its tests under Triton's CPU interpreter but not yet on GPU hardware, so
``backend="auto"`` (the default) is the torch path on every device until it has (:data:`TRITON_VALIDATED`).
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch

STATS = ("logprob", "ref_logprob", "entropy", "kl", "self_certainty", "topk_confidence")
BACKENDS = ("auto", "torch", "triton")
# Flip to True once tests/test_kernels_triton.py has passed on a CUDA GPU: then "auto" picks Triton on CUDA.
TRITON_VALIDATED = False
POLICY_STATS = ("logprob", "entropy", "self_certainty", "topk_confidence")

# Default tile: ``_TILE_ELEMENTS`` fp32 logits per model (4 MiB), at most ``_MAX_ROWS`` rows per block
_TILE_ELEMENTS = 1 << 20
_MAX_ROWS = 2048
_MIN_CHUNK = 256
# Streaming top-k: a lower bound of the k-th largest logit prunes whole blocks of ``_TOPK_GROUP`` logits; the
# survivors go to a per-row pool of ``_TOPK_POOL * k`` values (torch.topk has a large per-row cost on CPU, so it
# only runs when a row's pool overflows, mostly on the first chunk, and once at the end)
_TOPK_GROUP = 32
_TOPK_POOL = 8


class _Head:
    """One LM head: fp32 hidden states with the logit scale folded in, the weight (any dtype), fp32 bias."""

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
        # z = post * tanh(pre * y) with softcap, z = pre * y without (y = h @ W.T + b)
        pre = logit_scale / (temperature if softcap is None else softcap)
        self.post = None if softcap is None else softcap / temperature
        self.pre, self.raw_hidden, self.raw_bias = pre, hidden, bias  # for the Triton path
        self.hidden = hidden.float() * pre if pre != 1.0 else hidden.float().contiguous()
        self.bias = None if bias is None else bias.float() * pre
        self.weight = weight
        self.vocab = weight.shape[0]
        self._weight_buf = None

    def weight_tile(self, start: int, end: int) -> torch.Tensor:
        """``W[start:end]`` as fp32 (a view when the weight already is fp32, else a reused buffer)."""
        w = self.weight[start:end]
        if w.dtype == torch.float32:
            return w
        if self._weight_buf is None:  # the first chunk is the largest
            self._weight_buf = torch.empty(w.numel(), device=w.device, dtype=torch.float32)
        return self._weight_buf[: w.numel()].view(w.shape).copy_(w)

    def logits(self, w: torch.Tensor, start: int, rows: slice, out: torch.Tensor) -> torch.Tensor:
        """Transformed fp32 logits of ``rows`` against the weight tile ``w`` (vocabulary from ``start``), into ``out``."""
        h = self.hidden[rows]
        if self.bias is None:
            torch.mm(h, w.t(), out=out)
        else:
            torch.addmm(self.bias[start:start + w.shape[0]], h, w.t(), out=out)
        if self.post is not None:
            out.tanh_().mul_(self.post)
        return out

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


def _check_stats(stats: Iterable[str], allowed: tuple[str, ...]) -> set[str]:
    stats = tuple(stats)
    unknown = [s for s in stats if s not in allowed]
    if unknown:
        raise ValueError(f"unknown statistics {unknown}; choose from {allowed}")
    return set(stats)


def _check_targets(targets: torch.Tensor, n: int, vocab: int) -> None:
    if targets.dim() != 1 or targets.shape[0] != n:
        raise ValueError(f"targets must be [{n}], got {tuple(targets.shape)}")
    if targets.dtype.is_floating_point or targets.dtype == torch.bool:
        raise ValueError(f"targets must be an integer tensor, got {targets.dtype}")
    if n and (int(targets.min()) < 0 or int(targets.max()) >= vocab):
        raise ValueError(f"targets must lie in [0, {vocab}), got values in "
                         f"[{int(targets.min())}, {int(targets.max())}]")


def _triton_path(policy: _Head, reference: _Head | None, targets: torch.Tensor, top_k: int, backend: str):
    """The Triton module when ``backend`` asks for it (``"auto"`` only once :data:`TRITON_VALIDATED`), else ``None``.

    An explicit ``backend="triton"`` never falls back silently: inputs it cannot take raise.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    explicit = backend == "triton"
    if backend == "torch" or (backend == "auto" and not (TRITON_VALIDATED and targets.device.type == "cuda")):
        return None
    if targets.shape[0] == 0:
        return None
    try:
        from . import triton_fold
    except ImportError as e:
        if explicit:
            raise ImportError(f"backend='triton' needs the triton package ({e}); use backend='torch'") from None
        return None
    if explicit and targets.device.type != "cuda" and not triton_fold.INTERPRETED:
        raise ValueError(f"backend='triton' runs on CUDA tensors (got {targets.device.type}); use backend='torch' "
                         "(or set TRITON_INTERPRET=1 before importing triton to run it interpreted)")
    if triton_fold.supports(policy, reference, top_k):
        return triton_fold
    if explicit:
        raise ValueError(f"backend='triton' does not support these inputs (hidden/weight dtypes must match and be "
                         f"fp32/fp16/bf16, top_k <= {triton_fold.MAX_TOP_K}); use backend='torch'")
    return None


def _fused_stats(policy: _Head, reference: _Head | None, targets: torch.Tensor, want: set[str], top_k: int,
                 chunk_size: int | None, backend: str = "auto") -> dict[str, torch.Tensor]:
    """The fold shared by :func:`two_model_token_stats` and :func:`token_stats` (``reference=None``)."""
    triton_path = _triton_path(policy, reference, targets, top_k, backend)
    if triton_path is not None:
        return triton_path.fused_stats(policy, reference, targets, want, top_k)
    n, vocab, device = targets.shape[0], policy.vocab, targets.device
    targets = targets.long()
    need_policy = bool(want & {*POLICY_STATS, "kl"})
    need_ref = reference is not None and bool(want & {"ref_logprob", "kl"})
    k = min(top_k, vocab) if "topk_confidence" in want else 0
    linear_mean = policy.softcap is None
    p_fold = _Fold(n, device, a="entropy" in want or "kl" in want, b="kl" in want,
                   zsum="self_certainty" in want and not linear_mean, top_k=k) if need_policy else None
    r_fold = _Fold(n, device) if need_ref else None

    chunk, row_block = _block_sizes(n, vocab, chunk_size)
    # Tiles: policy logits, reference logits, scratch for exp(zp - m) when A or B is kept
    need_scratch = p_fold is not None and p_fold.a is not None
    buf = torch.empty(1 + int(need_ref) + int(need_scratch), row_block * chunk, device=device, dtype=torch.float32)
    for start in range(0, vocab if n else 0, chunk):
        end = min(start + chunk, vocab)
        w_p = policy.weight_tile(start, end) if need_policy else None
        w_r = reference.weight_tile(start, end) if need_ref else None
        for r0 in range(0, n, row_block):
            rows = slice(r0, min(r0 + row_block, n))
            shape = (rows.stop - r0, end - start)
            size = shape[0] * shape[1]
            z_r = reference.logits(w_r, start, rows, buf[1, :size].view(shape)) if need_ref else None
            if need_policy:
                z_p = policy.logits(w_p, start, rows, buf[0, :size].view(shape))
                p_fold.update(rows, z_p, buf[-1, :size].view(shape) if need_scratch else None, z_r)
            if need_ref:
                r_fold.update(rows, z_r, None)

    out = {}
    if need_policy:
        log_z = p_fold.log_z()
        if "logprob" in want:
            out["logprob"] = policy.target_logits(targets) - log_z
        if "entropy" in want:
            out["entropy"] = log_z - p_fold.a / p_fold.s
        if "self_certainty" in want:
            mean = policy.mean_logits() if linear_mean else p_fold.zsum / vocab
            out["self_certainty"] = log_z - mean - math.log(vocab)
        if "topk_confidence" in want:
            out["topk_confidence"] = log_z - p_fold.top_k_values().mean(-1)
    if need_ref:
        ref_log_z = r_fold.log_z()
        if "ref_logprob" in want:
            out["ref_logprob"] = reference.target_logits(targets) - ref_log_z
        if "kl" in want:
            out["kl"] = (p_fold.a - p_fold.b) / p_fold.s - log_z + ref_log_z
    return {key: out[key] for key in STATS if key in want}


def _check_common(temperature: float, top_k: int) -> None:
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    if top_k < 1:
        raise ValueError(f"top_k must be at least 1, got {top_k}")


@torch.no_grad()
def two_model_token_stats(
    policy_hidden: torch.Tensor,
    policy_weight: torch.Tensor,
    reference_hidden: torch.Tensor,
    reference_weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    policy_bias: torch.Tensor | None = None,
    reference_bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    policy_logit_scale: float = 1.0,
    reference_logit_scale: float = 1.0,
    policy_softcap: float | None = None,
    reference_softcap: float | None = None,
    stats: Iterable[str] = STATS,
    top_k: int = 20,
    chunk_size: int | None = None,
    backend: str = "auto",
) -> dict[str, torch.Tensor]:
    """Per-token statistics of a policy and its reference over a shared vocabulary, without ``[N, V]`` logits.

    Args:
        policy_hidden: ``[N, H_p]`` final hidden states of the policy; ``policy_weight``: ``[V, H_p]`` its LM head.
        reference_hidden: ``[N, H_r]``; ``reference_weight``: ``[V, H_r]`` (``H_r`` may differ from ``H_p``).
        targets: ``[N]`` token ids in ``[0, V)``.
        policy_bias, reference_bias: optional ``[V]`` head biases.
        temperature, *_logit_scale, *_softcap: the logit transform (see the module docstring).
        stats: any of :data:`STATS`; only those are computed (no reference GEMM without a reference statistic).
        top_k: ``k`` of ``topk_confidence`` (clamped to ``V``).
        chunk_size: vocabulary columns per tile; ``None`` picks a CPU-friendly size.
        backend: ``"torch"``, ``"triton"`` (CUDA, opt-in) or ``"auto"`` (torch until Triton is validated on GPU).

    Returns:
        ``{stat: [N] fp32}`` with exactly the requested keys, on the input device.
    """
    want = _check_stats(stats, STATS)
    _check_common(temperature, top_k)
    if policy_weight.shape[0] != reference_weight.shape[0]:
        raise ValueError(f"vocabulary sizes differ: policy {policy_weight.shape[0]} vs reference "
                         f"{reference_weight.shape[0]}")
    if policy_hidden.shape[0] != reference_hidden.shape[0]:
        raise ValueError(f"row counts differ: policy {policy_hidden.shape[0]} vs reference {reference_hidden.shape[0]}")
    policy = _Head(policy_hidden, policy_weight, policy_bias, temperature, policy_logit_scale, policy_softcap,
                   "policy")
    reference = _Head(reference_hidden, reference_weight, reference_bias, temperature, reference_logit_scale,
                      reference_softcap, "reference")
    _check_targets(targets, policy_hidden.shape[0], policy.vocab)
    return _fused_stats(policy, reference, targets, want, top_k, chunk_size, backend)


@torch.no_grad()
def token_stats(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    logit_scale: float = 1.0,
    softcap: float | None = None,
    stats: Iterable[str] = POLICY_STATS,
    top_k: int = 20,
    chunk_size: int | None = None,
    backend: str = "auto",
) -> dict[str, torch.Tensor]:
    """Single-model version of :func:`two_model_token_stats` (``hidden`` ``[N, H]``, ``weight`` ``[V, H]``).

    ``stats``: any of :data:`POLICY_STATS`. Returns ``{stat: [N] fp32}`` with exactly the requested keys.
    """
    want = _check_stats(stats, POLICY_STATS)
    _check_common(temperature, top_k)
    head = _Head(hidden, weight, bias, temperature, logit_scale, softcap, "model")
    _check_targets(targets, hidden.shape[0], head.vocab)
    return _fused_stats(head, None, targets, want, top_k, chunk_size, backend)
