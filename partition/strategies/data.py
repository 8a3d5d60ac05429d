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

Bytes per rank per step: weight_grad Σ_l (n_l·n_{l−1} + [bias] n_l)·b in 1 all-reduce
(wire ⌊2(P−1)/P · that⌋); metric 3·8 in 1 all-reduce; nothing for training at P = 1.
"""

from __future__ import annotations

import time

import torch

from partition.comm import Comm
from partition.config import RunConfig
from partition.data import Dataset
from partition.model import SGD, Grads, Layer, MLPSpec, add_decay, make_layer
from partition.strategies.base import StepOut, state_bytes
from partition.strategies.stage import Stage
from partition.strategies.tensor.plan import METRIC_BYTES, RoleTraffic, split_evenly
from partition.topology import Topology


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


def data_traffic(spec: MLPSpec, *, world: int, itemsize: int) -> dict[str, RoleTraffic]:
    """The byte formula of the module docstring, per role, for one rank and one step."""
    out: dict[str, RoleTraffic] = {}
    if world > 1:
        n = sum(spec.layer_params(l) for l in range(spec.num_layers)) * itemsize
        out["weight_grad"] = RoleTraffic(n, 1, 2 * (world - 1) * n // world)
    out["metric"] = RoleTraffic(METRIC_BYTES, 1,
                                2 * (world - 1) * METRIC_BYTES // world if world > 1 else 0)
    return out


class DataRunner:
    def __init__(self, cfg: RunConfig, topo: Topology, comm: Comm, data: Dataset,
                 full: dict[str, torch.Tensor]) -> None:
        self.cfg, self.topo, self.comm, self.data = cfg, topo, comm, data
        self.spec = cfg.spec
        self.dtype = getattr(torch, cfg.train.dtype)
        self.P, self.rank = topo.world_size, topo.rank
        self.rows = split_evenly(cfg.train.batch_size, self.P)[self.rank]
        self.layers: list[Layer] = [make_layer(full, l, dtype=self.dtype, device=topo.device)
                                    for l in range(self.spec.num_layers)]
        # Every rank holds the same weights: one copy goes to weights.npz.
        self.saved_layers = self.layers if self.rank == 0 else []
        self.stage = Stage(self.spec, self.layers)
        self.flat, self.stage.grads = flat_grads(self.layers)
        self.opt = SGD(cfg.train.lr, cfg.train.momentum)

    def _my_rows(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        t = self.cfg.train
        idx = self.data.rows(step, t.batch_size, shuffle=self.cfg.data.shuffle,
                             seed=self.cfg.seed)[slice(*self.rows)]
        dev = self.topo.device
        X = self.data.X[idx].to(device=dev, dtype=self.dtype)
        y = self.data.y[idx]
        y = y.to(dev) if y.dtype == torch.int64 else y.to(device=dev, dtype=self.dtype)
        return X, y

    def step(self, step: int, *, want_grads: bool) -> StepOut:
        t_start = time.perf_counter()
        n_rec = len(self.comm.ledger.records)
        B, M = self.cfg.train.batch_size, self.cfg.train.microbatches
        st = self.stage
        st.start_step()
        X, y = self._my_rows(step)
        loss_total, correct = 0.0, 0
        # tensor_split: exactly M pieces, as even as possible (config keeps them non-empty)
        for xm, ym in zip(X.tensor_split(M), y.tensor_split(M), strict=True):
            o = st.forward(xm)
            ls, c, g = st.loss(o, ym, B)  # g divides by the full B, not by this rank's rows
            del o
            st.backward(g, need_input_grad=False)
            loss_total += ls
            correct += c or 0
        del X, y
        if self.P > 1:
            self.comm.all_reduce(self.flat, role="weight_grad", phase="update")
        add_decay(self.layers, st.grads, self.spec.weight_decay)
        grads = [g.clone() for g in st.grads] if want_grads else None
        sq = sum(float((l.W * l.W).sum()) for l in self.saved_layers)
        self.opt.step(self.layers, st.grads)

        metric = torch.tensor([loss_total, sq, float(correct)], dtype=torch.float64,
                              device=self.topo.device)
        self.comm.all_reduce(metric, role="metric", phase="metric")
        loss_sum_all, sq_all, correct_all = metric.tolist()
        L = loss_sum_all / B
        comm_s = sum(r.seconds for r in self.comm.ledger.records[n_rec:])
        return StepOut(
            objective=L + 0.5 * self.spec.weight_decay * sq_all, data_loss=L,
            correct=int(correct_all) if self.spec.loss == "cross_entropy" else None,
            grads=grads, in_flight_max=st.in_flight_max,
            compute_s=max(0.0, time.perf_counter() - t_start - comm_s),
        )

    def predict(self, step: int, *, exchange: bool = True) -> torch.Tensor:
        """A prediction forward of this rank's rows (nothing kept, nothing crosses, so
        `exchange` changes nothing)."""
        X, _ = self._my_rows(step)
        return self.stage.predict(X)

    def state_bytes(self) -> dict[str, int]:
        # The gradients are views into the one flat buffer: grads_bytes = params_bytes.
        return state_bytes(self.layers, self.opt.state_bytes(self.layers))
