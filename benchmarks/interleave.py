"""The order the benchmarks run their variants in, round by round."""

from __future__ import annotations

import random

__all__ = ["round_order"]


def round_order(names, round_: int) -> list:
    """names shuffled for this round, seeded by the round so every rank runs the same order; unlike a rotation
    (A B C, B C A, ...), which keeps each variant's predecessor fixed, no variant always runs right after another
    (a cold cache after the one-process variant, say, hits each alike)."""
    order = list(names)
    random.Random(round_).shuffle(order)
    return order
