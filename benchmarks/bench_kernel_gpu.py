"""GPU benchmark of the fused two-model token statistics (Triton path) against the cuBLAS floor and other kernels.

    python benchmarks/bench_kernel_gpu.py --n 2048 --hidden 1024 --vocab 151936 --dtype bfloat16

Methods: ``floor_fp32`` / ``floor_bf16`` (the two GEMMs ``h_p @ W_p.T`` and ``h_r @ W_r.T`` alone, fp32 or
input-dtype output); ``naive`` (both fp32 logits materialised, log_softmax, every statistic); ``trl``
(``ChunkedLogProbFunction`` per model with entropy and mean logits + ``ChunkedDivergenceFunction`` with ``beta=1``
for KL(policy || reference); no top-k); ``liger`` (Liger-Kernel's fused linear cross-entropy per model,
``reduction="none"``: the two log-probs only); ``ours_*`` (``two_model_token_stats``: every statistic, all but
``topk_confidence``, the two log-probs only). Columns: median ms (``triton.testing.do_bench``), throughput relative to
``floor_fp32`` (floor ms / ms), peak extra CUDA memory (``max_memory_allocated`` minus the inputs), max abs error of
``logprob`` and ``kl`` against float64 on the first 64 rows. ``--sweep`` also times a few kernel tile configurations.
"""

from __future__ import annotations

import argparse
import math

import torch
import triton
from triton.testing import do_bench

ERROR_ROWS = 64
ALL = ("logprob", "ref_logprob", "entropy", "kl", "self_certainty", "topk_confidence")
# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages)
SWEEP = [(128, 64, 64, 8, 3), (128, 128, 64, 8, 3), (128, 64, 64, 8, 4), (64, 128, 64, 4, 3),
         (64, 128, 64, 4, 4), (64, 64, 64, 4, 4)]


def _inputs(args):
    g = torch.Generator(device="cuda").manual_seed(0)
    dtype = getattr(torch, args.dtype)

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, device="cuda") * scale).to(dtype)

    hp = randn(args.n, args.hidden, scale=4.0 / math.sqrt(args.hidden))
    wp = randn(args.vocab, args.hidden)
    hr = randn(args.n, args.hidden, scale=4.0 / math.sqrt(args.hidden))
    wr = randn(args.vocab, args.hidden)
    targets = torch.randint(0, args.vocab, (args.n,), generator=g, device="cuda")
    return hp, wp, hr, wr, targets


def _mm_fp32(a, b):
    try:
        return torch.mm(a, b, out_dtype=torch.float32)
    except TypeError:  # torch without out_dtype
        return torch.mm(a.float(), b.float())


def floor_fp32(hp, wp, hr, wr, targets, args):
    _mm_fp32(hp, wp.T)
    _mm_fp32(hr, wr.T)


def floor_bf16(hp, wp, hr, wr, targets, args):
    torch.mm(hp, wp.T)
    torch.mm(hr, wr.T)


def naive(hp, wp, hr, wr, targets, args):
    lp = _mm_fp32(hp, wp.T).log_softmax(-1)
    lr = _mm_fp32(hr, wr.T).log_softmax(-1)
    t = targets[:, None]
    out = {"logprob": lp.gather(-1, t).squeeze(-1), "ref_logprob": lr.gather(-1, t).squeeze(-1)}
    p = lp.exp()
    out["entropy"] = -(p * lp).sum(-1)
    out["kl"] = (p * (lp - lr)).sum(-1)
    out["self_certainty"] = -lp.mean(-1) - math.log(lp.shape[-1])
    out["topk_confidence"] = -lp.topk(args.top_k, -1).values.mean(-1)
    return out


def trl(hp, wp, hr, wr, targets, args):
    from trl.kernels import ChunkedLogProbFunction
    from trl.kernels.chunked_divergence import ChunkedDivergenceFunction

    logprob, entropy, _, mean_logits, _ = ChunkedLogProbFunction.apply(
        hp, wp, None, targets, 1.0, args.trl_chunk, None, 1.0, ("entropy", "mean_logits"))
    ref_logprob, *_ = ChunkedLogProbFunction.apply(hr, wr, None, targets, 1.0, args.trl_chunk, None, 1.0, ())
    kl, _ = ChunkedDivergenceFunction.apply(hp, wp, None, hr, wr, None, 1.0)  # beta=1: KL(policy || reference)
    return {"logprob": logprob, "ref_logprob": ref_logprob, "entropy": entropy, "kl": kl}


def liger(hp, wp, hr, wr, targets, args):
    from liger_kernel.ops.fused_linear_cross_entropy import fused_linear_cross_entropy_forward

    out = {}
    for key, h, w in (("logprob", hp, wp), ("ref_logprob", hr, wr)):
        loss = fused_linear_cross_entropy_forward(h, w, targets, reduction="none", compute_gradients=False)[0]
        out[key] = -loss
    return out


def _ours(stats):
    def run(hp, wp, hr, wr, targets, args):
        from progadv_trl.kernels import two_model_token_stats

        return two_model_token_stats(hp, wp, hr, wr, targets, stats=stats, top_k=args.top_k, backend="triton")
    return run


METHODS = {"floor_fp32": floor_fp32, "floor_bf16": floor_bf16, "naive": naive, "trl": trl, "liger": liger,
           "ours_all": _ours(ALL), "ours_no_topk": _ours(ALL[:-1]), "ours_logprobs": _ours(ALL[:2])}


def _reference(hp, wp, hr, wr, targets):
    """float64 ``logprob`` and ``kl`` of the first rows (vocabulary in blocks: no float64 copy of a whole head)."""
    def logits(h, w):
        h = h[:ERROR_ROWS].double()
        return torch.cat([h @ w[s:s + 16384].double().T for s in range(0, w.shape[0], 16384)], -1)

    lp, lr = logits(hp, wp).log_softmax(-1), logits(hr, wr).log_softmax(-1)
    return {"logprob": lp.gather(-1, targets[:ERROR_ROWS, None]).squeeze(-1),
            "kl": (lp.exp() * (lp - lr)).sum(-1)}


def _measure(fn, inputs, args):
    """(median ms, peak extra MiB, outputs)."""
    fn(*inputs, args)  # compile / warm up
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    out = fn(*inputs, args)
    torch.cuda.synchronize()
    peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    ms = do_bench(lambda: fn(*inputs, args), warmup=args.warmup, rep=args.rep, return_mode="median")
    return ms, peak, out


def _error(out, ref, key):
    if not out or key not in out:
        return "-"
    return f"{(out[key][:ERROR_ROWS].double() - ref[key]).abs().max().item():.1e}"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=2048)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--vocab", type=int, default=151936)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    parser.add_argument("--top-k", type=int, default=20)
    parser.add_argument("--trl-chunk", type=int, default=32768, help="TRL's chunk size (its trainer uses 32768)")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--warmup", type=int, default=25, help="do_bench warm-up (ms)")
    parser.add_argument("--rep", type=int, default=200, help="do_bench repetition time (ms)")
    parser.add_argument("--sweep", action="store_true", help="also time the tile configurations in SWEEP")
    args = parser.parse_args()
    torch.set_grad_enabled(False)

    from progadv_trl.kernels import triton_fold

    print(f"GPU: {torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}, "
          f"kernel config {triton_fold.DEFAULT_CONFIG} (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages)")
    print(f"N={args.n} H={args.hidden} V={args.vocab} dtype={args.dtype} top_k={args.top_k}")
    inputs = _inputs(args)
    ref = _reference(*inputs)
    flops = 2 * 2 * args.n * args.hidden * args.vocab
    rows, floor = [], None
    for name in args.methods.split(","):
        try:
            ms, peak, out = _measure(METHODS[name], inputs, args)
        except Exception as exc:  # a missing package or an unsupported setting: report and go on
            rows.append(f"| {name} | - | - | - | - | - | - | {type(exc).__name__}: {str(exc)[:80]} |")
            continue
        floor = floor or (ms if name == "floor_fp32" else None)
        ratio = f"{floor / ms:.2f}" if floor else "-"
        rows.append(f"| {name} | {ms:.3f} | {ratio} | {flops / ms / 1e9:.0f} | {peak:.0f} | "
                    f"{_error(out, ref, 'logprob')} | {_error(out, ref, 'kl')} | |")
        del out
        torch.cuda.empty_cache()
    print("\n| method | ms | floor / ms | GEMM TFLOP/s | peak extra (MiB) | logprob err | kl err | note |")
    print("|---|---|---|---|---|---|---|---|")
    print("\n".join(rows), flush=True)

    if args.sweep:
        print("\n| config (BM, BN, BK, warps, stages) | all stats ms | no top-k ms | floor / ms (all, no top-k) |")
        print("|---|---|---|---|")
        default = triton_fold.DEFAULT_CONFIG
        for config in SWEEP:
            triton_fold.DEFAULT_CONFIG = config
            try:
                t_all = _measure(METHODS["ours_all"], inputs, args)[0]
                t_no = _measure(METHODS["ours_no_topk"], inputs, args)[0]
            except Exception as exc:
                print(f"| {config} | - | - | {type(exc).__name__}: {str(exc)[:80]} |", flush=True)
                continue
            r = f"{floor / t_all:.2f}, {floor / t_no:.2f}" if floor else "-"
            print(f"| {config} | {t_all:.3f} | {t_no:.3f} | {r} |", flush=True)
        triton_fold.DEFAULT_CONFIG = default


if __name__ == "__main__":
    main()
