"""Triton backend of :mod:`.fused_stats`: the online fold fused into the matmul (CUDA).

Each program owns ``BLOCK_M`` rows and one slice of the vocabulary (split-V grid). For every ``BLOCK_N`` vocabulary
columns it computes the logit tile of both models with ``tl.dot`` (fp32 accumulation), applies the transform and
updates per-row accumulators in registers; the ``[N, V]`` logits never leave the chip. A small torch merge combines
the slices. Everything in the kernel is in base-2 units ``u = z * log2(e)`` (one multiply folded into the scale)::

    m = max u,  S = sum e,  A = sum e * u,  B = sum e * u_r,  Z = sum u      (e = 2^(u - m), per slice)
    merge:  M = max_s m_s,  S = sum_s 2^(m_s - M) S_s  (A, B alike),  logZ = (M + log2 S) * ln 2

Top-k (``topk_confidence``): each row keeps its ``k`` largest values in a ``[BLOCK_M, KP]`` register array
(``KP = next_pow2(k)``, unused slots ``+inf``) with ``tau`` = its minimum. Per tile, the values above ``tau`` are
moved in by repeated max-extraction, ``min(k, max over rows of #{u > tau})`` rounds (zero for most tiles once
``tau`` is high, but a block of rows pays for its busiest row). The merge takes the top-k of the slices' lists.

Target logits come from a ``[N, H]`` gather in torch (:meth:`.heads.Head.target_logits`). Not supported here, so left to
the torch path by :func:`supports`: non-CUDA tensors (unless forced), hidden and weight dtypes that differ or are not
fp32/fp16/bf16, ``k > 64``. fp32 inputs use IEEE fp32 ``tl.dot`` (no TF32), correct but far from the bf16 speed.
``chunk_size`` is ignored. Runs only when asked for (``backend="triton"``); CPU tensors need ``TRITON_INTERPRET=1``
set before Triton is imported.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .finish import Folded, Plan
from .heads import Head

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453
MAX_TOP_K = 64
# Accumulator rows of the partial-results tensor ``[len(_ACC), SPLIT, N]``
_ACC = ("m", "s", "a", "b", "z", "m_r", "s_r")
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages)
DEFAULT_CONFIG = (16, 32, 16, 1, 1) if INTERPRETED else (128, 64, 64, 8, 3)
_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@triton.jit
def _logit_tile(h_ptr, w_ptr, b_ptr, rows, cols, K, stride_h, stride_w, pre, post,
                HAS_BIAS: tl.constexpr, SOFTCAP: tl.constexpr, IEEE: tl.constexpr, EVEN_K: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """``u = post * tanh(pre * y)`` (softcap) or ``pre * y``, ``y = h[rows] @ w[cols].T + b[cols]``: ``[BM, BN]`` fp32.

    ``rows`` and ``cols`` are clamped into range by the caller, so only the hidden width needs a mask.
    """
    ks = tl.arange(0, BLOCK_K)
    h_ptrs = h_ptr + rows[:, None].to(tl.int64) * stride_h + ks[None, :]
    w_ptrs = w_ptr + cols[None, :].to(tl.int64) * stride_w + ks[:, None]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        if EVEN_K:
            h = tl.load(h_ptrs)
            w = tl.load(w_ptrs)
        else:
            h = tl.load(h_ptrs, mask=(k0 + ks)[None, :] < K, other=0.0)
            w = tl.load(w_ptrs, mask=(k0 + ks)[:, None] < K, other=0.0)
        if IEEE:
            acc = tl.dot(h, w, acc, input_precision="ieee")
        else:
            acc = tl.dot(h, w, acc)
        h_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
    if HAS_BIAS:
        acc += tl.load(b_ptr + cols)[None, :]
    if SOFTCAP:
        return post * (2.0 * tl.sigmoid(2.0 * pre * acc) - 1.0)  # tanh(x) = 2 sigmoid(2x) - 1
    return pre * acc


@triton.jit
def _fold_kernel(
    hp_ptr, wp_ptr, bp_ptr, hr_ptr, wr_ptr, br_ptr, part_ptr, top_ptr,
    N, V, KP_DIM, KR_DIM, cols_per_split,
    stride_hp, stride_wp, stride_hr, stride_wr,
    pre_p, post_p, pre_r, post_r,
    BIAS_P: tl.constexpr, BIAS_R: tl.constexpr, SOFTCAP_P: tl.constexpr, SOFTCAP_R: tl.constexpr,
    IEEE_P: tl.constexpr, IEEE_R: tl.constexpr, EVEN_KP: tl.constexpr, EVEN_KR: tl.constexpr,
    HAS_R: tl.constexpr, HAS_A: tl.constexpr, HAS_B: tl.constexpr, HAS_Z: tl.constexpr,
    TOP_K: tl.constexpr, KP: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Fold one (row block, vocabulary slice); writes ``part[acc, slice, rows]`` and ``top[slice, rows, :TOP_K]``."""
    n_row_blocks = tl.cdiv(N, BLOCK_M)
    pid = tl.program_id(0)
    # row blocks vary fastest: the programs in flight share each weight tile through L2
    rb = pid % n_row_blocks
    split = pid // n_row_blocks
    rows = rb * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < N
    rows_in = tl.where(row_ok, rows, N - 1)
    v_begin = split * cols_per_split
    v_end = tl.minimum(v_begin + cols_per_split, V)

    m = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    s = tl.zeros((BLOCK_M,), tl.float32)
    a = tl.zeros((BLOCK_M,), tl.float32)
    b = tl.zeros((BLOCK_M,), tl.float32)
    zsum = tl.zeros((BLOCK_M,), tl.float32)
    m_r = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    s_r = tl.zeros((BLOCK_M,), tl.float32)
    slots = tl.arange(0, KP)
    top = tl.where(slots[None, :] < TOP_K, float("-inf"), float("inf")) + tl.zeros((BLOCK_M, KP), tl.float32)
    tau = tl.full((BLOCK_M,), float("-inf"), tl.float32)

    offs_n = tl.arange(0, BLOCK_N)
    for v0 in range(v_begin, v_end, BLOCK_N):
        cols = v0 + offs_n
        col_ok = cols < v_end
        cols_in = tl.where(col_ok, cols, v_end - 1)
        up = _logit_tile(hp_ptr, wp_ptr, bp_ptr, rows_in, cols_in, KP_DIM, stride_hp, stride_wp, pre_p, post_p,
                         BIAS_P, SOFTCAP_P, IEEE_P, EVEN_KP, BLOCK_M, BLOCK_N, BLOCK_K)
        up_m = tl.where(col_ok[None, :], up, float("-inf"))
        m_new = tl.maximum(m, tl.max(up_m, 1))
        rescale = tl.exp2(m - m_new)
        e = tl.exp2(up_m - m_new[:, None])  # 0 on masked columns, where ``up`` itself is finite
        s = s * rescale + tl.sum(e, 1)
        if HAS_A:
            a = a * rescale + tl.sum(e * up, 1)
        if HAS_Z:
            zsum += tl.sum(tl.where(col_ok[None, :], up, 0.0), 1)
        if HAS_R:
            ur = _logit_tile(hr_ptr, wr_ptr, br_ptr, rows_in, cols_in, KR_DIM, stride_hr, stride_wr, pre_r, post_r,
                             BIAS_R, SOFTCAP_R, IEEE_R, EVEN_KR, BLOCK_M, BLOCK_N, BLOCK_K)
            if HAS_B:
                b = b * rescale + tl.sum(e * ur, 1)
            ur_m = tl.where(col_ok[None, :], ur, float("-inf"))
            mr_new = tl.maximum(m_r, tl.max(ur_m, 1))
            s_r = s_r * tl.exp2(m_r - mr_new) + tl.sum(tl.exp2(ur_m - mr_new[:, None]), 1)
            m_r = mr_new
        m = m_new
        if TOP_K > 0:
            rounds = tl.minimum(tl.max(tl.sum((up_m > tau[:, None]).to(tl.int32), 1), 0), TOP_K)
            for _ in range(rounds):
                x = tl.max(up_m, 1)
                idx = tl.argmax(up_m, 1)
                slot = tl.argmin(top, 1)
                hit = (slots[None, :] == slot[:, None]) & (x > tau)[:, None]
                top = tl.where(hit, x[:, None], top)
                tau = tl.min(top, 1)
                up_m = tl.where(offs_n[None, :] == idx[:, None], float("-inf"), up_m)

    out = part_ptr + split * N + rows
    plane = tl.num_programs(0) // n_row_blocks * N
    tl.store(out, m, mask=row_ok)
    tl.store(out + plane, s, mask=row_ok)
    if HAS_A:
        tl.store(out + 2 * plane, a, mask=row_ok)
    if HAS_B:
        tl.store(out + 3 * plane, b, mask=row_ok)
    if HAS_Z:
        tl.store(out + 4 * plane, zsum, mask=row_ok)
    if HAS_R:
        tl.store(out + 5 * plane, m_r, mask=row_ok)
        tl.store(out + 6 * plane, s_r, mask=row_ok)
    if TOP_K > 0:
        top_out = top_ptr + (split * N + rows)[:, None].to(tl.int64) * TOP_K + slots[None, :]
        tl.store(top_out, top, mask=row_ok[:, None] & (slots[None, :] < TOP_K))


def supports(policy, reference, top_k: int) -> bool:
    """Whether this backend handles the inputs (:class:`.heads.Head` objects)."""
    heads = [policy] if reference is None else [policy, reference]
    return top_k <= MAX_TOP_K and all(
        h.raw_hidden.dtype in _DTYPES and h.raw_hidden.dtype == h.weight.dtype for h in heads)


_SM_COUNT: dict[int, int] = {}


def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 4  # interpreter: still several slices
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _SM_COUNT:
        _SM_COUNT[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return _SM_COUNT[index]


def _num_splits(n_row_blocks: int, n_tiles: int, sms: int) -> int:
    """Vocabulary slices minimising the makespan ``waves * tiles per slice`` (one program per SM at a time).

    The smallest count within 1 % of the optimum wins (fewer partials, longer streams per program).
    """
    cost = {s: -(-n_row_blocks * s // sms) * -(-n_tiles // s) for s in range(1, min(n_tiles, 8 * sms) + 1)}
    best = min(cost.values())
    return min(s for s, c in cost.items() if c <= best * 1.01)


def _head_args(head):
    """(hidden, weight, fp32 bias or None, pre, post, softcap?) in the kernel's base-2 units."""
    hidden = head.raw_hidden if head.raw_hidden.stride(-1) == 1 else head.raw_hidden.contiguous()
    weight = head.weight if head.weight.stride(-1) == 1 else head.weight.contiguous()
    bias = None if head.raw_bias is None else head.raw_bias.float().contiguous()
    if head.post is None:
        return hidden, weight, bias, head.pre * LOG2E, 1.0, False
    return hidden, weight, bias, head.pre, head.post * LOG2E, True


def _launch(policy: Head, reference: Head | None, *, a=False, b=False, zsum=False, top_k=0, config=None,
            splits=None) -> Folded:
    """Run the kernel and merge the slices into natural units.

    ``policy`` is the folded model (``logZ``, ``S``; ``A`` if ``a``, the mean logit if ``zsum``, its top-k values
    ``[N, top_k]`` if ``top_k``); ``reference`` (optional) adds ``logZ_r`` and, if ``b``, ``B``.
    """
    bm, bn, bk, warps, stages = config or DEFAULT_CONFIG
    hp, wp, bp, pre_p, post_p, cap_p = _head_args(policy)
    n, vocab, device = hp.shape[0], wp.shape[0], hp.device
    if reference is not None:
        hr, wr, br, pre_r, post_r, cap_r = _head_args(reference)
    else:
        hr, wr, br, pre_r, post_r, cap_r = hp, wp, None, 1.0, 1.0, False
    n_row_blocks, n_tiles = triton.cdiv(n, bm), triton.cdiv(vocab, bn)
    splits = splits or _num_splits(n_row_blocks, n_tiles, _sm_count(device))
    cols_per_split = triton.cdiv(n_tiles, splits) * bn
    splits = triton.cdiv(vocab, cols_per_split)
    part = torch.empty(len(_ACC), splits, n, device=device, dtype=torch.float32)
    top = torch.empty(splits, n, max(top_k, 1), device=device, dtype=torch.float32)
    _fold_kernel[(n_row_blocks * splits,)](
        hp, wp, bp if bp is not None else hp, hr, wr, br if br is not None else hr, part, top,
        n, vocab, hp.shape[1], hr.shape[1], cols_per_split,
        hp.stride(0), wp.stride(0), hr.stride(0), wr.stride(0),
        pre_p, post_p, pre_r, post_r,
        BIAS_P=bp is not None, BIAS_R=br is not None, SOFTCAP_P=cap_p, SOFTCAP_R=cap_r,
        IEEE_P=hp.dtype == torch.float32, IEEE_R=hr.dtype == torch.float32,
        EVEN_KP=hp.shape[1] % bk == 0, EVEN_KR=hr.shape[1] % bk == 0,
        HAS_R=reference is not None, HAS_A=a, HAS_B=b, HAS_Z=zsum,
        TOP_K=top_k, KP=max(16, triton.next_power_of_2(top_k)),
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=warps, num_stages=stages,
    )
    m, s, acc_a, acc_b, acc_z, m_r, s_r = part.unbind(0)
    big_m = m.amax(0)
    w = torch.exp2(m - big_m)
    s_tot = (w * s).sum(0)
    out = Folded(log_z=(big_m + torch.log2(s_tot)) * LN2, s=s_tot)
    if a:
        out.a = (w * acc_a).sum(0) * LN2
    if b:
        out.b = (w * acc_b).sum(0) * LN2
    if zsum:
        out.mean = acc_z.sum(0) * LN2 / vocab
    if top_k:
        out.top = top.permute(1, 0, 2).reshape(n, -1).topk(top_k, -1, sorted=False).values * LN2
    if reference is not None:
        big_mr = m_r.amax(0)
        out.ref_log_z = (big_mr + torch.log2((torch.exp2(m_r - big_mr) * s_r).sum(0))) * LN2
    return out


def fold(policy: Head, reference: Head | None, plan: Plan, **kernel_options) -> Folded:
    """Fold what ``plan`` asks for (one kernel launch); ``kernel_options``: ``config``, ``splits`` of the launch."""
    if plan.policy:
        return _launch(policy, reference if plan.reference else None, a=plan.a, b=plan.b, zsum=plan.mean,
                       top_k=plan.top_k, **kernel_options)
    if plan.reference:
        return Folded(ref_log_z=_launch(reference, None, **kernel_options).log_z)
    return Folded()
