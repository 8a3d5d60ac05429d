"""`pipeline` on `torch.distributed.pipelining`: PipelineStage + ScheduleGPipe / Schedule1F1B.

Rank i holds the layers of `plan_stages` (the explicit engine's plan) as an
nn.Sequential. The stage is given its input and output shapes, so torch runs in
its STATIC mode and exchanges no shape metadata — only a 4-byte vote each way
on the first step (role `metadata` here). The loss of a micro-batch is its sum
divided by the *full* batch size with `scale_grads=False`, so the M micro-batch
gradients add up to exactly the full-batch mean, as in the explicit engine.

Roles: p2p towards rank+1 (or from rank−1) of the boundary activation's shape
and dtype is `activation` (forward); towards rank−1 is `activation_grad`
(backward); any other p2p is `metadata`.
"""

from __future__ import annotations

import torch
from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe

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
from partition.plans.stages import plan_stages
from partition.topology import Topology


class TorchPipelineRunner(TorchRunner):
    def __init__(self, cfg: RunConfig, topo: Topology, comm: Comm, data: Dataset,
                 full: dict[str, torch.Tensor]) -> None:
        super().__init__(cfg, topo, comm, data)
        P, i = topo.world_size, topo.rank
        M = cfg.train.microbatches
        if cfg.strategy.schedule == "1f1b" and M < P:
            raise ValueError(f"torch's Schedule1F1B needs train.microbatches >= world_size, "
                             f"got {M} < {P}")
        self.plan = plan_stages(self.spec, P, cfg.strategy.balance)
        start, end = self.plan[i]
        dev = topo.device
        self.linears = [build_linear(full, l, self.spec, dtype=self.dtype, device=dev)
                        for l in range(start, end)]
        self.module = layer_stack(self.spec, self.linears, start)
        self.layers = [as_layer(start + k, lin) for k, lin in enumerate(self.linears)]
        self.opt = make_sgd(self.linears, cfg)
        self.first, self.last = topo.is_first, topo.is_last
        mb = self.B // M
        self.in_shape = (mb, self.spec.dims[start])
        self.out_shape = (mb, self.spec.dims[end])
        # requires_grad on the examples is what tells torch which gradients cross back:
        # the boundary activations' (the first stage's input, the data, needs none).
        self.stage = PipelineStage(
            self.module, i, P, dev,
            input_args=torch.empty(self.in_shape, dtype=self.dtype, device=dev,
                                   requires_grad=not self.first),
            output_args=torch.empty(self.out_shape, dtype=self.dtype, device=dev,
                                    requires_grad=True),
        )
        sched = ScheduleGPipe if cfg.strategy.schedule == "gpipe" else Schedule1F1B
        # Every stage gets the loss: torch decides from it that the schedule has a backward.
        self.schedule = sched(self.stage, n_microbatches=M, loss_fn=self._loss, scale_grads=False)
        self._loss_sum, self._correct = 0.0, 0
        self._eval: tuple[PipelineStage, ScheduleGPipe] | None = None
        # Count micro-batches whose activations the stage holds (its forward cache) at once.
        self.module.register_forward_hook(self._count_in_flight)

    def _count_in_flight(self, module, args, output) -> None:  # noqa: ANN001
        # The stage caches this chunk right after the forward; what is cached now is still alive.
        self.in_flight = max(self.in_flight, len(self.stage.fwd_cache) + 1)

    def _loss(self, o: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """One micro-batch's share of the full-batch mean; also counts its loss sum and hits."""
        total = loss_sum(self.spec, o, y)
        self._loss_sum += float(total.detach())
        self._correct += hits(self.spec, o, y)
        return total / self.B

    def _train(self, X: torch.Tensor, y: torch.Tensor) -> tuple[float, int]:
        self._loss_sum, self._correct, self.in_flight = 0.0, 0, 0
        if self.first:
            self.schedule.step(X, return_outputs=False)
        elif self.last:
            self.schedule.step(target=y, return_outputs=False)
        else:
            self.schedule.step(return_outputs=False)
        # The loss lives on the last stage; the others contribute 0 to the reduction.
        return self._loss_sum, self._correct

    def role_of(self, s: SeenOp) -> tuple[str, str]:
        me = self.topo.rank
        if s.op in ("send", "recv") and s.dtype == self.dtype:
            downstream = s.peer == me + 1
            shape = self.out_shape if downstream else self.in_shape
            if s.shape == shape:
                forward = downstream == (s.op == "send")
                return ("activation", "forward") if forward else ("activation_grad", "backward")
        return "metadata", "forward" if s.op in ("send", "recv") else s.phase

    def predict(self, step: int) -> torch.Tensor | None:
        """Forward only, the whole batch as one micro-batch, through torch's own eval path."""
        if self._eval is None:
            P, i, dev = self.topo.world_size, self.topo.rank, self.topo.device
            start, end = self.plan[i]
            def example(width: int) -> torch.Tensor:
                return torch.empty((self.B, width), dtype=self.dtype, device=dev)

            stage = PipelineStage(self.module, i, P, dev, input_args=example(self.spec.dims[start]),
                                  output_args=example(self.spec.dims[end]))
            self._eval = (stage, ScheduleGPipe(stage, n_microbatches=1))
        _, sched = self._eval
        X, _ = self._batch(step)
        with torch.no_grad():
            out = sched.eval(X) if self.first else sched.eval()
        return out if self.last else None
