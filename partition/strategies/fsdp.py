"""`fsdp`: sharded data parallel, ZeRO stages 1, 2 and 3 (the plan: partition/plans/fsdp.py).

Rows are shared out as in `data` (split_evenly; the loss gradient divides by the full B,
so the sum over ranks of the local gradients is the full-batch gradient). Each layer's
parameters are one flat storage cut in P padded pieces (`FlatShard`); rank r owns piece r:
it holds its gradient and optimizer state and is the only rank that updates it.

stage 3  only the pieces live between steps. A layer's forward and backward each start
         with an all-gather of its pieces into P·c elements whose front is the layer
         (W, b are views of them: no copy). With reshard_after_forward (the default) that
         is the step's one gather buffer, refilled by the next layer's gather — the
         layer's full weights live from its gather to the next one, never two layers at
         once; with reshard_after_forward=false each layer gets its own buffer, kept from
         its forward to the end of its backward. The backward writes the layer's local
         gradient into the step's zeroed gradient buffer (same layout) and reduce-scatters
         it at once onto the rank's gradient piece.
stage 2  full (padded) parameters on every rank; gradients reduce-scattered layer by
         layer as in stage 3; after the update of its own piece, every layer is
         all-gathered back into the full parameters.
stage 1  full parameters and `data`'s one flat gradient buffer, all-reduced once; then
         the update of its own piece and the all-gathers of stage 2.

λW is added to the gradient piece after the reduction (so once), on W's elements only;
s is each rank's ‖W piece‖², summed with the loss under `metric`. The update is
`model.SGD` on the real elements of the piece (padding stays zero: its gradient is zero).
`layers` (and weights.npz) are the rank's real elements as rectangles of the full W and
ranges of b (`FlatShard.pieces`), so the pieces of all ranks cover every weight once.
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
    activation_backward,
    activation_forward,
    add_decay,
    correct_count,
    linear,
    linear_backward,
    loss_grad,
    loss_sum,
    to_float,
    weight_names,
)
from partition.plans.fsdp import FlatShard, shard_plan
from partition.plans.split import split_evenly
from partition.strategies.base import StepOut, build_optimizer, reduce_metric, sq_norm
from partition.strategies.data import flat_grads
from partition.topology import Topology
from partition.trace import maybe_span


def flat_layer(full: dict[str, torch.Tensor], shard: FlatShard, *, dtype: torch.dtype,
               device: torch.device) -> torch.Tensor:
    """Layer shard.index's parameters as one zero-padded flat tensor of P·c elements."""
    wname, bname = weight_names(shard.index)
    parts = [full[wname].reshape(-1)] + ([full[bname]] if shard.bias else [])
    flat = torch.zeros(shard.padded, dtype=dtype, device=device)
    flat[:shard.numel] = torch.cat(parts).to(device=device, dtype=dtype)
    return flat


def unflatten(shard: FlatShard, flat: torch.Tensor) -> Layer:
    """The layer as views of the front of a gathered (or full) flat buffer."""
    W = flat[:shard.weights].view(shard.n_out, shard.n_in)
    b = flat[shard.weights:shard.numel] if shard.bias else None
    return Layer(shard.index, W, b)


def grad_views(shard: FlatShard, flat: torch.Tensor) -> Grads:
    W = flat[:shard.weights].view(shard.n_out, shard.n_in)
    return Grads(W, flat[shard.weights:shard.numel] if shard.bias else None)


def piece_layers(shard: FlatShard, rank: int, piece: torch.Tensor) -> list[Layer]:
    """Rank's real elements of `piece` (its flat piece, or just its real elements: the
    spans lie within those) as Layers of the full W's rectangles
    and b's ranges — views, so they follow the updates (weights.npz, the grad check)."""
    out = []
    for p in shard.pieces(rank):
        run = piece[p.span[0]:p.span[1]]
        if p.tensor == "W":
            (r0, r1), (c0, c1) = p.rows, p.cols
            out.append(Layer(shard.index, run.view(r1 - r0, c1 - c0), None, p.rows, p.cols,
                             bias_owner=False))
        else:  # a range of b: an empty W slice of the same rows keeps Layer's shape rules
            out.append(Layer(shard.index, run.new_empty(len(run), 0), run, p.rows, (0, 0)))
    return out


def piece_grads(shard: FlatShard, rank: int, piece: torch.Tensor) -> list[Grads]:
    """`piece_layers`' rectangles of a gradient piece (matching them one to one)."""
    return [Grads(layer.W, layer.b) for layer in piece_layers(shard, rank, piece)]


class FsdpRunner:
    def __init__(self, cfg: RunConfig, topo: Topology, comm: Comm, data: Dataset,
                 full: dict[str, torch.Tensor]) -> None:
        self.cfg, self.topo, self.comm, self.data = cfg, topo, comm, data
        self.spec = cfg.spec
        self.dtype = getattr(torch, cfg.train.dtype)
        self.P, self.rank = topo.world_size, topo.rank
        self.zero_stage = cfg.strategy.zero_stage
        self.reshard = cfg.strategy.reshard_after_forward
        self.rows = split_evenly(cfg.train.batch_size, self.P)[self.rank]
        self.plan = shard_plan(self.spec.dims, world=self.P, bias=self.spec.bias)
        dev, r = topo.device, self.rank
        flats = [flat_layer(full, s, dtype=self.dtype, device=dev) for s in self.plan]
        if self.zero_stage == 3:
            # Only this rank's piece is kept: the full flats go when __init__ returns.
            self.pieces = [f[r * s.piece:(r + 1) * s.piece].clone()
                           for f, s in zip(flats, self.plan, strict=True)]
            self.flats: list[torch.Tensor] = []
            self.full_layers: list[Layer] = []
        else:
            self.flats = flats
            self.full_layers = [unflatten(s, f) for s, f in zip(self.plan, flats, strict=True)]
            self.pieces = [f[r * s.piece:(r + 1) * s.piece]
                           for f, s in zip(flats, self.plan, strict=True)]
        del flats
        if self.zero_stage == 1:
            # data's flat buffer: every gradient a view into it, one all-reduce per step
            self.flat_grad, self.full_grads = flat_grads(self.full_layers)
            starts = [0]
            for s in self.plan:
                starts.append(starts[-1] + s.numel)
            self.grad_pieces = [self.flat_grad[o + s.range(r)[0]:o + s.range(r)[1]]
                                for o, s in zip(starts, self.plan)]
        else:
            self.grad_pieces = [torch.zeros(s.piece, dtype=self.dtype, device=dev)
                                for s in self.plan]
            self.full_grads = []
        # The optimizer sees each piece's real elements as (W part, b part).
        self.opt_layers, self.opt_grads = [], []
        for s, p, g in zip(self.plan, self.pieces, self.grad_pieces, strict=True):
            v, wv = s.valid(r), s.weight_valid(r)
            self.opt_layers.append(Layer(s.index, p[:wv], p[wv:v] if v > wv else None))
            self.opt_grads.append(Grads(g[:wv], g[wv:v] if v > wv else None))
        self.opt = build_optimizer(cfg)  # its state is the pieces' too: 1/P of it
        self.layers = [l for s, p in zip(self.plan, self.pieces, strict=True)
                       for l in piece_layers(s, r, p)]
        self.saved_layers = self.layers  # the pieces of all ranks cover every weight once
        self.probe = None  # memory.StorageTracker while measured (memory_stages)
        self.tracer = None  # a trace.Tracer, set by the train loop
        self._bufs: dict[str, torch.Tensor] = {}  # the step's reused buffers (_step_buffer)

    # ------------------------------------------------------------ weights and gradients

    def _step_buffer(self, key: str, n: int) -> torch.Tensor:
        """This step's buffer `key` (the largest layer's P·c elements), made at first use and
        let go by `step` / `predict` at their end: every layer's gather (with resharding)
        and every layer's local gradient reuses one storage, as a caching allocator would
        hand FSDP back the block it freed. A fresh buffer per layer would be freed late:
        gloo's worker thread lets go of a collective's tensors only when it next gets the
        GIL, so the next layer's buffer could be made while the last one still lives."""
        buf = self._bufs.get(key)
        if buf is None:
            buf = torch.empty(max(s.padded for s in self.plan), dtype=self.dtype,
                              device=self.topo.device)
            self._bufs[key] = buf
        return buf[:n]

    def _gather(self, l: int, phase: str, *, exchange: bool = True) -> Layer:
        """Layer l whole. Stage 3 all-gathers its pieces into P·c elements: the step's
        gather buffer when resharding, else a buffer of its own, dropped after the layer's
        backward (exchange=False: the same buffer, filled with this rank's piece only)."""
        if self.zero_stage != 3:
            return self.full_layers[l]
        s = self.plan[l]
        if self.P == 1:  # the piece is the layer
            return unflatten(s, self.pieces[l])
        if self.reshard:
            buf = self._step_buffer("gather", s.padded)
        else:
            buf = torch.empty(s.padded, dtype=self.dtype, device=self.topo.device)
        if exchange:
            self.comm.all_gather_into(buf, self.pieces[l], role="weight_gather", phase=phase)
        else:
            buf.zero_()
            buf[self.rank * s.piece:(self.rank + 1) * s.piece] = self.pieces[l]
        if self.probe is not None:
            self.probe.tag("gathered", [buf])
        return unflatten(s, buf)

    def _grad_target(self, l: int) -> tuple[torch.Tensor | None, Grads]:
        """Where layer l's backward accumulates: stage 1 (and P = 1) the persistent
        gradients; stages 2, 3 the step's zeroed gradient buffer (P·c elements),
        reduce-scattered by `_grad_done`."""
        s = self.plan[l]
        if self.zero_stage == 1:
            return None, self.full_grads[l]
        if self.P == 1:
            return None, grad_views(s, self.grad_pieces[l])
        buf = self._step_buffer("grad", s.padded).zero_()
        return buf, grad_views(s, buf)

    def _grad_done(self, l: int, buf: torch.Tensor | None) -> None:
        if buf is None:
            return
        mine = self.comm.reduce_scatter(list(buf.chunk(self.P)), role="weight_grad",
                                        phase="backward")
        self.grad_pieces[l] += mine

    # ------------------------------------------------------------ one micro-batch

    def _forward(self, x: torch.Tensor, *, keep: bool, exchange: bool = True
                 ) -> tuple[torch.Tensor, list[Cache], dict[int, Layer]]:
        """Layer by layer, each gathered just before it is used; returns the output, the
        caches (keep=True) and the gathered layers held for backward (no resharding)."""
        last = self.spec.num_layers - 1
        caches: list[Cache] = []
        held: dict[int, Layer] = {}
        for l in range(self.spec.num_layers):
            layer = self._gather(l, "forward", exchange=exchange)
            with maybe_span(self.tracer, f"F{l}", kind="F", layer=l):
                z = linear(x, layer)  # (rows, n_l) @ (n_l, n_{l+1}) -> (rows, n_{l+1})
                if keep:
                    caches.append(Cache(x, None if l == last else z))
                    if self.zero_stage == 3 and not self.reshard:
                        held[l] = layer
                x = z if l == last else activation_forward(self.spec.activation, z)
            del layer, z  # resharded: the gathered buffer goes before the next gather
        if keep and self.probe is not None:
            self.probe.kept(caches, holds_input=True)
        return x, caches, held

    def _backward(self, caches: list[Cache], held: dict[int, Layer], g: torch.Tensor) -> None:
        """Top layer first: gather (unless held), weight and input gradients, reduce-scatter."""
        last = self.spec.num_layers - 1
        for l in range(last, -1, -1):
            layer = held.pop(l) if l in held else self._gather(l, "backward")
            cache = caches[l]
            caches[l] = None  # type: ignore[call-overload]  # free as we go
            buf, grads = self._grad_target(l)
            with maybe_span(self.tracer, f"B{l}", kind="B", layer=l):
                dz = g if l == last else activation_backward(self.spec.activation, cache.z, g)
                # dJ/dW += dzᵀ x: (n_{l+1}, rows) @ (rows, n_l); dJ/dx = dz W: (rows, n_{l+1}) @ (n_{l+1}, n_l)
                g = linear_backward(dz, cache.x, layer, grads, need_input_grad=l > 0)
            del layer, cache, dz, grads
            self._grad_done(l, buf)
            del buf

    # ------------------------------------------------------------ the step

    def _my_rows(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        t = self.cfg.train
        idx = self.data.rows(step, t.batch_size, shuffle=self.cfg.data.shuffle,
                             seed=self.cfg.seed)[slice(*self.rows)]
        dev = self.topo.device
        X = self.data.X[idx].to(device=dev, dtype=self.dtype)
        y = self.data.y[idx]
        y = y.to(dev) if y.dtype == torch.int64 else y.to(device=dev, dtype=self.dtype)
        return X, y

    def _loss(self, o: torch.Tensor, y: torch.Tensor) -> tuple[float, int, torch.Tensor]:
        if self.probe is not None:
            self.probe.inputs(y)
        total = to_float(loss_sum(self.spec.loss, o, y))
        correct = correct_count(o, y) if self.spec.loss == "cross_entropy" else 0
        # divides by the full B, not by this rank's rows
        return total, correct, loss_grad(self.spec.loss, o, y, self.cfg.train.batch_size)

    def _update(self, *, want_grads: bool) -> tuple[float, list[Grads] | None]:
        """λW on this rank's W elements, then SGD on its piece; stages 1, 2 gather the
        updated pieces back into every rank's full parameters. Returns (‖W piece‖², grads)."""
        if self.zero_stage == 1 and self.P > 1:
            self.comm.all_reduce(self.flat_grad, role="weight_grad", phase="update")
        if not self.opt.decoupled:  # AdamW applies λ itself
            add_decay(self.opt_layers, self.opt_grads, self.spec.weight_decay)
        grads = None
        if want_grads:
            grads = [g.clone() for s, p in zip(self.plan, self.grad_pieces, strict=True)
                     for g in piece_grads(s, self.rank, p)]
        sq = sq_norm(self.opt_layers)  # s at the weights the step starts from
        self.opt.step(self.opt_layers, self.opt_grads)
        if self.zero_stage != 3 and self.P > 1:
            for flat, mine in zip(self.flats, self.pieces, strict=True):
                piece = mine.clone()  # the input may not alias the output (a view of it)
                self.comm.all_gather_into(flat, piece, role="weight_gather", phase="update")
                del piece
        return sq, grads

    def step(self, step: int, *, want_grads: bool) -> StepOut:
        B, M = self.cfg.train.batch_size, self.cfg.train.microbatches
        for g in self.grad_pieces if self.zero_stage != 1 else [self.flat_grad]:
            g.zero_()
        self._bufs: dict[str, torch.Tensor] = {}
        X, y = self._my_rows(step)
        if self.probe is not None:
            self.probe.inputs(X)
        loss_total, correct = 0.0, 0
        # tensor_split: exactly M pieces, as even as possible (config keeps them non-empty)
        for m, (xm, ym) in enumerate(zip(X.tensor_split(M), y.tensor_split(M), strict=True)):
            o, caches, held = self._forward(xm, keep=True)
            with maybe_span(self.tracer, f"loss{m}", kind="loss", mb=m):
                ls, c, g = self._loss(o, ym)
                del o
            self._backward(caches, held, g)
            del g, caches, held
            loss_total += ls
            correct += c
        del X, y, xm, ym
        self._bufs = {}
        with maybe_span(self.tracer, "update", kind="update"):
            sq, grads = self._update(want_grads=want_grads)
        loss_sum_all, sq_all, correct_all = reduce_metric(self.comm, loss_total, sq, correct,
                                                          device=self.topo.device)
        L = loss_sum_all / B
        return StepOut(
            objective=L + 0.5 * self.spec.weight_decay * sq_all, data_loss=L,
            correct=int(correct_all) if self.spec.loss == "cross_entropy" else None,
            grads=grads, grads_have_decay=not self.opt.decoupled, in_flight_max=1,
        )

    def predict(self, step: int, *, exchange: bool = True) -> torch.Tensor:
        """A prediction forward of this rank's rows, keeping nothing. Stage 3 gathers each
        layer (exchange=False: the same buffers filled locally, so the output is not the
        net's, only its memory is); stages 1, 2 hold the full weights."""
        X, _ = self._my_rows(step)
        if self.probe is not None:
            self.probe.inputs(X)
        self._bufs = {}
        out, _, _ = self._forward(X, keep=False, exchange=exchange)
        self._bufs = {}
        return out

    # ------------------------------------------------------------ for memory.py

    def memory_stages(self) -> list:
        """This runner tags its own kept activations and gathered layers (`probe`)."""
        return [self]

    def memory_state(self) -> dict[str, list[torch.Tensor]]:
        params = self.pieces if self.zero_stage == 3 else self.flats
        grads = [self.flat_grad] if self.zero_stage == 1 else self.grad_pieces
        return {"params": list(params), "grads": list(grads), "optimizer": list(self.opt.buffers)}

    def state_bytes(self) -> dict[str, int]:
        def total(ts: list[torch.Tensor]) -> int:
            return sum(t.numel() * t.element_size() for t in ts)

        st = self.memory_state()
        # the optimizer makes its buffers at the first update: counted from the pieces
        opt = self.opt.state_bytes(self.opt_layers)
        return {"params_bytes": total(st["params"]), "grads_bytes": total(st["grads"]),
                "optimizer_bytes": opt}
