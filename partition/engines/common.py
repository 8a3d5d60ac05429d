"""What the torch-native engines share: modules from the full weights, the loss,
the optimizer, and one step's frame (observe, λ, update, the J reduction).

The maths is the explicit engine's, written the way a PyTorch user would:
`nn.Linear` layers, autograd, `F.cross_entropy(reduction="sum")`, and
`torch.optim.SGD` whose `weight_decay` adds λW to the weights' gradients (not the
biases') before momentum — the same ∂J/∂W = data gradient + λW and the same
heavy-ball update as `model.SGD` after `model.add_decay`.
"""

from __future__ import annotations

import contextlib
import time
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from partition.comm import Comm
from partition.config import RunConfig
from partition.data import Dataset
from partition.engines.observe import SeenOp, StepObserver, to_records
from partition.engines.profiled import Marks, SeenComm, Span, profiler_clock, step_spans
from partition.model import Grads, Layer, MLPSpec, weight_names
from partition.strategies.base import StepOut, reduce_metric, state_bytes
from partition.topology import Topology

ACTIVATION_MODULES = {"relu": nn.ReLU, "tanh": nn.Tanh, "sigmoid": nn.Sigmoid}


def build_linear(full: dict[str, torch.Tensor], index: int, spec: MLPSpec, *,
                 dtype: torch.dtype, device: torch.device) -> nn.Linear:
    """Layer `index` as an nn.Linear holding the full W (n_out, n_in) — the seed's layout."""
    n_out, n_in = spec.weight_shape(index)
    lin = nn.utils.skip_init(nn.Linear, n_in, n_out, bias=spec.bias, dtype=dtype, device=device)
    wname, bname = weight_names(index)
    with torch.no_grad():
        lin.weight.copy_(full[wname])
        if spec.bias:
            lin.bias.copy_(full[bname])
    return lin


def layer_stack(spec: MLPSpec, linears: list[nn.Linear], first: int) -> nn.Sequential:
    """Linear, activation, Linear, … from layer `first` on; the net's output layer gets none."""
    mods: list[nn.Module] = []
    for k, lin in enumerate(linears):
        mods.append(lin)
        if first + k != spec.num_layers - 1:
            mods.append(ACTIVATION_MODULES[spec.activation]())
    return nn.Sequential(*mods)


def loss_sum(spec: MLPSpec, o: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Σ over the rows of l(o, y); callers divide by the full batch size (micro-batches add up)."""
    if spec.loss == "cross_entropy":
        return F.cross_entropy(o, y, reduction="sum")
    return 0.5 * F.mse_loss(o, y, reduction="sum")


def hits(spec: MLPSpec, o: torch.Tensor, y: torch.Tensor) -> int:
    """Examples classified right (cross-entropy only; 0 otherwise)."""
    if spec.loss != "cross_entropy":
        return 0
    return int((o.detach().argmax(dim=1) == y).sum())


def as_layer(index: int, lin: nn.Linear, **where: object) -> Layer:
    """The Layer view (no copy) of what this rank holds of layer `index`, for weights.npz."""
    b = local(lin.bias) if lin.bias is not None else None
    return Layer(index, local(lin.weight), b, **where)  # type: ignore[arg-type]


def local(t: torch.Tensor) -> torch.Tensor:
    """The storage this rank holds: a DTensor's local shard, a plain tensor itself (no copy)."""
    t = t.detach()
    return t.to_local() if hasattr(t, "to_local") else t


def make_sgd(linears: list[nn.Linear], cfg: RunConfig) -> torch.optim.SGD:
    """λ on the weights only (biases are not regularised), as weight decay."""
    weights = [lin.weight for lin in linears]
    biases = [lin.bias for lin in linears if lin.bias is not None]
    groups: list[dict[str, Any]] = [{"params": weights, "weight_decay": cfg.spec.weight_decay}]
    if biases:
        groups.append({"params": biases, "weight_decay": 0.0})
    return torch.optim.SGD(groups, lr=cfg.train.lr, momentum=cfg.train.momentum)


class TorchRunner:
    """One rank of a torch-native engine: the Runner protocol of strategies/base.py.

    Subclasses build `self.linears` (whose tensors they hand to `self.layers`
    with the slice of the full matrix each holds), `self.opt`, and implement
    `_train(X, y)` -> (loss sum contribution, correct contribution) and `role_of`.
    """

    layers: list[Layer]

    def __init__(self, cfg: RunConfig, topo: Topology, comm: Comm, data: Dataset) -> None:
        self.cfg, self.topo, self.comm, self.data = cfg, topo, comm, data
        self.spec = cfg.spec
        self.dtype = getattr(torch, cfg.train.dtype)
        self.B = cfg.train.batch_size
        self.observer = StepObserver()
        # False only for timing runs (experiments.bench): the observer is a Python call per
        # aten op (tens of µs here), which would be charged to torch's step time. Without it
        # this engine's training traffic is missing from the ledger.
        self.observe = True
        # What the optimizer trains, per layer: an nn.Linear, or anything with its `weight`
        # and `bias` (engines/hybrid.py's DDP-held pair).
        self.linears: list[nn.Linear] = []
        self.opt: torch.optim.SGD | None = None
        self.in_flight = 0
        self.tracer = None  # a trace.Tracer, set by the train loop
        # The ranges around this rank's compute on a traced step (profiled.py): the traced
        # step runs under torch.profiler (train.py) and `profiled_spans` reads them back.
        self.marks = Marks()
        self._seen: list[SeenComm] = []
        # On a DeviceMesh: this rank's group members along each dimension -> the dimension,
        # for the records' `dim` (observe.to_records); None on the 1-D engines' world group.
        self.dims: dict[tuple[int, ...], str] | None = None

    # ------------------------------------------------------------ per engine

    def _train(self, X: torch.Tensor, y: torch.Tensor) -> tuple[float, int]:
        raise NotImplementedError

    def role_of(self, s: SeenOp) -> tuple[str, str]:
        raise NotImplementedError

    def _sq_share(self) -> float:
        """This rank's part of Σ‖W‖² such that the sum over ranks is the full net's."""
        return float(sum((local(lin.weight) ** 2).sum() for lin in self.linears))

    # ------------------------------------------------------------ the step

    def _batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.data.batch(step, self.B, shuffle=self.cfg.data.shuffle, seed=self.cfg.seed,
                               dtype=self.dtype, device=self.topo.device)

    def _grads_now(self) -> list[Grads]:
        """∂J/∂(what this rank holds) as the explicit engine has it before its update."""
        lam = self.spec.weight_decay
        out = []
        for lin in self.linears:
            gW = local(lin.weight.grad) + lam * local(lin.weight)
            gb = local(lin.bias.grad).clone() if lin.bias is not None else None
            out.append(Grads(gW, gb))
        return out

    def step(self, step: int, *, want_grads: bool) -> StepOut:
        assert self.opt is not None
        X, y = self._batch(step)
        sq = self._sq_share()  # s is J's at the weights the step starts from
        obs = self.observer
        obs.reset()
        self.marks.reset(on=self.tracer is not None and self.tracer.on)
        t0 = time.perf_counter()
        with obs if self.observe else contextlib.nullcontext():
            self.opt.zero_grad(set_to_none=True)
            loss_part, correct_part = self._train(X, y)
            grads = self._grads_now() if want_grads else None
            obs.phase = "update"
            with self.marks("update", kind="update"):
                self.opt.step()
        wall = time.perf_counter() - t0
        records = to_records(obs.seen, step=self.comm.ledger.step, world_size=self.topo.world_size,
                             role_of=self.role_of, dims=self.dims)
        if self.marks.on:  # the roles just given (role_of may count what it has seen)
            ops = [s for s in obs.seen if s.op != "wait"]  # to_records' one record per op
            self._seen = [SeenComm(s.name, s.op, r.role, s.bytes, s.peer)
                          for s, r in zip(ops, records, strict=True)]
        for r in records:
            self.comm.ledger.add(r)
        # J = L + s from the parts each rank holds, reduced under `metric` as explicit does.
        loss_total, sq_all, correct = reduce_metric(self.comm, loss_part, sq, correct_part,
                                                    device=self.topo.device)
        L = loss_total / self.B
        comm_s = sum(r.seconds for r in records)
        return StepOut(
            objective=L + 0.5 * self.spec.weight_decay * sq_all, data_loss=L,
            correct=int(correct) if self.spec.loss == "cross_entropy" else None,
            grads=grads, in_flight_max=self.in_flight,
            # Time inside local aten ops, as the dispatcher saw them (bounded by the wall time
            # of the step's observed part less its communication calls).
            compute_s=min(obs.compute_s, max(0.0, wall - comm_s)) if self.observe else wall,
            extra={"engine": "torch"},
        )

    # ------------------------------------------------------------ the traced step's spans

    def profiled_spans(self, events: list, reads: list[tuple[float, float]]) -> tuple[list[Span], dict]:
        """The traced step's spans from torch.profiler's events (profiled.py), and the clock
        calibration that put them on perf_counter's."""
        clock = profiler_clock(events, reads)
        step = self.tracer.step
        recorded = [(s["t0"], s["t1"]) for s in self.tracer.spans
                    if s["step"] == step and s["tid"] == "comm"]
        return step_spans(events, clock=clock, marks=self.marks.opened, seen=self._seen,
                          recorded=recorded), clock

    # ------------------------------------------------------------ for memory.py

    def memory_stages(self) -> list:
        """None: autograd keeps the activations here, untagged (they count as temporaries).
        (`self.stage`, where there is one, is torch's PipelineStage, not ours.)"""
        return []

    def memory_state(self) -> dict[str, list[torch.Tensor]]:
        """Params, the gradients left from the last step, momentum buffers: local shards."""
        grads = [local(p.grad) for lin in self.linears for p in lin.parameters()
                 if p.grad is not None]
        opt = [] if self.opt is None else [
            local(st["momentum_buffer"]) for st in self.opt.state.values()
            if st.get("momentum_buffer") is not None]
        return {"params": [t for l in self.layers for t in l.tensors()], "grads": grads,
                "optimizer": opt}

    def state_bytes(self) -> dict[str, int]:
        opt = 0
        if self.opt is not None:
            for st in self.opt.state.values():
                buf = st.get("momentum_buffer")
                if buf is not None:
                    t = local(buf)
                    opt += t.numel() * t.element_size()
        return state_bytes(self.layers, opt)


class RowShareRunner(TorchRunner):
    """A torch engine whose ranks each train on their share of the batch's rows (DDP,
    FSDP2): the forward with the loss as one span, the backward (its collectives inside,
    where torch runs them) as another."""

    def _mine(self, t: torch.Tensor) -> torch.Tensor:
        return t.tensor_split(self.topo.world_size)[self.topo.rank]

    def _train(self, X: torch.Tensor, y: torch.Tensor) -> tuple[float, int]:
        xs, ys = self._mine(X), self._mine(y)
        self.observer.phase = "forward"
        with self.marks("F", kind="F"):  # the forward (FSDP2: each layer's all-gather), the loss
            o = self.model(xs)
            total = loss_sum(self.spec, o, ys)
        self.observer.phase = "backward"
        with self.marks("B", kind="B"):  # DDP's bucket all-reduces, FSDP2's reduce-scatters
            (total * (self.topo.world_size / self.B)).backward()
        return float(total.detach()), hits(self.spec, o, ys)
