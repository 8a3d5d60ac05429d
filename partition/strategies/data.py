"""`data`: full weights on every rank, the batch's rows split across ranks.

Rank r takes rows R_r = split_evenly(B, P)[r] of the step's batch (uneven when P
does not divide B: the first B mod P ranks take one more row). Its loss gradient
divides by the full B, so the sum over ranks of the local gradients is exactly the
full-batch mean gradient, whatever the split. With M micro-batches each rank
accumulates over its rows in M near-equal pieces before anything crosses.

The gradients then cross once per step, bucketed: every gradient tensor is a view
into one flat buffer (DDP's "gradient as bucket view"), so a single all-reduce of
that buffer (role `weight_grad`, phase update) moves Σ params · b bytes — the same
payload as one all-reduce per tensor, with one call's latency instead of one per
tensor, and no copy in or out. λW is added after the reduction (it would otherwise count P times),
and s comes from the local full weights, contributed by rank 0 only.

Bytes per rank per step: see `partition.plans.data`.
"""

from __future__ import annotations

import torch

from partition.comm import Comm
from partition.config import RunConfig
from partition.data import Dataset
from partition.model import Grads, Layer, compute_copies, make_layer
from partition.plans.data import row_share
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


def flat_grads(layers: list[Layer]) -> tuple[torch.Tensor, list[Grads]]:
    """One zeroed flat buffer and per-layer gradients that are views into it."""
    total = sum(t.numel() for l in layers for t in l.tensors())
    W0 = layers[0].W
    flat = torch.zeros(total, dtype=W0.dtype, device=W0.device)
    grads, at = [], 0
    for l in layers:
        views = []
        for t in l.tensors():
            views.append(flat[at:at + t.numel()].view_as(t))
            at += t.numel()
        grads.append(Grads(views[0], views[1] if len(views) > 1 else None))
    return flat, grads


class DataRunner:
    def __init__(self, cfg: RunConfig, topo: Topology, comm: Comm, data: Dataset,
                 full: dict[str, torch.Tensor]) -> None:
        self.cfg, self.topo, self.comm, self.data = cfg, topo, comm, data
        self.spec = cfg.spec
        self.dtype, self.cdtype = master_dtype(cfg), compute_dtype(cfg)
        self.P, self.rank = topo.world_size, topo.rank
        self.rows = row_share(cfg.train.batch_size, self.P, self.rank)
        self.layers: list[Layer] = [make_layer(full, l, dtype=self.dtype, device=topo.device)
                                    for l in range(self.spec.num_layers)]
        # Every rank holds the same weights: one copy goes to weights.npz.
        self.saved_layers = self.layers if self.rank == 0 else []
        self.compute = compute_copies(self.layers, self.cdtype)
        self.stage = Stage(self.spec, self.layers, compute=self.compute,
                           recompute=recomputes(cfg))
        # The gradients stay in the master dtype under mixed precision: they are reduced in
        # float32, whatever the forward and backward computed in.
        self.flat, self.stage.grads = flat_grads(self.layers)
        self.opt = build_optimizer(cfg)
        self.tracer = None  # a trace.Tracer, set by the train loop

    def _my_rows(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        t = self.cfg.train
        idx = self.data.rows(step, t.batch_size, shuffle=self.cfg.data.shuffle,
                             seed=self.cfg.seed)[slice(*self.rows)]
        dev = self.topo.device
        X = self.data.X[idx].to(device=dev, dtype=self.cdtype)
        return X, self.data.targets(idx, device=dev, dtype=self.dtype)

    def step(self, step: int, *, want_grads: bool) -> StepOut:
        B, M = self.cfg.train.batch_size, self.cfg.train.microbatches
        st = self.stage
        st.start_step()
        with inputs_span(self.tracer):
            X, y = self._my_rows(step)
        loss_total, correct = 0.0, 0
        # tensor_split: exactly M pieces, as even as possible (config keeps them non-empty)
        for m, (xm, ym) in enumerate(zip(X.tensor_split(M), y.tensor_split(M), strict=True)):
            with maybe_span(self.tracer, f"F{m}", kind="F", mb=m):
                o = st.forward(xm, m)
                ls, c, g = st.loss(o, ym, B)  # g divides by the full B, not by this rank's rows
                del o
            with maybe_span(self.tracer, f"B{m}", kind="B", mb=m):
                st.backward(g, m, need_input_grad=False)
            loss_total += ls
            correct += c or 0
        del X, y
        if self.P > 1:
            self.comm.all_reduce(self.flat, role="weight_grad", phase="update")
        return finish_step(layers=self.layers, grads=st.grads, counted=self.saved_layers,
                           opt=self.opt, weight_decay=self.spec.weight_decay, comm=self.comm,
                           loss_sum=loss_total, correct=correct, batch=B, want_grads=want_grads,
                           cross_entropy=self.spec.loss == "cross_entropy",
                           in_flight_max=st.in_flight_max, device=self.topo.device,
                           compute=self.compute, tracer=self.tracer)

    def predict(self, step: int, *, exchange: bool = True) -> torch.Tensor:
        """A prediction forward of this rank's rows (nothing kept, nothing crosses, so
        `exchange` changes nothing)."""
        X, _ = self._my_rows(step)
        return self.stage.predict(X)

    def state_bytes(self) -> dict[str, int]:
        # The gradients are views into the one flat buffer: grads_bytes = params_bytes.
        return state_bytes(self.layers, self.opt.state_bytes(self.layers), self.compute)
