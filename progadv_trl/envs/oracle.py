"""``log P_ref(y | h)`` of every valid reply string after many histories, from a Hugging Face causal LM.

``log P_ref(y | h) = sum_j log softmax(z_j / T)[y_j]`` over the reply's canonical tokens plus the end-of-turn token,
after the history rendered by :class:`~progadv_trl.envs.codec.ChatCodec` (exactly what the policy samples and what
the scorer reads), at the trainer's temperature ``T`` (TRL regularises toward the reference at that temperature).
Each history is run once; its KV cache is repeated for the replies.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from .codec import ChatCodec
from .decoding import IncrementalBatch


class LMReplyOracle:
    """Callable ``(task, histories) -> [n, n_replies]`` array, as :func:`progadv_trl.envs.exact.solve` expects."""

    def __init__(self, model, codec: ChatCodec, temperature: float = 1.0, batch_size: int = 64):
        self.model, self.codec, self.temperature, self.batch_size = model, codec, temperature, batch_size

    def __call__(self, task, histories: Sequence) -> np.ndarray:
        rows = [self.codec.history_ids(task, h) for h in histories]
        return self.score_ids(rows)

    @torch.no_grad()
    def score_ids(self, prefixes: Sequence[list[int]]) -> np.ndarray:
        """``log P(reply + eos | prefix)`` for every valid reply, for prefixes given as token ids."""
        was_training = self.model.training
        self.model.eval()
        try:
            parts = [self._batch(prefixes[i: i + self.batch_size]) for i in range(0, len(prefixes), self.batch_size)]
        finally:
            self.model.train(was_training)
        return np.concatenate(parts) if parts else np.zeros((0, len(self.codec.reply_ids)))

    def _batch(self, prefixes: Sequence[list[int]]) -> np.ndarray:
        replies = self.codec.reply_ids
        n_rep, temp = len(replies), self.temperature
        batch = IncrementalBatch(self.model, len(prefixes), self.codec.tokenizer.pad_token_id or 0)
        logits, lengths = batch.feed(list(prefixes))
        first = torch.log_softmax(logits[torch.arange(len(prefixes)), lengths - 1] / temp, -1)  # [B, V]
        first_ids = torch.tensor([r[0] for r in replies])
        total = first[:, first_ids]  # [B, R]
        batch.repeat_interleave(n_rep)
        rest = [r[:-1] for r in replies] * len(prefixes)
        if max(len(r) for r in replies) > 1:
            logits, _ = batch.feed(rest)
            logp = torch.log_softmax(logits / temp, -1)  # [B*R, W, V]
            width = logp.shape[1]
            targets = torch.zeros((n_rep, width), dtype=torch.long)
            valid = torch.zeros((n_rep, width), dtype=torch.bool)
            for j, r in enumerate(replies):
                targets[j, : len(r) - 1] = torch.tensor(r[1:])
                valid[j, : len(r) - 1] = True
            targets = targets.repeat(len(prefixes), 1)
            valid = valid.repeat(len(prefixes), 1)
            tok = logp.gather(-1, targets[..., None]).squeeze(-1) * valid
            total = total + tok.sum(-1).view(len(prefixes), n_rep)
        return total.double().numpy()


class CachedOracle:
    """An oracle that remembers ``log P_ref(y | h)`` per ``(task, history)``.

    A DP at another ``beta`` (the reply probabilities do not depend on it), or a rerun that :meth:`load`-ed the
    values a previous run :meth:`save`-d, queries the wrapped model oracle only for histories it has not seen.
    """

    def __init__(self, oracle=None, table: dict | None = None):
        self.oracle, self.table = oracle, dict(table or {})
        self.n_queried = 0

    def __call__(self, task, histories: Sequence) -> np.ndarray:
        missing = [h for h in histories if (task, h) not in self.table]
        if missing:
            if self.oracle is None:
                raise KeyError(f"{len(missing)} histories of {task} are not cached and no model oracle is set")
            self.table.update(((task, h), row) for h, row in zip(missing, self.oracle(task, missing)))
            self.n_queried += len(missing)
        return np.stack([self.table[(task, h)] for h in histories]) if histories else np.zeros((0, 0))

    def save(self, path) -> None:
        """Write the table (a pickle of plain tuples, dataclasses and arrays; only load files you wrote)."""
        import pickle

        with open(path, "wb") as f:
            pickle.dump(self.table, f, protocol=pickle.HIGHEST_PROTOCOL)

    @classmethod
    def load(cls, path, oracle=None) -> "CachedOracle":
        import pickle

        with open(path, "rb") as f:
            return cls(oracle, pickle.load(f))
