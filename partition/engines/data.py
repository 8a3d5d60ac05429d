"""`data` on DistributedDataParallel: full weights per rank, B/P examples, gradients all-reduced.

Rank r trains on its `tensor_split` share of the batch. DDP averages the
gradients over the P ranks, so each rank's loss is its rows' sum times P / B:
the average of those is the full-batch mean, exactly as the explicit engine's.
`gradient_as_bucket_view=True` (DDP's documented memory saving: the gradients
live in the all-reduce buckets, no second copy) makes torch the leanest peer.

Roles: every collective inside the backward is `weight_grad` (DDP's bucketed
all-reduce); anything else (none expected in a step) is `metadata`.
"""

from __future__ import annotations

import torch
from torch.nn.parallel import DistributedDataParallel as DDP

from partition.comm import Comm
from partition.config import RunConfig
from partition.data import Dataset
from partition.engines.common import (
    RowShareRunner,
    as_layer,
    build_linear,
    layer_stack,
    make_sgd,
)
from partition.engines.observe import SeenOp
from partition.topology import Topology


def data_role(s: SeenOp) -> tuple[str, str]:
    """DDP's bucketed all-reduce in the backward is `weight_grad`; anything else (its
    bucket-order broadcast after the first step) `metadata`."""
    if s.phase == "backward" and s.op == "all_reduce":
        return "weight_grad", "backward"
    return "metadata", s.phase


class TorchDataRunner(RowShareRunner):
    def __init__(self, cfg: RunConfig, topo: Topology, comm: Comm, data: Dataset,
                 full: dict[str, torch.Tensor]) -> None:
        super().__init__(cfg, topo, comm, data)
        L = self.spec.num_layers
        self.linears = [build_linear(full, l, self.spec, dtype=self.dtype, device=topo.device)
                        for l in range(L)]
        module = layer_stack(self.spec, self.linears, 0)
        self.model = DDP(module, gradient_as_bucket_view=True)
        self.layers = [as_layer(l, lin) for l, lin in enumerate(self.linears)]
        self.opt = make_sgd(self.linears, cfg)

    def _sq_share(self) -> float:
        # Every rank holds the full weights: count them once.
        return super()._sq_share() if self.topo.rank == 0 else 0.0

    def role_of(self, s: SeenOp) -> tuple[str, str]:
        return data_role(s)

    def predict(self, step: int) -> torch.Tensor:
        """This rank's rows only, as in training."""
        X, _ = self._batch(step)
        with torch.no_grad():
            return self.model.module(self._mine(X))
