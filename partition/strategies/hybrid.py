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
    cross once, one all-reduce within the dp group.
Then the shared step tail: λW, the update, J over all ranks (dimension `world`).

Every ledger record carries its dimension (`dp`, `pp`, `tp`, `world`), so
`ranks[].comm.by_dim` says which links carry what.
"""

from __future__ import annotations

import torch

from partition.comm import Comm
from partition.config import RunConfig
from partition.data import Dataset
from partition.model import WeightPart, backward_weight
from partition.plans.mesh import DIMS, Mesh, replica_rows, resolve_mesh, stage_shards
from partition.plans.schedule import Schedule, load_schedule
from partition.strategies.base import StepOut, finish_step
from partition.strategies.data import flat_grads
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
        backward_weight(self.deferred.pop(mb), self.grads)

    def predict(self, x: torch.Tensor, *, exchange: bool = True) -> torch.Tensor:
        if self.probe is not None and self.holds_input:
            self.probe.inputs(x)
        out, _ = self._forward(x, keep=False, exchange=exchange)
        return out


class HybridRunner(PipelineRunner):
    def __init__(self, cfg: RunConfig, topo: Topology, comm: Comm, data: Dataset,
                 full: dict[str, torch.Tensor]) -> None:
        if cfg.strategy.dp_shard:
            raise ValueError("strategy.dp_shard=true: the sharded data dimension (fsdp) is "
                             "not built yet (strategy=fsdp is the 1-D form)")
        self.mesh = config_mesh(cfg)
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
        # Every stage's gradients are views into one flat buffer: one all-reduce over dp.
        self.flat, views = flat_grads(self.layers)
        at = 0
        for st in self.stages.values():
            st.grads = views[at:at + len(st.layers)]
            at += len(st.layers)
        # One copy of each weight counts in s and goes to weights.npz: dp replica 0's,
        # of a tensor stage the primary shards.
        mine = [l for st in self.stages.values() for l in getattr(st, "saved_layers", st.layers)]
        self.saved_layers = mine if self.coords.dp == 0 else []

    def _make_stage(self, s: int, start: int, end: int, full: dict[str, torch.Tensor]) -> Stage:
        if self.mesh.tp == 1:
            return super()._make_stage(s, start, end, full)
        plan = stage_shards(self.cfg.strategy.layout, self.spec.dims, start, end,
                            tp=self.mesh.tp, rank=self.coords.tp)
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
        if self.mesh.dp > 1:
            self.comms["dp"].all_reduce(self.flat, role="weight_grad", phase="update")
        # Every tp rank of the last stage computed the same loss: tp coordinate 0 counts it.
        loss_owner = self.coords.tp == 0
        return finish_step(layers=self.layers,
                           grads=[g for st in self.stages.values() for g in st.grads],
                           counted=self.saved_layers, opt=self.opt,
                           weight_decay=self.spec.weight_decay, comm=self.world,
                           loss_sum=self._loss if loss_owner else 0.0,
                           correct=self._correct if loss_owner else 0,
                           batch=self.cfg.train.batch_size, want_grads=want_grads,
                           cross_entropy=self.spec.loss == "cross_entropy",
                           in_flight_max=self._in_flight_max, device=self.topo.device,
                           compute=self.compute, tracer=self.tracer)
