"""What PyTorch's own engines put across boundaries, seen by the dispatcher.

The torch-native engines do not go through `comm.Comm`, so there is no ledger
entry made at the call site. Instead `StepObserver` (a `comm.Observer`, i.e. a
TorchDispatchMode) sees every c10d op of a step with its tensors, and
`to_records` turns what it saw into the same `CommRecord`s the explicit engines
write, so train.py and result.json treat both engines alike.

Two namespaces carry collectives: `c10d::` (the process-group ops that
`torch.distributed.*`, DDP's reducer and pipelining's p2p end in) and
`_c10d_functional::` (the functional collectives DTensor redistributes with).
Inside a dispatch mode, ops that run *within* another op are not seen (the mode
is off while it handles an op), so a functional all-reduce is counted once, at
its functional op, never again at the c10d op it runs underneath.

Roles cannot be read off an op; each engine maps what it saw to roles (see
`partition.engines` for the mapping per strategy). Payload bytes are exact:
they are the bytes of the tensors handed to the op. Each op also names the global ranks
of its process group (a c10d op's ProcessGroup argument, a functional collective's
`group_name`), so an engine on a DeviceMesh can say which mesh dimension it crossed — by
members, not by group object: DTensor may run a collective on an equal mesh's group.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.distributed as dist

from partition.comm import CommRecord, ObservedOp, Observer, nbytes, ring_wire_bytes

# namespace::name -> (normalised op, index of the argument holding this rank's input)
_OPS: dict[str, tuple[str, int | None]] = {
    "c10d::send": ("send", 0),
    "c10d::recv_": ("recv", 0),
    "c10d::recv_any_source_": ("recv", 0),
    "c10d::allreduce_": ("all_reduce", 0),
    "c10d::allreduce_coalesced_": ("all_reduce", 0),
    "c10d::allgather_": ("all_gather", 1),
    "c10d::_allgather_base_": ("all_gather", 1),
    "c10d::allgather_coalesced_": ("all_gather", 1),
    "c10d::allgather_into_tensor_coalesced_": ("all_gather", 1),
    "c10d::reduce_scatter_": ("reduce_scatter", 1),
    "c10d::_reduce_scatter_base_": ("reduce_scatter", 1),
    "c10d::reduce_scatter_tensor_coalesced_": ("reduce_scatter", 1),
    "c10d::broadcast_": ("broadcast", 0),
    "c10d::reduce_": ("reduce", 0),
    "c10d::gather_": ("gather", 1),
    "c10d::scatter_": ("scatter", 1),
    "c10d::alltoall_": ("all_to_all", 1),
    "c10d::alltoall_base_": ("all_to_all", 1),
    "c10d::barrier": ("barrier", None),
    "c10d::monitored_barrier_": ("barrier", None),
    "_c10d_functional::all_reduce": ("all_reduce", 0),
    "_c10d_functional::all_reduce_": ("all_reduce", 0),
    "_c10d_functional::all_reduce_coalesced": ("all_reduce", 0),
    "_c10d_functional::all_reduce_coalesced_": ("all_reduce", 0),
    "_c10d_functional::all_gather_into_tensor": ("all_gather", 0),
    "_c10d_functional::all_gather_into_tensor_out": ("all_gather", 0),
    "_c10d_functional::all_gather_into_tensor_coalesced": ("all_gather", 0),
    "_c10d_functional::reduce_scatter_tensor": ("reduce_scatter", 0),
    "_c10d_functional::reduce_scatter_tensor_coalesced": ("reduce_scatter", 0),
    "_c10d_functional::all_to_all_single": ("all_to_all", 0),
    "_c10d_functional::broadcast": ("broadcast", 0),
    "_c10d_functional::broadcast_": ("broadcast", 0),
    "_c10d_functional::wait_tensor": ("wait", None),
    # Wraps an async collective's result for autograd; moves nothing.
    "_c10d_functional::_wrap_tensor_autograd": ("wait", None),
    "_c10d_functional_autograd::all_to_all_single": ("all_to_all", 0),
    "_c10d_functional_autograd::reduce_scatter_tensor": ("reduce_scatter", 0),
    "_c10d_functional_autograd::all_gather_into_tensor": ("all_gather", 0),
}
_NAMESPACES = ("c10d", "_c10d_functional", "_c10d_functional_autograd")


def op_of(name: str) -> str:
    """The normalised op of a dispatcher name ("c10d::recv_" -> "recv"); "other" if unknown."""
    return _OPS.get(name, ("other", None))[0]


@dataclass(frozen=True)
class SeenOp:
    """One c10d op this rank dispatched during a step."""

    op: str  # send | recv | all_reduce | all_gather | reduce_scatter | broadcast | wait | …
    name: str  # the dispatcher's name, e.g. "c10d::send"
    bytes: int  # bytes of the tensors this rank hands in
    peer: int | None  # p2p partner (group rank); None for collectives
    shape: tuple[int, ...] | None  # of the first tensor handed in
    dtype: torch.dtype | None
    phase: str  # what the engine said it was doing when the op was dispatched
    seconds: float  # time inside the dispatch call (async ops: enqueueing, not the wait)
    group: tuple[int, ...] | None = None  # its process group's global ranks (None: not named)


def _group_name(ns: str, args: tuple) -> str | None:
    """The name of the process group an op runs on: a c10d op takes the ProcessGroup as a
    script object, a functional collective its name as its last string argument."""
    if ns == "c10d":
        for a in args:
            if isinstance(a, torch.ScriptObject) and a._type().qualified_name().endswith(
                    ".ProcessGroup"):
                return dist.ProcessGroup.unbox(a).group_name
        return None
    names = [a for a in args if isinstance(a, str)]
    return names[-1] if names else None


def _tensors(a: object) -> list[torch.Tensor]:
    if isinstance(a, torch.Tensor):
        return [a]
    if isinstance(a, (list, tuple)):
        return [t for x in a for t in _tensors(x)]
    return []


class StepObserver(Observer):
    """`comm.Observer`, plus peer, shape, timing and the engine's current phase per op.

    Also sums the time spent in every other (local arithmetic) op, which is the
    engine's compute time: the torch engines have no hand-written compute
    section to time.
    """

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[SeenOp] = []
        self.phase = "forward"
        self.compute_s = 0.0
        self._members: dict[str, tuple[int, ...]] = {}  # group name -> its global ranks

    def _group(self, ns: str, args: tuple) -> tuple[int, ...] | None:
        name = _group_name(ns, args)
        if name is None:
            return None
        if name not in self._members:  # names are unique within a process
            from torch.distributed.distributed_c10d import _resolve_process_group

            self._members[name] = tuple(dist.get_process_group_ranks(
                _resolve_process_group(name)))
        return self._members[name]

    def reset(self) -> None:
        self.ops.clear()
        self.seen.clear()
        self.compute_s = 0.0
        self.phase = "forward"

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        kwargs = kwargs or {}
        ns = getattr(func, "namespace", "")
        if ns not in _NAMESPACES:
            t0 = time.perf_counter()
            out = func(*args, **kwargs)
            self.compute_s += time.perf_counter() - t0
            return out
        name = f"{ns}::{func._opname}"
        op, idx = _OPS.get(name, ("other", 0))
        tensors = _tensors(args[idx]) if idx is not None and idx < len(args) else []
        n = sum(nbytes(t) for t in tensors)
        peer = int(args[2]) if op in ("send", "recv") and len(args) > 2 else None
        first = tensors[0] if tensors else None
        t0 = time.perf_counter()
        out = func(*args, **kwargs)
        dt = time.perf_counter() - t0
        short = name.split("::", 1)[1]
        self.ops.append(ObservedOp(short, n))
        self.seen.append(SeenOp(op, name, n, peer,
                                tuple(first.shape) if first is not None else None,
                                first.dtype if first is not None else None, self.phase, dt,
                                self._group(ns, args)))
        return out


def to_records(seen: list[SeenOp], *, step: int | None, world_size: int, role_of,  # noqa: ANN001
               dims: Mapping[tuple[int, ...], str] | None = None) -> list[CommRecord]:
    """The ledger records of one step. A `wait` adds its seconds to the collective before it.

    `role_of(SeenOp) -> (role, phase)`. `dims`, on a mesh: this rank's group members along
    each dimension -> the dimension; an op on one of them is recorded with that dimension,
    its group's size, and a p2p peer as the global rank (the op names the group rank).
    """
    out: list[CommRecord] = []
    for s in seen:
        if s.op == "wait":
            if out:
                last = out[-1]
                out[-1] = CommRecord(**{**last.__dict__, "seconds": last.seconds + s.seconds})
            continue
        role, phase = role_of(s)
        dim = (dims or {}).get(s.group) if s.group is not None else None
        members = s.group if dim is not None else None
        n, p = s.bytes, world_size if members is None else len(members)
        peer = s.peer if members is None or s.peer is None else members[s.peer]
        sent = received = collective = wire = 0
        if s.op == "send":
            sent = wire = n
        elif s.op == "recv":
            received = n
        elif s.op == "all_reduce":
            sent = collective = n
            wire = ring_wire_bytes("all_reduce", n, p)
        elif s.op == "all_gather":
            sent = collective = n
            received = (p - 1) * n
            wire = ring_wire_bytes("all_gather", n, p)
        elif s.op == "reduce_scatter":
            sent = collective = n
            received = n // p
            wire = ring_wire_bytes("reduce_scatter", n, p)
        elif s.op == "broadcast":
            sent = collective = n
            wire = ring_wire_bytes("broadcast", n, p)
        else:  # barrier, anything unexpected: shown, with the bytes it handed in
            sent = collective = wire = n
        out.append(CommRecord(step, s.op, role, phase, peer, p, sent, received,
                              collective, wire, s.seconds, dim))
    return out
