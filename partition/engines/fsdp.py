"""`fsdp` on PyTorch's FSDP2: `fully_shard` on every layer and on the root, a 1-D DeviceMesh.

Zero stage 3 only (torch has no maintained stage-1/2 API of the same shape; config refuses
them). FSDP2 shards each parameter along dim 0 — W's rows (torch.chunk: ⌈n_out/P⌉ per
rank, the last ones shorter; `layers[].rows` say which) — zero-padded to equal pieces,
and all-gathers a layer's parameters (W and b) in one call per `fully_shard` unit: before
its forward, again before its backward unless `strategy.reshard_after_forward=false`;
its gradients are reduce-scattered in one call right after its backward. So it moves
what the explicit engine moves, cut differently: the padded piece is
⌈n_out/P⌉·(n_in + [bias]) elements per layer rather than ⌈N/P⌉ of the flat storage.

Rank r trains on its `tensor_split` share of the batch, as `data` does. FSDP2 divides the
reduced gradients by P, so each rank's loss is its rows' sum times P / B, as in
engines/data.py. Roles: an all-gather is `weight_gather` (in the phase it was made in),
a reduce-scatter `weight_grad`; anything else (none expected) is `metadata`.
"""

from __future__ import annotations

import torch
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

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
from partition.plans.fsdp import chunk_range
from partition.topology import Topology


class TorchFsdpRunner(RowShareRunner):
    def __init__(self, cfg: RunConfig, topo: Topology, comm: Comm, data: Dataset,
                 full: dict[str, torch.Tensor]) -> None:
        super().__init__(cfg, topo, comm, data)
        P, r = topo.world_size, topo.rank
        reshard = cfg.strategy.reshard_after_forward
        self.mesh = init_device_mesh(topo.device.type, (P,))
        self.linears = [build_linear(full, l, self.spec, dtype=self.dtype, device=topo.device)
                        for l in range(self.spec.num_layers)]
        self.model = layer_stack(self.spec, self.linears, 0)
        for lin in self.linears:
            fully_shard(lin, mesh=self.mesh, reshard_after_forward=reshard)
        fully_shard(self.model, mesh=self.mesh, reshard_after_forward=reshard)
        self.layers = [as_layer(l, lin, rows=chunk_range(self.spec.dims[l + 1], P, r))
                       for l, lin in enumerate(self.linears)]
        for layer in self.layers:
            assert layer.W.shape[0] == layer.rows[1] - layer.rows[0], (layer.W.shape, layer.rows)
        self.opt = make_sgd(self.linears, cfg)

    def role_of(self, s: SeenOp) -> tuple[str, str]:
        if s.op == "all_gather":
            return "weight_gather", s.phase
        if s.op == "reduce_scatter":
            return "weight_grad", s.phase
        return "metadata", s.phase

    def predict(self, step: int) -> torch.Tensor:
        """This rank's rows only, as in training (each layer all-gathered, then resharded)."""
        X, _ = self._batch(step)
        with torch.no_grad():
            return self.model(self._mine(X))
