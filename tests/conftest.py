"""Tiny local checkpoints shared by the tests: built once per session, saved and reloaded like real models."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from progadv_trl.data import Message, ToolCall, Trajectory  # noqa: E402
from progadv_trl.tiny import build_model, build_tokenizer, perturbed_copy  # noqa: E402

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """``reference/`` and ``policy/`` (Qwen2, tied head) with one tokenizer; ``llama_ref``/``llama_policy`` (untied)."""
    root = tmp_path_factory.mktemp("tiny")
    torch.manual_seed(0)
    tok = build_tokenizer()
    ref = build_model(tok, root / "reference", arch="qwen2", seed=0)
    perturbed_copy(ref, root / "policy", scale=0.3, seed=1)
    tok.save_pretrained(root / "policy")
    lref = build_model(tok, root / "llama_ref", arch="llama", seed=2, tie_word_embeddings=False)
    perturbed_copy(lref, root / "llama_policy", scale=0.3, seed=3)
    tok.save_pretrained(root / "llama_policy")
    return root


def sample_trajectories():
    tc = (ToolCall("search", {"query": "flights Paris Rome"}),)
    return [
        Trajectory([Message("system", "You are a travel agent."), Message("user", "Book the cheapest flight."),
                    Message("assistant", "I will search for flights first.", tc),
                    Message("tool", "three flights found, prices 120, 95 and 143 euros."),
                    Message("assistant", "The cheapest flight costs 95 euros. I book it now.")],
                   id="a", group="g1", reward=1.0),
        Trajectory([Message("user", "Book the cheapest flight."), Message("assistant", "I book the first flight."),
                    Message("tool", "booked, 120 euros"), Message("assistant", "Done.")],
                   id="b", group="g1", reward=0.0, mistake_step=1),
        Trajectory([Message("user", "What is 2 + 2?"), Message("assistant", "The answer is 4.")],
                   id="c", group="g2", reward=1.0),
        Trajectory([Message("user", "What is 2 + 2?"), Message("assistant", "Step 1: add.\n\nThe answer is 5.")],
                   id="d", group="g2", reward=0.0, mistake_step=1),
    ]


@pytest.fixture
def trajectories():
    return sample_trajectories()


def many_trajectories(n: int, prefix: str = "t") -> list[Trajectory]:
    """``n`` copies of the sample trajectories in turn, with ids ``<prefix>0``, ``<prefix>1``, ..."""
    out = []
    for i in range(n):
        t = sample_trajectories()[i % 4]
        t.id = f"{prefix}{i}"
        out.append(t)
    return out


def cli_models(tiny_dir) -> list[str]:
    """The ``progadv`` model flags of the tiny policy and reference."""
    return ["--policy", str(tiny_dir / "policy"), "--reference", str(tiny_dir / "reference"), "--no-progress"]


@pytest.fixture
def data(tmp_path):
    """The sample trajectories as a JSONL input file."""
    from progadv_trl.formats import save_trajectories

    path = tmp_path / "in.jsonl"
    save_trajectories(path, sample_trajectories())
    return path


def synthetic_log_probs(task, histories, n_replies: int, seed: int = 0):
    """A history-dependent pseudo-random reply distribution with some invalid mass: ``[n_histories, n_replies]``
    log-probabilities, an oracle for the exact DP's tests."""
    import zlib

    out = []
    for h in histories:
        g = np.random.default_rng(zlib.crc32(repr((seed, task, h)).encode()))
        z = g.normal(size=n_replies + 1) * 1.5
        out.append((z - np.log(np.exp(z).sum()))[:n_replies])
    return np.array(out)
