"""Query rows in chunks of bounded size, in a number of chunks a compiled graph can share across sizes.

A loop over `ceil(n / budget)` chunks makes that count a constant of a compiled graph (dynamo unrolls the loop and
guards the count exactly): one graph per distinct count, so a new image size often compiled again and dynamo's
recompile limit came after 8 counts. Here the count is a power of two found by doubling, each test `count * budget
< n` an inequality guard, so one graph serves every size whose count is the same power of two; the chunks are
`ceil(n / count) <= budget` rows, the last ones shorter or empty. Eager and compiled calls chunk alike, so a compiled
output stays bitwise the eager one. Every consumer must accept an empty chunk (zero query rows)."""

from __future__ import annotations

import torch

__all__ = ["row_chunks"]


def row_chunks(start: int, stop: int, budget: int) -> list[slice]:
    """`start:stop` as contiguous slices of at most `budget` (>= 1) rows each: a power-of-two number of them, of
    `ceil(n / count)` rows, with `start`, `stop` and `budget` ints or a graph's symbolic ints. One slice when the rows
    fit the budget; trailing slices may be empty (`slice(stop, stop)`)."""
    n = stop - start
    count = 1
    while count * budget < n:  # an inequality guard in a graph, not the count itself
        count *= 2
    if count == 1:
        return [slice(start, stop)]
    size = (n + count - 1) // count
    bounds = [start, *(start + torch.sym_min(i * size, n) for i in range(1, count)), stop]
    return [slice(lo, hi) for lo, hi in zip(bounds, bounds[1:])]
