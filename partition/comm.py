"""Every crossing of a device boundary, and its ledger.

This is the only module that moves training data through torch.distributed. Each
call names a `role` (docs/results.md) and a `phase` (forward / backward / update /
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

from partition.plans.traffic import ring_wire_bytes

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
    # The mesh dimension of the group (hybrid: dp | pp | tp, `world` for the metric over
    # all ranks); None for the 1-D strategies, whose one group is the world.
    dim: str | None = None


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
    if any(r.dim is not None for r in records):
        out["by_dim"] = by_dim(records)
    return out


def by_dim(records: list[CommRecord]) -> dict[str, dict[str, Any]]:
    """{dim: {bytes, messages, wire_bytes, by_role: {role: {bytes, messages}}}}: what each
    mesh dimension's links carry (payload as in `by_role`: what this rank sends or hands in)."""
    out: dict[str, dict[str, Any]] = {}
    for r in records:
        if r.op == "recv" or r.dim is None:
            continue
        d = out.setdefault(r.dim, {"bytes": 0, "messages": 0, "wire_bytes": 0, "by_role": {}})
        d["bytes"] += r.sent
        d["messages"] += 1
        d["wire_bytes"] += r.wire
        role = d["by_role"].setdefault(r.role, {"bytes": 0, "messages": 0})
        role["bytes"] += r.sent
        role["messages"] += 1
    for d in out.values():
        d["by_role"] = dict(sorted(d["by_role"].items()))
    return dict(sorted(out.items()))


@dataclass
class Pending:
    """A posted send or receive: its work handle, the tensor it reads or fills, and the
    seconds spent posting it (its record is made when it is waited for)."""

    work: Any
    tensor: torch.Tensor
    peer: int
    role: str
    phase: str
    seconds: float
    seq: int = 0  # its place among this step's posted sends (or receives) to (from) its peer


class Transport:
    """The calls that move bytes between ranks: torch.distributed's, on one group.

    `Comm` records; this moves. The dry run (dryrun.py) hands `Comm` a transport that
    moves nothing, so a dry run records exactly what a real run records.
    """

    moves = True  # False for a transport that moves nothing (the dry run's)

    def __init__(self, group: Any = None) -> None:
        self.group = group

    def on(self, group: Any) -> Transport:
        """The same kind of transport on another process group (a mesh dimension's).
        Peers are always global ranks, as torch.distributed's send/recv take them."""
        return type(self)(group)

    def send(self, t: torch.Tensor, dst: int) -> None:
        dist.send(t, dst, group=self.group)

    def recv(self, t: torch.Tensor, src: int) -> None:
        dist.recv(t, src, group=self.group)

    def isend(self, t: torch.Tensor, dst: int) -> Any:
        return dist.isend(t, dst, group=self.group)

    def irecv(self, t: torch.Tensor, src: int) -> Any:
        return dist.irecv(t, src, group=self.group)

    def all_reduce(self, t: torch.Tensor) -> None:
        dist.all_reduce(t, op=dist.ReduceOp.SUM, group=self.group)

    def all_gather(self, bufs: list[torch.Tensor], piece: torch.Tensor) -> None:
        dist.all_gather(bufs, piece, group=self.group)

    def reduce_scatter(self, out: torch.Tensor, ins: list[torch.Tensor]) -> None:
        dist.reduce_scatter(out, ins, op=dist.ReduceOp.SUM, group=self.group)

    def all_gather_into(self, out: torch.Tensor, piece: torch.Tensor) -> None:
        dist.all_gather_single(out, piece, group=self.group)


class Comm:
    """Typed, recorded communication for one rank of a process group.

    A record is made when a call completes (a posted send or receive when it is waited
    for), with the seconds spent in it, posting and waiting together.
    """

    def __init__(self, *, rank: int, world_size: int, ledger: Ledger, group: Any = None,
                 device: torch.device | None = None, transport: Transport | None = None,
                 dim: str | None = None, members: tuple[int, ...] | None = None) -> None:
        self.rank, self.world_size, self.ledger, self.group = rank, world_size, ledger, group
        self.device = device or torch.device("cpu")
        self.transport = transport or Transport(group)
        self.tracer = None  # a trace.Tracer while a step is traced (set by the train loop)
        # A mesh dimension's Comm: `rank` and peers are indices in `members` (the group's
        # global ranks); every record names the global peer and the dimension.
        self.dim = dim
        self.members = members
        # Per step, how many sends (receives) were posted to (from) each peer: the k-th
        # posted send of a rank to a peer is matched with that peer's k-th posted receive
        # from it (gloo and NCCL match in posting order), so the trace can pair them.
        self._seq: dict[tuple[str, int], int] = {}
        self._seq_step: int | None = None

    def _next_seq(self, kind: str, peer: int) -> int:
        if self._seq_step != self.ledger.step:
            self._seq, self._seq_step = {}, self.ledger.step
        k = self._seq.get((kind, peer), 0)
        self._seq[(kind, peer)] = k + 1
        return k

    def sub(self, *, dim: str, members: tuple[int, ...], group: Any) -> Comm:
        """This rank's Comm on one mesh dimension: same ledger and device, its own group
        (`group`, built by topology.mesh_groups; None in a dry run), rank = its index in
        `members`. Callers address peers by that index; the transport gets global ranks."""
        here = self.members[self.rank] if self.members else self.rank
        if here not in members:
            raise ValueError(f"rank {here} is not in its {dim} group {list(members)}")
        return Comm(rank=members.index(here), world_size=len(members), ledger=self.ledger,
                    group=group, device=self.device, transport=self.transport.on(group),
                    dim=dim, members=tuple(members))

    def _global(self, peer: int) -> int:
        return self.members[peer] if self.members is not None else peer

    def _span(self, name: str, t0: float, t1: float, *, role: str, nbytes: int,
              peer: int | None = None, waiting: bool = False, seq: int | None = None) -> None:
        if self.tracer is not None:
            # a posted message's number (pairs its two ends); a collective's members (global
            # ranks: which calls of other ranks are the same call)
            extra = {"seq": seq} if seq is not None else {} if peer is not None else {
                "group": list(self.members) if self.members else list(range(self.world_size))}
            self.tracer.add(name, "comm", t0, t1, role=role, bytes=nbytes, peer=peer,
                            waiting=waiting, **extra)

    # ------------------------------------------------------------ recording

    def _rec(self, op: str, role: str, phase: str, *, peer: int | None, sent: int, received: int,
             collective: int, wire: int, seconds: float) -> None:
        if role not in ROLES:
            raise ValueError(f"unknown role {role!r}")
        if phase not in PHASES:
            raise ValueError(f"unknown phase {phase!r}")
        self.ledger.add(CommRecord(self.ledger.step, op, role, phase, peer, self.world_size,
                                   sent, received, collective, wire, seconds, self.dim))

    # ------------------------------------------------------------ point to point

    def send(self, t: torch.Tensor, dst: int, *, role: str, phase: str) -> None:
        dst = self._global(dst)
        t0 = time.perf_counter()
        self.transport.send(t.contiguous(), dst)
        t1 = time.perf_counter()
        n = nbytes(t)
        self._rec("send", role, phase, peer=dst, sent=n, received=0, collective=0, wire=n,
                  seconds=t1 - t0)
        self._span(f"send {role}", t0, t1, role=role, nbytes=n, peer=dst, waiting=True)

    def recv(self, shape: tuple[int, ...], dtype: torch.dtype, src: int, *, role: str,
             phase: str) -> torch.Tensor:
        t = torch.empty(shape, dtype=dtype, device=self.device)
        src = self._global(src)
        t0 = time.perf_counter()
        self.transport.recv(t, src)
        t1 = time.perf_counter()
        self._rec("recv", role, phase, peer=src, sent=0, received=nbytes(t), collective=0, wire=0,
                  seconds=t1 - t0)
        self._span(f"recv {role}", t0, t1, role=role, nbytes=nbytes(t), peer=src, waiting=True)
        return t

    def post_send(self, t: torch.Tensor, dst: int, *, role: str, phase: str) -> Pending:
        """Start sending `t`; it must stay alive until `wait_send` (the runtime keeps it)."""
        t = t.contiguous()
        dst = self._global(dst)
        seq = self._next_seq("send", dst)
        t0 = time.perf_counter()
        work = self.transport.isend(t, dst)
        t1 = time.perf_counter()
        self._span(f"send {role}", t0, t1, role=role, nbytes=nbytes(t), peer=dst, seq=seq)
        return Pending(work, t, dst, role, phase, t1 - t0, seq)

    def wait_send(self, p: Pending) -> None:
        t0 = time.perf_counter()
        p.work.wait()
        t1 = time.perf_counter()
        n = nbytes(p.tensor)
        self._rec("send", p.role, p.phase, peer=p.peer, sent=n, received=0, collective=0,
                  wire=n, seconds=p.seconds + t1 - t0)
        self._span(f"wait send {p.role}", t0, t1, role=p.role, nbytes=n, peer=p.peer, waiting=True,
                   seq=p.seq)

    def post_recv(self, shape: tuple[int, ...], dtype: torch.dtype, src: int, *, role: str,
                  phase: str) -> Pending:
        """Post a receive into a new buffer; `wait_recv` returns it filled."""
        t = torch.empty(shape, dtype=dtype, device=self.device)
        src = self._global(src)
        seq = self._next_seq("recv", src)
        t0 = time.perf_counter()
        work = self.transport.irecv(t, src)
        t1 = time.perf_counter()
        self._span(f"post recv {role}", t0, t1, role=role, nbytes=nbytes(t), peer=src, seq=seq)
        return Pending(work, t, src, role, phase, t1 - t0, seq)

    def wait_recv(self, p: Pending) -> torch.Tensor:
        t0 = time.perf_counter()
        p.work.wait()
        t1 = time.perf_counter()
        self._rec("recv", p.role, p.phase, peer=p.peer, sent=0, received=nbytes(p.tensor),
                  collective=0, wire=0, seconds=p.seconds + t1 - t0)
        self._span(f"wait recv {p.role}", t0, t1, role=p.role, nbytes=nbytes(p.tensor),
                   peer=p.peer, waiting=True, seq=p.seq)
        return p.tensor

    # ------------------------------------------------------------ collectives

    def all_reduce(self, t: torch.Tensor, *, role: str, phase: str) -> torch.Tensor:
        """Sum `t` over the group, in place."""
        t0 = time.perf_counter()
        self.transport.all_reduce(t)
        t1 = time.perf_counter()
        n = nbytes(t)
        self._rec("all_reduce", role, phase, peer=None, sent=n, received=0, collective=n,
                  wire=ring_wire_bytes("all_reduce", n, self.world_size), seconds=t1 - t0)
        self._span(f"all_reduce {role}", t0, t1, role=role, nbytes=n, waiting=True)
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
        self.transport.all_gather(bufs, piece)
        t1 = time.perf_counter()
        dt = t1 - t0
        self._span(f"all_gather {role}", t0, t1, role=role, nbytes=nbytes(piece), waiting=True)
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
        self.transport.all_gather_into(out, piece)
        t1 = time.perf_counter()
        n = nbytes(piece)
        self._rec("all_gather", role, phase, peer=None, sent=n,
                  received=(self.world_size - 1) * n, collective=n,
                  wire=ring_wire_bytes("all_gather", n, self.world_size), seconds=t1 - t0)
        self._span(f"all_gather {role}", t0, t1, role=role, nbytes=n, waiting=True)
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
        self.transport.reduce_scatter(out, ins)
        t1 = time.perf_counter()
        n = sum(nbytes(c) for c in ins)
        self._rec("reduce_scatter", role, phase, peer=None, sent=n,
                  received=(self.world_size - 1) * nbytes(out), collective=n,
                  wire=ring_wire_bytes("reduce_scatter", n, self.world_size), seconds=t1 - t0)
        self._span(f"reduce_scatter {role}", t0, t1, role=role, nbytes=n, waiting=True)
        return out

    # ------------------------------------------------------------ outside training steps

    def gather_objects(self, obj: Any) -> list[Any] | None:
        """Setup / reporting only (never inside a step): rank 0 gets every rank's object.

        `obj` must be JSON-serialisable: it crosses as UTF-8 JSON bytes in a uint8 tensor,
        never as a pickle (torch's gather_object unpickles whatever a peer sends).
        """
        import json

        payload = torch.frombuffer(bytearray(json.dumps(obj).encode()), dtype=torch.uint8)
        size = torch.tensor([payload.numel()], dtype=torch.int64, device=self.device)
        sizes = [torch.zeros_like(size) for _ in range(self.world_size)]
        dist.all_gather(sizes, size, group=self.group)  # gloo's gather needs equal pieces
        longest = max(int(s.item()) for s in sizes)
        piece = torch.zeros(longest, dtype=torch.uint8, device=self.device)
        piece[:payload.numel()] = payload.to(self.device)
        bufs = ([torch.empty_like(piece) for _ in range(self.world_size)]
                if self.rank == 0 else None)
        dist.gather(piece, bufs, dst=0, group=self.group)
        if bufs is None:
            return None
        return [json.loads(bytes(b[:int(s.item())].cpu().numpy()).decode())
                for b, s in zip(bufs, sizes, strict=True)]

    def broadcast_object(self, obj: Any) -> Any:
        """Rank 0's `obj` on every rank, as JSON bytes in a tensor (no rank unpickles)."""
        import json

        data = json.dumps(obj).encode() if self.rank == 0 else b""
        size = torch.tensor([len(data)], dtype=torch.int64, device=self.device)
        dist.broadcast(size, src=0, group=self.group)
        buf = torch.zeros(int(size.item()), dtype=torch.uint8, device=self.device)
        if self.rank == 0 and data:
            buf[:] = torch.frombuffer(bytearray(data), dtype=torch.uint8).to(self.device)
        dist.broadcast(buf, src=0, group=self.group)
        return json.loads(bytes(buf.cpu().numpy()).decode())

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
