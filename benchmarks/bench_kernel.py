"""Time the fused two-model token statistics against bare GEMMs, a naive full-logits version and TRL's kernels.

    /work/venv/bin/python benchmarks/bench_kernel.py --n 2048 --hidden 1024 --vocab 151936 --dtype float32 --repeats 3

Each method runs in a fresh subprocess on the same seeded inputs. Columns: median (and best) wall time of ``--repeats`` runs,
ratio to "floor" (the two plain full GEMMs ``h_p @ W_p.T`` and ``h_r @ W_r.T``, materialised), peak extra resident
memory (``ru_maxrss`` after the runs minus ``ru_maxrss`` once the inputs exist), and the max abs error of ``logprob``
against a float64 reference on the first 64 rows.

Methods: ``floor``; ``naive`` (both fp32 logits materialised, log_softmax, gather, entropy, KL, self-certainty, top-k;
about 6 GiB at full size, ``--skip-naive`` to skip); ``trl`` (``trl.kernels.ChunkedLogProbFunction`` per model with
entropy and mean logits, plus ``ChunkedDivergenceFunction`` with ``beta=1`` for the exact KL(policy || reference); TRL
has no top-k confidence); ``ours`` (``two_model_token_stats`` with every statistic).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import time

import torch

METHODS = ("floor", "naive", "trl", "ours")
ERROR_ROWS = 64


def _inputs(args):
    """Seeded inputs filled block by block, so that building them leaves no transient peak in ``ru_maxrss``."""
    dtype = getattr(torch, args.dtype)
    g = torch.Generator().manual_seed(0)

    def randn(rows, cols, scale=1.0):
        out = torch.empty(rows, cols, dtype=dtype)
        for r in range(0, rows, 8192):
            block = torch.randn(min(8192, rows - r), cols, generator=g)
            out[r:r + block.shape[0]] = block.mul_(scale)
        return out

    # hidden states scaled so the logits spread over several units, as in a real model
    hp = randn(args.n, args.hidden, 4.0 / math.sqrt(args.hidden))
    wp = randn(args.vocab, args.hidden)
    hr = randn(args.n, args.hidden, 4.0 / math.sqrt(args.hidden))
    wr = randn(args.vocab, args.hidden)
    targets = torch.randint(0, args.vocab, (args.n,), generator=g)
    return hp, wp, hr, wr, targets


def _floor(hp, wp, hr, wr, targets, args):
    zp = hp @ wp.T
    del zp
    zr = hr @ wr.T
    del zr
    return None


def _naive(hp, wp, hr, wr, targets, args):
    lp = (hp.float() @ wp.float().T).log_softmax(-1)
    lr = (hr.float() @ wr.float().T).log_softmax(-1)
    out = {"logprob": lp.gather(-1, targets[:, None]).squeeze(-1),
           "ref_logprob": lr.gather(-1, targets[:, None]).squeeze(-1)}
    p = lp.exp()
    out["entropy"] = -(p * lp).sum(-1)
    lr.sub_(lp).neg_()  # lr := lp - lr
    out["kl"] = (p * lr).sum(-1)
    del lr, p
    out["self_certainty"] = -lp.mean(-1) - math.log(lp.shape[-1])
    out["topk_confidence"] = -lp.topk(args.top_k, -1).values.mean(-1)
    return out


def _trl(hp, wp, hr, wr, targets, args):
    from trl.kernels import ChunkedLogProbFunction
    from trl.kernels.chunked_divergence import ChunkedDivergenceFunction

    chunk = args.trl_chunk
    logprob, entropy, _, mean_logits, _ = ChunkedLogProbFunction.apply(
        hp, wp, None, targets, 1.0, chunk, None, 1.0, ("entropy", "mean_logits"))
    ref_logprob, *_ = ChunkedLogProbFunction.apply(hr, wr, None, targets, 1.0, chunk, None, 1.0, ())
    # beta=1: reverse KL(student || teacher) = KL(policy || reference)
    kl, _ = ChunkedDivergenceFunction.apply(hp, wp, None, hr, wr, None, 1.0)
    return {"logprob": logprob, "ref_logprob": ref_logprob, "entropy": entropy, "kl": kl, "mean_logits": mean_logits}


def _ours(hp, wp, hr, wr, targets, args):
    from progadv_trl.kernels import two_model_token_stats

    return two_model_token_stats(hp, wp, hr, wr, targets, top_k=args.top_k, chunk_size=args.chunk_size)


def _reference_logprob(h, w, targets):
    """float64 log-probabilities of the first rows, vocabulary in blocks (no float64 copy of the whole head)."""
    h = h[:ERROR_ROWS].double()
    z = torch.cat([h @ w[s:s + 16384].double().T for s in range(0, w.shape[0], 16384)], -1)
    return z.log_softmax(-1).gather(-1, targets[:ERROR_ROWS, None]).squeeze(-1)


def _child(args):
    torch.set_grad_enabled(False)
    inputs = _inputs(args)
    if args.method == "trl":  # imports count towards the baseline, not the method
        import trl.kernels.chunked_divergence  # noqa: F401
    elif args.method == "ours":
        import progadv_trl.kernels  # noqa: F401
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    fn = {"floor": _floor, "naive": _naive, "trl": _trl, "ours": _ours}[args.method]
    times, out = [], None
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        out = fn(*inputs, args)
        times.append(time.perf_counter() - t0)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    err = None
    if out is not None:
        hp, wp, _, _, targets = inputs
        ref = _reference_logprob(hp, wp, targets)
        err = (out["logprob"][:ERROR_ROWS].double() - ref).abs().max().item()
    print(json.dumps({"time": statistics.median(times), "times": times, "extra_mib": (peak - base) / 1024,
                      "err": err}))


def _cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or "unknown"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=2048)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--vocab", type=int, default=151936)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--top-k", type=int, default=20)
    parser.add_argument("--chunk-size", type=int, default=None, help="ours: vocabulary chunk (default: automatic)")
    parser.add_argument("--trl-chunk", type=int, default=32768, help="TRL's chunk size (its trainer uses 32768)")
    parser.add_argument("--skip-naive", action="store_true")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--method", help=argparse.SUPPRESS)  # internal: run one method in this process
    args = parser.parse_args()
    if args.method:
        return _child(args)

    print(f"CPU: {_cpu_model()} ({os.cpu_count()} logical cores), torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")
    print(f"N={args.n} H={args.hidden} V={args.vocab} dtype={args.dtype} top_k={args.top_k} repeats={args.repeats}\n")
    rows, floor = [], None
    for method in args.methods.split(","):
        if method == "naive" and args.skip_naive:
            rows.append((method, None, "skipped (--skip-naive)"))
            continue
        cmd = [sys.executable, __file__, *sys.argv[1:], "--method", method]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            reason = (proc.stderr.strip().splitlines() or ["failed"])[-1]
            rows.append((method, None, f"could not run: {reason}"))
            continue
        res = json.loads(proc.stdout.strip().splitlines()[-1])
        if method == "floor":
            floor = res["time"]
        rows.append((method, res, ""))

    print("| method | time (s) | vs floor | best (s) | peak extra (MiB) | logprob max abs err | note |")
    print("|---|---|---|---|---|---|---|")
    for method, res, note in rows:
        if res is None:
            print(f"| {method} | - | - | - | - | - | {note} |")
            continue
        ratio = f"{res['time'] / floor:.2f}x" if floor else "-"
        err = "-" if res["err"] is None else f"{res['err']:.1e}"
        if method == "trl":
            note = "no top-k confidence in TRL; three passes over the vocabulary"
        print(f"| {method} | {res['time']:.2f} | {ratio} | {min(res['times']):.2f} | {res['extra_mib']:.0f} | {err} | "
              f"{note} |")


if __name__ == "__main__":
    main()
