"""`hybrid` on PyTorch's own engines: a 3-D DeviceMesh ("dp", "pp", "tp") laid out as
plans/mesh.py's (tp innermost, then pp, dp outermost), composed of the 1-D torch engines:

  - pp: engines/pipeline.py's runner — torch.distributed.pipelining stages over
    mesh["pp"]'s group, on the schedule of the mesh's pp ranks (a one-stage pipeline when
    pp = 1, which only runs the M micro-batches, as the explicit hybrid does);
  - tp: each stage's layers parallelized on mesh["tp"] in engines/tensor.py's DTensor
    styles, the layout applied to the stage's own layers (as plans/mesh.stage_shards);
  - dp: each stage module wrapped in DDP over mesh["dp"]. Given a sub-mesh, DDP swaps the
    DTensor parameters for their local shards (torch's TP + DDP transform) and
    all-reduces those; pipelining runs all micro-batches but the last under DDP's no_sync,
    so the gradients cross once per step, in the last backward.
Then the torch engines' step tail: λ as weight decay, SGD, J over every rank (`world`).

What crosses is what the explicit hybrid plans (plans/mesh.hybrid_calls) except where
DTensor places a tensor differently: RowwiseParallel replicates its bias, so every tp rank
(not tp rank 0 alone) all-reduces that bias's gradient over dp; a stage with an odd number
of layers ends ColwiseParallel with an all-gathered output (the explicit engine
replicates that layer: no bytes).

Roles by the process group an op ran on (observe.SeenOp.group, its member ranks): on tp
as engines/tensor.py's, on dp as engines/data.py's, on pp as engines/pipeline.py's.
Forward pre/post hooks on each stage module say which phase a tp collective is in (torch's
schedule interleaves the micro-batches' forwards and backwards).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.nn.parallel import DistributedDataParallel as DDP

from partition.comm import Comm
from partition.config import RunConfig
from partition.data import Dataset
from partition.engines.data import data_role
from partition.engines.observe import SeenOp
from partition.engines.pipeline import TorchPipelineRunner
from partition.engines.tensor import tensor_parallel, tensor_role
from partition.model import Layer
from partition.plans.mesh import DIMS, Mesh, replica_rows
from partition.strategies.hybrid import config_mesh, mesh_schedule, pp_topology
from partition.topology import Topology


@dataclass(frozen=True)
class DdpParams:
    """What DDP trains of one nn.Linear: its (local) Parameters. Under tp, DDP's TP
    transform swaps the module's DTensor parameters for these and its forward hook sets
    DTensor views of them back as plain attributes (the module then lists no parameters),
    so the optimizer and the gradients read them here, not off the module."""

    weight: nn.Parameter
    bias: nn.Parameter | None

    def parameters(self) -> list[nn.Parameter]:
        return [p for p in (self.weight, self.bias) if p is not None]


def mesh_layout(mesh: Mesh) -> list[list[list[int]]]:
    """The global rank at [dp][pp][tp]: what the DeviceMesh must hold."""
    return [[[mesh.rank_of(dp=d, pp=p, tp=t) for t in range(mesh.tp)] for p in range(mesh.pp)]
            for d in range(mesh.dp)]


class TorchHybridRunner(TorchPipelineRunner):
    def __init__(self, cfg: RunConfig, topo: Topology, comm: Comm, data: Dataset,
                 full: dict[str, torch.Tensor]) -> None:
        self.mesh = config_mesh(cfg)
        self.coords = self.mesh.coords(topo.rank)
        self.device_mesh = init_device_mesh(topo.device.type, (self.mesh.dp, self.mesh.pp,
                                                               self.mesh.tp), mesh_dim_names=DIMS)
        if self.device_mesh.mesh.tolist() != mesh_layout(self.mesh):
            raise ValueError(f"torch's DeviceMesh {self.device_mesh.mesh.tolist()} is not the "
                             f"plan's layout {mesh_layout(self.mesh)}")
        # J over every rank: the world's group, recorded as dimension `world`.
        world = comm.sub(dim="world", members=tuple(range(self.mesh.world)), group=None)
        super().__init__(cfg, pp_topology(self.mesh, topo), world, data, full,
                         schedule=mesh_schedule(cfg, self.mesh),
                         rows=replica_rows(cfg.train.batch_size, self.mesh, topo.rank),
                         group=self.device_mesh["pp"].get_group())
        # A dimension of size 1 carries nothing (and its one-rank groups would collide).
        self.dims = {self.mesh.group(topo.rank, dim): dim for dim in DIMS
                     if self.mesh.size(dim) > 1}
        # One copy of each weight goes to weights.npz and counts in s: dp replica 0's.
        self.saved_layers = self.layers if self.coords.dp == 0 else []

    def _stage_module(self, start: int, end: int, full: dict[str, torch.Tensor],
                      ) -> tuple[nn.Module, list, list[Layer]]:
        module, lins, layers = super()._stage_module(start, end, full)
        if self.mesh.tp > 1:
            layers = tensor_parallel(self.spec, module, lins, first=start,
                                     layout=self.cfg.strategy.layout, mesh=self.device_mesh["tp"])
        module.register_forward_pre_hook(self._in_forward)
        module.register_forward_hook(self._after_forward)
        if self.mesh.dp == 1:
            return module, lins, layers
        ddp = DDP(module, device_mesh=self.device_mesh["dp"], gradient_as_bucket_view=True)
        # Read after the wrap: the local Parameters DDP holds (the Layer views share their
        # storage, so they stay right).
        return ddp, [DdpParams(lin.weight, lin.bias) for lin in lins], layers

    def _in_forward(self, module: nn.Module, args: tuple) -> None:
        self.observer.phase = "forward"

    def _after_forward(self, module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        # A tp or dp collective outside a stage's forward is in a backward.
        self.observer.phase = "backward"

    def _train(self, X: torch.Tensor, y: torch.Tensor) -> tuple[float, int]:
        loss, correct = super()._train(X, y)
        # Every tp rank of the last stage computed the same loss: tp coordinate 0 counts it.
        return (loss, correct) if self.coords.tp == 0 else (0.0, 0)

    def _sq_share(self) -> float:
        # The tp shards of one replica cover every weight once (DTensor shards them all).
        return super()._sq_share() if self.coords.dp == 0 else 0.0

    def role_of(self, s: SeenOp) -> tuple[str, str]:
        dim = self.dims.get(s.group) if s.group is not None else None
        if dim == "tp":
            return tensor_role(s)
        if dim == "dp":
            return data_role(s)
        return super().role_of(s)
