"""Every crossing of a device boundary, and its ledger.

This is the only module that moves training data through torch.distributed. Each
call names a `role` (DESIGN §5) and a `phase` (forward / backward / update /
metric) and is recorded with its payload, its wire bytes under a ring model, its
peer or group size and the seconds spent in it. `Observer` is an independent
check: a TorchDispatchMode that sees every c10d op with its tensors, used by the
tests to prove that nothing crossed unrecorded.
"""

from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch.utils._python_dispatch import TorchDispatchMode

ROLES = ("activation", "activation_grad", "partial_output", "input_grad", "gather",
         "weight_grad", "weight_gather", "metric", "calibration")
# `setup`: outside training steps (the cost model's start-up micro-benchmark).
PHASES = ("forward", "backward", "update", "metric", "setup")


def nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


@dataclass(frozen=True)
class CommRecord:
    """One call: `sent` is what this rank sends p2p or hands to a collective."""

    step: int | None
    op: str  # send | recv | all_reduce | all_gather | reduce_scatter | broadcast
    role: str
    phase: str
    peer: int | None  # p2p partner; None for collectives
    group_size: int
    sent: int
    received: int
    collective: int  # payload handed to a collective (0 for p2p)
    wire: int  # bytes put on the wire by this rank under a ring model
    seconds: float


@dataclass
class Ledger:
    """All crossings of one rank. Calls outside a step (setup, reporting) have step None."""

    records: list[CommRecord] = field(default_factory=list)
    step: int | None = None

    def add(self, rec: CommRecord) -> None:
        self.records.append(rec)

    def step_records(self, step: int) -> list[CommRecord]:
        return [r for r in self.records if r.step == step]

    def step_summary(self, step: int) -> dict[str, Any]:
        return summarize(self.step_records(step))

    def seconds(self, step: int) -> float:
        return sum(r.seconds for r in self.records if r.step == step)


def summarize(records: list[CommRecord]) -> dict[str, Any]:
    """The `ranks[].comm` block of result.json for one step's records."""
    by_role: dict[str, dict[str, int]] = defaultdict(lambda: {"bytes": 0, "messages": 0})
    by_phase: dict[str, int] = defaultdict(int)
    out = {"sent_bytes": 0, "recv_bytes": 0, "collective_bytes": 0, "wire_bytes": 0,
           "messages": 0, "seconds": 0.0}
    for r in records:
        out["sent_bytes"] += r.sent if r.op in ("send",) else 0
        out["recv_bytes"] += r.received
        out["collective_bytes"] += r.collective
        out["wire_bytes"] += r.wire
        out["seconds"] += r.seconds
        if r.op != "recv":
            out["messages"] += 1
            by_role[r.role]["bytes"] += r.sent
            by_role[r.role]["messages"] += 1
            by_phase[r.phase] += r.sent
    out["by_role"] = dict(sorted(by_role.items()))
    out["by_phase"] = dict(sorted(by_phase.items()))
    return out


def ring_wire_bytes(op: str, n: int, p: int) -> int:
    """Bytes one rank puts on the wire for a payload of n bytes among p ranks (ring model)."""
    if p <= 1:
        return 0
    if op == "all_reduce":
        return 2 * (p - 1) * n // p
    if op == "all_gather":
        return (p - 1) * n  # n = this rank's piece
    if op == "reduce_scatter":
        return (p - 1) * n // p
    if op == "broadcast":
        return n
    raise ValueError(f"no wire model for {op!r}")


class Comm:
    """Typed, recorded communication for one rank of a process group.

    Pipeline calls are named from the stage's point of view: forward traffic
    goes to rank+1, backward traffic to rank-1 (DESIGN §3).
    """

    def __init__(self, *, rank: int, world_size: int, ledger: Ledger, group: Any = None,
                 device: torch.device | None = None) -> None:
        self.rank, self.world_size, self.ledger, self.group = rank, world_size, ledger, group
        self.device = device or torch.device("cpu")

    # ------------------------------------------------------------ recording

    def _rec(self, op: str, role: str, phase: str, *, peer: int | None, sent: int, received: int,
             collective: int, wire: int, seconds: float) -> None:
        if role not in ROLES:
            raise ValueError(f"unknown role {role!r}")
        if phase not in PHASES:
            raise ValueError(f"unknown phase {phase!r}")
        self.ledger.add(CommRecord(self.ledger.step, op, role, phase, peer, self.world_size,
                                   sent, received, collective, wire, seconds))

    # ------------------------------------------------------------ point to point

    def send(self, t: torch.Tensor, dst: int, *, role: str, phase: str) -> None:
        t0 = time.perf_counter()
        dist.send(t.contiguous(), dst, group=self.group)
        n = nbytes(t)
        self._rec("send", role, phase, peer=dst, sent=n, received=0, collective=0, wire=n,
                  seconds=time.perf_counter() - t0)

    def recv(self, shape: tuple[int, ...], dtype: torch.dtype, src: int, *, role: str,
             phase: str) -> torch.Tensor:
        t = torch.empty(shape, dtype=dtype, device=self.device)
        t0 = time.perf_counter()
        dist.recv(t, src, group=self.group)
        self._rec("recv", role, phase, peer=src, sent=0, received=nbytes(t), collective=0, wire=0,
                  seconds=time.perf_counter() - t0)
        return t

    def send_recv(self, send_t: torch.Tensor, dst: int, recv_shape: tuple[int, ...],
                  src: int, *, send_role: str, recv_role: str, send_phase: str,
                  recv_phase: str) -> torch.Tensor:
        """Send and receive at once (1F1B steady state): neither side can block the other."""
        out = torch.empty(recv_shape, dtype=send_t.dtype, device=self.device)
        send_t = send_t.contiguous()
        t0 = time.perf_counter()
        reqs = dist.batch_isend_irecv([dist.P2POp(dist.isend, send_t, dst, group=self.group),
                                       dist.P2POp(dist.irecv, out, src, group=self.group)])
        for r in reqs:
            r.wait()
        dt = time.perf_counter() - t0
        n = nbytes(send_t)
        # The pair's time is split evenly between its two records; the step total stays exact.
        self._rec("send", send_role, send_phase, peer=dst, sent=n, received=0, collective=0,
                  wire=n, seconds=dt / 2)
        self._rec("recv", recv_role, recv_phase, peer=src, sent=0, received=nbytes(out),
                  collective=0, wire=0, seconds=dt / 2)
        return out

    def send_forward(self, t: torch.Tensor) -> None:
        self.send(t, self.rank + 1, role="activation", phase="forward")

    def recv_forward(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        return self.recv(shape, dtype, self.rank - 1, role="activation", phase="forward")

    def send_backward(self, t: torch.Tensor) -> None:
        self.send(t, self.rank - 1, role="activation_grad", phase="backward")

    def recv_backward(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        return self.recv(shape, dtype, self.rank + 1, role="activation_grad", phase="backward")

    def send_forward_recv_backward(self, t: torch.Tensor, grad_shape: tuple[int, ...]) -> torch.Tensor:
        return self.send_recv(t, self.rank + 1, grad_shape, self.rank + 1,
                              send_role="activation", recv_role="activation_grad",
                              send_phase="forward", recv_phase="backward")

    def send_backward_recv_forward(self, g: torch.Tensor, act_shape: tuple[int, ...]) -> torch.Tensor:
        return self.send_recv(g, self.rank - 1, act_shape, self.rank - 1,
                              send_role="activation_grad", recv_role="activation",
                              send_phase="backward", recv_phase="forward")

    # ------------------------------------------------------------ collectives

    def all_reduce(self, t: torch.Tensor, *, role: str, phase: str) -> torch.Tensor:
        """Sum `t` over the group, in place."""
        t0 = time.perf_counter()
        dist.all_reduce(t, op=dist.ReduceOp.SUM, group=self.group)
        n = nbytes(t)
        self._rec("all_reduce", role, phase, peer=None, sent=n, received=0, collective=n,
                  wire=ring_wire_bytes("all_reduce", n, self.world_size),
                  seconds=time.perf_counter() - t0)
        return t

    def all_gather(self, t: torch.Tensor, shapes: list[tuple[int, ...]], *, role: str,
                   phase: str) -> list[torch.Tensor]:
        """Gather every rank's `t`; `shapes[i]` is rank i's shape.

        Shapes may differ between ranks (uneven shards), but gloo's all-gather takes
        only equal pieces: uneven pieces are zero-padded to the largest shape, and
        the padded piece is what is recorded, since that is what crosses.
        """
        t = t.contiguous()
        big = tuple(max(s[i] for s in shapes) for i in range(t.dim()))
        if all(tuple(s) == big for s in shapes):
            piece = t
        else:
            piece = torch.zeros(big, dtype=t.dtype, device=t.device)
            piece[tuple(slice(0, d) for d in t.shape)] = t
        bufs = [torch.empty(big, dtype=t.dtype, device=self.device) for _ in shapes]
        t0 = time.perf_counter()
        dist.all_gather(bufs, piece, group=self.group)
        dt = time.perf_counter() - t0
        outs = [b if tuple(s) == big else b[tuple(slice(0, d) for d in s)]
                for b, s in zip(bufs, shapes, strict=True)]
        n = nbytes(piece)
        self._rec("all_gather", role, phase, peer=None, sent=n,
                  received=(self.world_size - 1) * n, collective=n,
                  wire=ring_wire_bytes("all_gather", n, self.world_size), seconds=dt)
        return outs

    def all_gather_into(self, out: torch.Tensor, piece: torch.Tensor, *, role: str,
                        phase: str) -> torch.Tensor:
        """Gather every rank's equal-sized `piece` into `out` (P pieces in rank order), in one call.

        The flat form FSDP uses: the caller keeps its shards padded to one size, so the
        gathered tensor is one buffer whose front is the whole (views, no copy). The
        padded piece is what is recorded, since that is what crosses.
        """
        if out.numel() != piece.numel() * self.world_size:
            raise ValueError(f"all_gather_into: out has {out.numel()} elements, not "
                             f"{self.world_size} x {piece.numel()}")
        piece = piece.contiguous()
        t0 = time.perf_counter()
        dist.all_gather_single(out, piece, group=self.group)
        n = nbytes(piece)
        self._rec("all_gather", role, phase, peer=None, sent=n,
                  received=(self.world_size - 1) * n, collective=n,
                  wire=ring_wire_bytes("all_gather", n, self.world_size),
                  seconds=time.perf_counter() - t0)
        return out

    def reduce_scatter(self, chunks: list[torch.Tensor], *, role: str,
                       phase: str) -> torch.Tensor:
        """Sum chunk i over the group onto rank i; return this rank's sum.

        `chunks` (one per rank, shapes may differ: uneven shards) together are this
        rank's whole partial tensor, so the payload is their total; what reaches this
        rank is the others' P−1 contributions to its own chunk.
        """
        ins = [c.contiguous() for c in chunks]
        out = torch.empty_like(ins[self.rank])
        t0 = time.perf_counter()
        dist.reduce_scatter(out, ins, op=dist.ReduceOp.SUM, group=self.group)
        n = sum(nbytes(c) for c in ins)
        self._rec("reduce_scatter", role, phase, peer=None, sent=n,
                  received=(self.world_size - 1) * nbytes(out), collective=n,
                  wire=ring_wire_bytes("reduce_scatter", n, self.world_size),
                  seconds=time.perf_counter() - t0)
        return out

    # ------------------------------------------------------------ outside training steps

    def gather_objects(self, obj: Any) -> list[Any] | None:
        """Setup / reporting only (never inside a step): rank 0 gets every rank's object."""
        out = [None] * self.world_size if self.rank == 0 else None
        dist.gather_object(obj, out, dst=0, group=self.group)
        return out

    def broadcast_object(self, obj: Any) -> Any:
        box = [obj]
        dist.broadcast_object_list(box, src=0, group=self.group)
        return box[0]

    def barrier(self) -> None:
        dist.barrier(group=self.group)


# ---------------------------------------------------------------- the observer


@dataclass(frozen=True)
class ObservedOp:
    op: str  # the c10d op name without namespace/overload, e.g. "send", "allreduce_"
    bytes: int  # bytes of the tensors this rank hands in (input side)


class Observer(TorchDispatchMode):
    """Sees every c10d op dispatched on this rank, with the bytes of its input tensors.

    Independent of the ledger: it hooks the dispatcher, not our wrappers, so a
    crossing made around `Comm` shows up here and not in the ledger.
    """

    # Which argument holds the tensors this rank contributes, per c10d op.
    _INPUT_ARG = {"send": 0, "recv_": 0, "allreduce_": 0, "allgather_": 1, "_allgather_base_": 1,
                  "broadcast_": 0, "reduce_scatter_": 1, "_reduce_scatter_base_": 1,
                  "allgather_into_tensor_coalesced_": 1, "gather_": 1, "scatter_": 1,
                  "barrier": None, "alltoall_base_": 1}

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[ObservedOp] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        kwargs = kwargs or {}
        name = str(func.name() if hasattr(func, "name") else func)
        if name.startswith("c10d::"):
            short = name.split("::", 1)[1].split(".")[0]
            idx = self._INPUT_ARG.get(short, 0)
            n = 0
            if idx is not None and idx < len(args):
                a = args[idx]
                ts = a if isinstance(a, (list, tuple)) else [a]
                for x in ts:
                    if isinstance(x, torch.Tensor):
                        n += nbytes(x)
                    elif isinstance(x, (list, tuple)):
                        n += sum(nbytes(y) for y in x if isinstance(y, torch.Tensor))
            self.ops.append(ObservedOp(short, n))
        return func(*args, **kwargs)
