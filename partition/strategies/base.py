"""What every strategy's runner offers the step loop (train.py)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

import torch

from partition.model import (
    SGD,
    Adam,
    Grads,
    Layer,
    add_decay,
    copy_tensors,
    refresh_copies,
    tensors_bytes,
    to_float,
)
from partition.trace import maybe_span


if TYPE_CHECKING:
    from partition.config import RunConfig


@dataclass
class StepOut:
    """One training step as seen by one rank."""

    objective: float  # J = L + s, the same on every rank (reduced under role `metric`)
    data_loss: float  # L, the batch mean
    correct: int | None  # examples classified right (cross-entropy only)
    # The final gradients, when asked (grad check): the runner's own buffers, read before the
    # next step (no copy, so the check adds nothing to the step's memory).
    grads: list[Grads] | None = None
    grads_have_decay: bool = True  # False: λW is the optimizer's (AdamW), not in `grads`
    in_flight_max: int = 0  # most micro-batches whose activations were held at once
    # Seconds in local arithmetic. None: the sum of the step's compute spans (trace.Tracer,
    # train.py), the one definition for the explicit engine; the torch engines, whose
    # work the tracer does not see, set it themselves.
    compute_s: float | None = None
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


def state_bytes(layers: list[Layer], optimizer_bytes: int,
                copies: list[Layer] | None = None) -> dict[str, int]:
    """params, grads (one buffer per parameter) and optimizer state, exact.

    `copies`: mixed precision's compute copies of the weights, which live as long as the
    masters and count as params (float32 masters + their bfloat16 copy: 6 bytes a weight).
    """
    p = tensors_bytes([t for l in layers for t in l.tensors()])
    c = 0 if copies is None else tensors_bytes(copy_tensors(layers, copies))
    return {"params_bytes": p + c, "grads_bytes": p, "optimizer_bytes": optimizer_bytes}


# ---------------------------------------------------------------- the one-device policy


def master_dtype(cfg: RunConfig) -> torch.dtype:
    """train.dtype: how the weights, their gradients and the optimizer state are stored."""
    return getattr(torch, cfg.train.dtype)


def compute_dtype(cfg: RunConfig) -> torch.dtype:
    """What forward and backward compute in: bfloat16 under train.precision=bf16, else the
    master dtype (config.py refuses the combinations that make no sense)."""
    return torch.bfloat16 if cfg.train.precision == "bf16" else master_dtype(cfg)


def recomputes(cfg: RunConfig) -> bool:
    return cfg.train.recompute == "full"


def build_optimizer(cfg: RunConfig) -> SGD | Adam:
    """train.optimizer, chosen here for every runner: sgd (with train.momentum), adam (λ as
    L2 in dJ/dW, as in the seed), adamw (λ decoupled, applied by the optimizer)."""
    t = cfg.train
    if t.optimizer == "sgd":
        return SGD(t.lr, t.momentum)
    if t.optimizer in ("adam", "adamw"):
        adamw = t.optimizer == "adamw"
        return Adam(t.lr, tuple(t.betas), t.eps,
                    weight_decay=cfg.spec.weight_decay if adamw else 0.0, decoupled=adamw)
    raise ValueError(f"unknown train.optimizer {t.optimizer!r}")


def sq_norm(layers: list[Layer]) -> float:
    """Σ‖W‖_F² over `layers` (biases are not regularised), accumulated in float64."""
    return sum(to_float((l.W * l.W).sum()) for l in layers)


def finish_step(*, layers: list[Layer], grads: list[Grads], counted: list[Layer], opt,  # noqa: ANN001
                weight_decay: float, comm, loss_sum: float, correct: int,  # noqa: ANN001
                batch: int, want_grads: bool, cross_entropy: bool,
                in_flight_max: int, device: torch.device,
                compute: list[Layer] | None = None, tracer=None) -> StepOut:  # noqa: ANN001
    """The step tail every runner shares, after its gradients are complete (and reduced).

    s = λ/2 Σ‖W‖² from the weights before the update (`counted`: the layers this rank
    contributes to s, so a replica counts once), dJ/dW += λW once per step (unless the
    optimizer applies λ itself: AdamW), the optimizer update of the master weights (which
    reads the gradients and leaves them as they are: they go back for the check), the
    compute copies rounded from them (`compute`, mixed precision), and J's reduction over
    the group (role `metric`: [this rank's loss sum, its Σ‖W‖², its correct count] in
    float64).
    """
    with maybe_span(tracer, "update", kind="update"):
        sq = sq_norm(counted)
        if not opt.decoupled:
            add_decay(layers, grads, weight_decay)
        opt.step(layers, grads)
        if compute is not None:
            refresh_copies(layers, compute)
    if comm is not None:
        loss_sum, sq, correct = reduce_metric(comm, loss_sum, sq, correct, device=device)
    L = loss_sum / batch
    return StepOut(objective=L + 0.5 * weight_decay * sq, data_loss=L,
                   correct=int(correct) if cross_entropy else None,
                   grads=grads if want_grads else None, grads_have_decay=not opt.decoupled,
                   in_flight_max=in_flight_max)


def reduce_metric(comm, loss_sum: float, sq: float, correct: float, *,  # noqa: ANN001
                  device: torch.device) -> tuple[float, float, float]:
    """Sum [loss sum, Σ‖W‖², correct] over the group in one float64 all-reduce (role
    `metric`): J needs the loss from the stage or rank that has it and every shard's s."""
    metric = torch.tensor([loss_sum, sq, float(correct)], dtype=torch.float64, device=device)
    comm.all_reduce(metric, role="metric", phase="metric")
    if metric.is_meta:  # a dry run: the sums are not known, only what crossed
        return loss_sum, sq, correct
    loss_sum, sq, correct = metric.tolist()
    return loss_sum, sq, correct
