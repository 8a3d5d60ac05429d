"""The stage plan: which contiguous layers each pipeline stage holds. Pure."""

from __future__ import annotations

from collections.abc import Sequence
from functools import cache
from typing import Protocol


class NetShape(Protocol):
    """What a plan needs to know of the net (model.MLPSpec has it)."""

    dims: tuple[int, ...]
    bias: bool


def layer_params(dims: Sequence[int], layer: int, *, bias: bool) -> int:
    """Parameters of layer `layer` (0-based): W (n_out × n_in) and, with bias, b (n_out)."""
    n_in, n_out = dims[layer], dims[layer + 1]
    return n_out * n_in + (n_out if bias else 0)


def plan_stages(spec: NetShape, stages: int, balance: Sequence[int] | None = None) -> list[tuple[int, int]]:
    """Half-open layer ranges [start, end), one per stage.

    With `balance` (layers per stage) the split is as given; otherwise the one
    that minimises the largest stage's parameter count (ties: earlier stages
    get fewer layers), since parameters and their gradients dominate a stage's memory.
    """
    L = len(spec.dims) - 1
    if stages < 1:
        raise ValueError(f"a pipeline needs at least 1 stage, got {stages}")
    if stages > L:
        raise ValueError(f"{stages} stages for {L} layers: every stage needs at least one layer")
    if balance is not None:
        if len(balance) != stages or any(b < 1 for b in balance) or sum(balance) != L:
            raise ValueError(f"balance {list(balance)} must have {stages} entries >= 1 summing to {L}")
        counts = list(balance)
    else:
        counts = _min_max_split(tuple(layer_params(spec.dims, l, bias=spec.bias) for l in range(L)),
                                stages)
    ranges, start = [], 0
    for c in counts:
        ranges.append((start, start + c))
        start += c
    return ranges


def _min_max_split(sizes: tuple[int, ...], parts: int) -> list[int]:
    """Layers per part minimising the largest part's total (exact, by dynamic programming)."""

    @cache
    def best(i: int, k: int) -> tuple[int, tuple[int, ...]]:
        # Split sizes[i:] into k non-empty parts: (largest part, counts).
        n = len(sizes) - i
        if k == 1:
            return sum(sizes[i:]), (n,)
        out: tuple[int, tuple[int, ...]] | None = None
        head = 0
        for c in range(1, n - k + 2):
            head += sizes[i + c - 1]
            rest, counts = best(i + c, k - 1)
            cand = (max(head, rest), (c,) + counts)
            if out is None or cand[0] < out[0]:
                out = cand
        assert out is not None
        return out

    return list(best(0, parts)[1])
