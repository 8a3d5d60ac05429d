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


def data_role(s: SeenOp) -> tuple[str, str]:
    """DDP's bucketed all-reduce in the backward is `weight_grad`; anything else (its
    bucket-order broadcast after the first step) `metadata`."""
    if s.phase == "backward" and s.op == "all_reduce":
        return "weight_grad", "backward"
    return "metadata", s.phase


class TorchDataRunner(TorchRunner):
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

    def _mine(self, t: torch.Tensor) -> torch.Tensor:
        return t.tensor_split(self.topo.world_size)[self.topo.rank]

    def _train(self, X: torch.Tensor, y: torch.Tensor) -> tuple[float, int]:
        xs, ys = self._mine(X), self._mine(y)
        self.observer.phase = "forward"
        with self.marks("F", kind="F"):  # the forward with the loss, as one span
            o = self.model(xs)
            total = loss_sum(self.spec, o, ys)
        self.observer.phase = "backward"
        with self.marks("B", kind="B"):  # DDP's bucket all-reduces run (and are waited) inside
            (total * (self.topo.world_size / self.B)).backward()
        return float(total.detach()), hits(self.spec, o, ys)

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
