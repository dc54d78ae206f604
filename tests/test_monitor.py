"""The monitor without a Trainer: reference caching, disk snapshots, drift numbers, decay warnings."""

import gc
import weakref

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from progadv_trl import ProgressAdvantageConfig, ProgressAdvantageMonitor
from progadv_trl.drift import DecayDetector, token_drift, weight_drift
from progadv_trl.reference import snapshot

from conftest import sample_trajectories


def _models(tiny_dir):
    tok = AutoTokenizer.from_pretrained(tiny_dir / "policy")
    return (AutoModelForCausalLM.from_pretrained(tiny_dir / "policy"),
            AutoModelForCausalLM.from_pretrained(tiny_dir / "reference"), tok)


def test_cached_disk_snapshot_matches_uncached_and_skips_reference_forwards(tiny_dir, tmp_path):
    policy, reference, tok = _models(tiny_dir)
    ref = snapshot(reference, tmp_path / "snap", "disk")
    loaded, forwards = [], []  # weak references to each reference model loaded from disk; its forward calls
    load = ref.view

    def counting_load():
        view = load()
        loaded.append(weakref.ref(view.model))
        view.model.get_input_embeddings().register_forward_hook(lambda *_: forwards.append(1))
        return view

    ref.view = counting_load
    cached = ProgressAdvantageMonitor(ref, tok, ProgressAdvantageConfig(export=False), heldout=sample_trajectories())
    plain = ProgressAdvantageMonitor(reference, tok, ProgressAdvantageConfig(export=False, reference_cache=False),
                                     heldout=sample_trajectories())
    a1, b1 = cached.evaluate(policy, 0), plain.evaluate(policy, 0)
    gc.collect()
    n_forwards = len(forwards)
    assert len(loaded) == 1 and n_forwards > 0 and loaded[0]() is None  # loaded once, freed after the evaluation
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(0.01 * torch.randn_like(p))
    a2, b2 = cached.evaluate(policy, 1), plain.evaluate(policy, 1)
    assert len(loaded) == 1 and len(forwards) == n_forwards  # no load, no reference forward: the cache answered
    for a, b in ((a1, b1), (a2, b2)):
        for key in ("progadv/kl/mean", "progadv/log_ratio/mean", "progadv/auroc", "progadv/weight_drift"):
            assert a[key] == pytest.approx(b[key], abs=1e-5), key


def test_drift_numbers_by_hand():
    r = torch.tensor([0.5, -0.5, 1.0, float("nan")])
    d = token_drift(r, torch.tensor([0.1, 0.2, 0.3, float("nan")]))
    assert d["log_ratio/mean"] == pytest.approx(1 / 3) and d["n_tokens"] == 3
    k3 = sum(torch.exp(-x) + x - 1 for x in r[:3]).item() / 3
    assert d["kl_k3"] == pytest.approx(k3) and d["kl/max"] == pytest.approx(0.3)
    a, b = torch.tensor([3.0, 4.0]), torch.tensor([0.0, 0.0])
    assert weight_drift([(a, torch.tensor([3.0, 0.0]))]) == pytest.approx(4 / 3)
    assert weight_drift([(a, a)]) == 0.0 and torch.isnan(torch.tensor(weight_drift([(a, b)])))


def test_decay_detector_names_the_best_step(caplog):
    det = DecayDetector(margin=0.05)
    assert det.update(0, 0.8) == (True, None)
    assert det.update(10, 0.9)[0]
    assert det.update(20, 0.87) == (False, None)
    best, warning = det.update(30, 0.8)
    assert not best and "step 10" in warning and "0.900" in warning


def test_monitor_needs_heldout(tiny_dir):
    _, reference, tok = _models(tiny_dir)
    with pytest.raises(ValueError, match="held-out"):
        ProgressAdvantageMonitor(reference, tok, ProgressAdvantageConfig())
