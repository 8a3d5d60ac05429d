"""Near-equal splits: one definition for shard widths, batch rows and micro-batch pieces."""

from __future__ import annotations


def split_evenly(n: int, parts: int) -> list[tuple[int, int]]:
    """Half-open ranges covering [0, n) in `parts` pieces; the first n mod parts get one more.

    The same pieces as `torch.tensor_split(n, parts)`, so a runner that splits a tensor
    with tensor_split and a plan that reads these ranges agree by construction.
    """
    if parts < 1:
        raise ValueError(f"cannot split into {parts} parts")
    if n < parts:
        raise ValueError(f"cannot split a width of {n} over {parts} ranks: each needs at least one")
    base, extra = divmod(n, parts)
    out, lo = [], 0
    for r in range(parts):
        hi = lo + base + (1 if r < extra else 0)
        out.append((lo, hi))
        lo = hi
    return out


def piece_sizes(n: int, parts: int) -> list[int]:
    """The sizes of `split_evenly(n, parts)`."""
    return [hi - lo for lo, hi in split_evenly(n, parts)]


def width(r: tuple[int, int]) -> int:
    return r[1] - r[0]
