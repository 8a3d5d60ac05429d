"""Executing a pipeline stage: GPipe and 1F1B side by side (picotron's layout).

Rank i holds layers plan[i]. Forward sends the boundary activation to rank i+1
(role `activation`); backward sends its gradient to rank i−1 (`activation_grad`).
1F1B's steady state pairs a send with the opposite receive in one call, so two
neighbouring stages can never both wait on a send (NCCL's send blocks until the
matching receive is posted; gloo's may).
"""

from __future__ import annotations

import time

import torch

from partition.comm import Comm
from partition.config import RunConfig
from partition.data import Dataset
from partition.model import SGD, Layer, add_decay, decay_sq_sum, make_layer
from partition.strategies.base import StepOut, state_bytes
from partition.strategies.pipeline.plan import plan_stages
from partition.strategies.stage import Stage
from partition.topology import Topology


class PipelineRunner:
    def __init__(self, cfg: RunConfig, topo: Topology, comm: Comm, data: Dataset,
                 full: dict[str, torch.Tensor]) -> None:
        self.cfg, self.topo, self.comm, self.data = cfg, topo, comm, data
        self.spec = cfg.spec
        self.dtype = getattr(torch, cfg.train.dtype)
        self.plan = plan_stages(self.spec, topo.world_size, cfg.strategy.balance)
        start, end = self.plan[topo.rank]
        self.layers: list[Layer] = [make_layer(full, l, dtype=self.dtype, device=topo.device)
                                    for l in range(start, end)]
        self.stage = Stage(self.spec, self.layers)
        self.opt = SGD(cfg.train.lr, cfg.train.momentum)
        self.micro = cfg.train.microbatches
        self.mb_rows = cfg.train.batch_size // self.micro
        self.in_width = self.spec.dims[start]  # width of the activation this stage receives
        self.out_width = self.spec.dims[end]  # width of the activation it sends on
        self.first, self.last = topo.is_first, topo.is_last

    # ------------------------------------------------------------ one micro-batch

    def _inputs(self, step: int) -> None:
        """Only the first stage reads X and only the last reads y."""
        t = self.cfg.train
        idx = self.data.rows(step, t.batch_size, shuffle=self.cfg.data.shuffle, seed=self.cfg.seed)
        dev = self.topo.device
        self._X = self.data.X[idx].to(device=dev, dtype=self.dtype).chunk(self.micro) if self.first else None
        if self.last:
            y = self.data.y[idx]
            y = y.to(dev) if y.dtype == torch.int64 else y.to(device=dev, dtype=self.dtype)
            self._y = y.chunk(self.micro)
        else:
            self._y = None
        self._loss, self._correct, self._fwd, self._bwd = 0.0, 0, 0, 0

    def _recv_forward(self) -> torch.Tensor:
        if self.first:
            return self._X[self._fwd]
        return self.comm.recv_forward((self.mb_rows, self.in_width), self.dtype)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.stage.forward(x)
        m = self._fwd
        self._fwd += 1
        if self.last:
            # The loss gradient is this stage's "received" gradient: keep it for the backward.
            ls, c, g = self.stage.loss(out, self._y[m], self.cfg.train.batch_size)
            self._loss += ls
            self._correct += c or 0
            self._pending_grad.append(g)
        return out

    def _backward(self, g: torch.Tensor) -> torch.Tensor | None:
        self._bwd += 1
        return self.stage.backward(g, need_input_grad=not self.first)

    def _send_forward(self, out: torch.Tensor) -> None:
        if not self.last:
            self.comm.send_forward(out)

    def _recv_backward(self) -> torch.Tensor:
        if self.last:
            return self._pending_grad.pop(0)
        return self.comm.recv_backward((self.mb_rows, self.out_width), self.dtype)

    def _send_backward(self, dx: torch.Tensor | None) -> None:
        if not self.first:
            assert dx is not None
            self.comm.send_backward(dx)

    def _send_forward_recv_backward(self, out: torch.Tensor) -> torch.Tensor:
        if self.last:
            return self._pending_grad.pop(0)
        return self.comm.send_forward_recv_backward(out, (self.mb_rows, self.out_width))

    def _send_backward_recv_forward(self, dx: torch.Tensor | None) -> torch.Tensor:
        if self.first:
            return self._X[self._fwd]
        assert dx is not None
        return self.comm.send_backward_recv_forward(dx, (self.mb_rows, self.in_width))

    # ------------------------------------------------------------ the two schedules

    def _gpipe(self) -> None:
        """All forwards, then all backwards in the same (FIFO) order."""
        for _ in range(self.micro):
            out = self._forward(self._recv_forward())
            self._send_forward(out)
        for _ in range(self.micro):
            self._send_backward(self._backward(self._recv_backward()))

    def _one_f_one_b(self) -> None:
        """Warm-up, steady one-forward-one-backward, cool-down (see schedules.py)."""
        P, i, M = self.topo.world_size, self.topo.rank, self.micro
        warmup = min(P - i - 1, M)
        remaining = M - warmup
        for _ in range(warmup):
            self._send_forward(self._forward(self._recv_forward()))
        x = self._recv_forward() if remaining > 0 else None
        for j in range(remaining):
            out = self._forward(x)
            g = self._send_forward_recv_backward(out)
            dx = self._backward(g)
            if j == remaining - 1:
                self._send_backward(dx)
            else:
                x = self._send_backward_recv_forward(dx)
        for _ in range(warmup):
            self._send_backward(self._backward(self._recv_backward()))

    # ------------------------------------------------------------ the step

    def step(self, step: int, *, want_grads: bool) -> StepOut:
        st = self.stage
        st.start_step()
        t0 = time.perf_counter()
        self._inputs(step)
        self._pending_grad: list[torch.Tensor] = []
        st.compute_s += time.perf_counter() - t0
        if self.cfg.strategy.schedule == "gpipe":
            self._gpipe()
        else:
            self._one_f_one_b()
        assert self._fwd == self._bwd == self.micro and not st.fifo
        self._X = self._y = None

        t0 = time.perf_counter()
        sq = decay_sq_sum(self.layers)
        add_decay(self.layers, st.grads, self.spec.weight_decay)
        grads = [g.clone() for g in st.grads] if want_grads else None
        self.opt.step(self.layers, st.grads)
        st.compute_s += time.perf_counter() - t0

        # J = L + s: L lives on the last stage, each stage holds its part of s.
        metric = torch.tensor([self._loss, float(sq), float(self._correct)],
                              dtype=torch.float64, device=self.topo.device)
        self.comm.all_reduce(metric, role="metric", phase="metric")
        loss_sum, sq_all, correct = metric.tolist()
        L = loss_sum / self.cfg.train.batch_size
        return StepOut(
            objective=L + 0.5 * self.spec.weight_decay * sq_all, data_loss=L,
            correct=int(correct) if self.spec.loss == "cross_entropy" else None,
            grads=grads, in_flight_max=st.in_flight_max, compute_s=st.compute_s,
        )

    def predict(self, step: int, *, exchange: bool = True) -> torch.Tensor | None:
        """A prediction forward through the pipeline (no micro-batching, nothing kept).

        exchange=False: each stage alone, on a locally allocated input of the shape it
        would receive, sending nothing — the same memory, no traffic.
        """
        t = self.cfg.train
        B = t.batch_size
        if self.first:
            idx = self.data.rows(step, B, shuffle=self.cfg.data.shuffle, seed=self.cfg.seed)
            x = self.data.X[idx].to(device=self.topo.device, dtype=self.dtype)
        elif exchange:
            x = self.comm.recv((B, self.in_width), self.dtype, self.topo.rank - 1,
                               role="activation", phase="forward")
        else:
            x = torch.zeros((B, self.in_width), dtype=self.dtype, device=self.topo.device)
        out = self.stage.predict(x)
        if not self.last:
            if exchange:
                self.comm.send(out, self.topo.rank + 1, role="activation", phase="forward")
            return None
        return out

    def state_bytes(self) -> dict[str, int]:
        return state_bytes(self.layers, self.opt.state_bytes(self.layers))
