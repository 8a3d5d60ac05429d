"""One module (or small package) per strategy; `build_runner` picks the one a config names."""

from __future__ import annotations

import torch

from partition.comm import Comm
from partition.config import RunConfig
from partition.data import Dataset
from partition.strategies.base import Runner, StepOut
from partition.topology import Topology


def build_runner(cfg: RunConfig, topo: Topology, comm: Comm | None, data: Dataset,
                 full: dict[str, torch.Tensor]) -> Runner:
    name = cfg.strategy.name
    if name == "single":
        from partition.strategies.single import SingleRunner

        return SingleRunner(cfg, topo, data, full)
    if comm is None:
        raise ValueError(f"strategy {name!r} needs a process group")
    if cfg.engine == "torch":
        # PyTorch's own pipelining / DTensor / DDP as peers (`single` has no torch engine).
        from partition.engines import build_torch_runner

        return build_torch_runner(cfg, topo, comm, data, full)
    if name == "pipeline":
        from partition.strategies.pipeline import PipelineRunner

        return PipelineRunner(cfg, topo, comm, data, full)
    if name == "tensor":
        from partition.strategies.tensor import TensorRunner

        return TensorRunner(cfg, topo, comm, data, full)
    if name == "data":
        from partition.strategies.data import DataRunner

        return DataRunner(cfg, topo, comm, data, full)
    if name == "fsdp":
        from partition.strategies.fsdp import FsdpRunner

        return FsdpRunner(cfg, topo, comm, data, full)
    raise ValueError(f"strategy {name!r} is not implemented yet")


__all__ = ["Runner", "StepOut", "build_runner"]
