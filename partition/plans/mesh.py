"""The hybrid mesh: data × pipeline × tensor ranks, and what crosses each dimension. Pure.

Rank layout as torchtitan's `ParallelDims`: tp innermost (consecutive ranks — the fast
links inside one node), then pp, then dp outermost:

    rank = (dp_i · pp + pp_i) · tp + tp_i

so dp=2 × pp=2 × tp=2 puts ranks 0,1 in one tp group (stage 0 of replica 0), 2,3 in the
next (stage 1 of replica 0), 4..7 the same for replica 1; the pp group of rank 1 is
(1, 3), its dp group (1, 5).

What each dimension carries in one step (per rank; b = item size, R = this replica's rows
B/dp, M micro-batches):

  pp  `activation` and `activation_grad` at each stage boundary this rank's stages touch,
      R·n_k·b each way in M sends (every tp rank of a stage sends its whole activation to
      the rank of the same tp coordinate in the next stage);
  tp  within each stage, the tensor plan of the stage's own layers (plans/tensor.py on
      dims[start..end]) at batch R; a stage that is not the first also all-reduces the
      input gradient of its first layer (R·n_start·b in M calls) when that gradient is a
      partial sum (a column-parallel or row-wise first layer);
  dp  one flat all-reduce of this rank's gradients (its shards' parameters · b); or, with
      dp_shard (fsdp stage 3 on the data dimension, as FSDP2 over tensor-parallel
      shards), plans/fsdp.py's calls over the dp group for each of this rank's tensor
      shards — a shard's W block and bias slice form one flat storage (`dp_flat_shards`)
      cut in dp pieces of c = ⌈N/dp⌉ elements: per micro-batch and shard an all-gather of
      c·b (`weight_gather`, forward), another before its backward unless
      reshard_after_forward=false (backward), and a reduce-scatter of its dp·c·b local
      gradient (`weight_grad`, backward);
  world  J's metric, one all-reduce of 3·8 bytes over all ranks.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from partition.plans.data import row_share
from partition.plans.fsdp import FlatShard, fsdp_calls
from partition.plans.schedule import Schedule, produces
from partition.plans.stages import NetShape
from partition.plans.tensor import LayerShard, plan_layers, shard_params, tensor_calls
from partition.plans.traffic import Call, RoleTraffic, collective, metric_call

DIMS = ("dp", "pp", "tp")


@dataclass(frozen=True)
class Coords:
    dp: int
    pp: int
    tp: int


@dataclass(frozen=True)
class Mesh:
    """A validated dp × pp × tp mesh; every size >= 1."""

    dp: int
    pp: int
    tp: int

    def __post_init__(self) -> None:
        for name in DIMS:
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"strategy.{name}={v}: must be an integer >= 1")

    @property
    def world(self) -> int:
        return self.dp * self.pp * self.tp

    def size(self, dim: str) -> int:
        return getattr(self, dim)

    def coords(self, rank: int) -> Coords:
        if not 0 <= rank < self.world:
            raise ValueError(f"rank {rank} outside the mesh's [0, {self.world})")
        return Coords(dp=rank // (self.pp * self.tp), pp=(rank // self.tp) % self.pp,
                      tp=rank % self.tp)

    def rank_of(self, *, dp: int, pp: int, tp: int) -> int:
        return (dp * self.pp + pp) * self.tp + tp

    def group(self, rank: int, dim: str) -> tuple[int, ...]:
        """The member ranks of `rank`'s group along `dim`, in order of that coordinate
        (a rank's index in it is its coordinate)."""
        c = self.coords(rank)
        at = {"dp": c.dp, "pp": c.pp, "tp": c.tp}
        out = []
        for i in range(self.size(dim)):
            at[dim] = i
            out.append(self.rank_of(**at))
        return tuple(out)

    def groups(self, dim: str) -> list[tuple[int, ...]]:
        """Every group along `dim`, each once, ordered by its lowest rank (the order in
        which all ranks must create them)."""
        seen: dict[tuple[int, ...], None] = {}
        for r in range(self.world):
            seen.setdefault(self.group(r, dim), None)
        return sorted(seen)


def resolve_mesh(*, world: int, dp: int | str, pp: int, tp: int) -> Mesh:
    """dp='auto' is world ÷ (pp·tp); the product must be the world size."""
    for name, v in (("pp", pp), ("tp", tp)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"strategy.{name}={v}: must be an integer >= 1")
    if dp == "auto":
        if world % (pp * tp):
            raise ValueError(f"strategy.dp=auto: world_size={world} is not divisible by "
                             f"strategy.pp={pp} × strategy.tp={tp} = {pp * tp}")
        dp = world // (pp * tp)
    if isinstance(dp, bool) or not isinstance(dp, int) or dp < 1:
        raise ValueError(f"strategy.dp={dp}: must be an integer >= 1 or auto")
    if dp * pp * tp != world:
        raise ValueError(f"strategy.dp={dp} × strategy.pp={pp} × strategy.tp={tp} = "
                         f"{dp * pp * tp} ranks, but world_size={world}")
    return Mesh(dp=dp, pp=pp, tp=tp)


def stage_shards(layout: str, dims: Sequence[int], start: int, end: int, *, tp: int,
                 rank: int) -> list[LayerShard]:
    """The tensor plan of one pipeline stage (layers [start, end)) over its tp group: the
    layout applied to the stage's own sub-net dims[start..end], layer indices global."""
    local = plan_layers(layout, list(dims[start:end + 1]), tp, rank)
    return [LayerShard(s.layer + start, s.kind, s.rows, s.cols, s.bias_owner, s.primary)
            for s in local]


def first_input_grad_partial(shards: list[LayerShard]) -> bool:
    """Is dJ/d(stage input) a partial sum over the tp group (to be all-reduced)?"""
    return shards[0].kind in ("column", "rowwise")


def stage_tp_calls(layout: str, dims: Sequence[int], start: int, end: int, *, tp: int,
                   rank: int, rows: int, itemsize: int) -> list[Call]:
    """The tp collectives of one micro-batch of `rows` rows through stage [start, end), in
    the order the stage makes them: the tensor plan of the stage's own layers (forward's,
    then backward's), then — a stage that is not the first — the all-reduce of its first
    layer's input gradient when that is a partial sum. None at tp = 1."""
    if tp == 1:
        return []
    sub = list(dims[start:end + 1])
    out = tensor_calls(layout, sub, world=tp, rank=rank, batch=rows, micro=1,
                       itemsize=itemsize)[:-1]  # its metric is the world's
    shards = stage_shards(layout, dims, start, end, tp=tp, rank=rank)
    if start > 0 and first_input_grad_partial(shards):
        out.append(collective("input_grad", "backward", "all_reduce", rows * dims[start] * itemsize,
                              tp))
    return out


def dp_flat_shards(spec: NetShape, shards: list[LayerShard], *, dp: int) -> list[FlatShard]:
    """dp_shard: each tensor shard of a stage (its rows × cols block of the full W, and
    its slice of b where it owns one) as one flat storage cut in dp pieces — fsdp's unit,
    the layer, made the shard (a whole layer where tp = 1)."""
    out = []
    for s in shards:
        r0, r1 = s.rows or (0, spec.dims[s.layer + 1])
        c0, c1 = s.cols or (0, spec.dims[s.layer])
        out.append(FlatShard(s.layer, r1 - r0, c1 - c0, spec.bias and s.bias_owner, dp,
                             row0=r0, col0=c0))
    return out


def stage_dp_calls(spec: NetShape, shards: list[LayerShard], *, dp: int, itemsize: int,
                   reshard_after_forward: bool) -> list[Call]:
    """dp_shard: the dp collectives of one micro-batch through a stage whose tensor shards
    are `shards` — fsdp stage 3's calls (plans/fsdp.py) over the dp group, in its order:
    every shard's forward gather, then from the top each shard's backward gather (unless
    reshard_after_forward=false) and its gradient's reduce-scatter. Every micro-batch runs
    each of the stage's layers forward and backward once, in whatever order the schedule
    puts them, so a step makes these M times. None at dp = 1."""
    return [Call(k.role, k.phase, k.op, k.payload, k.received, k.wire)
            for k in fsdp_calls(dp_flat_shards(spec, shards, dp=dp), zero_stage=3, micro=1,
                                itemsize=itemsize, reshard_after_forward=reshard_after_forward)]


def replica_rows(batch: int, mesh: Mesh, rank: int) -> tuple[int, int]:
    """The rows of the step's batch that `rank`'s data-parallel replica takes."""
    return row_share(batch, mesh.dp, mesh.coords(rank).dp)


def hybrid_calls(spec: NetShape, mesh: Mesh, schedule: Schedule,
                 stages: list[tuple[int, int]], *, layout: str, rank: int, batch: int,
                 micro: int, itemsize: int, dp_shard: bool = False,
                 reshard_after_forward: bool = True) -> dict[str, list[Call]]:
    """Every crossing of one step of `rank`, by mesh dimension (`world`: the metric).

    Point-to-point sends are Calls with op `send` (payload = wire = the tensor's bytes).
    """
    dims, b = spec.dims, itemsize
    c = mesh.coords(rank)
    lo, hi = replica_rows(batch, mesh, rank)
    rows = hi - lo
    mb = rows // micro
    out: dict[str, list[Call]] = {"dp": [], "pp": [], "tp": [], "world": []}
    S = schedule.stages
    for a in schedule.ranks[c.pp]:
        msg = produces(a, S)
        if msg is None or schedule.stage_rank[msg.to_stage] == c.pp:
            continue
        boundary = stages[msg.to_stage][0] if msg.role == "activation" else stages[msg.from_stage][0]
        n = mb * dims[boundary] * b
        out["pp"].append(Call(msg.role, "forward" if msg.role == "activation" else "backward",
                              "send", n, 0, n))
    params = 0
    for s in schedule.rank_stages(c.pp):
        start, end = stages[s]
        shards = stage_shards(layout, dims, start, end, tp=mesh.tp, rank=c.tp)
        params += shard_params(dims, shards, bias=spec.bias)
        out["tp"] += stage_tp_calls(layout, dims, start, end, tp=mesh.tp, rank=c.tp, rows=mb,
                                    itemsize=b) * micro
        if dp_shard:
            out["dp"] += stage_dp_calls(spec, shards, dp=mesh.dp, itemsize=b,
                                        reshard_after_forward=reshard_after_forward) * micro
    if mesh.dp > 1 and not dp_shard:
        out["dp"].append(collective("weight_grad", "update", "all_reduce", params * b, mesh.dp))
    if mesh.world > 1:
        out["world"].append(metric_call(mesh.world))
    return out


def by_dim_role(calls: dict[str, list[Call]]) -> dict[str, dict[str, RoleTraffic]]:
    """{dim: {role: bytes, messages, wire}} — the shape of `ranks[].comm.by_dim`."""
    out: dict[str, dict[str, RoleTraffic]] = {}
    for dim, cs in calls.items():
        for call in cs:
            t = out.setdefault(dim, {}).get(call.role, RoleTraffic(0, 0, 0))
            out[dim][call.role] = RoleTraffic(t.bytes + call.payload, t.messages + 1,
                                              t.wire + call.wire)
    return out


