"""A contiguous run of layers with its gradients and a FIFO of kept activations.

The single-device runner is one stage holding every layer; a pipeline rank is
one stage of several. Micro-batches leave the FIFO in the order they entered
(first in, first out), which both GPipe and 1F1B rely on.
"""

from __future__ import annotations

import time
from collections import deque

import torch

from partition.model import (
    Cache,
    Grads,
    Layer,
    MLPSpec,
    backward_layers,
    correct_count,
    forward_layers,
    loss_grad,
    loss_sum,
    zero_grads,
)


class Stage:
    def __init__(self, spec: MLPSpec, layers: list[Layer]) -> None:
        self.spec = spec
        self.layers = layers
        self.grads: list[Grads] = zero_grads(layers)
        self.fifo: deque[list[Cache]] = deque()
        self.in_flight_max = 0
        self.compute_s = 0.0  # reset by the runner at each step
        # A memory tracker (memory.StorageTracker) while one measures this stage: told
        # which storages are kept for backward and which are the data batch.
        self.probe = None

    @property
    def has_output_layer(self) -> bool:
        return self.layers[-1].index == self.spec.num_layers - 1

    def start_step(self) -> None:
        for g in self.grads:
            for t in g.tensors():
                t.zero_()
        self.in_flight_max = 0
        self.compute_s = 0.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t0 = time.perf_counter()
        out, caches = forward_layers(self.spec, self.layers, x, keep=True)
        self.fifo.append(caches)
        self.in_flight_max = max(self.in_flight_max, len(self.fifo))
        if self.probe is not None:
            self.probe.kept(caches, holds_input=self.layers[0].index == 0)
        self.compute_s += time.perf_counter() - t0
        return out

    def loss(self, o: torch.Tensor, y: torch.Tensor, batch: int) -> tuple[float, int | None, torch.Tensor]:
        """Loss sum over these rows, correct count, and dJ/do for a batch of `batch` rows."""
        t0 = time.perf_counter()
        if self.probe is not None:
            self.probe.inputs(y)
        total = float(loss_sum(self.spec.loss, o, y))
        correct = correct_count(o, y) if self.spec.loss == "cross_entropy" else None
        g = loss_grad(self.spec.loss, o, y, batch)
        self.compute_s += time.perf_counter() - t0
        return total, correct, g

    def backward(self, g: torch.Tensor, *, need_input_grad: bool) -> torch.Tensor | None:
        t0 = time.perf_counter()
        caches = self.fifo.popleft()
        dx = backward_layers(self.spec, self.layers, caches, self.grads, g,
                             need_input_grad=need_input_grad)
        self.compute_s += time.perf_counter() - t0
        return dx

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        if self.probe is not None and self.layers[0].index == 0:
            self.probe.inputs(x)
        out, _ = forward_layers(self.spec, self.layers, x, keep=False)
        return out
