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

The pieces and stage 3's gather / reduce-scatter are `ShardedLayers`, which a hybrid mesh's
dp_shard stages hold too (over each tensor shard and the dp group: strategies/hybrid.py).

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
from partition.trace import inputs_span, maybe_span


def flat_layer(full: dict[str, torch.Tensor], shard: FlatShard, *, dtype: torch.dtype,
               device: torch.device) -> torch.Tensor:
    """Layer shard.index's parameters (or its tensor shard's: `FlatShard.row0`, `col0`) as
    one zero-padded flat tensor of P·c elements."""
    wname, bname = weight_names(shard.index)
    rows = slice(shard.row0, shard.row0 + shard.n_out)
    W = full[wname][rows, shard.col0:shard.col0 + shard.n_in]
    parts = [W.reshape(-1)] + ([full[bname][rows]] if shard.bias else [])
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


class StepBuffers:
    """A step's reused buffers, one per key (`gather`, `grad`), each as large as the largest
    layer's P·c elements: made at first use and let go by `release` at the step's (or the
    prediction's) end. Every layer's gather (with resharding) and every layer's local
    gradient reuses one storage, as a caching allocator would hand FSDP back the block it
    freed. A fresh buffer per layer would be freed late: gloo's worker thread lets go of a
    collective's tensors only when it next gets the GIL, so the next layer's buffer could
    be made while the last one still lives. One set serves every `ShardedLayers` of a rank
    (a hybrid rank's stages)."""

    def __init__(self, *, dtype: torch.dtype, device: torch.device) -> None:
        self.dtype, self.device = dtype, device
        self.size = 0
        self._bufs: dict[str, torch.Tensor] = {}

    def fit(self, n: int) -> None:
        """Make room for a layer of n elements (before the first buffer is made)."""
        self.size = max(self.size, n)

    def get(self, key: str, n: int) -> torch.Tensor:
        buf = self._bufs.get(key)
        if buf is None:
            buf = torch.empty(self.size, dtype=self.dtype, device=self.device)
            self._bufs[key] = buf
        return buf[:n]

    def release(self) -> None:
        self._bufs = {}


class ShardedLayers:
    """Layers' flat storages (`FlatShard`s) cut in pieces over one group, with ZeRO stage
    3's mechanics: a layer all-gathered whole before it is used (role `weight_gather`), its
    local gradient reduce-scattered onto the rank's gradient piece right after its backward
    (role `weight_grad`). `FsdpRunner` holds one over every layer and the world; a hybrid
    mesh's dp_shard stage one over its tensor shards and its dp group (strategies/hybrid.py).

    `pieces`, `grad_pieces`: this rank's padded pieces (c elements each; views of the full
    flats under stages 1 and 2) and their gradients. `opt_layers`, `opt_grads`: their real
    elements as (W part, b part) — what λW, s and the optimizer see. `layers`: those
    elements as rectangles of the full W and ranges of b (views: weights.npz, the grad check).
    """

    def __init__(self, plan: list[FlatShard], pieces: list[torch.Tensor],
                 grad_pieces: list[torch.Tensor], *, comm: Comm | None, rank: int,
                 reshard: bool, buffers: StepBuffers) -> None:
        self.plan, self.pieces, self.grad_pieces = plan, pieces, grad_pieces
        self.comm, self.rank, self.reshard, self.buffers = comm, rank, reshard, buffers
        self.P = plan[0].world if plan else 1
        for s in plan:
            buffers.fit(s.padded)
        self.opt_layers: list[Layer] = []
        self.opt_grads: list[Grads] = []
        for s, p, g in zip(plan, pieces, grad_pieces, strict=True):
            v, wv = s.valid(rank), s.weight_valid(rank)
            self.opt_layers.append(Layer(s.index, p[:wv], p[wv:v] if v > wv else None))
            self.opt_grads.append(Grads(g[:wv], g[wv:v] if v > wv else None))
        self.layers = [l for s, p in zip(plan, pieces, strict=True)
                       for l in piece_layers(s, rank, p)]

    @classmethod
    def cut(cls, plan: list[FlatShard], flats: list[torch.Tensor], *, comm: Comm | None,
            rank: int, reshard: bool, buffers: StepBuffers) -> ShardedLayers:
        """Stage 3: keep only this rank's piece of each flat (the flats may go) and a zeroed
        gradient piece beside it."""
        pieces = [f[rank * s.piece:(rank + 1) * s.piece].clone()
                  for f, s in zip(flats, plan, strict=True)]
        grads = [torch.zeros_like(p) for p in pieces]
        return cls(plan, pieces, grads, comm=comm, rank=rank, reshard=reshard, buffers=buffers)

    def gather(self, l: int, phase: str, *, exchange: bool = True, probe=None) -> Layer:  # noqa: ANN001
        """Layer l whole: its pieces all-gathered into P·c elements, the step's gather buffer
        when resharding, else a buffer of its own (the caller holds it as long as it needs
        it). exchange=False: the same buffer, filled with this rank's piece only (prediction
        memory without traffic). `probe` (memory.StorageTracker) is told it is `gathered`."""
        s = self.plan[l]
        if self.P == 1:  # the piece is the layer
            return unflatten(s, self.pieces[l])
        if self.reshard:
            buf = self.buffers.get("gather", s.padded)
        else:
            buf = torch.empty(s.padded, dtype=self.buffers.dtype, device=self.buffers.device)
        if exchange:
            self.comm.all_gather_into(buf, self.pieces[l], role="weight_gather", phase=phase)
        else:
            buf.zero_()
            buf[self.rank * s.piece:(self.rank + 1) * s.piece] = self.pieces[l]
        if probe is not None:
            probe.tag("gathered", [buf])
        return unflatten(s, buf)

    def grad_target(self, l: int) -> tuple[torch.Tensor | None, Grads]:
        """Where layer l's backward accumulates: the step's zeroed gradient buffer (P·c
        elements), reduce-scattered by `grad_done`; at P = 1 the gradient piece itself."""
        s = self.plan[l]
        if self.P == 1:
            return None, grad_views(s, self.grad_pieces[l])
        buf = self.buffers.get("grad", s.padded).zero_()
        return buf, grad_views(s, buf)

    def grad_done(self, l: int, buf: torch.Tensor | None) -> None:
        if buf is None:
            return
        mine = self.comm.reduce_scatter(list(buf.chunk(self.P)), role="weight_grad",
                                        phase="backward")
        self.grad_pieces[l] += mine

    def piece_grads(self) -> list[Grads]:
        """The gradient pieces as `layers`' rectangles (matching them one to one)."""
        return [g for s, p in zip(self.plan, self.grad_pieces, strict=True)
                for g in piece_grads(s, self.rank, p)]


def sharded_state_bytes(state: dict[str, list[torch.Tensor]], optimizer_bytes: int
                        ) -> dict[str, int]:
    """params and grads as held (padded pieces, or full flats), and the optimizer state,
    which exists only after the first update: counted from the pieces' real elements."""
    def total(ts: list[torch.Tensor]) -> int:
        return sum(t.numel() * t.element_size() for t in ts)

    return {"params_bytes": total(state["params"]), "grads_bytes": total(state["grads"]),
            "optimizer_bytes": optimizer_bytes}


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
        self.buffers = StepBuffers(dtype=self.dtype, device=dev)
        flats = [flat_layer(full, s, dtype=self.dtype, device=dev) for s in self.plan]
        if self.zero_stage == 3:
            # Only this rank's piece is kept: the full flats go when __init__ returns.
            self.sharded = ShardedLayers.cut(self.plan, flats, comm=comm, rank=r,
                                             reshard=self.reshard, buffers=self.buffers)
            self.flats: list[torch.Tensor] = []
            self.full_layers: list[Layer] = []
            self.full_grads: list[Grads] = []
        else:
            self.flats = flats
            self.full_layers = [unflatten(s, f) for s, f in zip(self.plan, flats, strict=True)]
            pieces = [f[r * s.piece:(r + 1) * s.piece] for f, s in zip(flats, self.plan, strict=True)]
            if self.zero_stage == 1:
                # data's flat buffer: every gradient a view into it, one all-reduce per step
                self.flat_grad, self.full_grads = flat_grads(self.full_layers)
                starts = [0]
                for s in self.plan:
                    starts.append(starts[-1] + s.numel)
                grad_pieces = [self.flat_grad[o + s.range(r)[0]:o + s.range(r)[1]]
                               for o, s in zip(starts, self.plan)]
            else:
                grad_pieces = [torch.zeros(s.piece, dtype=self.dtype, device=dev)
                               for s in self.plan]
                self.full_grads = []
            self.sharded = ShardedLayers(self.plan, pieces, grad_pieces, comm=comm, rank=r,
                                         reshard=self.reshard, buffers=self.buffers)
        del flats
        self.pieces, self.grad_pieces = self.sharded.pieces, self.sharded.grad_pieces
        self.opt_layers, self.opt_grads = self.sharded.opt_layers, self.sharded.opt_grads
        self.opt = build_optimizer(cfg)  # its state is the pieces' too: 1/P of it
        self.layers = self.sharded.layers
        self.saved_layers = self.layers  # the pieces of all ranks cover every weight once
        self.probe = None  # memory.StorageTracker while measured (memory_stages)
        self.tracer = None  # a trace.Tracer, set by the train loop

    # ------------------------------------------------------------ weights and gradients

    def _gather(self, l: int, phase: str, *, exchange: bool = True) -> Layer:
        """Layer l whole: stages 1 and 2 hold it; stage 3 gathers it (`ShardedLayers`)."""
        if self.zero_stage != 3:
            return self.full_layers[l]
        return self.sharded.gather(l, phase, exchange=exchange, probe=self.probe)

    def _grad_target(self, l: int) -> tuple[torch.Tensor | None, Grads]:
        """Where layer l's backward accumulates: stage 1 the persistent full gradients;
        stages 2, 3 the step's gradient buffer, reduce-scattered by `_grad_done`."""
        if self.zero_stage == 1:
            return None, self.full_grads[l]
        return self.sharded.grad_target(l)

    def _grad_done(self, l: int, buf: torch.Tensor | None) -> None:
        self.sharded.grad_done(l, buf)

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
            grads = [g.clone() for g in self.sharded.piece_grads()]
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
        self.buffers.release()
        with inputs_span(self.tracer):
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
        self.buffers.release()
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
        self.buffers.release()
        out, _, _ = self._forward(X, keep=False, exchange=exchange)
        self.buffers.release()
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
        return sharded_state_bytes(self.memory_state(), self.opt.state_bytes(self.opt_layers))
