"""Splitting work over ranks so that every rank runs the same forwards, and putting the results back in order.

Under FSDP2 or ZeRO-3 every forward is a collective (each layer's shards are all-gathered): a rank that runs one
forward more than another waits for it forever. So each rank gets the same number of items (short ranks repeat an
item whose result is dropped), and the results are merged back in input order. Pure functions, no processes.
"""

from __future__ import annotations

import math
from typing import Sequence, TypeVar

T = TypeVar("T")


def split_evenly(items: Sequence[T], rank: int, world: int) -> tuple[list[T], int]:
    """Rank ``rank``'s share of ``items`` (every ``world``-th item from ``rank``), padded to ``ceil(n / world)``.

    Returns ``(shard, n_real)``: the first ``n_real`` items of ``shard`` are its own, the rest repeat its last item
    (or ``items[0]`` when it has none) and their results are to be dropped. Every rank gets the same length.
    """
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"rank {rank} is not in a world of {world}")
    shard = list(items[rank::world])
    n_real = len(shard)
    size = math.ceil(len(items) / world)
    if n_real < size:
        shard += [shard[-1] if shard else items[0]] * (size - n_real)
    return shard, n_real


def merge_in_order(shards: Sequence[Sequence[T]]) -> list[T]:
    """Inverse of :func:`split_evenly`: ``shards[r]`` holds rank ``r``'s real results (padding dropped); returns
    them in the input order ``[shards[0][0], shards[1][0], ..., shards[0][1], ...]``."""
    world = len(shards)
    n = sum(len(s) for s in shards)
    out: list = [None] * n
    for rank, shard in enumerate(shards):
        if len(shard) != len(range(rank, n, world)):
            raise ValueError(f"rank {rank} returned {len(shard)} results; its share of {n} over {world} ranks is "
                             f"{len(range(rank, n, world))}")
        out[rank::world] = list(shard)
    return out
