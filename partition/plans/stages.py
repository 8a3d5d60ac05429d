"""The stage plan: which contiguous layers each pipeline stage holds. Pure."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol


class NetShape(Protocol):
    """What a plan needs to know of the net (model.MLPSpec has it)."""

    dims: tuple[int, ...]
    bias: bool


def layer_params(dims: Sequence[int], layer: int, *, bias: bool) -> int:
    """Parameters of layer `layer` (0-based): W (n_out × n_in) and, with bias, b (n_out)."""
    n_in, n_out = dims[layer], dims[layer + 1]
    return n_out * n_in + (n_out if bias else 0)


BALANCES = ("params", "flops", "time")


def layer_flops(dims: Sequence[int], layer: int) -> int:
    """Matrix-product FLOPs of one example through layer `layer`: forward and weight
    gradient, and the input gradient for every layer but the net's first."""
    one = 2 * dims[layer] * dims[layer + 1]
    return one * (3 if layer > 0 else 2)


def plan_stages(spec: NetShape, stages: int,
                balance: Sequence[int] | str | None = None) -> list[tuple[int, int]]:
    """Half-open layer ranges [start, end), one per stage.

    `balance`: a list (layers per stage) is taken as given; `params` (the default, None)
    minimises the largest stage's parameter count, since parameters and their gradients
    dominate a stage's memory; `flops` its matrix-product FLOPs, the compute a stage
    waits on (ties: earlier stages get fewer layers). `time` is chosen by measuring
    (calibrate.resolve_balance) and arrives here as a list.
    """
    L = len(spec.dims) - 1
    if stages < 1:
        raise ValueError(f"a pipeline needs at least 1 stage, got {stages}")
    if stages > L:
        raise ValueError(f"{stages} stages for {L} layers: every stage needs at least one layer")
    if balance == "time":
        raise ValueError("strategy.balance=time is resolved to a list by measuring first "
                         "(calibrate.resolve_balance)")
    if balance is not None and not isinstance(balance, str):
        if len(balance) != stages or any(b < 1 for b in balance) or sum(balance) != L:
            raise ValueError(f"balance {list(balance)} must have {stages} entries >= 1 summing to {L}")
        counts = list(balance)
    elif balance == "flops":
        counts = _min_max_split(tuple(layer_flops(spec.dims, l) for l in range(L)), stages)
    else:
        counts = _min_max_split(tuple(layer_params(spec.dims, l, bias=spec.bias) for l in range(L)),
                                stages)
    ranges, start = [], 0
    for c in counts:
        ranges.append((start, start + c))
        start += c
    return ranges


def compositions(n: int, parts: int) -> list[tuple[int, ...]]:
    """Every way to give `parts` stages at least one of `n` layers each, in order."""
    if parts == 1:
        return [(n,)]
    return [(c,) + rest for c in range(1, n - parts + 2) for rest in compositions(n - c, parts - 1)]


def _min_max_split(sizes: tuple[float, ...], parts: int) -> list[int]:
    """Layers per part minimising the largest part's total (exact, by dynamic programming).

    Bottom up over the number of parts left (no recursion: a 1024-stage pipeline is 1024
    levels deep); among equal optima the first part takes the fewest layers."""
    n = len(sizes)
    # k = 1: what is left goes in one part
    best: list[float] = [sum(sizes[i:]) for i in range(n + 1)]
    first: list[list[int]] = []  # first[j][i]: the first part's layers, sizes[i:] in parts-j parts
    for k in range(2, parts + 1):
        cur, take = [0.0] * (n + 1), [0] * (n + 1)
        # the first parts - k parts took at least one layer each; k parts need k layers
        for i in range(parts - k, n - k + 1):
            head, out, c_best = 0, None, 0
            for c in range(1, n - i - k + 2):
                head += sizes[i + c - 1]
                cand = max(head, best[i + c])
                if out is None or cand < out:
                    out, c_best = cand, c
            cur[i], take[i] = out, c_best
        best = cur
        first.append(take)
    counts, i = [], 0
    for take in reversed(first):
        counts.append(take[i])
        i += take[i]
    return counts + [n - i]
