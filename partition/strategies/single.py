"""`single`: the whole net on one device; M > 1 is gradient accumulation.

Each micro-batch runs forward then backward before the next starts, so only one
micro-batch of activations is alive at a time — the memory a smaller minibatch
costs — while the update is exactly the full batch's (the loss is a sum divided
by the full batch size).
"""

from __future__ import annotations

import torch

from partition.config import RunConfig
from partition.data import Dataset
from partition.model import Layer, compute_copies, make_layer
from partition.strategies.base import (
    StepOut,
    build_optimizer,
    compute_dtype,
    finish_step,
    master_dtype,
    recomputes,
    state_bytes,
)
from partition.strategies.stage import Stage
from partition.topology import Topology
from partition.trace import inputs_span, maybe_span


class SingleRunner:
    def __init__(self, cfg: RunConfig, topo: Topology, data: Dataset,
                 full: dict[str, torch.Tensor]) -> None:
        self.cfg, self.topo, self.data = cfg, topo, data
        self.spec = cfg.spec
        self.dtype, self.cdtype = master_dtype(cfg), compute_dtype(cfg)
        self.layers: list[Layer] = [make_layer(full, l, dtype=self.dtype, device=topo.device)
                                    for l in range(self.spec.num_layers)]
        self.compute = compute_copies(self.layers, self.cdtype)
        self.stage = Stage(self.spec, self.layers, compute=self.compute,
                           recompute=recomputes(cfg))
        self.opt = build_optimizer(cfg)
        self.tracer = None  # a trace.Tracer, set by the train loop

    def _batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        t = self.cfg.train
        return self.data.batch(step, t.batch_size, shuffle=self.cfg.data.shuffle,
                               seed=self.cfg.seed, dtype=self.cdtype, device=self.topo.device,
                               y_dtype=self.dtype)

    def step(self, step: int, *, want_grads: bool) -> StepOut:
        B, M = self.cfg.train.batch_size, self.cfg.train.microbatches
        with inputs_span(self.tracer):
            X, y = self._batch(step)
        st = self.stage
        st.start_step()
        loss_total, correct_total = 0.0, 0
        for m, (xm, ym) in enumerate(zip(X.chunk(M), y.chunk(M))):
            with maybe_span(self.tracer, f"F{m}", kind="F", mb=m):
                o = st.forward(xm, m)
                ls, c, g = st.loss(o, ym, B)
                del o
            with maybe_span(self.tracer, f"B{m}", kind="B", mb=m):
                st.backward(g, m, need_input_grad=False)
            loss_total += ls
            correct_total += c or 0
        del X, y
        return finish_step(layers=self.layers, grads=st.grads, counted=self.layers, opt=self.opt,
                           weight_decay=self.spec.weight_decay, comm=None, loss_sum=loss_total,
                           correct=correct_total, batch=B, want_grads=want_grads,
                           cross_entropy=self.spec.loss == "cross_entropy",
                           in_flight_max=st.in_flight_max, device=self.topo.device,
                           compute=self.compute, tracer=self.tracer)

    def predict(self, step: int, *, exchange: bool = True) -> torch.Tensor:
        X, _ = self._batch(step)
        return self.stage.predict(X)

    def state_bytes(self) -> dict[str, int]:
        return state_bytes(self.layers, self.opt.state_bytes(self.layers), self.compute)
