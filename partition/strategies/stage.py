"""A contiguous run of layers with its gradients and the activations it keeps per micro-batch.

The single-device runner is one stage holding every layer; a pipeline rank holds one
stage or several (interleaved and V-shaped layouts). What a forward keeps is stored by
micro-batch, not in a queue, so a schedule may run the backwards in any order it likes;
`backward` is the full backward (B), `backward_input` and `backward_weight` its two
halves (I, then W) for schedules that defer the weight gradient.

Two one-device policies live here, so every strategy built on stages has them:
- recompute (train.recompute=full): a forward keeps only the micro-batch's input to the
  stage's first layer; its B or I first redoes z and h of every layer from it (the same
  products in the same order, so the same bits) and then runs the ordinary backward. What
  is kept between F and B is the inputs; the redone z, h of one micro-batch are temporaries
  of its backward (and, for a deferred W, kept with dJ/dz until the W).
- mixed precision: `layers` are the master weights (the gradients match them, the
  optimizer updates them), `compute` the copies forward and backward multiply by.
"""

from __future__ import annotations

import torch

from partition.model import (
    Cache,
    Grads,
    Layer,
    MLPSpec,
    WeightPart,
    backward_input,
    backward_layers,
    backward_weight,
    forward_layers,
    loss_and_grad,
    zero_grads,
)


class Stage:
    def __init__(self, spec: MLPSpec, layers: list[Layer], *, index: int = 0,
                 compute: list[Layer] | None = None, recompute: bool = False) -> None:
        self.spec = spec
        self.index = index  # global stage index (pipeline); 0 for a lone stage
        self.layers = layers  # the master weights
        self.compute = layers if compute is None else compute  # what the products use
        self.recompute = recompute
        self.grads: list[Grads] = zero_grads(layers)
        self.kept: dict[int, list[Cache]] = {}  # micro-batch -> caches, from F until B or I
        self.deferred: dict[int, list[WeightPart]] = {}  # micro-batch -> W's inputs, I until W
        self.in_flight_max = 0
        # A memory tracker (memory.StorageTracker) while one measures this stage: told
        # which storages are kept for backward and which are the data batch.
        self.probe = None

    @property
    def holds_input(self) -> bool:
        return self.layers[0].index == 0

    @property
    def has_output_layer(self) -> bool:
        return self.layers[-1].index == self.spec.num_layers - 1

    @property
    def in_flight(self) -> int:
        return len(self.kept) + len(self.deferred)

    def start_step(self) -> None:
        for g in self.grads:
            for t in g.tensors():
                t.zero_()
        self.in_flight_max = 0

    def idle(self) -> bool:
        """Nothing kept: every forward of the step has had its backward."""
        return not self.kept and not self.deferred

    def forward(self, x: torch.Tensor, mb: int = 0) -> torch.Tensor:
        out, caches = forward_layers(self.spec, self.compute, x, keep=not self.recompute)
        if self.recompute:
            caches = [Cache(x, None)]  # the input only: z and h are redone in the backward
        self.kept[mb] = caches
        self.in_flight_max = max(self.in_flight_max, self.in_flight)
        if self.probe is not None:
            self.probe.kept(caches, holds_input=self.holds_input)
        return out

    def loss(self, o: torch.Tensor, y: torch.Tensor, batch: int) -> tuple[float, int | None, torch.Tensor]:
        """Loss sum over these rows, correct count, and dJ/do for a batch of `batch` rows
        (in the master dtype; dJ/do in o's)."""
        if self.probe is not None:
            self.probe.inputs(y)
        return loss_and_grad(self.spec, o, y, batch, dtype=self.layers[0].W.dtype)

    def _caches(self, mb: int) -> list[Cache]:
        """What micro-batch mb's backward needs: kept, or (recompute) redone from its input."""
        kept = self.kept.pop(mb)
        if not self.recompute:
            return kept
        _, caches = forward_layers(self.spec, self.compute, kept[0].x, keep=True,
                                   skip_output=True)
        return caches

    def backward(self, g: torch.Tensor, mb: int = 0, *, need_input_grad: bool) -> torch.Tensor | None:
        """B: dJ/dW of every layer and (if asked) dJ/d(input), freeing as it goes."""
        return backward_layers(self.spec, self.compute, self._caches(mb), self.grads, g,
                               need_input_grad=need_input_grad)

    def backward_input(self, g: torch.Tensor, mb: int, *, need_input_grad: bool) -> torch.Tensor | None:
        """I: dJ/d(input) now; what the weight gradient needs is kept for `backward_weight`."""
        dx, parts = backward_input(self.spec, self.compute, self._caches(mb), g,
                                   need_input_grad=need_input_grad)
        self.deferred[mb] = parts
        if self.probe is not None:
            # dJ/dz, and x where recomputation made it anew, live on until the W
            self.probe.tag("activations", [t for p in parts for t in (p.dz, p.x)])
        return dx

    def backward_weight(self, mb: int) -> None:
        """W: dJ/dW from what the I kept."""
        backward_weight(self.deferred.pop(mb), self.grads)

    def predict(self, x: torch.Tensor, *, exchange: bool = True) -> torch.Tensor:
        """A forward keeping nothing (`exchange` is for stages whose layers are sharded:
        a whole stage has nothing to exchange)."""
        if self.probe is not None and self.holds_input:
            self.probe.inputs(x)
        out, _ = forward_layers(self.spec, self.compute, x, keep=False)
        return out
