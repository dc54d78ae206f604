"""Rows of token streams fed to a causal LM chunk by chunk over one shared KV cache.

Chunks of different lengths are right-padded; the padded positions stay masked out for every later query, and each
row's positions count only its real tokens, so a row sees exactly its own tokens, as if it were run alone.
"""

from __future__ import annotations


import torch

from ..models import cache_keyword


class IncrementalBatch:
    """Feed ``chunks[b]`` to row ``b`` and get the logits at every fed position.

    Args:
        model: a Hugging Face causal LM (switched to eval mode by the caller).
        n_rows: batch size.
        pad_id: token fed at padded positions (masked out).
    """

    def __init__(self, model, n_rows: int, pad_id: int = 0):
        from transformers import DynamicCache

        self.model, self.pad_id = model, pad_id
        self.device = next(model.parameters()).device
        self.cache = DynamicCache(config=model.config)
        self.mask = torch.zeros((n_rows, 0), dtype=torch.long, device=self.device)
        self.count = torch.zeros(n_rows, dtype=torch.long, device=self.device)
        self._cache_arg = cache_keyword(type(model).forward)

    @torch.no_grad()
    def feed(self, chunks: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns ``(logits [B, W, V] in float32, lengths [B])``; ``logits[b, lengths[b] - 1]`` follows the
        row's last real token. Rows with an empty chunk get garbage logits (ignore them)."""
        lengths = torch.tensor([len(c) for c in chunks], dtype=torch.long, device=self.device)
        width = int(lengths.max())
        ids = torch.full((len(chunks), width), self.pad_id, dtype=torch.long, device=self.device)
        for b, c in enumerate(chunks):
            if c:
                ids[b, : len(c)] = torch.as_tensor(c, device=self.device)
        new_mask = (torch.arange(width, device=self.device)[None] < lengths[:, None]).long()
        self.mask = torch.cat([self.mask, new_mask], dim=1)
        positions = self.count[:, None] + torch.arange(width, device=self.device)[None]
        out = self.model(input_ids=ids, attention_mask=self.mask, position_ids=positions, use_cache=True,
                         **{self._cache_arg: self.cache})  # the cache is updated in place
        self.count = self.count + lengths
        return out.logits.float(), lengths

    def repeat_interleave(self, repeats: int) -> None:
        """Each row becomes ``repeats`` consecutive copies."""
        self.cache.batch_repeat_interleave(repeats)
        self.mask = self.mask.repeat_interleave(repeats, dim=0)
        self.count = self.count.repeat_interleave(repeats, dim=0)
