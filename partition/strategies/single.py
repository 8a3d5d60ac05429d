"""`single`: the whole net on one device; M > 1 is gradient accumulation.

Each micro-batch runs forward then backward before the next starts, so only one
micro-batch of activations is alive at a time — the memory a smaller minibatch
costs — while the update is exactly the full batch's (the loss is a sum divided
by the full batch size).
"""

from __future__ import annotations

import time

import torch

from partition.config import RunConfig
from partition.data import Dataset
from partition.model import SGD, Layer, add_decay, decay_sq_sum, make_layer
from partition.strategies.base import StepOut, state_bytes
from partition.strategies.stage import Stage
from partition.topology import Topology


class SingleRunner:
    def __init__(self, cfg: RunConfig, topo: Topology, data: Dataset,
                 full: dict[str, torch.Tensor]) -> None:
        self.cfg, self.topo, self.data = cfg, topo, data
        self.spec = cfg.spec
        self.dtype = getattr(torch, cfg.train.dtype)
        self.layers: list[Layer] = [make_layer(full, l, dtype=self.dtype, device=topo.device)
                                    for l in range(self.spec.num_layers)]
        self.stage = Stage(self.spec, self.layers)
        self.opt = SGD(cfg.train.lr, cfg.train.momentum)

    def _batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        t = self.cfg.train
        return self.data.batch(step, t.batch_size, shuffle=self.cfg.data.shuffle,
                               seed=self.cfg.seed, dtype=self.dtype, device=self.topo.device)

    def step(self, step: int, *, want_grads: bool) -> StepOut:
        B, M = self.cfg.train.batch_size, self.cfg.train.microbatches
        X, y = self._batch(step)
        st = self.stage
        st.start_step()
        loss_total, correct_total = 0.0, 0
        for xm, ym in zip(X.chunk(M), y.chunk(M)):
            o = st.forward(xm)
            ls, c, g = st.loss(o, ym, B)
            del o
            st.backward(g, need_input_grad=False)
            loss_total += ls
            correct_total += c or 0
        del X, y
        t0 = time.perf_counter()
        sq = float(decay_sq_sum(self.layers))
        add_decay(self.layers, st.grads, self.spec.weight_decay)
        grads = [g.clone() for g in st.grads] if want_grads else None
        self.opt.step(self.layers, st.grads)
        st.compute_s += time.perf_counter() - t0
        L = loss_total / B
        return StepOut(
            objective=L + 0.5 * self.spec.weight_decay * sq, data_loss=L,
            correct=correct_total if self.spec.loss == "cross_entropy" else None,
            grads=grads, in_flight_max=st.in_flight_max, compute_s=st.compute_s,
        )

    def predict(self, step: int, *, exchange: bool = True) -> torch.Tensor:
        X, _ = self._batch(step)
        return self.stage.predict(X)

    def state_bytes(self) -> dict[str, int]:
        return state_bytes(self.layers, self.opt.state_bytes(self.layers))
