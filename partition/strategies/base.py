"""What every strategy's runner offers the step loop (train.py)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import torch

from partition.model import Grads, Layer, tensors_bytes


@dataclass
class StepOut:
    """One training step as seen by one rank."""

    objective: float  # J = L + s, the same on every rank (reduced under role `metric`)
    data_loss: float  # L, the batch mean
    correct: int | None  # examples classified right (cross-entropy only)
    grads: list[Grads] | None = None  # copies of the final gradients, when asked (grad check)
    in_flight_max: int = 0  # most micro-batches whose activations were held at once
    compute_s: float = 0.0  # seconds in local arithmetic (not in communication)
    extra: dict = field(default_factory=dict)


class Runner(Protocol):
    """A strategy on one rank: it owns its layers, gradients and optimizer state."""

    layers: list[Layer]

    def step(self, step: int, *, want_grads: bool) -> StepOut: ...

    def predict(self, step: int, *, exchange: bool = True) -> torch.Tensor | None:
        """A prediction forward of step's batch, keeping nothing for backward.

        exchange=False: the same forward and the same buffers, but nothing crosses a
        boundary (a received input is allocated locally, nothing is sent or reduced) —
        how train.py measures the prediction peak without adding traffic outside steps.
        """
        ...

    def state_bytes(self) -> dict[str, int]: ...


def saved_layers(runner: Runner) -> list[Layer]:
    """The layers this rank returns for weights.npz.

    A runner whose ranks hold replicas (data parallel; a replicated tensor layer)
    sets `saved_layers` so that one copy comes back instead of P; otherwise all.
    """
    return getattr(runner, "saved_layers", runner.layers)


def state_bytes(layers: list[Layer], optimizer_bytes: int) -> dict[str, int]:
    """params, grads (one buffer per parameter) and optimizer state, exact."""
    p = tensors_bytes([t for l in layers for t in l.tensors()])
    return {"params_bytes": p, "grads_bytes": p, "optimizer_bytes": optimizer_bytes}
