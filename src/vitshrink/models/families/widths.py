"""Width arithmetic shared by the families' pruning rules (pure functions, no torch).

transformers rebuilds every layer from one config, so widths must be uniform per layer (per stage for
hierarchical models) and, where the head size is derived from the width, heads and embedding width can
only shrink together in whole heads.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence


def kept_width(width: int, ratio: float, round_to: int) -> int:
    """Width left after removing `ratio` of `width`, rounded to the nearest multiple of `round_to`.

    Never below one step and never wider than `width`; widths narrower than `round_to` move in steps of 1.
    """
    if ratio <= 0:
        return width
    target = width * (1.0 - ratio)
    step = round_to if round_to > 1 and width >= round_to else 1
    kept = max(step, math.floor(target / step + 0.5) * step)
    return min(kept, width)


def kept_heads(
    heads: int,
    ratio: float,
    head_dims: Sequence[int],
    round_to: int,
    valid: Callable[[int], bool] | None = None,
) -> int:
    """Number of heads to keep (whole heads; head size unchanged).

    Among admissible counts (1..heads, filtered by `valid`) pick the one closest to heads*(1-ratio),
    preferring counts whose resulting widths (count * head_dim) are multiples of `round_to`; on a tie
    the larger count (e.g. 3 heads at ratio 0.5 keep 2).
    """
    if ratio <= 0:
        return heads
    target = heads * (1.0 - ratio)
    cands = [k for k in range(1, heads + 1) if valid is None or valid(k)]
    if not cands:
        return heads

    def score(k: int) -> tuple[int, float, int]:
        aligned = round_to <= 1 or all((k * d) % round_to == 0 for d in head_dims)
        return (0 if aligned else 1, abs(k - target), -k)

    return min(cands, key=score)


def ratio_for_width(width: int, base: int) -> float:
    """Smallest float r with int(r * base) == width (config ratios are applied as int(r * dim))."""
    r = width / base
    while int(r * base) < width:  # float division can land just below the integer
        r = math.nextafter(r, math.inf)
    return r
