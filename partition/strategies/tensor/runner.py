"""Executing a tensor-parallel plan (plan.py): one rank's shards, forward and backward.

Every rank reads the whole batch (replicated input, nothing crosses for it), runs
its shards of every layer, and meets the others only in the collectives the layout
needs (see plan.py for what crosses and why). With M micro-batches each one runs
forward then backward before the next (gradient accumulation), so every crossing
happens once per micro-batch and the update is the full batch's.

With train.recompute=full a micro-batch keeps only its input; its backward first redoes
the forward of every layer but the net's last (whose backward needs only its input and
dJ/do), collectives included: a hidden row-parallel layer's all-reduce, a hidden rowwise
layer's all-gather cross again, recorded in phase `backward`. Under mixed precision the
activation collectives (partial outputs, gathers, input gradients) carry bfloat16.
"""

from __future__ import annotations

import torch

from partition.comm import Comm
from partition.config import RunConfig
from partition.data import Dataset
from partition.model import (
    Cache,
    Grads,
    Layer,
    WeightPart,
    activation_backward,
    activation_forward,
    compute_copies,
    input_grad,
    linear,
    linear_backward,
    loss_and_grad,
    make_layer,
    weight_grad,
    zero_grads,
)
from partition.plans.split import split_evenly
from partition.plans.tensor import LayerShard, plan_layers
from partition.strategies.base import (
    StepOut,
    build_optimizer,
    compute_dtype,
    finish_step,
    master_dtype,
    recomputes,
    state_bytes,
)
from partition.topology import Topology
from partition.trace import inputs_span, maybe_span


class TensorShards:
    """One rank's shards of a contiguous run of layers over a tensor group, with their
    forward and backward (the collectives included): the whole tensor strategy is one
    of these over every layer; a hybrid pipeline stage is one over its own layers.

    `plan`: this rank's LayerShards (global layer indices, in order); `comm` is the
    group's (world size P, this rank's index in it); `dtype` the masters', `cdtype` what
    the products use (mixed precision); `recompute`: a backward first redoes its forward
    from the kept input. Subclasses own the step.
    """

    def __init__(self, spec, plan: list[LayerShard], full: dict[str, torch.Tensor], *,  # noqa: ANN001
                 comm: Comm | None, world: int, rank: int, dtype: torch.dtype,
                 cdtype: torch.dtype, recompute: bool, device: torch.device) -> None:
        self.spec, self.plan, self.comm = spec, plan, comm
        self.P, self.rank = world, rank
        self.recompute = recompute
        self.layers: list[Layer] = [
            make_layer(full, s.layer, dtype=dtype, device=device, rows=s.rows,
                       cols=s.cols, bias_owner=s.bias_owner)
            for s in self.plan
        ]
        # Replicas are returned (and counted in s) by one rank only.
        self.saved_layers = [l for l, s in zip(self.layers, self.plan, strict=True) if s.primary]
        self.compute = compute_copies(self.layers, cdtype)
        self.grads = zero_grads(self.layers)
        # rowwise: every rank's row range of every layer's output (all-gather shapes,
        # reduce-scatter chunks).
        self.splits = [split_evenly(spec.dims[s.layer + 1], self.P) if s.kind == "rowwise"
                       else None for s in self.plan]
        # A memory tracker (memory.StorageTracker) while one measures a phase: this object
        # plays the part of a `Stage` for it (it keeps its own caches and holds the grads).
        self.probe = None
        self.tracer = None  # a trace.Tracer, set by the train loop

    # ------------------------------------------------------------ collectives (none at P = 1)

    def _all_reduce(self, t: torch.Tensor, *, role: str, phase: str,
                    exchange: bool = True) -> torch.Tensor:
        if self.P == 1 or not exchange:  # in place: nothing to allocate for the result
            return t
        return self.comm.all_reduce(t.contiguous(), role=role, phase=phase)

    def _gather(self, t: torch.Tensor, splits: list[tuple[int, int]], *,
                exchange: bool = True, phase: str = "forward") -> torch.Tensor:
        """Whole activation from every rank's column slice: (B, n_r) -> (B, n)."""
        if self.P == 1:
            return t
        shapes = [(t.shape[0], hi - lo) for lo, hi in splits]
        if exchange:
            return torch.cat(self.comm.all_gather(t, shapes, role="gather", phase=phase),
                             dim=1)
        return torch.cat(self._gather_alone(t, shapes), dim=1)

    def _gather_alone(self, t: torch.Tensor, shapes: list[tuple[int, int]]) -> list[torch.Tensor]:
        """comm.all_gather's buffers without the crossing (prediction, exchange=False): the
        zero-padded piece where slices are uneven and P receive buffers, this rank's own
        filled in, the others left zero — the same memory, no traffic."""
        big = tuple(max(s[i] for s in shapes) for i in range(2))
        piece = t
        if any(tuple(s) != big for s in shapes):
            piece = torch.zeros(big, dtype=t.dtype, device=t.device)
            piece[:, :t.shape[1]] = t
        bufs = [torch.zeros(big, dtype=t.dtype, device=t.device) for _ in shapes]
        bufs[self.rank].copy_(piece)
        return [b if tuple(s) == big else b[:, :s[1]] for b, s in zip(bufs, shapes, strict=True)]

    def _reduce_scatter(self, t: torch.Tensor, splits: list[tuple[int, int]]) -> torch.Tensor:
        """Sum the ranks' partial (B, n) and keep this rank's columns: (B, n) -> (B, n_r)."""
        if self.P == 1:
            return t
        chunks = [t[:, lo:hi] for lo, hi in splits]
        return self.comm.reduce_scatter(chunks, role="input_grad", phase="backward")

    # ------------------------------------------------------------ what each layer's products use

    # A hybrid mesh's dp_shard stage (strategies/hybrid.py) holds only pieces of its shards:
    # it gathers layer i before each use and reduce-scatters its gradient after. Here the
    # shard itself is used and its gradient accumulates in place.

    def _weights(self, i: int, phase: str, *, exchange: bool = True) -> Layer:
        """The weights layer i's forward or backward multiplies by."""
        return self.compute[i]

    def _grad_target(self, i: int) -> tuple[torch.Tensor | None, Grads]:
        """Where layer i's weight gradient accumulates, and a handle for `_grad_done`."""
        return None, self.grads[i]

    def _grad_done(self, i: int, handle: torch.Tensor | None) -> None:
        """Layer i's weight gradient of this micro-batch is complete."""

    # ------------------------------------------------------------ one micro-batch

    def _forward(self, x: torch.Tensor, *, keep: bool, exchange: bool = True,
                 redo: bool = False) -> tuple[torch.Tensor, list[Cache]]:
        """x: the whole (mb, d) input on every rank -> the whole (mb, q) output on every rank.

        exchange=False (prediction only): nothing crosses; see `predict`.
        redo=True (recomputation inside a backward): the caches of every layer, the net's
        last only recording its input; its crossings are in phase `backward`, and what it
        makes is a temporary of the backward, not kept activations."""
        last = self.spec.num_layers - 1
        phase = "backward" if redo else "forward"
        caches: list[Cache] = []
        for i, (sh, splits) in enumerate(zip(self.plan, self.splits, strict=True)):
            if redo and sh.layer == last:
                caches.append(Cache(x, None))
                break
            layer = self._weights(i, phase, exchange=exchange)
            # column: (mb, n_in) -> (mb, |R_r|); row: (mb, |R_r|) -> (mb, n_out) partial;
            # replicated: (mb, n_in) -> (mb, n_out); rowwise: (mb, n_in) -> (mb, |R_r|)
            name = f"F{layer.index}"
            with maybe_span(self.tracer, name, kind="F", layer=layer.index):
                z = linear(x, layer)
            del layer  # resharded (dp_shard): the gathered weights go before the next gather
            if sh.kind == "row":
                z = self._all_reduce(z, role="partial_output", phase=phase,
                                     exchange=exchange)
            with maybe_span(self.tracer, name, kind="F", layer=sh.layer):
                if keep:
                    caches.append(Cache(x, None if sh.layer == last else z))
                h = z if sh.layer == last else activation_forward(self.spec.activation, z)
            x = (self._gather(h, splits, exchange=exchange, phase=phase)
                 if sh.kind == "rowwise" else h)
        if keep and not redo and self.probe is not None:
            self.probe.kept(caches, holds_input=self.plan[0].layer == 0)
        return x, caches

    def _backward(self, caches: list[Cache], g: torch.Tensor, *, need_input_grad: bool = False,
                  defer: list[WeightPart] | None = None) -> torch.Tensor | None:
        """g = dJ/d(output), whole on every rank (the loss gradient, or what the next
        pipeline stage sent). Returns dJ/d(input), whole on every rank, if asked (a
        pipeline stage that is not the first). `defer`: a list to receive each layer's
        (dJ/dz, x) instead of accumulating dJ/dW now (the I of an I/W split; the W is
        `backward_weight`) — the same products either way."""
        last = self.spec.num_layers - 1
        if self.recompute:  # only the micro-batch's input was kept: redo z and h
            _, caches = self._forward(caches[0].x, keep=True, redo=True)
        parts: list[WeightPart | None] = [None] * len(self.plan)
        dx = None
        for i in range(len(self.plan) - 1, -1, -1):
            sh, cache = self.plan[i], caches[i]
            want_dx = i > 0 or need_input_grad
            layer = self._weights(i, "backward")
            with maybe_span(self.tracer, f"B{sh.layer}", kind="B", layer=sh.layer):
                if sh.kind == "rowwise" and i == len(self.plan) - 1:
                    # the top of the run (the net's output, or a pipeline stage's last
                    # hidden layer): g is the whole dJ/do or dJ/dh; this rank's columns
                    g = g[:, slice(*sh.rows)]
                if sh.layer == last:
                    dz = g
                else:
                    dz = activation_backward(self.spec.activation, cache.z, g)
                if defer is None:
                    handle, grads = self._grad_target(i)
                    dx = linear_backward(dz, cache.x, layer, grads, need_input_grad=want_dx)
                    del grads
                else:
                    parts[i] = WeightPart(dz, cache.x)
                    dx = input_grad(dz, layer) if want_dx else None
                caches[i] = None  # type: ignore[call-overload]  # free as we go
            del layer
            if defer is None:
                self._grad_done(i, handle)
                del handle
            if dx is None:
                break
            if sh.kind == "column":
                # (mb, |R_r|) @ (|R_r|, n_in): a partial sum of the pair's input gradient
                dx = self._all_reduce(dx, role="input_grad", phase="backward")
            elif sh.kind == "rowwise" and i > 0:
                dx = self._reduce_scatter(dx, self.splits[i - 1])
            elif sh.kind == "rowwise":
                # the stage's input is whole on every rank: its gradient is summed whole
                dx = self._all_reduce(dx, role="input_grad", phase="backward")
            # row: dx is already this rank's slice of dJ/dh; replicated: dx is whole
            g = dx
        if defer is not None:
            defer.extend(parts)  # type: ignore[arg-type]
        return dx

    def _backward_weight(self, parts: list[WeightPart]) -> None:
        """The W of an I/W split: dJ/dW += dJ/dz xᵀ from what `_backward(defer=...)` kept,
        top layer first — the products `model.backward_weight` makes, into `_grad_target`."""
        for i in range(len(parts) - 1, -1, -1):
            handle, grads = self._grad_target(i)
            weight_grad(parts[i].dz, parts[i].x, grads)
            parts[i] = None  # type: ignore[call-overload]
            del grads
            self._grad_done(i, handle)


class TensorRunner(TensorShards):
    """`tensor`: every layer sharded over all ranks; every rank reads the whole batch."""

    def __init__(self, cfg: RunConfig, topo: Topology, comm: Comm, data: Dataset,
                 full: dict[str, torch.Tensor]) -> None:
        self.cfg, self.topo, self.data = cfg, topo, data
        self.dtype, self.cdtype = master_dtype(cfg), compute_dtype(cfg)
        plan = plan_layers(cfg.strategy.layout, cfg.spec.dims, topo.world_size, topo.rank)
        super().__init__(cfg.spec, plan, full, comm=comm, world=topo.world_size,
                         rank=topo.rank, dtype=self.dtype, cdtype=self.cdtype,
                         recompute=recomputes(cfg), device=topo.device)
        self.opt = build_optimizer(cfg)

    def memory_stages(self) -> list[TensorRunner]:
        """For memory.py: the objects that hold the grads and take `probe` (here, self)."""
        return [self]

    # ------------------------------------------------------------ the step

    def step(self, step: int, *, want_grads: bool) -> StepOut:
        t = self.cfg.train
        B, M = t.batch_size, t.microbatches
        for g in self.grads:
            for x in g.tensors():
                x.zero_()
        with inputs_span(self.tracer):
            X, y = self.data.batch(step, B, shuffle=self.cfg.data.shuffle, seed=self.cfg.seed,
                                   dtype=self.cdtype, device=self.topo.device,
                                   y_dtype=self.dtype)
        if self.probe is not None:
            self.probe.inputs(X, y)
        loss_total, correct = 0.0, 0
        ce = self.spec.loss == "cross_entropy"
        for xm, ym in zip(X.chunk(M), y.chunk(M), strict=True):
            o, caches = self._forward(xm, keep=not self.recompute)
            if self.recompute:
                caches = [Cache(xm, None)]  # the input only (it is the data batch: `input`)
            with maybe_span(self.tracer, "loss", kind="loss"):
                ls, c, g = loss_and_grad(self.spec, o, ym, B, dtype=self.dtype)
                loss_total += ls
                correct += c or 0
                del o
            self._backward(caches, g)
        del X, y
        # λW is local to each shard. The loss is the same on every rank (each has the whole
        # o): rank 0 contributes it; s needs every rank's shards, replicas counted once.
        mine = self.rank == 0
        return finish_step(layers=self.layers, grads=self.grads, counted=self.saved_layers,
                           opt=self.opt, weight_decay=self.spec.weight_decay, comm=self.comm,
                           loss_sum=loss_total if mine else 0.0, correct=correct if mine else 0,
                           batch=B, want_grads=want_grads, cross_entropy=ce, in_flight_max=1,
                           device=self.topo.device, compute=self.compute, tracer=self.tracer)

    def predict(self, step: int, *, exchange: bool = True) -> torch.Tensor:
        """A prediction forward (nothing kept); the whole output is on every rank.

        exchange=False: nothing crosses — megatron's all-reduces are skipped (they work in
        place, so the memory is the same), rowwise gathers allocate their buffers locally;
        the output is then not the net's (partial sums, zero slices), only its memory is.
        """
        X, _ = self.data.batch(step, self.cfg.train.batch_size, shuffle=self.cfg.data.shuffle,
                               seed=self.cfg.seed, dtype=self.cdtype, device=self.topo.device)
        if self.probe is not None:
            self.probe.inputs(X)
        out, _ = self._forward(X, keep=False, exchange=exchange)
        return out

    def state_bytes(self) -> dict[str, int]:
        return state_bytes(self.layers, self.opt.state_bytes(self.layers), self.compute)
