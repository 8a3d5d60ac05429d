"""PyTorch's own engines as peers of the explicit ones (`engine=torch`).

pipeline: torch.distributed.pipelining (PipelineStage, ScheduleGPipe / Schedule1F1B);
tensor: torch.distributed.tensor.parallel (ColwiseParallel / RowwiseParallel on a DeviceMesh);
data: DistributedDataParallel; fsdp: FSDP2's fully_shard (zero stage 3); hybrid: a 3-D
DeviceMesh composing them (pipelining stages, DTensor on mesh["tp"], DDP on mesh["dp"]).
Autograd, the same init, data, λ term and SGD update as the explicit engine, so both end at
the same weights; their bytes are what the dispatcher saw
(`observe.py`), recorded in the same ledger format. This package may call torch.distributed.
"""

from __future__ import annotations

import torch

from partition.comm import Comm
from partition.config import RunConfig
from partition.data import Dataset
from partition.topology import Topology


def build_torch_runner(cfg: RunConfig, topo: Topology, comm: Comm, data: Dataset,
                       full: dict[str, torch.Tensor]):  # noqa: ANN201 - a strategies.base.Runner
    name = cfg.strategy.name
    if name == "pipeline":
        from partition.engines.pipeline import TorchPipelineRunner

        return TorchPipelineRunner(cfg, topo, comm, data, full)
    if name == "tensor":
        from partition.engines.tensor import TorchTensorRunner

        return TorchTensorRunner(cfg, topo, comm, data, full)
    if name == "data":
        from partition.engines.data import TorchDataRunner

        return TorchDataRunner(cfg, topo, comm, data, full)
    if name == "fsdp":
        from partition.engines.fsdp import TorchFsdpRunner

        return TorchFsdpRunner(cfg, topo, comm, data, full)
    if name == "hybrid":
        from partition.engines.hybrid import TorchHybridRunner

        return TorchHybridRunner(cfg, topo, comm, data, full)
    raise ValueError(f"engine=torch has no {name!r} strategy (pipeline, tensor, data, fsdp, "
                     f"hybrid)")


__all__ = ["build_torch_runner"]
