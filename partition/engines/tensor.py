"""`tensor` on `torch.distributed.tensor.parallel`: DTensor shards over a 1-D DeviceMesh.

Megatron layout: layers go in (ColwiseParallel, RowwiseParallel) pairs — W¹ split
by rows (hidden units; DTensor's Shard(0) of nn.Linear's (n_out, n_in) weight),
W² by columns (Shard(1)) — so the forward needs one all-reduce of the partial
outputs per pair, and the backward one all-reduce of the input gradient per pair
after the first (the seed's x needs none). An odd last layer is ColwiseParallel
with a replicated (all-gathered) output. The `rowwise` layout makes every layer
ColwiseParallel with a replicated output: an all-gather between layers.

Shards follow DTensor's even split (torch.chunk: ceil(n/P) rows per rank, the
last ones shorter); `layers[].rows/cols` say which, for weights.npz. A
RowwiseParallel bias is replicated; rank 0 owns it in the weights file.

Roles: an all-reduce in the forward is `partial_output`, an all-gather `gather`;
any collective in the backward is `input_grad`.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed._functional_collectives import AsyncCollectiveTensor
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.tensor import Replicate
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

from partition.comm import Comm
from partition.config import RunConfig
from partition.data import Dataset
from partition.engines.common import (
    TorchRunner,
    as_layer,
    build_linear,
    hits,
    layer_stack,
    loss_sum,
    make_sgd,
)
from partition.engines.observe import SeenOp
from partition.model import Layer, MLPSpec
from partition.topology import Topology


def chunk_range(n: int, parts: int, index: int) -> tuple[int, int]:
    """DTensor's Shard split of n among `parts` (torch.chunk): [start, end) of part `index`."""
    size = -(-n // parts)
    start = min(n, index * size)
    return start, min(n, start + size)


def styles(num_layers: int, layout: str) -> list[str]:
    """'col' / 'row' / 'col_rep' (colwise, output replicated) per layer."""
    if layout == "rowwise":
        return ["col_rep"] * num_layers
    out = ["col" if l % 2 == 0 else "row" for l in range(num_layers)]
    if num_layers % 2:
        out[-1] = "col_rep"
    return out


def check_even(dims: tuple[int, ...] | list[int], kinds: list[str], first: int, P: int) -> None:
    """RowwiseParallel rebuilds its sharded input with DTensor.from_local, which assumes even
    shards: an uneven column split before a row layer computes with the wrong shapes."""
    for l, kind in enumerate(kinds):
        n_out = dims[first + l + 1]
        if kind == "col" and n_out % P:
            raise ValueError(f"engine=torch tensor parallel needs the width of layer "
                             f"{first + l + 1} ({n_out}) divisible by {P} ranks")


def tensor_parallel(spec: MLPSpec, module: nn.Sequential, linears: list[nn.Linear], *,
                    first: int, layout: str, mesh: DeviceMesh) -> list[Layer]:
    """Shard `module` (engines/common.layer_stack of layers first, first+1, …) over the 1-D
    `mesh` in `layout`'s DTensor styles, in place; the Layer views (global layer indices,
    the slice of the full matrix each holds) of what this rank keeps."""
    P, r = mesh.size(), mesh.get_local_rank()
    kinds = styles(len(linears), layout)
    check_even(spec.dims, kinds, first, P)
    plan = {}
    for l, kind in enumerate(kinds):
        name = str(2 * l)  # Sequential index: Linear, activation, Linear, …
        plan[name] = (RowwiseParallel() if kind == "row"
                      else ColwiseParallel(output_layouts=Replicate()) if kind == "col_rep"
                      else ColwiseParallel())
    # Every rank holds the same full weights, so each just keeps its slice (no scatter).
    parallelize_module(module, mesh, plan, src_data_rank=None)
    layers = []
    for l, (kind, lin) in enumerate(zip(kinds, linears, strict=True)):
        n_out, n_in = spec.weight_shape(first + l)
        if kind == "row":
            cols = chunk_range(n_in, P, r)
            layer = as_layer(first + l, lin, cols=cols, bias_owner=r == 0)  # bias replicated
            assert layer.W.shape == (n_out, cols[1] - cols[0]), (layer.W.shape, cols)
        else:
            rows = chunk_range(n_out, P, r)
            layer = as_layer(first + l, lin, rows=rows)
            assert layer.W.shape == (rows[1] - rows[0], n_in), (layer.W.shape, rows)
        layers.append(layer)
    return layers


def tensor_role(s: SeenOp) -> tuple[str, str]:
    """An all-reduce in the forward is `partial_output`, an all-gather `gather`; any
    collective in the backward is `input_grad`."""
    if s.phase == "forward":
        return ("gather" if s.op == "all_gather" else "partial_output"), "forward"
    return "input_grad", s.phase


class TorchTensorRunner(TorchRunner):
    def __init__(self, cfg: RunConfig, topo: Topology, comm: Comm, data: Dataset,
                 full: dict[str, torch.Tensor]) -> None:
        super().__init__(cfg, topo, comm, data)
        self.mesh = init_device_mesh(topo.device.type, (topo.world_size,))
        self.linears = [build_linear(full, l, self.spec, dtype=self.dtype, device=topo.device)
                        for l in range(self.spec.num_layers)]
        self.model = layer_stack(self.spec, self.linears, 0)
        self.layers = tensor_parallel(self.spec, self.model, self.linears, first=0,
                                      layout=cfg.strategy.layout, mesh=self.mesh)
        self.opt = make_sgd(self.linears, cfg)

    def _train(self, X: torch.Tensor, y: torch.Tensor) -> tuple[float, int]:
        self.observer.phase = "forward"
        with self.marks("F", kind="F"):  # with the partial outputs' all-reduce, and the loss
            o = self.model(X)  # replicated on every rank
            total = loss_sum(self.spec, o, y)
        self.observer.phase = "backward"
        with self.marks("B", kind="B"):
            (total / self.B).backward()
        correct = hits(self.spec, o, y)
        # Every rank computed the same loss; rank 0 alone reports it.
        return (float(total.detach()), correct) if self.topo.rank == 0 else (0.0, 0)

    def _sq_share(self) -> float:
        # Every weight is sharded (none replicated), so the shards' squares add up to ‖W‖².
        return super()._sq_share()

    def role_of(self, s: SeenOp) -> tuple[str, str]:
        return tensor_role(s)

    def predict(self, step: int) -> torch.Tensor:
        X, _ = self._batch(step)
        with torch.no_grad():
            out = self.model(X)
        # The replicated output is an AsyncCollectiveTensor until someone reads it: wait here,
        # so the caller gets a plain tensor and no all-reduce is left in flight.
        return out.wait() if isinstance(out, AsyncCollectiveTensor) else out
