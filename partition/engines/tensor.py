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
from torch.distributed._functional_collectives import AsyncCollectiveTensor
from torch.distributed.device_mesh import init_device_mesh
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


class TorchTensorRunner(TorchRunner):
    def __init__(self, cfg: RunConfig, topo: Topology, comm: Comm, data: Dataset,
                 full: dict[str, torch.Tensor]) -> None:
        super().__init__(cfg, topo, comm, data)
        P, r = topo.world_size, topo.rank
        L = self.spec.num_layers
        kinds = styles(L, cfg.strategy.layout)
        for l, kind in enumerate(kinds):
            n_out = self.spec.dims[l + 1]
            if kind == "col" and n_out % P:
                # RowwiseParallel rebuilds its sharded input with DTensor.from_local, which
                # assumes even shards: an uneven split computes with the wrong shapes.
                raise ValueError(f"engine=torch tensor parallel needs the width of layer {l + 1} "
                                 f"({n_out}) divisible by world_size={P}")
        self.mesh = init_device_mesh(topo.device.type, (P,))
        self.linears = [build_linear(full, l, self.spec, dtype=self.dtype, device=topo.device)
                        for l in range(L)]
        self.model = layer_stack(self.spec, self.linears, 0)
        plan = {}
        for l, kind in enumerate(kinds):
            name = str(2 * l)  # Sequential index: Linear, activation, Linear, …
            plan[name] = (RowwiseParallel() if kind == "row"
                          else ColwiseParallel(output_layouts=Replicate()) if kind == "col_rep"
                          else ColwiseParallel())
        # Every rank holds the same full weights, so each just keeps its slice (no scatter).
        parallelize_module(self.model, self.mesh, plan, src_data_rank=None)
        self.layers = []
        for l, (kind, lin) in enumerate(zip(kinds, self.linears, strict=True)):
            n_out, n_in = self.spec.weight_shape(l)
            if kind == "row":
                cols = chunk_range(n_in, P, r)
                layer = as_layer(l, lin, cols=cols, bias_owner=r == 0)  # the bias is replicated
                assert layer.W.shape == (n_out, cols[1] - cols[0]), (layer.W.shape, cols)
            else:
                rows = chunk_range(n_out, P, r)
                layer = as_layer(l, lin, rows=rows)
                assert layer.W.shape == (rows[1] - rows[0], n_in), (layer.W.shape, rows)
            self.layers.append(layer)
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
        if s.phase == "forward":
            return ("gather" if s.op == "all_gather" else "partial_output"), "forward"
        return "input_grad", s.phase

    def predict(self, step: int) -> torch.Tensor:
        X, _ = self._batch(step)
        with torch.no_grad():
            out = self.model(X)
        # The replicated output is an AsyncCollectiveTensor until someone reads it: wait here,
        # so the caller gets a plain tensor and no all-reduce is left in flight.
        return out.wait() if isinstance(out, AsyncCollectiveTensor) else out
