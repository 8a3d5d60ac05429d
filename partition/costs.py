"""Predictions: the exact ones from the dry run, and the closed forms a reader checks by hand.

`predict(cfg)` is the `predicted` block of result.json. Its per-rank `comm` and `memory`
come from the dry run (dryrun.py: the real runners on the meta device), so they are
what a run measures, to the byte. Next to them, `predicted.formula` holds the closed
forms of this module, each a few lines in the seed's notation (docs/cost-model.md):

    state        params, grads (one buffer per parameter) and optimizer state (momentum)
    kept         Σ over a stage's micro-batches in flight (counted from the action list)
                 of what one micro-batch keeps: every layer's input x but the data batch,
                 every hidden layer's z (for φ'(z))
    peak         state + the largest of a few moments' live sets: the batch arriving,
                 the backward (data batch + kept + dJ/do + boundary buffers + the largest
                 backward transient), a pipeline's hand-offs, and the step's tail (W⊙W)
    messages     every crossing of one step, from the plans (plans/schedule.py's lowering,
                 plans/tensor.py, plans/data.py): payload and ring wire bytes per role
    flops        matrix-product FLOPs: forward, input gradient (I) and weight gradient (W)

Time is still the simple model (FLOPs ÷ rate, stretched by the ideal bubble, plus
α + n/β per message); `cost.calibrate` measures α, β and the rate.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

from partition.comm import CommRecord, summarize
from partition.config import RunConfig
from partition.plans.data import data_calls, data_rows
from partition.plans.schedule import (
    NAMED,
    Message,
    Schedule,
    eager_sends,
    in_flight,
    load_schedule,
    needs,
    produces,
    transfers,
)
from partition.plans.split import piece_sizes, split_evenly, width
from partition.plans.stages import plan_stages
from partition.plans.tensor import plan_layers, tensor_calls
from partition.plans.traffic import Call, metric_call, ring_wire_bytes

ITEMSIZE = {"float32": 4, "float64": 8}

__all__ = ["CostParams", "LocalLayer", "RankCost", "bubble_fraction", "compute_itemsize",
           "kept_activation_bytes", "one_device_formula", "optimizer_state_bytes", "predict",
           "peak_over_limit", "prediction_error", "rank_cost", "rank_costs",
           "recompute_flops", "recompute_kept_bytes", "rel_err", "split_evenly",
           "state_bytes", "width"]


# ---------------------------------------------------------------- what a rank holds


@dataclass(frozen=True)
class LocalLayer:
    """Layer `index` as one rank holds it: the local (n_in, n_out) of its W, and its bias."""

    index: int
    n_in: int
    n_out: int
    bias: bool  # this rank holds (and updates) a bias slice
    stage: int = 0  # pipeline stage (one rank may hold several)
    note: str = ""

    @property
    def params(self) -> int:
        return self.n_in * self.n_out + (self.n_out if self.bias else 0)


def _mesh(cfg: RunConfig):  # noqa: ANN202 - plans.mesh.Mesh
    from partition.plans.mesh import resolve_mesh

    s = cfg.strategy
    return resolve_mesh(world=cfg.world_size, dp=s.dp, pp=s.pp, tp=s.tp)


def _runs_pipeline(cfg: RunConfig) -> bool:
    """A pipeline, or a hybrid mesh: the pipeline runtime over its pp group (pp = 1 too)."""
    return cfg.strategy.name in ("pipeline", "hybrid")


def _pp_rank(cfg: RunConfig, rank: int) -> int:
    """`rank`'s row of the schedule: itself, or its mesh pp coordinate."""
    return _mesh(cfg).coords(rank).pp if cfg.strategy.name == "hybrid" else rank


def _schedule(cfg: RunConfig):  # noqa: ANN202 - plans.schedule.Schedule
    """The schedule over the pipeline's ranks (a hybrid mesh's: over its pp size)."""
    v = cfg.strategy.virtual_stages
    world = _mesh(cfg).pp if cfg.strategy.name == "hybrid" else cfg.world_size
    if cfg.strategy.schedule in NAMED:  # built and validated once: every rank's formulas read it
        return _named_schedule(cfg.strategy.schedule, world, cfg.train.microbatches, v)
    return load_schedule(cfg.strategy.schedule, world=world, micro=cfg.train.microbatches,
                         virtual=v)


@lru_cache(maxsize=16)
def _named_schedule(name: str, world: int, micro: int, virtual: int | None):  # noqa: ANN202
    return load_schedule(name, world=world, micro=micro, virtual=virtual)


def stage_layers(cfg: RunConfig, rank: int) -> list[LocalLayer]:
    """The layers (whole or sharded) that `rank` holds under cfg's strategy."""
    n, L, bias = cfg.model.dims, len(cfg.model.dims) - 1, cfg.model.bias
    name = cfg.strategy.name
    if name in ("single", "data"):
        return [LocalLayer(l, n[l], n[l + 1], bias) for l in range(L)]
    if name == "pipeline":
        sched = _schedule(cfg)
        plan = plan_stages(cfg.spec, sched.stages, cfg.strategy.balance)
        return [LocalLayer(l, n[l], n[l + 1], bias, stage=s)
                for s in sched.rank_stages(rank) for l in range(*plan[s])]
    if name == "tensor":
        return [_shard_layer(n, s, bias) for s in plan_layers(cfg.strategy.layout, n,
                                                               cfg.world_size, rank)]
    if name == "hybrid":
        # the rank's stages (its pp coordinate's), each its tp shards of the stage's layers
        return [_shard_layer(n, sh, bias, stage=s) for s, sh in _hybrid_shards(cfg, rank)]
    raise ValueError(f"no cost model for strategy {name!r}")


def _shard_layer(n: list[int] | tuple[int, ...], s: Any, bias: bool, stage: int = 0) -> LocalLayer:
    """A plans.tensor.LayerShard as the rank holds it: its slice's widths, its bias if it owns it."""
    return LocalLayer(s.layer, width(s.cols) if s.cols else n[s.layer],
                      width(s.rows) if s.rows else n[s.layer + 1], bias and s.bias_owner,
                      stage=stage, note=s.kind)


def _hybrid_shards(cfg: RunConfig, rank: int) -> list[tuple[int, Any]]:
    """(stage, LayerShard) of every layer a mesh rank holds (plans/mesh.py `stage_shards`)."""
    from partition.plans.mesh import stage_shards

    mesh, sched = _mesh(cfg), _schedule(cfg)
    c = mesh.coords(rank)
    plan = plan_stages(cfg.spec, sched.stages, cfg.strategy.balance)
    return [(s, sh) for s in sched.rank_stages(c.pp)
            for sh in stage_shards(cfg.strategy.layout, cfg.model.dims, *plan[s], tp=mesh.tp,
                                   rank=c.tp)]


def _dp_sharded(cfg: RunConfig) -> bool:
    return cfg.strategy.name == "hybrid" and cfg.strategy.dp_shard


def _dp_flats(cfg: RunConfig, rank: int) -> list[Any]:
    """dp_shard: each tensor shard of the rank as the flat storage its dp group cuts in
    pieces (plans/mesh.py `dp_flat_shards`, plans/fsdp.py `FlatShard`)."""
    from partition.plans.mesh import dp_flat_shards

    return dp_flat_shards(cfg.spec, [sh for _, sh in _hybrid_shards(cfg, rank)],
                          dp=_mesh(cfg).dp)


def _tensor_group(cfg: RunConfig, rank: int) -> tuple[int, int]:
    """(size, this rank's index) of the group the rank's layers are sharded over."""
    if cfg.strategy.name == "tensor":
        return cfg.world_size, rank
    if cfg.strategy.name == "hybrid":
        mesh = _mesh(cfg)
        return mesh.tp, mesh.coords(rank).tp
    return 1, 0


def _rows(cfg: RunConfig, rank: int) -> int:
    """Rows of one micro-batch on this rank (the largest, where they differ)."""
    B, M = cfg.train.batch_size, cfg.train.microbatches
    if cfg.strategy.name == "data":
        return max(piece_sizes(data_rows(B, cfg.world_size, rank), M))
    return _batch_rows(cfg, rank) // M


# ---------------------------------------------------------------- the machine


@dataclass(frozen=True)
class CostParams:
    """α, β per message kind and the compute rate; from config or a calibration."""

    alpha_s: float = 55e-6
    beta_Bps: float = 5e9
    collective_alpha_s: float = 230e-6
    collective_beta_Bps: float = 2.6e9
    flops_per_s: float = 115e9
    source: str = "config"  # config | calibrated

    @classmethod
    def from_config(cls, cfg: RunConfig) -> CostParams:
        c = cfg.cost
        return cls(c.alpha_s, c.beta_Bps, c.collective_alpha_s, c.collective_beta_Bps,
                   c.flops_per_s, "config")

    def as_dict(self) -> dict[str, Any]:
        return {"alpha_s": self.alpha_s, "beta_Bps": self.beta_Bps,
                "collective_alpha_s": self.collective_alpha_s,
                "collective_beta_Bps": self.collective_beta_Bps,
                "flops_per_s": self.flops_per_s, "source": self.source}


# ---------------------------------------------------------------- messages (closed forms)


def _record(c: Call, world: int) -> CommRecord:
    return CommRecord(None, c.op, c.role, c.phase, None, world, c.payload, c.received, c.payload,
                      c.wire, 0.0)


def pipeline_messages(cfg: RunConfig, rank: int) -> list[CommRecord]:
    """The schedule's crossings on `rank` (`_pipeline_p2p`) and the metric."""
    return _pipeline_p2p(cfg, rank) + [_record(metric_call(cfg.world_size), cfg.world_size)]


def _pipeline_p2p(cfg: RunConfig, rank: int) -> list[CommRecord]:
    """The schedule's crossings on `rank` (its lowering: F's output to the next stage's
    rank, B/I's input gradient to the previous one), each mb·n_k·b bytes (b the compute
    itemsize: 2 under bf16). A hybrid rank's are over its pp group (dimension `pp`; the
    peers its group's global ranks)."""
    sched = _schedule(cfg)
    plan = plan_stages(cfg.spec, sched.stages, cfg.strategy.balance)
    item, rows = compute_itemsize(cfg), _rows(cfg, rank)
    if cfg.strategy.name == "hybrid":
        members, dim = _mesh(cfg).group(rank, "pp"), "pp"
    else:
        members, dim = tuple(range(cfg.world_size)), None
    P = len(members)
    recv, send = transfers(sched, _pp_rank(cfg, rank))
    out = []
    for m in send:
        n = rows * cfg.model.dims[plan[max(m.from_stage, m.to_stage)][0]] * item
        phase = "forward" if m.role == "activation" else "backward"
        out.append(CommRecord(None, "send", m.role, phase, members[sched.stage_rank[m.to_stage]],
                              P, n, 0, 0, ring_wire_bytes("send", n, 2), 0.0, dim))
    for m in recv:
        n = rows * cfg.model.dims[plan[max(m.from_stage, m.to_stage)][0]] * item
        phase = "forward" if m.role == "activation" else "backward"
        out.append(CommRecord(None, "recv", m.role, phase,
                              members[sched.stage_rank[m.from_stage]], P, 0, n, 0, 0, 0.0, dim))
    return out


def hybrid_messages(cfg: RunConfig, rank: int) -> list[CommRecord]:
    """A mesh rank's crossings, each in its dimension: pp the pipeline's (`_pipeline_p2p`,
    the sends of plans/mesh.py `hybrid_calls` and the receives that match them), and the
    collectives of `hybrid_calls` — tp its stages' tensor plans, dp the gradient
    all-reduce (dp_shard: fsdp's gathers and reduce-scatters of every shard), world the
    metric."""
    from partition.plans.mesh import hybrid_calls

    mesh, sched = _mesh(cfg), _schedule(cfg)
    plan = plan_stages(cfg.spec, sched.stages, cfg.strategy.balance)
    calls = hybrid_calls(cfg.spec, mesh, sched, plan, layout=cfg.strategy.layout, rank=rank,
                         batch=cfg.train.batch_size, micro=cfg.train.microbatches,
                         itemsize=compute_itemsize(cfg), dp_shard=cfg.strategy.dp_shard,
                         reshard_after_forward=cfg.strategy.reshard_after_forward)
    groups = {"tp": mesh.tp, "dp": mesh.dp, "world": mesh.world}
    return _pipeline_p2p(cfg, rank) + [
        CommRecord(None, c.op, c.role, c.phase, None, groups[dim], c.payload, c.received,
                   c.payload, c.wire, 0.0, dim)
        for dim in ("tp", "dp", "world") for c in calls[dim]]


def tensor_messages(cfg: RunConfig, rank: int) -> list[CommRecord]:
    """The tensor plan's collectives (plans/tensor.py `tensor_calls`)."""
    P = cfg.world_size
    calls = tensor_calls(cfg.strategy.layout, cfg.model.dims, world=P, rank=rank,
                         batch=cfg.train.batch_size, micro=cfg.train.microbatches,
                         itemsize=compute_itemsize(cfg),
                         recompute=cfg.train.recompute == "full")
    return [_record(c, P) for c in calls]


def data_messages(cfg: RunConfig, rank: int) -> list[CommRecord]:
    """The data plan's all-reduces (plans/data.py `data_calls`)."""
    P = cfg.world_size
    return [_record(c, P) for c in data_calls(cfg.spec, world=P, itemsize=ITEMSIZE[cfg.train.dtype])]


def _fsdp_plan(cfg: RunConfig):  # noqa: ANN202 - the plan's shards
    from partition.plans import fsdp

    return fsdp, fsdp.shard_plan(cfg.model.dims, world=cfg.world_size, bias=cfg.model.bias)


def fsdp_messages(cfg: RunConfig, rank: int) -> list[CommRecord]:
    """The fsdp plan's collectives (plans/fsdp.py `fsdp_calls`) and the metric."""
    plan, shards = _fsdp_plan(cfg)
    P, st = cfg.world_size, cfg.strategy
    calls = plan.fsdp_calls(shards, zero_stage=st.zero_stage,
                            reshard_after_forward=st.reshard_after_forward,
                            micro=cfg.train.microbatches, itemsize=ITEMSIZE[cfg.train.dtype])
    return [CommRecord(None, c.op, c.role, c.phase, None, P, c.payload, c.received, c.payload,
                       c.wire, 0.0) for c in calls] + [_record(metric_call(P), P)]


def fsdp_formula(cfg: RunConfig, rank: int) -> dict[str, Any]:
    """fsdp's closed forms from its plan: state 1/P (padded), the gathered layers, the
    unsharded gradient being reduce-scattered, kept activations as `data` — a floor (the
    batch and the backward's temporaries are left out; docs/fsdp.md)."""
    plan, _ = _fsdp_plan(cfg)
    st = cfg.strategy
    mem = plan.memory(cfg.model.dims, world=cfg.world_size, rank=rank,
                      rows=data_rows(cfg.train.batch_size, cfg.world_size, rank),
                      micro=cfg.train.microbatches, zero_stage=st.zero_stage,
                      reshard_after_forward=st.reshard_after_forward, bias=cfg.model.bias,
                      momentum=bool(cfg.train.momentum), itemsize=ITEMSIZE[cfg.train.dtype])
    comm = summarize(fsdp_messages(cfg, rank))
    return {"rank": rank, **{k: mem[k] for k in ("params_bytes", "grads_bytes",
                                                  "optimizer_bytes", "activations_bytes",
                                                  "gathered_bytes", "peak_bytes")},
            "comm": {k: comm[k] for k in ("sent_bytes", "recv_bytes", "collective_bytes",
                                          "wire_bytes", "messages", "by_role")}}


MESSAGES = {"pipeline": pipeline_messages, "tensor": tensor_messages, "data": data_messages,
            "fsdp": fsdp_messages, "hybrid": hybrid_messages}


def messages(cfg: RunConfig, rank: int) -> list[CommRecord]:
    fn = MESSAGES.get(cfg.strategy.name)
    return fn(cfg, rank) if fn else []


def rank_flops(cfg: RunConfig, rank: int) -> dict[str, int]:
    """Matrix-product FLOPs of one step, 2·m·n·k each: the forward z = W x, the input
    gradient (I) dJ/dx = Wᵀ dJ/dz for every layer but the net's first, the weight
    gradient (W) dJ/dW = dJ/dz xᵀ. Elementwise work (φ, the loss, SGD) is left out.
    fsdp multiplies by every layer whole (as its gathers make them) at its rows."""
    rows = _batch_rows(cfg, rank)
    f = i = w = 0
    n = cfg.model.dims
    layers = ([LocalLayer(l, n[l], n[l + 1], cfg.model.bias) for l in range(len(n) - 1)]
              if cfg.strategy.name == "fsdp" else stage_layers(cfg, rank))
    for l in layers:
        one = 2 * rows * l.n_in * l.n_out
        f, w = f + one, w + one
        i += one if l.index > 0 else 0
    r = recompute_flops(cfg, rank)  # train.recompute=full: the backward's forward again
    return {"forward": f, "input_grad": i, "weight_grad": w, "recompute": r,
            "total": f + i + w + r}


def bubble_fraction(cfg: RunConfig) -> float:
    """Ideal idle share of a pipeline step: the schedule's action lists simulated with equal
    stages, F = I = W (B = 2F) and free communication, averaged over the ranks —
    (P−1)/(M+P−1) for GPipe and 1F1B (simulate.ideal_idle)."""
    if not _runs_pipeline(cfg):
        return 0.0
    from partition.simulate import ideal_idle

    idle = ideal_idle(_schedule(cfg))
    return sum(idle) / len(idle)


def in_flight_per_stage(cfg: RunConfig, rank: int) -> dict[int, int]:
    """Micro-batches whose activations each of the rank's stages holds at once, counted from
    its action list (GPipe M; 1F1B min(P−i, M)); 1 where there is no pipeline."""
    if not _runs_pipeline(cfg):
        return {0: 1}
    return in_flight(_schedule(cfg).ranks[_pp_rank(cfg, rank)])


# ---------------------------------------------------------------- memory (closed forms)
#
# The training peak of a rank is its state plus the largest of a few moments' live sets,
# each a sum of named terms (docs/cost-model.md), in the seed's notation with r rows per
# micro-batch and b bytes per item:
#
#   load      the data batch arriving: the float64 rows gathered from the data set next
#             to their copy in the run's dtype, and the row indices
#   backward  the data batch + the kept activations of every micro-batch in flight + the
#             loss gradients dJ/do held + the boundary buffers (pipeline) + the largest
#             backward transient of one micro-batch
#   hand-off  (pipeline) kept + the output being sent + the send still held + the
#             receive posted for the next action
#   tail      after the backward: what the step still references, and the largest W⊙W
#             that s = λ/2 Σ‖W‖² makes
#
# None of these replays an op: each term is a product of widths, and the pipeline's
# counts (micro-batches in flight, buffers held) come from the rank's action list.


def state_bytes(cfg: RunConfig, rank: int) -> dict[str, int]:
    """params, grads (one buffer per parameter) and optimizer state (momentum buffers).
    dp_shard: the padded pieces and their gradients, the state of the pieces' real
    elements (fsdp stage 3's over each tensor shard)."""
    item = ITEMSIZE[cfg.train.dtype]
    if _dp_sharded(cfg):
        flats, d = _dp_flats(cfg, rank), _mesh(cfg).coords(rank).dp
        piece = sum(f.piece for f in flats) * item
        real = sum(f.valid(d) for f in flats) * item
        return {"params_bytes": piece, "grads_bytes": piece,
                "optimizer_bytes": real if cfg.train.momentum else 0}
    p = sum(l.params for l in stage_layers(cfg, rank)) * item
    return {"params_bytes": p, "grads_bytes": p,
            "optimizer_bytes": p if cfg.train.momentum else 0}


def _kept_per_microbatch(cfg: RunConfig, rank: int) -> dict[int, int]:
    """Per stage, bytes one micro-batch keeps for backward: every layer's input x (but the
    data batch) and every hidden layer's z."""
    item, L, rows = ITEMSIZE[cfg.train.dtype], cfg.spec.num_layers, _rows(cfg, rank)
    out: dict[int, int] = {}
    for lay in stage_layers(cfg, rank):
        out[lay.stage] = out.get(lay.stage, 0) + rows * _kept_width(lay, L) * item
    return out


def _kept_width(lay: LocalLayer, L: int) -> int:
    # x as this rank holds it (a row-parallel layer its slice, a rowwise one the gathered
    # whole), z as it comes out of the layer's communication
    return (lay.n_in if lay.index > 0 else 0) + (lay.n_out if lay.index < L - 1 else 0)


def _kept_for_weight_grad(cfg: RunConfig, rank: int) -> dict[int, int]:
    """Per stage, bytes one micro-batch keeps from its I to its W (a deferred weight
    gradient): every layer's input x (but the data batch) and its dJ/dz, z freed."""
    item, rows = ITEMSIZE[cfg.train.dtype], _rows(cfg, rank)
    out: dict[int, int] = {}
    for lay in stage_layers(cfg, rank):
        n = (lay.n_in if lay.index > 0 else 0) + lay.n_out
        out[lay.stage] = out.get(lay.stage, 0) + rows * n * item
    return out


def kept_activation_bytes(cfg: RunConfig, rank: int) -> int:
    """The kept-activation peak. A pipeline rank walks its action list: F keeps what a
    micro-batch keeps for backward, I trades it for what the deferred W needs, W and B free
    it; the peak of that running sum (with F and B only, and one stage per rank: micro-batches
    in flight × what each keeps). Elsewhere one micro-batch's worth."""
    kf = _kept_per_microbatch(cfg, rank)
    if not _runs_pipeline(cfg):
        return sum(kf.values())
    return _walk_kept(cfg, rank, kf, _kept_for_weight_grad(cfg, rank))


def _walk_kept(cfg: RunConfig, rank: int, kf: dict[int, int], kw: dict[int, int]) -> int:
    """The most bytes kept at once along the rank's action list: F keeps `kf` of its stage,
    I trades that for the `kw` its W needs, B and W let go."""
    live = peak = 0
    for a in _schedule(cfg).ranks[_pp_rank(cfg, rank)]:
        live += {"F": kf[a.stage], "B": -kf[a.stage], "I": kw[a.stage] - kf[a.stage],
                 "W": -kw[a.stage]}[a.kind]
        peak = max(peak, live)
    return peak


def _batch_rows(cfg: RunConfig, rank: int) -> int:
    """Rows of the step's batch on this rank (data parallel: its share; a hybrid mesh: its
    replica's)."""
    B = cfg.train.batch_size
    if cfg.strategy.name == "hybrid":
        from partition.plans.mesh import replica_rows

        return width(replica_rows(B, _mesh(cfg), rank))
    return data_rows(B, cfg.world_size, rank) if cfg.strategy.name in ("data", "fsdp") else B


def _label_bytes(cfg: RunConfig, rows: int) -> int:
    """y for `rows` examples: class indices (int64) or targets in the run's dtype."""
    if cfg.model.loss == "cross_entropy":
        return rows * 8
    return rows * cfg.model.dims[-1] * ITEMSIZE[cfg.train.dtype]


def input_bytes(cfg: RunConfig, rank: int) -> int:
    """The data batch on this rank's device: X (and y) of its rows, in the run's dtype."""
    item, rows = ITEMSIZE[cfg.train.dtype], _batch_rows(cfg, rank)
    layers = stage_layers(cfg, rank)
    x = rows * cfg.model.dims[0] * item if layers[0].index == 0 else 0
    last = layers[-1].index == cfg.spec.num_layers - 1
    return x + (_label_bytes(cfg, rows) if last else 0)


def staging_bytes(cfg: RunConfig, rank: int) -> int:
    """The moment the batch arrives: the row indices (int64, the whole batch), the rows of
    X gathered from the data set (float64) and, in float32, their converted copy."""
    item, rows, d = ITEMSIZE[cfg.train.dtype], _batch_rows(cfg, rank), cfg.model.dims[0]
    if stage_layers(cfg, rank)[0].index != 0:
        # only y arrives (the last pipeline stage): its indices and labels, and for
        # squared error the float64 targets next to their copy
        y64 = 0 if cfg.model.loss == "cross_entropy" or item == 8 else rows * cfg.model.dims[-1] * 8
        return cfg.train.batch_size * 8 + y64 + _label_bytes(cfg, rows)
    x64 = rows * d * 8
    return cfg.train.batch_size * 8 + x64 + (rows * d * item if item != 8 else 0)


# Buffers of the layer's width alive inside φ'(z) ⊙ dJ/dh, the result dJ/dz included:
# relu's backward is one fused pass; tanh makes t and 1 − t²; sigmoid σ, dh·σ and 1 − σ.
ACTIVATION_BACKWARD_BUFFERS = {"relu": 1, "tanh": 3, "sigmoid": 4}


def backward_transient(cfg: RunConfig, rank: int, stage: int = 0) -> int:
    """The most bytes one micro-batch's backward through a stage allocates beyond what it
    keeps and the gradient it starts from (G = dJ/d(output), held by the caller until the
    stage's backward ends).

    Going down the stage's layers i, the live transients are the incoming gradient dJ/dh_i
    (but at the top, where it is G), the layer above's dJ/dz until this layer's replaces
    it, the φ' buffers, dJ/dz_i, dJ/db_i (one row, before dJ/dx) and the new dJ/dx_i —
    less the caches of the layers above, which are freed as the backward passes them. A
    rowwise layer's dJ/dx is a partial sum that is reduce-scattered: the partial, its P
    contiguous chunks and this rank's sum.
    """
    r, item, L = _rows(cfg, rank), ITEMSIZE[cfg.train.dtype], cfg.spec.num_layers
    tp, tp_rank = _tensor_group(cfg, rank)
    act = ACTIVATION_BACKWARD_BUFFERS[cfg.model.activation]
    layers = [l for l in stage_layers(cfg, rank) if l.stage == stage]
    best = freed = g_in = dz_above = 0  # widths: r·b bytes each
    for pos in range(len(layers) - 1, -1, -1):
        lay = layers[pos]
        hidden = lay.index < L - 1
        if hidden:  # φ'(z) ⊙ g, while the layer above's dJ/dz is still referenced
            best = max(best, r * (g_in + dz_above + act * lay.n_out - freed))
        dz = lay.n_out if hidden else 0  # the top layer's dJ/dz is dJ/do itself
        if lay.bias:  # dJ/db = Σ_rows dJ/dz: one row of n_out
            best = max(best, r * (g_in + dz - freed) + lay.n_out)
        if lay.index > 0:  # dJ/dx (the net's input needs none)
            dx = lay.n_in
            if lay.note == "rowwise" and tp > 1:  # + chunks + this rank's sum
                dx += lay.n_in + width(split_evenly(lay.n_in, tp)[tp_rank])
            best = max(best, r * (g_in + dz + dx - freed))
        else:
            best = max(best, r * (g_in + dz - freed))
        freed += _kept_width(lay, L)
        g_in = layers[pos - 1].n_out if pos > 0 else 0
        dz_above = dz
    return best * item


def _loss_gradient(cfg: RunConfig, rank: int) -> int:
    """dJ/do of one micro-batch: r·q·b."""
    return _rows(cfg, rank) * cfg.model.dims[-1] * ITEMSIZE[cfg.train.dtype]


def _counted_layers(cfg: RunConfig, rank: int) -> list[LocalLayer]:
    """The layers whose ‖W‖² this rank adds to s (a replica is counted by one rank only)."""
    layers = stage_layers(cfg, rank)
    if cfg.strategy.name == "data":
        return layers if rank == 0 else []
    if cfg.strategy.name == "tensor":
        plan = plan_layers(cfg.strategy.layout, cfg.model.dims, cfg.world_size, rank)
        return [l for l, s in zip(layers, plan, strict=True) if s.primary]
    if cfg.strategy.name == "hybrid":  # replica 0's primary shards
        if _mesh(cfg).coords(rank).dp != 0:
            return []
        return [l for l, (_, s) in zip(layers, _hybrid_shards(cfg, rank), strict=True)
                if s.primary]
    return layers


def tail_bytes(cfg: RunConfig, rank: int) -> int:
    """The step's tail, after the backward: the largest W⊙W that s = λ/2 Σ‖W‖² makes
    (one layer at a time) with its sum, and what the step still references — for single,
    data and tensor the data batch and the last micro-batch's dJ/do; a pipeline has let
    go of both."""
    item = ITEMSIZE[cfg.train.dtype]
    w = max(((l.n_in * l.n_out + 1) * item for l in _counted_layers(cfg, rank)), default=0)
    if _runs_pipeline(cfg):
        return w
    last = stage_layers(cfg, rank)[-1].index == cfg.spec.num_layers - 1
    return w + input_bytes(cfg, rank) + (_loss_gradient(cfg, rank) if last else 0)


@lru_cache(maxsize=16)
def _eager_sends(sched: Schedule) -> bool:
    return eager_sends(sched)  # plays every rank's list: once per schedule, not per rank


def _pipeline_moments(cfg: RunConfig, rank: int) -> dict[str, int]:
    """A pipeline rank's largest `backward` and `hand-off` live sets beyond state and the
    data batch, read off its action list. At each action: the activations of the
    micro-batches then in flight, the loss gradients dJ/do the last stage keeps for them
    (made by the loss at F, used at B), the boundary buffers, and the action's transient.

    Boundary buffers, each one micro-batch of a boundary width (r·n_k·b):
      G         a B's incoming dJ/d(output), held through the stage's backward
      held      sent buffers not yet waited for: none with eager sends (each is waited for
                and freed right after the next receive is posted), otherwise every send of
                the step (waited for at its end)
      local     outputs handed to a stage on the same rank, until it takes them
      posted    the receive posted for the next action, as soon as this one is done
    An F's received input is not a term of its own: it is the first layer's kept x.
    """
    sched = _schedule(cfg)
    plan = plan_stages(cfg.spec, sched.stages, cfg.strategy.balance)
    here = _pp_rank(cfg, rank)
    S, n, acts = sched.stages, cfg.model.dims, sched.ranks[here]
    r, item, q = _rows(cfg, rank), ITEMSIZE[cfg.train.dtype], cfg.model.dims[-1]
    kept_mb = _kept_per_microbatch(cfg, rank)
    transient = {s: backward_transient(cfg, rank, s) for s in kept_mb}
    eager = _eager_sends(sched)
    live = dict.fromkeys(kept_mb, 0)  # micro-batches in flight per stage (F until B or W)
    held: list[int] = []
    local: dict[Message, int] = {}

    def size(msg: Message) -> int:  # an activation into stage s, or its gradient: r·n_start(s)·b
        return r * n[plan[max(msg.from_stage, msg.to_stage)][0]] * item

    def remote(msg: Message | None, stage_of: str) -> bool:
        return msg is not None and sched.stage_rank[getattr(msg, stage_of)] != here

    def kept() -> int:
        return sum(live[s] * kept_mb[s] for s in live)

    def loss_grads() -> int:
        return live.get(S - 1, 0) * r * q * item

    backward = hand_off = 0
    for i, a in enumerate(acts):
        need, made = needs(a, S), produces(a, S)
        if need is not None:
            local.pop(need, None)  # a hand-over is now this action's input
        buffers = sum(held) + sum(local.values())
        if a.kind == "F":
            if a.stage == S - 1:  # the output o and the loss's softmax next to it
                hand_off = max(hand_off, kept() + kept_mb[a.stage] + loss_grads() + buffers
                               + 2 * r * q * item)
            live[a.stage] += 1
        elif a.kind in ("B", "I"):
            G = size(need) if need is not None else 0  # the last stage's G is its dJ/do
            backward = max(backward, kept() + loss_grads() + G + buffers + transient[a.stage])
            if a.kind == "B":  # an I keeps x and dJ/dz for its W
                live[a.stage] -= 1
        else:
            live[a.stage] -= 1
        sent = 0
        if made is not None:
            if remote(made, "to_stage"):
                sent = size(made)
            else:
                local[made] = size(made)
        nxt = needs(acts[i + 1], S) if i + 1 < len(acts) else None
        posted = size(nxt) if remote(nxt, "from_stage") else 0
        hand_off = max(hand_off, kept() + loss_grads() + sent + sum(held) + sum(local.values())
                       + posted)
        if sent:
            held = [] if eager else [*held, sent]
    return {"backward": backward, "hand-off": hand_off}


def dp_shard_buffer_bytes(cfg: RunConfig, rank: int) -> int:
    """dp_shard: what a backward holds beyond the plain mesh's — fsdp stage 3's terms over
    the rank's tensor shards (plans/fsdp.py): the gathered layers (the largest P·c·b when
    resharding, else every shard's) and the unsharded gradient being reduce-scattered,
    added to the pipeline's backward moment. An estimate, neither floor nor ceiling
    (docs/cost-model.md): it leaves out a keeping forward's layers held for the other
    micro-batches in flight and the collectives' own buffers, and the pipeline moment's
    largest transient is not always alive next to these buffers."""
    from partition.plans.fsdp import gathered_bytes, grad_buffer_bytes

    flats, item = _dp_flats(cfg, rank), ITEMSIZE[cfg.train.dtype]
    return (gathered_bytes(flats, zero_stage=3, itemsize=item,
                           reshard_after_forward=cfg.strategy.reshard_after_forward)
            + grad_buffer_bytes(flats, zero_stage=3, itemsize=item))


def peak_terms(cfg: RunConfig, rank: int) -> dict[str, Any]:
    """The closed-form training peak and its terms: `state`, `input` (the data batch),
    `kept`, and outside a pipeline `loss_gradient` and `transient`; `moments`, the live
    set beyond state of each moment (load, backward, hand-off for a pipeline, tail);
    `peak_bytes` = state + the largest moment, which `moment` names."""
    st = sum(state_bytes(cfg, rank).values())
    x = input_bytes(cfg, rank)
    moments = {"load": staging_bytes(cfg, rank)}
    terms = {"state": st, "input": x, "kept": kept_activation_bytes(cfg, rank)}
    if _runs_pipeline(cfg):
        for k, v in _pipeline_moments(cfg, rank).items():
            moments[k] = x + v
        if _dp_sharded(cfg):
            terms["step_buffers"] = dp_shard_buffer_bytes(cfg, rank)
            moments["backward"] += terms["step_buffers"]
    else:
        last = stage_layers(cfg, rank)[-1].index == cfg.spec.num_layers - 1
        terms["loss_gradient"] = _loss_gradient(cfg, rank) if last else 0
        terms["transient"] = backward_transient(cfg, rank)
        moments["backward"] = x + terms["kept"] + terms["loss_gradient"] + terms["transient"]
    moments["tail"] = tail_bytes(cfg, rank)
    top = max(moments, key=lambda k: moments[k])
    return {**terms, "moments": moments, "moment": top, "peak_bytes": st + moments[top]}


def formula_peak(cfg: RunConfig, rank: int) -> int:
    """state + the largest moment's live set (`peak_terms`)."""
    return peak_terms(cfg, rank)["peak_bytes"]


def independent_estimate(cfg: RunConfig) -> int:
    """The seed's hand count for one device, full batch: params + grads + input X +
    kept activations (z, h of each hidden layer) + the gradient dJ/dh reaching the top
    hidden layer."""
    item = ITEMSIZE[cfg.train.dtype]
    B, dims = cfg.train.batch_size, cfg.model.dims
    p = sum(cfg.spec.layer_params(l) for l in range(cfg.spec.num_layers)) * item
    hidden = sum(dims[1:-1])
    top = dims[-2] if len(dims) > 2 else 0
    return 2 * p + B * dims[0] * item + 2 * B * hidden * item + B * top * item


def formula(cfg: RunConfig, rank: int) -> dict[str, Any]:
    """`predicted.formula.ranks[]`: the closed forms for one rank."""
    if cfg.strategy.name == "fsdp":
        out = fsdp_formula(cfg, rank)
        if cfg.train.optimizer != "sgd":  # Adam's two moments instead of momentum's one
            extra = optimizer_state_bytes(cfg, rank) - out["optimizer_bytes"]
            out["optimizer_bytes"] += extra
            out["peak_bytes"] += extra
        return out
    comm = summarize(messages(cfg, rank))
    out = {"rank": rank, **state_bytes(cfg, rank),
           "input_bytes": input_bytes(cfg, rank),
           "activations_bytes": kept_activation_bytes(cfg, rank),
           "peak_bytes": formula_peak(cfg, rank),
           "in_flight": in_flight_per_stage(cfg, rank),
           "comm": {k: comm[k] for k in ("sent_bytes", "recv_bytes", "collective_bytes",
                                         "wire_bytes", "messages", "by_role")},
           "flops": rank_flops(cfg, rank)}
    t = cfg.train
    if t.recompute != "none" or t.precision == "bf16" or t.optimizer != "sgd":
        out.update(one_device_formula(cfg, rank))
    return out


# ---------------------------------------------------------------- one device's alternatives
#
# Recomputation, mixed precision and the optimizer's state (docs/one-device.md), as closed
# forms on top of the ones above: each says what changes, the rest is theirs.


def compute_itemsize(cfg: RunConfig) -> int:
    """Bytes per element of what forward and backward make (activations, their gradients,
    the data batch X): 2 under train.precision=bf16, else the master dtype's."""
    return 2 if cfg.train.precision == "bf16" else ITEMSIZE[cfg.train.dtype]


def recompute_flops(cfg: RunConfig, rank: int) -> int:
    """Extra FLOPs of train.recompute=full: each micro-batch's backward redoes z = W x of
    every layer the rank holds but the net's output layer (whose backward needs only its
    input and dJ/do), 2·rows·n_in·n_out each — the forward's FLOPs less the output layer's."""
    if cfg.train.recompute != "full":
        return 0
    rows = _batch_rows(cfg, rank)
    last = cfg.spec.num_layers - 1
    return sum(2 * rows * l.n_in * l.n_out for l in stage_layers(cfg, rank) if l.index != last)


def optimizer_state_bytes(cfg: RunConfig, rank: int) -> int:
    """The optimizer's state for the rank's parameters, in the master dtype: SGD with
    momentum one buffer per parameter, Adam / AdamW two (m and v), plain SGD none."""
    if cfg.strategy.name == "fsdp":  # the real elements of the rank's pieces
        _, shards = _fsdp_plan(cfg)
        p = sum(s.valid(rank) for s in shards) * ITEMSIZE[cfg.train.dtype]
    elif _dp_sharded(cfg):  # the same, of the pieces of its tensor shards
        d = _mesh(cfg).coords(rank).dp
        p = sum(f.valid(d) for f in _dp_flats(cfg, rank)) * ITEMSIZE[cfg.train.dtype]
    else:
        p = sum(l.params for l in stage_layers(cfg, rank)) * ITEMSIZE[cfg.train.dtype]
    if cfg.train.optimizer in ("adam", "adamw"):
        return 2 * p
    return p if cfg.train.momentum else 0


def compute_copy_bytes(cfg: RunConfig, rank: int) -> int:
    """Mixed precision's bfloat16 copy of the rank's weights (2 bytes a parameter), kept
    next to the float32 masters and counted with the params."""
    if cfg.train.precision != "bf16":
        return 0
    return 2 * sum(l.params for l in stage_layers(cfg, rank))


def recompute_kept_bytes(cfg: RunConfig, rank: int) -> int:
    """Kept activations under train.recompute=full, walked over the rank's action list as
    `kept_activation_bytes` walks it: F keeps the stage's input (rows × n_first × compute
    itemsize; nothing for the stage that reads the data batch), I trades it for what the
    deferred W needs (the same as without recomputation: the redone x and dJ/dz), W and B
    free it. With F and B only and one stage per rank: micro-batches in flight × input."""
    b, c, rows = ITEMSIZE[cfg.train.dtype], compute_itemsize(cfg), _rows(cfg, rank)
    kf: dict[int, int] = {}
    for lay in stage_layers(cfg, rank):
        kf.setdefault(lay.stage, rows * lay.n_in * c if lay.index > 0 else 0)
    if not _runs_pipeline(cfg):
        return sum(kf.values())
    kw = {s: n * c // b for s, n in _kept_for_weight_grad(cfg, rank).items()}
    return _walk_kept(cfg, rank, kf, kw)


def one_device_formula(cfg: RunConfig, rank: int) -> dict[str, int]:
    """state, kept activations and peak under the run's recompute / precision / optimizer,
    from the plain closed forms: the state with the optimizer's and the bf16 copy's bytes;
    what forward and backward make at the compute itemsize c instead of b; with recompute,
    the stage inputs in flight kept, plus one micro-batch's z and h back in its backward."""
    b, c = ITEMSIZE[cfg.train.dtype], compute_itemsize(cfg)
    plain_state = state_bytes(cfg, rank)
    state = {"params_bytes": plain_state["params_bytes"] + compute_copy_bytes(cfg, rank),
             "grads_bytes": plain_state["grads_bytes"],
             "optimizer_bytes": optimizer_state_bytes(cfg, rank)}
    inp, kept = input_bytes(cfg, rank), kept_activation_bytes(cfg, rank)
    transient = formula_peak(cfg, rank) - sum(plain_state.values()) - inp - kept
    layers = stage_layers(cfg, rank)
    rows = _batch_rows(cfg, rank)
    x = rows * cfg.model.dims[0] * b if layers[0].index == 0 else 0
    inp = inp - x + x * c // b
    if cfg.train.recompute == "full":
        per_mb = _kept_per_microbatch(cfg, rank)
        mb_rows = _rows(cfg, rank)
        first: dict[int, LocalLayer] = {}
        for lay in layers:
            first.setdefault(lay.stage, lay)
        # the largest of one micro-batch's redone caches, less its input (already kept)
        redone = max(n - (mb_rows * first[s].n_in * b if first[s].index > 0 else 0)
                     for s, n in per_mb.items())
        kept_now = recompute_kept_bytes(cfg, rank)
        live = kept_now + redone * c // b
    else:
        kept_now = kept * c // b
        live = kept_now
    peak = sum(state.values()) + inp + live + transient * c // b
    if cfg.train.precision == "bf16":
        peak = max(peak, sum(state.values()) + inp + _mixed_weight_grad_live(cfg, rank))
    return {**state, "activations_bytes": kept_now, "peak_bytes": peak}


def _mixed_weight_grad_live(cfg: RunConfig, rank: int) -> int:
    """bf16's other candidate for the peak: the backward of a stage's lowest layer makes its
    weight gradient dJ/dz xᵀ as a bfloat16 temporary (n_out·n_in·2 bytes) before adding it
    into the float32 buffer, while its x and z, dJ/dh, dJ/dz, the gradient the stage's
    backward started from, and the other micro-batches in flight are alive (bytes beyond
    state and the data batch)."""
    b, c, rows = ITEMSIZE[cfg.train.dtype], compute_itemsize(cfg), _rows(cfg, rank)
    L = cfg.spec.num_layers
    flight = in_flight_per_stage(cfg, rank)
    per_mb = _kept_per_microbatch(cfg, rank)
    by_stage: dict[int, list[LocalLayer]] = {}
    for lay in stage_layers(cfg, rank):
        by_stage.setdefault(lay.stage, []).append(lay)
    best = 0
    for s, lays in by_stage.items():
        low, top = lays[0], lays[-1]
        one = (rows * low.n_in * c if low.index > 0 else 0) if cfg.train.recompute == "full" \
            else per_mb[s] * c // b
        hidden = low.index < L - 1
        live = ((flight.get(s, 1) - 1) * one
                + (rows * low.n_in * c if low.index > 0 else 0)  # x, unless the data batch
                + rows * low.n_out * c * (3 if hidden else 1)  # z, dJ/dh, dJ/dz (or dJ/do)
                + (rows * top.n_out * c if len(lays) > 1 else 0)  # where the backward began
                + low.n_out * low.n_in * c)  # the bfloat16 product
        best = max(best, live)
    return best


# bfloat16 keeps 8 significant bits: round-to-nearest errs by at most 2⁻⁸ relative.
BF16_UNIT_ROUNDOFF = 2.0**-8


def bf16_growth(cfg: RunConfig) -> dict[str, int]:
    """How many unit roundoffs one bf16 step can add (docs/one-device.md): every matrix
    product of the forward rounds its weight copy and its output, the data batch is
    rounded once (2L+1, at most 3L with a rounded φ); the gradient of W¹ also passes back
    through every layer, each rounding dJ/dz, its product and φ'(z) from a rounded z (6L)."""
    L = cfg.spec.num_layers
    return {"forward": 3 * L, "step": 6 * L}


def bf16_loss_tolerance(cfg: RunConfig, losses: list[float]) -> float:
    """|J_bf16 − J_float64| after the steps of `losses` (J per step), to first order:
    evaluating J at the end errs by ≤ 3L·u·|J_T| (the forward's growth), and each step's
    gradient by ≤ 6L·u relative, which changes that step's decrease of J by as much, so the
    path adds ≤ 6L·u·Σ_t |J_t − J_{t+1}|. u = 2⁻⁸; no cancellation assumed."""
    u, g = BF16_UNIT_ROUNDOFF, bf16_growth(cfg)
    path = sum(abs(a - b) for a, b in zip(losses, losses[1:]))
    return u * (g["forward"] * abs(losses[-1]) + g["step"] * path)


def precision_check(cfg: RunConfig, losses: list[float]) -> dict[str, Any]:
    """result.json's `check` under train.precision=bf16: the tolerance on the final J against
    a float64 run of the same config (from this run's own curve), and what it rests on;
    the achieved gradient error is `grad_max_rel_err` beside it. Empty otherwise."""
    if cfg.train.precision != "bf16" or not losses:
        return {}
    g = bf16_growth(cfg)
    return {"precision": "bf16", "unit_roundoff": BF16_UNIT_ROUNDOFF, "growth": g,
            "grad_rel_err_first_order": g["step"] * BF16_UNIT_ROUNDOFF,
            "final_loss_tolerance": bf16_loss_tolerance(cfg, losses),
            "tolerance_reference": "float64, same config (docs/one-device.md)"}


_DEVIATION_KEYS = ("peak_bytes", "params_bytes", "grads_bytes", "optimizer_bytes",
                   "activations_bytes")
_DEVIATION_COMM = ("sent_bytes", "recv_bytes", "collective_bytes", "wire_bytes", "messages")


def formula_deviation(cfg: RunConfig) -> list[dict[str, Any]]:
    """Each closed form next to the dry run, once per distinct rank (`count` ranks alike):
    {key: (dry run, formula, (formula − dry run) / dry run)} for the training peak, the
    state, the kept activations and the comm bytes, and `moment`, the moment the formula's
    peak is at. `python -m experiments.formula_deviation` prints it as a table."""
    from partition.dryrun import dry_run

    out = []
    for d in dry_run(cfg):
        if d.same_as:
            continue
        f = formula(cfg, d.rank)
        moment = ("floor (plans/fsdp.py)" if cfg.strategy.name == "fsdp"
                  else "estimate (dp_shard)" if _dp_sharded(cfg)
                  else peak_terms(cfg, d.rank)["moment"])
        row: dict[str, Any] = {"rank": d.rank, "count": d.count, "moment": moment}
        for k in _DEVIATION_KEYS:
            row[k] = (d.memory[k], f[k], rel_err(f[k], d.memory[k]))
        for k in _DEVIATION_COMM:
            row[k] = (d.comm[k], f["comm"][k], rel_err(f["comm"][k], d.comm[k]))
        out.append(row)
    return out


# ---------------------------------------------------------------- the exact prediction


@dataclass
class PhaseMemory:
    """One phase's predicted memory (from the dry run)."""

    peak_bytes: int
    breakdown: dict[str, int]
    activations_bytes: int = 0


@dataclass
class RankCost:
    """Everything predicted for one rank and one steady step."""

    rank: int
    layers: list[LocalLayer]
    messages: list[CommRecord]  # the closed-form crossings (plans), next to the dry run's
    comm: dict[str, Any]  # the dry run's ledger summary: exactly what a run records
    memory_record: dict[str, Any]  # the dry run's `ranks[].memory`
    state: dict[str, int]
    flops: dict[str, int]
    in_flight_max: int
    count: int = 1
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def train(self) -> PhaseMemory:
        m = self.memory_record
        return PhaseMemory(m["peak_bytes"], m["breakdown"], m["activations_bytes"])

    @property
    def predict(self) -> PhaseMemory:
        m = self.memory_record
        return PhaseMemory(m["predict_peak_bytes"], m["predict_breakdown"])

    def memory(self) -> dict[str, Any]:
        """Mirrors `ranks[].memory` of result.json."""
        return dict(self.memory_record)


def _layers_or_none(cfg: RunConfig, rank: int) -> list[LocalLayer]:
    try:
        return stage_layers(cfg, rank)
    except ValueError:  # a strategy without closed forms yet: the dry run still predicts it
        return []


def _flops_or_zero(cfg: RunConfig, rank: int) -> dict[str, int]:
    try:
        return rank_flops(cfg, rank)
    except ValueError:  # a strategy without closed forms yet
        return {"total": 0}


def rank_costs(cfg: RunConfig, *, device: str = "cpu") -> list[RankCost]:
    """Every rank's prediction; identical ranks share one dry run (dryrun.signature)."""
    from partition.dryrun import dry_run

    out = []
    for d in dry_run(cfg):
        layers = _layers_or_none(cfg, d.rank)
        out.append(RankCost(
            d.rank, layers, messages(cfg, d.rank) if layers else [], d.comm, d.memory,
            {k: d.memory[k] for k in ("params_bytes", "grads_bytes", "optimizer_bytes")},
            _flops_or_zero(cfg, d.rank),
            d.in_flight_max, d.count, extra={"flops_counted": d.flops}))
    return out


def rank_cost(cfg: RunConfig, rank: int, device: str = "cpu") -> RankCost:
    """One rank's prediction (a dry run of that rank alone)."""
    from partition.dryrun import dry_rank

    d = dry_rank(cfg, rank)
    layers = _layers_or_none(cfg, rank)
    return RankCost(rank, layers, messages(cfg, rank) if layers else [], d.comm, d.memory,
                    {k: d.memory[k] for k in ("params_bytes", "grads_bytes", "optimizer_bytes")},
                    _flops_or_zero(cfg, rank), d.in_flight_max)


# ---------------------------------------------------------------- time and the whole run


def predict(cfg: RunConfig, *, device: str = "cpu", params: CostParams | None = None,
            times: list[dict[str, float]] | None = None) -> dict[str, Any]:
    """The `predicted` block of result.json: per rank the dry run's comm and memory, the
    simulated timing (when `times`, each rank's calibrated action durations, are given),
    and the closed forms under `formula`."""
    from partition.timeline import simulation

    params = params or CostParams.from_config(cfg)
    costs = rank_costs(cfg, device=device)
    bubble = bubble_fraction(cfg)
    sim, why = simulation(cfg, times, params) if times else (None, None)
    ranks = []
    for c in costs:
        timing = ({k: sim["ranks"][c.rank][k] for k in ("step_s", "compute_s", "idle_fraction")}
                  if sim else {"step_s": None, "compute_s": None, "idle_fraction": None})
        ranks.append({"rank": c.rank, "comm": c.comm, "memory": c.memory(), "timing": timing,
                      "flops": c.flops["total"], "flops_by_kind": c.flops,
                      # the dry run's count of the runner's own matrix products
                      "flops_counted": c.extra.get("flops_counted"),
                      "in_flight_max": c.in_flight_max,
                      "layers": [{"index": l.index, "n_in": l.n_in, "n_out": l.n_out}
                                 for l in c.layers]})
    has_formula = bool(costs and costs[0].layers) or cfg.strategy.name == "fsdp"
    return {
        "source": "dry run",
        "ranks": ranks,
        "bubble_fraction": bubble,
        "flops_per_step": sum(c.flops["total"] for c in costs),
        "step_time_s": sim["step_time_s"] if sim else None,
        "idle_fraction": sim["idle_fraction"] if sim else None,
        "idle_causes": sim["causes"] if sim else None,
        # why there is no simulated step although action times were given (else None)
        "not_simulated": why,
        "cost_params": params.as_dict(),
        "device": device,
        "formula": {"ranks": [formula(cfg, c.rank) for c in costs]} if has_formula else None,
    }


def peak_over_limit(cfg: RunConfig, *, device: str = "cpu") -> tuple[int, int] | None:
    """(rank, predicted peak) of the first rank whose dry-run peak exceeds memory_limit."""
    if cfg.memory_limit is None:
        return None
    for c in rank_costs(cfg, device=device):
        if c.train.peak_bytes > cfg.memory_limit:
            return c.rank, c.train.peak_bytes
    return None


# ---------------------------------------------------------------- measured vs predicted


def rel_err(measured: float | None, predicted: float | None) -> float | None:
    """(measured − predicted) / predicted; 0 when both are 0; None when it cannot be said."""
    if measured is None or predicted is None:
        return None
    if predicted == 0:
        return 0.0 if measured == 0 else None
    return (measured - predicted) / predicted


_COMM_KEYS = ("sent_bytes", "recv_bytes", "collective_bytes", "wire_bytes", "messages")
_MEM_KEYS = ("peak_bytes", "predict_peak_bytes", "params_bytes", "grads_bytes",
             "optimizer_bytes", "activations_bytes")
_FORMULA_KEYS = ("peak_bytes", "params_bytes", "grads_bytes", "optimizer_bytes",
                 "activations_bytes")


def prediction_error(ranks: list[dict[str, Any]], predicted: dict[str, Any], *,
                     step_time_s: float | None = None,
                     bubble_measured: float | None = None) -> dict[str, Any]:
    """Relative error of every measured figure against the dry run, per rank, with the
    largest absolute one per group (comm bytes, exact memory, peaks, time), and against
    the closed forms (`formula`)."""
    per_rank = []
    worst = {"comm": 0.0, "state": 0.0, "peaks": 0.0}
    worst_formula = {"comm": 0.0, "peak": 0.0, "state": 0.0}
    mismatches: list[str] = []
    formulas = (predicted.get("formula") or {}).get("ranks") or []
    for i, (mr, pr) in enumerate(zip(ranks, predicted["ranks"], strict=False)):
        mc, pc = mr.get("comm") or {}, pr["comm"]
        comm = {k: rel_err(mc.get(k), pc.get(k)) for k in _COMM_KEYS}
        roles = set(mc.get("by_role", {})) | set(pc.get("by_role", {}))
        comm["by_role"] = {role: rel_err(mc.get("by_role", {}).get(role, {}).get("bytes", 0),
                                         pc["by_role"].get(role, {}).get("bytes", 0))
                           for role in sorted(roles)}
        mm, pm = mr.get("memory") or {}, pr["memory"]
        mem = {k: rel_err(mm.get(k), pm.get(k)) for k in _MEM_KEYS}
        timing = {k: rel_err((mr.get("timing") or {}).get(k), pr["timing"].get(k))
                  for k in ("step_s", "compute_s", "comm_s")}
        entry: dict[str, Any] = {"rank": mr.get("rank"), "comm": comm, "memory": mem,
                                 "timing": timing}
        if i < len(formulas):
            f = formulas[i]
            fm = {k: rel_err(mm.get(k), f.get(k)) for k in _FORMULA_KEYS}
            fc = {k: rel_err(mc.get(k), f["comm"].get(k)) for k in _COMM_KEYS}
            entry["formula"] = {"memory": fm, "comm": fc}
            for k, v in fm.items():
                if v is not None:
                    key = "peak" if k == "peak_bytes" else "state"
                    worst_formula[key] = max(worst_formula[key], abs(v))
            for v in fc.values():
                if v is not None:
                    worst_formula["comm"] = max(worst_formula["comm"], abs(v))
        per_rank.append(entry)
        flat = [(f"comm.{k}", v) for k, v in comm.items() if k != "by_role"]
        flat += [(f"comm.by_role.{k}", v) for k, v in comm["by_role"].items()]
        for key, v in flat:
            if v is None:
                mismatches.append(f"rank {mr.get('rank')} {key}")
            else:
                worst["comm"] = max(worst["comm"], abs(v))
        for k in ("params_bytes", "grads_bytes", "optimizer_bytes", "activations_bytes"):
            if mem[k] is not None:
                worst["state"] = max(worst["state"], abs(mem[k]))
        for k in ("peak_bytes", "predict_peak_bytes"):
            if mem[k] is not None:
                worst["peaks"] = max(worst["peaks"], abs(mem[k]))
    return {
        "ranks": per_rank,
        "step_time_s": rel_err(step_time_s, predicted.get("step_time_s")),
        "bubble_fraction": None if bubble_measured is None
        else bubble_measured - predicted.get("bubble_fraction", 0.0),
        "max_abs": worst,
        "formula_max_abs": worst_formula if formulas else None,
        "unpredicted": mismatches,
    }
