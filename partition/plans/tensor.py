"""Tensor-parallel shard plans and their byte counts. Pure: no processes, no tensors.

Two layouts of the L weight matrices W_l ∈ R^{n_{l+1} × n_l} (0-based l, n_0 = d, n_L = q)
over P ranks.

`megatron` (the default). Layers are taken in pairs (2k, 2k+1):
  - layer 2k is *column-parallel*: rank r holds rows R_r of W (and b) — its own slice of
    the n_{2k+1} hidden units — so it computes its slice of z and h = φ(z) with no traffic;
  - layer 2k+1 is *row-parallel*: rank r holds the matching columns R_r of W, so its
    product is a partial sum of the full output; one all-reduce of the partial output
    (role `partial_output`, phase forward) gives every rank the same full z. Its bias
    lives on rank 0 only (`bias_owner`), added there before the all-reduce, so it is
    added exactly once.
  Backward mirrors it: dJ/d(pair output) is the same on every rank, the row-parallel
  layer returns this rank's slice of dJ/dh with no traffic, and the column-parallel
  layer's dJ/dx is a partial sum: all-reduced (role `input_grad`, phase backward) for
  every pair but the first (the first pair's input is X, which needs no gradient).
  An odd last layer (L odd) is *replicated*: every rank holds all of W_{L−1} and
  computes the same o from the same (already all-reduced) input. That is the cheaper
  exact option: no bytes cross, where a column-parallel last layer would need an
  all-gather of o (B·q·b) forward and an all-reduce of its input gradient
  (B·n_{L−1}·b) backward; its price is q·n_{L−1} replicated parameters and FLOPs.
  Only rank 0 counts the replica in s and returns it for weights.npz. With L = 1
  nothing is split at all (use `rowwise` to split a one-layer net).

`rowwise`. Every layer is split by output rows R_r of n_{l+1} (with its bias). The
  input of every layer must be whole on every rank, so after every layer the slices
  of its activation (and of o, which the loss needs whole) are all-gathered (role
  `gather`, forward; gloo takes only equal pieces, so an uneven slice is zero-padded
  to ⌈n/P⌉ columns and the padded piece is what is counted). Backward: each rank's
  dJ/dx = dz_r W_r is a partial sum over ranks of the full input gradient, and the
  layer below needs only its own slice of it: a reduce-scatter (role `input_grad`,
  backward) — half the wire bytes of an all-reduce of the full gradient — for every
  layer but the first.

Widths that P does not divide are split as evenly as possible, the first ranks taking
one extra unit (`split_evenly`); every rank needs at least one unit of every split width.

Bytes per rank per step (payload this rank hands to collectives; b = item size,
B = batch, M micro-batches, each crossing once per micro-batch so its bytes sum to B
rows; nothing at P = 1, where no boundary exists):
  megatron  partial_output  Σ_{k<⌊L/2⌋} B·n_{2k+2}·b          in ⌊L/2⌋·M all-reduces
            input_grad      Σ_{1≤k<⌊L/2⌋} B·n_{2k}·b          in (⌊L/2⌋−1)·M all-reduces
            (seed [d, h, q]: B·q·b in one all-reduce, nothing in backward)
  rowwise   gather          Σ_{1≤l≤L} B·⌈n_l/P⌉·b              in L·M all-gathers
            input_grad      Σ_{1≤l<L} B·n_l·b                 in (L−1)·M reduce-scatters
  both      metric          3·8 (loss sum, Σ‖W‖² shard, correct; float64) in 1 all-reduce
Wire bytes per rank under the ring model (plans.traffic.ring_wire_bytes), per call of payload N:
all-reduce ⌊2(P−1)N/P⌋, all-gather (P−1)·N (N = this rank's slice), reduce-scatter
⌊(P−1)N/P⌋. Seed, P = 2: megatron puts B·q·b on the wire; rowwise
B·(⌈h/2⌉ + ⌈q/2⌉)·b + B·h·b/2, about B·(h + q/2)·b — the Megatron pairing is cheaper
because it only ever moves the pair's output (q wide), never the hidden width.
"""

from __future__ import annotations

from dataclasses import dataclass

from partition.plans.split import split_evenly
from partition.plans.traffic import Call, RoleTraffic, by_role, collective, metric_call

LAYOUTS = ("megatron", "rowwise")
KINDS = ("column", "row", "replicated", "rowwise")


@dataclass(frozen=True)
class LayerShard:
    """What one rank holds of layer `layer`, and how it takes part in the step."""

    layer: int
    kind: str  # column | row | replicated | rowwise
    rows: tuple[int, int] | None  # slice of the full W's rows (output units); None = all
    cols: tuple[int, int] | None  # slice of the full W's columns (input units); None = all
    bias_owner: bool  # holds (and updates) the bias slice of `rows`
    primary: bool  # counted in s and returned for weights.npz (False for replicas off rank 0)


def split_widths(layout: str, dims: tuple[int, ...] | list[int]) -> list[int]:
    """The widths a layout splits over the ranks (each must be >= P)."""
    L = len(dims) - 1
    if layout == "megatron":
        return [dims[2 * k + 1] for k in range(L // 2)]
    if layout == "rowwise":
        return list(dims[1:])
    raise ValueError(f"unknown tensor layout {layout!r}; expected one of {LAYOUTS}")


def check_world(layout: str, dims: tuple[int, ...] | list[int], world: int) -> None:
    widths = split_widths(layout, dims)
    if world < 1:
        raise ValueError(f"world size must be >= 1, got {world}")
    if widths and world > min(widths):
        raise ValueError(f"{layout} splits widths {widths} of dims {list(dims)}: "
                         f"{world} ranks exceed the narrowest, {min(widths)}")


def megatron_plan(dims: tuple[int, ...] | list[int], world: int, rank: int) -> list[LayerShard]:
    check_world("megatron", dims, world)
    _check_rank(world, rank)
    L = len(dims) - 1
    out: list[LayerShard] = []
    for k in range(L // 2):
        units = split_evenly(dims[2 * k + 1], world)[rank]
        out.append(LayerShard(2 * k, "column", units, None, True, True))
        out.append(LayerShard(2 * k + 1, "row", None, units, rank == 0, True))
    if L % 2:
        out.append(LayerShard(L - 1, "replicated", None, None, True, rank == 0))
    return out


def rowwise_plan(dims: tuple[int, ...] | list[int], world: int, rank: int) -> list[LayerShard]:
    check_world("rowwise", dims, world)
    _check_rank(world, rank)
    return [LayerShard(l, "rowwise", split_evenly(dims[l + 1], world)[rank], None, True, True)
            for l in range(len(dims) - 1)]


def plan_layers(layout: str, dims: tuple[int, ...] | list[int], world: int,
                rank: int) -> list[LayerShard]:
    if layout == "megatron":
        return megatron_plan(dims, world, rank)
    if layout == "rowwise":
        return rowwise_plan(dims, world, rank)
    raise ValueError(f"unknown tensor layout {layout!r}; expected one of {LAYOUTS}")


def shard_params(dims: tuple[int, ...] | list[int], shards: list[LayerShard], *,
                 bias: bool) -> int:
    """Parameters (elements) one rank holds under its plan."""
    total = 0
    for s in shards:
        n_out, n_in = dims[s.layer + 1], dims[s.layer]
        rows = s.rows[1] - s.rows[0] if s.rows else n_out
        cols = s.cols[1] - s.cols[0] if s.cols else n_in
        total += rows * cols + (rows if bias and s.bias_owner else 0)
    return total


def tensor_calls(layout: str, dims: tuple[int, ...] | list[int], *, world: int, rank: int = 0,
                 batch: int, micro: int, itemsize: int, recompute: bool = False) -> list[Call]:
    """Every collective of one step of `rank`, in order: per micro-batch the forward's,
    then the backward's (top layer first), then the metric. Only what reaches a rank
    from a reduce-scatter (its own slice) depends on the rank.

    recompute: each backward first redoes the forward of every layer but the net's last,
    so the forward's collectives of hidden layers cross again (phase `backward`)."""
    check_world(layout, dims, world)
    _check_rank(world, rank)
    P, L, b = world, len(dims) - 1, itemsize
    mb = batch // micro

    def call(role: str, phase: str, op: str, n: int, received: int = 0) -> Call:
        return collective(role, phase, op, n, P, received)

    one: list[Call] = []  # one micro-batch
    if P > 1 and layout == "megatron":
        pairs = L // 2
        one += [call("partial_output", "forward", "all_reduce", mb * dims[2 * k + 2] * b)
                for k in range(pairs)]
        if recompute:  # a pair's row layer is hidden unless it is the net's last layer
            one += [call("partial_output", "backward", "all_reduce", mb * dims[2 * k + 2] * b)
                    for k in range(pairs) if 2 * k + 1 < L - 1]
        one += [call("input_grad", "backward", "all_reduce", mb * dims[2 * k] * b)
                for k in range(pairs - 1, 0, -1)]
    elif P > 1:
        # every rank hands in the widest slice, ⌈n/P⌉ (uneven slices are zero-padded)
        for l in range(1, L + 1):
            n = mb * -(-dims[l] // P) * b
            one.append(call("gather", "forward", "all_gather", n, (P - 1) * n))
        for l in range(1, L if recompute else 1):
            n = mb * -(-dims[l] // P) * b
            one.append(call("gather", "backward", "all_gather", n, (P - 1) * n))
        for l in range(L - 1, 0, -1):
            lo, hi = split_evenly(dims[l], P)[rank]
            one.append(call("input_grad", "backward", "reduce_scatter", mb * dims[l] * b,
                            (P - 1) * mb * (hi - lo) * b))
    return one * micro + [metric_call(P)]


def tensor_traffic(layout: str, dims: tuple[int, ...] | list[int], *, world: int, batch: int,
                   micro: int, itemsize: int) -> dict[str, RoleTraffic]:
    """The byte formulas of the module docstring, per role, for one step of any rank
    (every rank hands the same bytes to the same collectives)."""
    return by_role(tensor_calls(layout, dims, world=world, batch=batch, micro=micro,
                                itemsize=itemsize))


def _check_rank(world: int, rank: int) -> None:
    if not 0 <= rank < world:
        raise ValueError(f"rank {rank} outside [0, {world})")
