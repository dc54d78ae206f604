"""The scorer never holds a ``[tokens, vocab]`` tensor: every per-token statistic is folded over vocabulary chunks."""

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from progadv_trl import ProgressAdvantageScorer

from conftest import many_trajectories


class VocabRows(TorchDispatchMode):
    """The most rows (elements / vocab) of any tensor with a vocabulary-sized dimension that an aten op returns."""

    def __init__(self, vocab: int):
        super().__init__()
        self.vocab, self.rows, self.op = vocab, 0, None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and self.vocab in t.shape and t.numel() // self.vocab > self.rows:
                self.rows, self.op = t.numel() // self.vocab, f"{func} {tuple(t.shape)}"
        return out


def test_scoring_never_materialises_a_tokens_by_vocab_tensor(tiny_dir):
    scorer = ProgressAdvantageScorer.from_models(tiny_dir / "policy", tiny_dir / "reference", baselines=["all"],
                                                 chunk_size=32, batch_size=8)
    trajs = many_trajectories(8)
    vocab = scorer.policy.head.vocab_size
    tokens = sum(len(scorer._tokenize(t).input_ids) for t in trajs)  # noqa: SLF001 (a count, not a behaviour)
    hidden = scorer.policy.head.weight.shape[1]
    with VocabRows(vocab) as seen:
        results = scorer.score(trajs)
    assert len(results) == 8 and tokens > 4 * hidden
    # the LM head's weight (and a copy of it) is [vocab, hidden]; logits of the batch would be [tokens, vocab]
    assert seen.rows <= hidden, (seen.rows, seen.op, tokens, vocab)
