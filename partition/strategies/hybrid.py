"""`hybrid`: a dp × pp × tp mesh (plans/mesh.py), composed of the 1-D strategies' parts.

Nothing here is a new strategy:
  - pp: the one pipeline runtime (pipeline/runner.py) runs the schedule over the rank's
    pp group, with its own Comm (peers are pp coordinates);
  - tp: each of the rank's stages is a `TensorStage`, the tensor strategy's shards of
    that stage's layers (tensor/runner.py's `TensorShards`) behind the `Stage` interface,
    over the tp group. The stage's input and output are whole on every tp rank, so the
    pipeline hands whole activations between ranks of the same tp coordinate;
  - dp: the replica of the whole pipeline takes its rows of the batch; after the
    pipeline's backward its gradients — views into one flat buffer, as data.py's —
    cross once, one all-reduce within the dp group. With dp_shard (fsdp stage 3 on the
    data dimension, torchtitan's FSDP2 × TP) each stage is a `ShardedTensorStage`: every
    tensor shard is cut again in dp pieces (fsdp.py's `ShardedLayers`), gathered over dp
    before each forward and each backward of a micro-batch, its gradient reduce-scattered
    onto the pieces after its backward; only the pieces, their gradients and their
    optimizer state live between steps.
Then the shared step tail: λW, the update, J over all ranks (dimension `world`) — on the
pieces under dp_shard.

Every ledger record carries its dimension (`dp`, `pp`, `tp`, `world`), so
`ranks[].comm.by_dim` says which links carry what.
"""

from __future__ import annotations

import torch

from partition.comm import Comm
from partition.config import RunConfig
from partition.data import Dataset
from partition.memory import layer_state_tensors
from partition.model import Grads, Layer, WeightPart
from partition.plans.mesh import (
    DIMS,
    Mesh,
    dp_flat_shards,
    replica_rows,
    resolve_mesh,
    stage_shards,
)
from partition.plans.schedule import Schedule, load_schedule
from partition.strategies.base import StepOut, finish_step, master_dtype
from partition.strategies.data import flat_grads
from partition.strategies.fsdp import (
    ShardedLayers,
    StepBuffers,
    flat_layer,
    piece_layers,
    sharded_state_bytes,
)
from partition.strategies.pipeline.runner import PipelineRunner
from partition.strategies.stage import Stage
from partition.strategies.tensor.runner import TensorShards
from partition.topology import Topology, mesh_groups


def config_mesh(cfg: RunConfig) -> Mesh:
    s = cfg.strategy
    return resolve_mesh(world=cfg.world_size, dp=s.dp, pp=s.pp, tp=s.tp)


def mesh_schedule(cfg: RunConfig, mesh: Mesh) -> Schedule:
    """The pipeline schedule over the mesh's pp ranks."""
    return load_schedule(cfg.strategy.schedule, world=mesh.pp, micro=cfg.train.microbatches,
                         virtual=cfg.strategy.virtual_stages)


def pp_topology(mesh: Mesh, topo: Topology) -> Topology:
    """The pipeline's view of this rank: its pp coordinate among the mesh's pp ranks."""
    return Topology(mesh.coords(topo.rank).pp, mesh.pp, topo.local_rank, topo.device,
                    topo.backend if mesh.pp > 1 else "none")


class TensorStage(TensorShards, Stage):
    """A pipeline stage whose layers are tensor-sharded over a tp group: `Stage`'s
    bookkeeping (what is kept per micro-batch, the loss, the I/W split's deferral) around
    `TensorShards`' forward and backward."""

    def __init__(self, spec, plan, full, *, index: int, comm: Comm, dtype: torch.dtype,  # noqa: ANN001
                 cdtype: torch.dtype, device: torch.device) -> None:
        # train.recompute and mixed precision are refused for hybrid meshes (config.py):
        # the mesh's plan (plans/mesh.py) does not count their crossings.
        TensorShards.__init__(self, spec, plan, full, comm=comm, world=comm.world_size,
                              rank=comm.rank, dtype=dtype, cdtype=cdtype, recompute=False,
                              device=device)
        self.index = index
        self.kept, self.deferred, self.in_flight_max = {}, {}, 0

    # By the plan, not by `layers`: a dp_shard stage's layers are pieces, and a rank's
    # piece of a small layer may be empty.
    @property
    def holds_input(self) -> bool:
        return self.plan[0].layer == 0

    @property
    def has_output_layer(self) -> bool:
        return self.plan[-1].layer == self.spec.num_layers - 1

    def forward(self, x: torch.Tensor, mb: int = 0) -> torch.Tensor:
        out, caches = self._forward(x, keep=True)
        self.kept[mb] = caches
        self.in_flight_max = max(self.in_flight_max, self.in_flight)
        return out

    def backward(self, g: torch.Tensor, mb: int = 0, *,
                 need_input_grad: bool) -> torch.Tensor | None:
        return self._backward(self.kept.pop(mb), g, need_input_grad=need_input_grad)

    def backward_input(self, g: torch.Tensor, mb: int, *,
                       need_input_grad: bool) -> torch.Tensor | None:
        parts: list[WeightPart] = []
        dx = self._backward(self.kept.pop(mb), g, need_input_grad=need_input_grad, defer=parts)
        self.deferred[mb] = parts
        if self.probe is not None:
            self.probe.tag("activations", [p.dz for p in parts])
        return dx

    def backward_weight(self, mb: int) -> None:
        self._backward_weight(self.deferred.pop(mb))

    def predict(self, x: torch.Tensor, *, exchange: bool = True) -> torch.Tensor:
        if self.probe is not None and self.holds_input:
            self.probe.inputs(x)
        out, _ = self._forward(x, keep=False, exchange=exchange)
        return out


class ShardedTensorStage(TensorStage):
    """dp_shard: a TensorStage whose tensor shards are cut again, each in dp pieces over the
    dp group (`plans.mesh.dp_flat_shards`; fsdp.py's `ShardedLayers` does the cutting,
    gathering and reduce-scattering). Each forward and each backward of a micro-batch
    gathers a layer just before its product (`_weights`); its gradient is reduce-scattered
    onto the rank's gradient piece right after (`_grad_done`). With
    reshard_after_forward=false a forward's gathered layers are kept, per micro-batch, until
    that micro-batch's B or I, which then gathers nothing.

    `layers` (and `compute`: the products use the gathered layers, never these) are the
    pieces' real elements as rectangles of the full W, `grads` their gradients' — the
    masters; `opt_layers`/`opt_grads` the same elements as the optimizer sees them.
    """

    def __init__(self, spec, plan, full, *, index: int, comm: Comm, dp_comm: Comm,  # noqa: ANN001
                 reshard: bool, buffers: StepBuffers, dtype: torch.dtype,
                 device: torch.device) -> None:
        super().__init__(spec, plan, full, index=index, comm=comm, dtype=dtype, cdtype=dtype,
                         device=device)
        flats = dp_flat_shards(spec, plan, dp=dp_comm.world_size)
        self.sharded = ShardedLayers.cut(
            flats, [flat_layer(full, f, dtype=dtype, device=device) for f in flats],
            comm=dp_comm, rank=dp_comm.rank, reshard=reshard, buffers=buffers)
        # The pieces are the masters: the whole shards TensorShards made are let go here.
        self.layers = self.compute = self.sharded.layers
        self.grads = self.sharded.piece_grads()
        r, sh = dp_comm.rank, self.sharded
        # s and weights.npz: every dp rank's pieces, of the primary shards only (a megatron
        # replica counts once).
        self.saved_layers = [l for f, p, ls in zip(flats, sh.pieces, plan, strict=True)
                             if ls.primary for l in piece_layers(f, r, p)]
        self.counted = [l for l, ls in zip(sh.opt_layers, plan, strict=True) if ls.primary]
        self.held: dict[int, dict[int, Layer]] = {}  # micro-batch -> its forward's layers
        self._filling: dict[int, Layer] | None = None  # a keeping forward's, without resharding
        self._using: dict[int, Layer] = {}  # the backward's held layers

    def _weights(self, i: int, phase: str, *, exchange: bool = True) -> Layer:
        if phase == "backward" and i in self._using:
            return self._using.pop(i)
        layer = self.sharded.gather(i, phase, exchange=exchange, probe=self.probe)
        if self._filling is not None:
            self._filling[i] = layer
        return layer

    def _grad_target(self, i: int) -> tuple[torch.Tensor | None, Grads]:
        return self.sharded.grad_target(i)

    def _grad_done(self, i: int, handle: torch.Tensor | None) -> None:
        self.sharded.grad_done(i, handle)

    def start_step(self) -> None:
        for g in self.sharded.grad_pieces:
            g.zero_()
        self.in_flight_max = 0

    def idle(self) -> bool:
        return super().idle() and not self.held

    def forward(self, x: torch.Tensor, mb: int = 0) -> torch.Tensor:
        self._filling = None if self.sharded.reshard else {}
        out = super().forward(x, mb)
        if self._filling is not None:
            self.held[mb] = self._filling
        self._filling = None
        return out

    def backward(self, g: torch.Tensor, mb: int = 0, *,
                 need_input_grad: bool) -> torch.Tensor | None:
        self._using = self.held.pop(mb, {})
        dx = super().backward(g, mb, need_input_grad=need_input_grad)
        self._using = {}
        return dx

    def backward_input(self, g: torch.Tensor, mb: int, *,
                       need_input_grad: bool) -> torch.Tensor | None:
        self._using = self.held.pop(mb, {})
        dx = super().backward_input(g, mb, need_input_grad=need_input_grad)
        self._using = {}
        return dx


class HybridRunner(PipelineRunner):
    def __init__(self, cfg: RunConfig, topo: Topology, comm: Comm, data: Dataset,
                 full: dict[str, torch.Tensor]) -> None:
        self.mesh = config_mesh(cfg)
        self.dp_shard = cfg.strategy.dp_shard
        # dp_shard: one set of step buffers for all of this rank's stages.
        self.buffers = StepBuffers(dtype=master_dtype(cfg), device=topo.device)
        self.global_topo = topo
        self.coords = self.mesh.coords(topo.rank)
        # The groups, built once (every rank creates every group); none in a dry run,
        # whose transport moves nothing. A dimension of size 1 has no group and its Comm
        # is never called: the runners skip every crossing of a 1-rank group.
        groups = mesh_groups(self.mesh, topo.rank) if comm.transport.moves else {}
        self.comms: dict[str, Comm] = {
            dim: comm.sub(dim=dim, members=self.mesh.group(topo.rank, dim),
                          group=groups[dim][1] if dim in groups else None)
            for dim in DIMS}
        # J over every rank: the world's group, recorded as dimension `world`.
        self.world = comm.sub(dim="world", members=tuple(range(self.mesh.world)), group=None)
        super().__init__(cfg, pp_topology(self.mesh, topo), self.comms["pp"], data, full,
                         schedule=mesh_schedule(cfg, self.mesh),
                         rows=replica_rows(cfg.train.batch_size, self.mesh, topo.rank))
        mine = [l for st in self.stages.values() for l in getattr(st, "saved_layers", st.layers)]
        if self.dp_shard:
            # The pieces of all dp ranks cover every weight once: each counts its own.
            sharded = [st.sharded for st in self.stages.values()]
            self.opt_layers = [l for sh in sharded for l in sh.opt_layers]
            self.opt_grads = [g for sh in sharded for g in sh.opt_grads]
            self.counted = [l for st in self.stages.values() for l in st.counted]
            self.saved_layers = mine
            return
        # Every stage's gradients are views into one flat buffer: one all-reduce over dp.
        self.flat, views = flat_grads(self.layers)
        at = 0
        for st in self.stages.values():
            st.grads = views[at:at + len(st.layers)]
            at += len(st.layers)
        # One copy of each weight counts in s and goes to weights.npz: dp replica 0's,
        # of a tensor stage the primary shards.
        self.saved_layers = mine if self.coords.dp == 0 else []

    def _make_stage(self, s: int, start: int, end: int, full: dict[str, torch.Tensor]) -> Stage:
        if self.mesh.tp == 1 and not self.dp_shard:
            return super()._make_stage(s, start, end, full)
        # (dp_shard at tp = 1: the tensor plan of one rank, whole layers, cut over dp.)
        plan = stage_shards(self.cfg.strategy.layout, self.spec.dims, start, end,
                            tp=self.mesh.tp, rank=self.coords.tp)
        if self.dp_shard:
            return ShardedTensorStage(self.spec, plan, full, index=s, comm=self.comms["tp"],
                                      dp_comm=self.comms["dp"],
                                      reshard=self.cfg.strategy.reshard_after_forward,
                                      buffers=self.buffers, dtype=self.dtype,
                                      device=self.topo.device)
        return TensorStage(self.spec, plan, full, index=s, comm=self.comms["tp"],
                           dtype=self.dtype, cdtype=self.cdtype, device=self.topo.device)

    @property
    def tracer(self):  # noqa: ANN201
        return self._tracer

    @tracer.setter
    def tracer(self, t) -> None:  # noqa: ANN001
        # The train loop hands the tracer to the runner and the world's Comm; the mesh's
        # Comms record spans too.
        self._tracer = t
        for c in getattr(self, "comms", {}).values():
            c.tracer = t
        if hasattr(self, "world"):
            self.world.tracer = t

    def _finish(self, want_grads: bool) -> StepOut:
        grads = [g for st in self.stages.values() for g in st.grads]
        if self.dp_shard:
            # The gradients are on the pieces already (reduce-scattered layer by layer).
            self.buffers.release()
            layers, opt_grads, counted = self.opt_layers, self.opt_grads, self.counted
        else:
            if self.mesh.dp > 1:
                self.comms["dp"].all_reduce(self.flat, role="weight_grad", phase="update")
            layers, opt_grads, counted = self.layers, grads, self.saved_layers
        # Every tp rank of the last stage computed the same loss: tp coordinate 0 counts it.
        loss_owner = self.coords.tp == 0
        out = finish_step(layers=layers, grads=opt_grads, counted=counted, opt=self.opt,
                          weight_decay=self.spec.weight_decay, comm=self.world,
                          loss_sum=self._loss if loss_owner else 0.0,
                          correct=self._correct if loss_owner else 0,
                          batch=self.cfg.train.batch_size, want_grads=want_grads,
                          cross_entropy=self.spec.loss == "cross_entropy",
                          in_flight_max=self._in_flight_max, device=self.topo.device,
                          compute=None if self.dp_shard else self.compute, tracer=self.tracer)
        if want_grads:
            out.grads = grads  # matching `layers` (dp_shard: the pieces' rectangles)
        return out

    def predict(self, step: int, *, exchange: bool = True) -> torch.Tensor | None:
        self.buffers.release()
        out = super().predict(step, exchange=exchange)
        self.buffers.release()
        return out

    # ------------------------------------------------------------ for memory.py

    def memory_state(self) -> dict[str, list[torch.Tensor]]:
        """dp_shard: the padded pieces and their gradients (a rank's piece of a small layer
        may hold no real element, and no view of it would name its storage)."""
        if not self.dp_shard:
            return layer_state_tensors(self)
        sharded = [st.sharded for st in self.stages.values()]
        return {"params": [p for sh in sharded for p in sh.pieces],
                "grads": [g for sh in sharded for g in sh.grad_pieces],
                "optimizer": list(self.opt.buffers)}

    def state_bytes(self) -> dict[str, int]:
        if not self.dp_shard:
            return super().state_bytes()
        return sharded_state_bytes(self.memory_state(), self.opt.state_bytes(self.opt_layers))
