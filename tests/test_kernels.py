"""Fused token statistics against a plain float64 PyTorch reference that materialises the full logits."""

import math

import pytest
import torch

from progadv_trl.kernels import STATS, token_stats, two_model_token_stats


def _logits64(hidden, weight, bias, temperature, logit_scale, softcap):
    z = hidden.double() @ weight.double().T
    if bias is not None:
        z = z + bias.double()
    z = z * logit_scale
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    return z / temperature


def _reference_stats(zp, zr, targets, top_k):
    """Every statistic from full float64 logits ``zp`` (policy) and ``zr`` (reference), ``[N, V]``."""
    lp, lr = zp.log_softmax(-1), zr.log_softmax(-1)
    p = lp.exp()
    k = min(top_k, zp.shape[-1])
    t = targets.unsqueeze(-1)
    return {
        "logprob": lp.gather(-1, t).squeeze(-1),
        "ref_logprob": lr.gather(-1, t).squeeze(-1),
        "entropy": -(p * lp).sum(-1),
        "kl": (p * (lp - lr)).sum(-1),
        "self_certainty": -lp.mean(-1) - math.log(zp.shape[-1]),
        "topk_confidence": -lp.topk(k, -1).values.mean(-1),
    }


def _inputs(n, h_p, h_r, vocab, *, dtype=torch.float32, bias=False, spread=4.0, seed=0):
    """Random non-zero heads; hidden states scaled so the logits have a standard deviation of about ``spread``."""
    g = torch.Generator().manual_seed(seed)
    wp = torch.randn(vocab, h_p, generator=g)
    wr = torch.randn(vocab, h_r, generator=g)
    hp = torch.randn(n, h_p, generator=g) * spread / math.sqrt(h_p)
    hr = torch.randn(n, h_r, generator=g) * spread / math.sqrt(h_r)
    bp = torch.randn(vocab, generator=g) if bias else None
    br = torch.randn(vocab, generator=g) if bias else None
    targets = torch.randint(0, vocab, (n,), generator=g)
    cast = (lambda x: None if x is None else x.to(dtype))
    return cast(hp), cast(wp), cast(hr), cast(wr), targets, cast(bp), cast(br)


CASES = {
    # name: (n, h_p, h_r, vocab, chunk_size, kwargs)
    "plain": (37, 32, 32, 1000, 96, {}),
    "temperature": (37, 32, 32, 1000, 96, {"temperature": 0.7}),
    "bias": (37, 32, 24, 1000, 128, {"bias": True}),
    "softcap": (37, 32, 32, 1000, 96, {"policy_softcap": 30.0, "reference_softcap": 30.0, "spread": 40.0}),
    "logit_scale": (37, 32, 48, 1000, 96, {"policy_logit_scale": 0.5, "reference_logit_scale": 2.0}),
    "widths_differ": (37, 48, 16, 1000, 192, {"temperature": 1.3}),
    "everything": (37, 32, 48, 1000, 128, {"temperature": 0.7, "bias": True, "policy_softcap": 30.0,
                                           "reference_logit_scale": 1.5, "spread": 20.0}),
    "default_chunk": (300, 32, 32, 5000, None, {}),
    "single_row_block": (5, 16, 16, 777, 64, {}),
    "tiny_vocab": (9, 8, 8, 7, 3, {"top_k": 20}),
    "many_chunks": (64, 16, 16, 16384, 512, {"top_k": 5}),  # pruned top-k merges
}


def _run(case, dtype=torch.float32):
    n, h_p, h_r, vocab, chunk, kw = CASES[case]
    kw = dict(kw)
    spread, bias, top_k = kw.pop("spread", 4.0), kw.pop("bias", False), kw.pop("top_k", 20)
    hp, wp, hr, wr, targets, bp, br = _inputs(n, h_p, h_r, vocab, dtype=dtype, bias=bias, spread=spread)
    out = two_model_token_stats(hp, wp, hr, wr, targets, policy_bias=bp, reference_bias=br, top_k=top_k,
                                chunk_size=chunk, **kw)
    t = kw.get("temperature", 1.0)
    zp = _logits64(hp, wp, bp, t, kw.get("policy_logit_scale", 1.0), kw.get("policy_softcap"))
    zr = _logits64(hr, wr, br, t, kw.get("reference_logit_scale", 1.0), kw.get("reference_softcap"))
    return out, _reference_stats(zp, zr, targets, top_k)


@pytest.mark.parametrize("case", list(CASES))
def test_matches_float64_reference(case):
    out, ref = _run(case)
    assert list(out) == list(STATS)
    for key in STATS:
        assert out[key].dtype == torch.float32 and out[key].shape == ref[key].shape
        torch.testing.assert_close(out[key].double(), ref[key], atol=1e-4, rtol=1e-5, msg=f"{case}: {key}")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case", ["plain", "everything", "tiny_vocab"])
def test_half_precision_inputs(case, dtype):
    # the reference upcasts the same rounded inputs, so only the fp32 accumulation differs
    out, ref = _run(case, dtype)
    for key in STATS:
        assert out[key].dtype == torch.float32
        torch.testing.assert_close(out[key].double(), ref[key], atol=1e-3, rtol=1e-4, msg=f"{case}: {key}")


def test_statistics_are_sane():
    out, _ = _run("plain")
    assert (out["logprob"] <= 0).all() and (out["entropy"] >= 0).all() and (out["kl"] >= -1e-5).all()
    assert (out["self_certainty"] >= 0).all() and (out["topk_confidence"] >= 0).all()


@pytest.mark.parametrize("chunk_size", [None, 64, 100])
def test_identical_models(chunk_size):
    hp, wp, _, _, targets, bp, _ = _inputs(50, 32, 32, 1000, bias=True)
    out = two_model_token_stats(hp, wp, hp, wp, targets, policy_bias=bp, reference_bias=bp, temperature=0.8,
                                chunk_size=chunk_size)
    assert torch.equal(out["logprob"], out["ref_logprob"])
    assert torch.equal(out["kl"], torch.zeros_like(out["kl"]))


@pytest.mark.parametrize("chunk_size", [None, 96])
def test_single_model_matches_two_model(chunk_size):
    hp, wp, hr, wr, targets, bp, br = _inputs(40, 32, 16, 1000, bias=True)
    kw = {"temperature": 0.7, "top_k": 5, "chunk_size": chunk_size}
    two = two_model_token_stats(hp, wp, hr, wr, targets, policy_bias=bp, reference_bias=br, policy_softcap=30.0,
                                policy_logit_scale=2.0, **kw)
    one = token_stats(hp, wp, targets, bias=bp, softcap=30.0, logit_scale=2.0, **kw)
    assert list(one) == ["logprob", "entropy", "self_certainty", "topk_confidence"]
    for key, value in one.items():
        torch.testing.assert_close(value, two[key], atol=1e-6, rtol=0)
    ref = token_stats(hr, wr, targets, bias=br, temperature=0.7, stats=("logprob",), chunk_size=chunk_size)
    torch.testing.assert_close(ref["logprob"], two["ref_logprob"], atol=1e-6, rtol=0)


@pytest.mark.parametrize("stats", [("logprob", "ref_logprob"), ("kl",), ("ref_logprob",), ("topk_confidence",),
                                   ("self_certainty", "entropy"), ()])
def test_subset_of_stats(stats):
    hp, wp, hr, wr, targets, _, _ = _inputs(20, 16, 16, 300)
    out = two_model_token_stats(hp, wp, hr, wr, targets, stats=stats, chunk_size=64)
    assert set(out) == set(stats)
    full = two_model_token_stats(hp, wp, hr, wr, targets, chunk_size=64)
    for key in stats:
        torch.testing.assert_close(out[key], full[key], atol=1e-6, rtol=0)


def test_empty_rows():
    hp, wp, hr, wr, targets, _, _ = _inputs(0, 16, 16, 300)
    out = two_model_token_stats(hp, wp, hr, wr, targets)
    assert all(v.shape == (0,) and v.dtype == torch.float32 for v in out.values())


def test_invalid_inputs():
    hp, wp, hr, wr, targets, _, _ = _inputs(10, 16, 16, 300)
    with pytest.raises(ValueError, match="300.*299|299.*300"):
        two_model_token_stats(hp, wp, hr, wr[:299], targets)
    for bad in (torch.full((10,), 300), torch.full((10,), -1)):
        with pytest.raises(ValueError, match="targets"):
            two_model_token_stats(hp, wp, hr, wr, bad)
        with pytest.raises(ValueError, match="targets"):
            token_stats(hp, wp, bad)
    with pytest.raises(ValueError, match="targets"):
        token_stats(hp, wp, targets[:5])
    with pytest.raises(ValueError, match="unknown"):
        token_stats(hp, wp, targets, stats=("kl",))
    with pytest.raises(ValueError, match="width"):
        token_stats(hp, wr[:, :8], targets)
    with pytest.raises(ValueError):
        token_stats(hp, wp, targets, temperature=0.0)


def test_tied_logits():
    # every logit equal: each chunk ties the running k-th largest value, so the top-k pool keeps overflowing
    g = torch.Generator().manual_seed(1)
    w = torch.randn(1, 16, generator=g).expand(300, 16).contiguous()
    h = torch.randn(7, 16, generator=g)
    out = token_stats(h, w, torch.zeros(7, dtype=torch.long), top_k=10, chunk_size=64)
    log_v = torch.full((7,), math.log(300))
    torch.testing.assert_close(out["logprob"], -log_v)
    torch.testing.assert_close(out["entropy"], log_v)
    torch.testing.assert_close(out["topk_confidence"], log_v)
    torch.testing.assert_close(out["self_certainty"], torch.zeros(7), atol=1e-5, rtol=0)
