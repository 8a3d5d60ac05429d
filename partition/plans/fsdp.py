"""Sharded data parallel (ZeRO-1/2/3, FSDP) shard plans, byte counts and memory. Pure: stdlib only.

P ranks, each taking its share of the batch's rows as `data` does. Every layer l's
parameters (W_l row-major, then b_l) form one flat storage of N_l = n_{l+1}·n_l
(+ n_{l+1} with biases) elements — FSDP's flat parameter, one per layer, the unit that is
gathered and reduce-scattered. It is cut in P pieces of c_l = ⌈N_l/P⌉ elements, the rule of
torch.chunk and of FSDP itself: rank r holds [r·c_l, min((r+1)·c_l, N_l)) and its piece is
zero-padded to c_l, since gloo's all-gather takes equal pieces only. With the pieces that
size, rank order puts the gathered layer at the front of the P·c_l buffer: W and b are
views of it, no copy. The padding (P·c_l − N_l elements per layer, at most P − 1) is
stored, sent and counted like any other element; it is zero and stays zero.

What each ZeRO stage keeps and moves, per rank (b = item size, M micro-batches, every
rank hands the same bytes to the same calls):

    stage 3  params c_l, grads c_l, optimizer v_l(r) per layer (v_l(r) = the real elements of
             rank r's piece; momentum only). Per micro-batch: before layer l's forward an
             all-gather of its pieces (weight_gather, forward), freed after the forward unless
             reshard_after_forward=false; before its backward another (weight_gather,
             backward); right after its weight gradient, a reduce-scatter of the layer's
             padded local gradient (weight_grad, backward) onto the grad shards.
    stage 2  params P·c_l (full, padded), grads c_l, optimizer v_l(r). Per micro-batch the
             reduce-scatter of each layer's gradient (weight_grad, backward); after the
             update of its own piece, an all-gather of every layer (weight_gather, update).
    stage 1  params P·c_l, grads N_l (data's one flat buffer, all-reduced once: weight_grad,
             update), optimizer v_l(r); the update of its own piece, then an all-gather of
             every layer (weight_gather, update).

Bytes per rank per step (payload this rank hands to collectives; nothing at P = 1):

    stage 3   weight_gather  2·M·Σ_l c_l·b in 2·M·L all-gathers (M·Σ_l c_l·b, M·L calls
                             with reshard_after_forward=false)
              weight_grad    M·Σ_l P·c_l·b in M·L reduce-scatters
    stage 2   weight_grad    M·Σ_l P·c_l·b in M·L reduce-scatters
              weight_gather  Σ_l c_l·b in L all-gathers
    stage 1   weight_grad    Σ_l N_l·b in 1 all-reduce (exactly data's)
              weight_gather  Σ_l c_l·b in L all-gathers
    all       metric         3·8 in 1 all-reduce (the runners' METRIC_BYTES; not in this plan)

Ring wire bytes per call (`ring_wire`): all-reduce ⌊2(P−1)N/P⌋, all-gather (P−1)·n for a
piece n, reduce-scatter ⌊(P−1)N/P⌋. So at M = 1, with N = Σ_l N_l·b (and padding aside),
stage 3 puts 2(P−1)/P·N (two gathers) + (P−1)/P·N (the reduce-scatter) = 3(P−1)/P·N on
the wire per step, 1.5× data parallel's 2(P−1)/P·N; 1× with reshard_after_forward=false.
Stage 2 (reduce-scatter + one gather) is 1×, stage 1 (all-reduce + one gather) 1.5×.

Memory (`memory`): params + grads + optimizer as above, plus the gathered layers live at
once (stage 3: the largest P·c_l·b with resharding, Σ_l P·c_l·b without; stages 1, 2:
none — the gather lands in the params), plus the unsharded local gradient of the layer
being reduce-scattered (stages 2, 3: the largest P·c_l·b; stage 1's full gradients are
its grads already), plus the kept activations 2·⌈rows/M⌉·Σ hidden·b (every hidden
layer's z and h, as `data`). That sum is a floor: the measured peak adds the data batch
and the loss's and backward's temporaries (dJ/dz, …).
"""

from __future__ import annotations

from dataclasses import dataclass

from partition.plans.traffic import ring_wire_bytes

ZERO_STAGES = (1, 2, 3)


def ring_wire(op: str, n: int, p: int) -> int:
    """The ring model's bytes on the wire (plans/traffic.py, the one definition)."""
    return ring_wire_bytes(op, n, p)


def chunk_range(n: int, parts: int, index: int) -> tuple[int, int]:
    """torch.chunk's (and FSDP's) split of n among `parts`: [start, end) of part `index`,
    ⌈n/parts⌉ each, the last ones shorter or empty."""
    if parts < 1 or not 0 <= index < parts:
        raise ValueError(f"part {index} of {parts}")
    size = -(-n // parts)
    start = min(n, index * size)
    return start, min(n, start + size)


@dataclass(frozen=True)
class FlatShard:
    """Layer `index`'s flat storage (W row-major, then b) cut in `world` pieces.

    The storage is the whole layer, or (a hybrid mesh's dp_shard, plans/mesh.py) one
    tensor shard of it: the n_out × n_in block of the full W at rows `row0`…, columns
    `col0`…, and its slice of b, so that `pieces` still names rectangles of the full W.
    """

    index: int
    n_out: int
    n_in: int
    bias: bool
    world: int
    row0: int = 0
    col0: int = 0

    @property
    def weights(self) -> int:
        return self.n_out * self.n_in

    @property
    def numel(self) -> int:
        return self.weights + (self.n_out if self.bias else 0)

    @property
    def piece(self) -> int:
        """Elements of every rank's padded piece, c = ⌈N/P⌉."""
        return -(-self.numel // self.world)

    @property
    def padded(self) -> int:
        """Elements of the gathered buffer, P·c (≥ N)."""
        return self.piece * self.world

    @property
    def padding(self) -> int:
        return self.padded - self.numel

    def range(self, rank: int) -> tuple[int, int]:
        """The real elements [lo, hi) of the flat storage that `rank` holds."""
        return chunk_range(self.numel, self.world, rank)

    def valid(self, rank: int) -> int:
        lo, hi = self.range(rank)
        return hi - lo

    def weight_valid(self, rank: int) -> int:
        """How many of rank's real elements are W's (the rest are b's): λ and s apply to those."""
        lo, hi = self.range(rank)
        return max(0, min(hi, self.weights) - lo)

    def pieces(self, rank: int) -> list[Piece]:
        """Rank's real elements as rectangles of the full W (rows, cols) and ranges of b,
        each a contiguous run [start, stop) of its flat piece (offsets from lo)."""
        lo, hi = self.range(rank)
        out: list[Piece] = []
        w_hi = min(hi, self.weights)
        R, C = self.row0, self.col0
        for (r0, r1), (c0, c1), (f0, f1) in flat_rectangles(lo, w_hi, self.n_in):
            out.append(Piece("W", (R + r0, R + r1), (C + c0, C + c1), (f0 - lo, f1 - lo)))
        if hi > max(lo, self.weights):
            b0 = max(lo, self.weights)
            out.append(Piece("b", (R + b0 - self.weights, R + hi - self.weights), None,
                             (b0 - lo, hi - lo)))
        return out


@dataclass(frozen=True)
class Piece:
    """A contiguous run of a rank's flat piece that is a rectangle of W (or a range of b)."""

    tensor: str  # W | b
    rows: tuple[int, int]  # of W (or the elements of b)
    cols: tuple[int, int] | None  # of W; None for b
    span: tuple[int, int]  # [start, stop) within the rank's piece


def flat_rectangles(lo: int, hi: int, n_cols: int
                    ) -> list[tuple[tuple[int, int], tuple[int, int], tuple[int, int]]]:
    """[lo, hi) of a row-major matrix with n_cols columns as at most three rectangles
    (a partial first row, whole rows, a partial last row): ((r0, r1), (c0, c1), (f0, f1))."""
    out = []
    while lo < hi:
        r, c = divmod(lo, n_cols)
        if c or hi - lo < n_cols:  # a partial row
            stop = min(hi, (r + 1) * n_cols)
            out.append(((r, r + 1), (c, c + stop - lo), (lo, stop)))
        else:  # whole rows
            rows = (hi - lo) // n_cols
            stop = lo + rows * n_cols
            out.append(((r, r + rows), (0, n_cols), (lo, stop)))
        lo = stop
    return out


def shard_plan(dims: tuple[int, ...] | list[int], *, world: int, bias: bool) -> list[FlatShard]:
    """One FlatShard per layer of the net `dims` = [d, n_1, …, q]."""
    if world < 1:
        raise ValueError(f"world size must be >= 1, got {world}")
    if len(dims) < 2:
        raise ValueError(f"dims needs at least 2 entries, got {list(dims)}")
    return [FlatShard(l, dims[l + 1], dims[l], bias, world) for l in range(len(dims) - 1)]


# ---------------------------------------------------------------- communication


@dataclass(frozen=True)
class Call:
    """One collective of one rank in one step (the ledger's view of it)."""

    op: str  # all_gather | reduce_scatter | all_reduce
    role: str  # weight_gather | weight_grad
    phase: str  # forward | backward | update
    layer: int | None  # None for stage 1's all-reduce of the whole flat gradient
    payload: int  # bytes this rank hands in
    received: int  # bytes that reach this rank from the others
    wire: int  # ring-model bytes this rank puts on the wire


def _check(zero_stage: int, micro: int) -> None:
    if zero_stage not in ZERO_STAGES:
        raise ValueError(f"zero_stage must be one of {ZERO_STAGES}, got {zero_stage}")
    if micro < 1:
        raise ValueError(f"micro-batches must be >= 1, got {micro}")


def fsdp_calls(shards: list[FlatShard], *, zero_stage: int, reshard_after_forward: bool,
               micro: int, itemsize: int) -> list[Call]:
    """Every training collective of one step, in the order the runner makes them."""
    _check(zero_stage, micro)
    P = shards[0].world
    if P == 1:
        return []
    b = itemsize

    def gather(s: FlatShard, phase: str) -> Call:
        n = s.piece * b
        return Call("all_gather", "weight_gather", phase, s.index, n, (P - 1) * n,
                    ring_wire("all_gather", n, P))

    def reduce_scatter(s: FlatShard) -> Call:
        n = s.padded * b
        return Call("reduce_scatter", "weight_grad", "backward", s.index, n,
                    (P - 1) * s.piece * b, ring_wire("reduce_scatter", n, P))

    out: list[Call] = []
    for _ in range(micro):
        if zero_stage == 3:
            out += [gather(s, "forward") for s in shards]
        for s in reversed(shards):
            if zero_stage == 3 and reshard_after_forward:
                out.append(gather(s, "backward"))
            if zero_stage >= 2:
                out.append(reduce_scatter(s))
    if zero_stage == 1:
        n = sum(s.numel for s in shards) * b
        out.append(Call("all_reduce", "weight_grad", "update", None, n, 0,
                        ring_wire("all_reduce", n, P)))
    if zero_stage <= 2:
        out += [gather(s, "update") for s in shards]
    return out


def role_traffic(calls: list[Call]) -> dict[str, dict[str, int]]:
    """{role: {bytes, messages, wire}} of a list of calls."""
    out: dict[str, dict[str, int]] = {}
    for c in calls:
        t = out.setdefault(c.role, {"bytes": 0, "messages": 0, "wire": 0})
        t["bytes"] += c.payload
        t["messages"] += 1
        t["wire"] += c.wire
    return out


# ---------------------------------------------------------------- memory


def state_bytes(shards: list[FlatShard], *, rank: int, zero_stage: int, momentum: bool,
                itemsize: int) -> dict[str, int]:
    """params, grads and optimizer bytes that `rank` holds between steps (padding included)."""
    _check(zero_stage, 1)
    b = itemsize
    piece = sum(s.piece for s in shards) * b
    params = piece if zero_stage == 3 else sum(s.padded for s in shards) * b
    grads = sum(s.numel for s in shards) * b if zero_stage == 1 else piece
    opt = sum(s.valid(rank) for s in shards) * b if momentum else 0
    return {"params_bytes": params, "grads_bytes": grads, "optimizer_bytes": opt}


def gathered_bytes(shards: list[FlatShard], *, zero_stage: int,
                   reshard_after_forward: bool, itemsize: int) -> int:
    """The most bytes of gathered layers alive at once (stage 3; 0 at P = 1, where the
    piece is the layer)."""
    if zero_stage != 3 or shards[0].world == 1:
        return 0
    sizes = [s.padded * itemsize for s in shards]
    return max(sizes) if reshard_after_forward else sum(sizes)


def grad_buffer_bytes(shards: list[FlatShard], *, zero_stage: int, itemsize: int) -> int:
    """The largest layer's unsharded local gradient, P·c·b, made for its reduce-scatter
    (stages 2, 3; 0 at P = 1, where the gradient piece is the layer's gradient)."""
    if zero_stage == 1 or shards[0].world == 1:
        return 0
    return max(s.padded for s in shards) * itemsize


def kept_activation_bytes(dims: tuple[int, ...] | list[int], *, rows: int, micro: int,
                          itemsize: int) -> int:
    """What one micro-batch keeps for backward: each hidden layer's z and h = φ(z);
    the largest micro-batch of this rank's `rows` (torch.tensor_split: ⌈rows/M⌉)."""
    mb = -(-rows // micro)
    return 2 * mb * sum(dims[1:-1]) * itemsize


def memory(dims: tuple[int, ...] | list[int], *, world: int, rank: int, rows: int, micro: int,
           zero_stage: int, reshard_after_forward: bool, bias: bool, momentum: bool,
           itemsize: int) -> dict[str, int]:
    """The closed form of the module docstring for one rank: each term and their sum."""
    shards = shard_plan(dims, world=world, bias=bias)
    out = state_bytes(shards, rank=rank, zero_stage=zero_stage, momentum=momentum,
                      itemsize=itemsize)
    out["gathered_bytes"] = gathered_bytes(shards, zero_stage=zero_stage,
                                           reshard_after_forward=reshard_after_forward,
                                           itemsize=itemsize)
    out["grad_buffer_bytes"] = grad_buffer_bytes(shards, zero_stage=zero_stage,
                                                 itemsize=itemsize)
    out["activations_bytes"] = kept_activation_bytes(dims, rows=rows, micro=micro,
                                                     itemsize=itemsize)
    out["peak_bytes"] = sum(out.values())
    return out
