"""One random draw from a finite distribution, shared by the tasks' ``step`` and ``reset``."""

from __future__ import annotations

import random
from typing import Sequence, TypeVar

T = TypeVar("T")


def draw(outcomes: Sequence[tuple[float, T]], rng: random.Random) -> T:
    """The outcome of ``[(probability, outcome), ...]`` that one ``rng.random()`` falls in (the last one when rounding
    leaves the probabilities' sum just under the draw)."""
    r, acc = rng.random(), 0.0
    for p, outcome in outcomes:
        acc += p
        if r < acc:
            return outcome
    return outcomes[-1][1]
