"""The Triton path of the fused token statistics against the float64 reference of ``test_kernels.py``.

Runs (a) on CPU through Triton's interpreter at tiny shapes: ``test_under_triton_interpreter`` reruns this module in a
subprocess with ``TRITON_INTERPRET=1`` (it must be set before Triton is first imported, which another test module of
this process may already have done), and (b) on CUDA at larger shapes, bf16 included.
"""

import importlib.util
import math
import os
import subprocess
import sys

import pytest
import torch

from progadv_trl.kernels import STATS, token_stats, two_model_token_stats
from test_kernels import _inputs, _logits64, _reference_stats

HAS_TRITON = importlib.util.find_spec("triton") is not None
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
ON_CUDA = HAS_TRITON and not INTERPRETED and torch.cuda.is_available()
DEVICE = "cuda" if ON_CUDA else "cpu"
needs_kernel = pytest.mark.skipif(not (INTERPRETED or ON_CUDA),
                                  reason="needs CUDA, or TRITON_INTERPRET=1 (test_under_triton_interpreter runs it so)")

# name: (kwargs, tiny sizes, large sizes); sizes (n, h_p, h_r, vocab) are odd ones that divide no block size
CASES = {
    "plain": ({}, (13, 32, 32, 300), (1000, 256, 256, 32003)),
    "temperature": ({"temperature": 0.7}, (13, 32, 32, 300), (777, 256, 256, 32003)),
    "bias_widths_differ": ({"bias": True}, (11, 32, 24, 257), (1000, 256, 192, 20011)),
    "softcap": ({"policy_softcap": 30.0, "reference_softcap": 30.0, "spread": 40.0},
                (13, 32, 32, 300), (1000, 256, 256, 20011)),
    "logit_scale": ({"policy_logit_scale": 0.5, "reference_logit_scale": 2.0},
                    (9, 32, 16, 300), (513, 256, 128, 20011)),
    "everything": ({"temperature": 0.7, "bias": True, "policy_softcap": 30.0, "reference_logit_scale": 1.5,
                    "spread": 20.0}, (16, 24, 32, 291), (1000, 200, 256, 32003)),
    "tiny_vocab": ({"top_k": 20}, (9, 8, 8, 7), (9, 8, 8, 7)),
}
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
TOL = {torch.float32: (1e-4, 1e-5), torch.float16: (1e-3, 1e-4), torch.bfloat16: (1e-3, 1e-4)}


@pytest.fixture
def triton_calls(monkeypatch):
    """Counts the calls that reach the Triton path, so a silent fallback to torch fails the test."""
    from progadv_trl.kernels import triton_fold

    calls = []
    inner = triton_fold.fold
    monkeypatch.setattr(triton_fold, "fold", lambda *a, **k: calls.append(1) or inner(*a, **k))
    return calls


def _to(device, *tensors):
    return [None if t is None else t.to(device) for t in tensors]


def _run(case, dtype):
    kw, tiny, large = CASES[case]
    (n, h_p, h_r, vocab), kw = (large if ON_CUDA else tiny), dict(kw)
    spread, bias, top_k = kw.pop("spread", 4.0), kw.pop("bias", False), kw.pop("top_k", 20)
    hp, wp, hr, wr, targets, bp, br = _inputs(n, h_p, h_r, vocab, dtype=dtype, bias=bias, spread=spread)
    out = two_model_token_stats(*_to(DEVICE, hp, wp, hr, wr, targets), policy_bias=_to(DEVICE, bp)[0],
                                reference_bias=_to(DEVICE, br)[0], top_k=top_k, backend="triton", **kw)
    t = kw.get("temperature", 1.0)
    zp = _logits64(hp, wp, bp, t, kw.get("policy_logit_scale", 1.0), kw.get("policy_softcap"))
    zr = _logits64(hr, wr, br, t, kw.get("reference_logit_scale", 1.0), kw.get("reference_softcap"))
    return out, _reference_stats(zp, zr, targets, top_k)


@needs_kernel
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("case", list(CASES))
def test_matches_float64_reference(case, dtype, triton_calls):
    dtype = DTYPES[dtype]
    if INTERPRETED and dtype == torch.bfloat16:
        pytest.skip("Triton's interpreter computes bf16 tl.dot wrongly (silently); bf16 runs on CUDA only")
    if INTERPRETED and dtype == torch.float16 and case not in ("plain", "everything"):
        pytest.skip("interpreter: fp16 on two cases only, to keep the run short")
    out, ref = _run(case, dtype)
    assert triton_calls and list(out) == list(STATS)
    atol, rtol = TOL[dtype]
    for key in STATS:
        assert out[key].dtype == torch.float32 and out[key].device.type == DEVICE
        torch.testing.assert_close(out[key].cpu().double(), ref[key], atol=atol, rtol=rtol, msg=f"{case}: {key}")


@needs_kernel
@pytest.mark.parametrize("stats", [("logprob", "ref_logprob"), ("kl",), ("ref_logprob",), ("topk_confidence",),
                                   ("self_certainty", "entropy")])
def test_subset_of_stats(stats, triton_calls):
    hp, wp, hr, wr, targets, bp, br = _to(DEVICE, *_inputs(14, 32, 16, 300, bias=True))
    kw = {"policy_bias": bp, "reference_bias": br, "temperature": 0.8, "policy_softcap": 20.0, "backend": "triton"}
    out = two_model_token_stats(hp, wp, hr, wr, targets, stats=stats, **kw)
    full = two_model_token_stats(hp, wp, hr, wr, targets, **kw)
    assert set(out) == set(stats) and len(triton_calls) == 2
    for key in stats:
        torch.testing.assert_close(out[key], full[key], atol=1e-5, rtol=0)


@needs_kernel
def test_single_model(triton_calls):
    hp, wp, _, _, targets, bp, _ = _to(DEVICE, *_inputs(15, 32, 16, 300, bias=True))
    kw = {"temperature": 0.7, "top_k": 5, "backend": "triton"}
    one = token_stats(hp, wp, targets, bias=bp, softcap=30.0, logit_scale=2.0, **kw)
    two = two_model_token_stats(hp, wp, hp, wp, targets, policy_bias=bp, reference_bias=bp, policy_softcap=30.0,
                                reference_softcap=30.0, policy_logit_scale=2.0, reference_logit_scale=2.0, **kw)
    assert list(one) == ["logprob", "entropy", "self_certainty", "topk_confidence"] and len(triton_calls) == 2
    for key, value in one.items():
        torch.testing.assert_close(value, two[key], atol=1e-5, rtol=0)
    torch.testing.assert_close(two["kl"], torch.zeros_like(two["kl"]), atol=1e-5, rtol=0)


@needs_kernel
def test_tied_logits(triton_calls):
    # every logit equal: each tile ties the running k-th largest value
    g = torch.Generator().manual_seed(1)
    w = torch.randn(1, 16, generator=g).expand(300, 16).contiguous()
    h = torch.randn(7, 16, generator=g)
    out = token_stats(*_to(DEVICE, h, w, torch.zeros(7, dtype=torch.long)), top_k=10, backend="triton")
    log_v = torch.full((7,), math.log(300))
    assert triton_calls
    torch.testing.assert_close(out["logprob"].cpu(), -log_v)
    torch.testing.assert_close(out["entropy"].cpu(), log_v)
    torch.testing.assert_close(out["topk_confidence"].cpu(), log_v)
    torch.testing.assert_close(out["self_certainty"].cpu(), torch.zeros(7), atol=1e-5, rtol=0)


@pytest.mark.slow
@pytest.mark.skipif(not HAS_TRITON or INTERPRETED, reason="needs triton; runs the interpreted tests in a subprocess")
def test_under_triton_interpreter():
    env = {**os.environ, "TRITON_INTERPRET": "1", "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-2000:]
    assert " passed" in proc.stdout and " failed" not in proc.stdout


def test_default_backend_is_torch_on_every_device(monkeypatch):
    """Until the Triton path has passed these tests on a GPU, only an explicit backend="triton" runs it."""
    from progadv_trl.kernels import constants

    assert not constants.TRITON_VALIDATED
    hp, wp, hr, wr, targets, bp, br = _to(DEVICE, *_inputs(14, 32, 16, 300, bias=True))
    if HAS_TRITON:
        from progadv_trl.kernels import triton_fold

        monkeypatch.setattr(triton_fold, "fold", lambda *a, **k: pytest.fail("Triton ran by default"))
    for backend in ("auto", "torch"):
        two_model_token_stats(hp, wp, hr, wr, targets, backend=backend)
        token_stats(hp, wp, targets, backend=backend)


@pytest.mark.skipif(not HAS_TRITON or INTERPRETED or ON_CUDA, reason="CPU tensors without the interpreter")
def test_explicit_triton_on_cpu_tensors_refuses():
    hp, wp, hr, wr, targets, _, _ = _inputs(5, 8, 8, 30)
    with pytest.raises(ValueError, match="CUDA"):
        two_model_token_stats(hp, wp, hr, wr, targets, backend="triton")
    with pytest.raises(ValueError, match="backend"):
        token_stats(hp, wp, targets, backend="cuda")
