"""The torch engines' spans, from torch.profiler: the same trace.json as the explicit engine's.

The explicit engine times its own compute and communication with perf_counter (trace.py,
comm.py). PyTorch's engines compute and communicate inside torch, so on a traced step
(`trace.steps`) the train loop runs the step under `torch.profiler` and the runner turns
its events into the Tracer's spans: the same names, tids and args, so `timeline.measured`
and `timeline.draw` read both engines alike.

**Compute.** torch 2.13's pipelining emits ranges, but none that holds exactly an action's
compute: `_PipelineScheduleRuntime` (interleaved 1F1B, looped BFS, the zero-bubble and V
schedules, CSVs) wraps each action in `PP:<action>`, and a compute action's range also holds
the wait for its input (the RECV posted earlier is waited on inside it); DualPipeV's
OVERLAP_F_B range holds two actions; `ScheduleGPipe` wraps micro-batch i in `Forward i` /
`Backward i`, which hold the receive, its wait and the posting of the send, and leave the
last stage's loss outside; `Schedule1F1B` emits none. So each torch runner opens a range of
its own, `partition:<span name>` (`Marks`), around exactly the compute — a pipeline stage's
forward_one_chunk / backward_one_chunk / backward_weight_one_chunk, the loss, the optimizer
step — and each span records the torch range it ran in (`args.torch_range`: `PP:0F1`,
`Forward 1`, or none), which maps torch's names onto ours one to one.

**Communication** (tid comm). The profiler records each c10d op on the rank's thread when it
is called (the *posting*), and gloo records the op itself (`gloo:send`, `gloo:recv`,
`gloo:all_reduce`, …) until it completes — for p2p until its wait returns. The thread
records nothing while it blocks, so a *wait* is the gap in the thread's profiled ops that
ends when an op completes (if the thread is not inside an op then); such a gap can also hold
a little Python the profiler does not see. Roles, bytes and peers are the observer's
(observe.py) for the same op, matched in dispatch order. What `Comm` recorded itself (the J
reduction) is left to it. A compute span is its range less the comm calls and waits inside
it (tensor, data and fsdp run their collectives inside the forward or the backward).

**Clock.** Profiler times are µs from the profiler's start. Just before the step the runner
opens `partition:clock<i>` ranges, each between two perf_counter readings: aligning a range's
midpoint with its readings' midpoint gives offset = perf_counter − profiler time, uncertain
by half the readings' gap the range does not cover; the tightest try is used.

On CUDA the spans are host-side, as the explicit engine's are.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from torch.profiler import record_function

from partition.engines.observe import op_of

MARK = "partition:"
CLOCK = MARK + "clock"
CLOCK_TRIES = 3
_TORCH_RANGE = re.compile(r"PP:|(Forward|Backward) \d+$")
_COMM_NS = ("c10d::", "_c10d_functional::", "_c10d_functional_autograd::")
_COLLECTIVE = "collective"

Span = tuple[str, str, float, float, dict[str, Any]]  # Tracer.add's name, tid, t0, t1, args


@dataclass
class Marks:
    """The ranges a torch runner opens around its compute on a traced step, in order, with
    the args of the span each becomes. Off (a plain call) on every other step."""

    on: bool = False
    opened: list[tuple[str, dict[str, Any]]] = field(default_factory=list)

    def reset(self, *, on: bool) -> None:
        self.on, self.opened = on, []

    @contextmanager
    def __call__(self, name: str, **args: Any) -> Iterator[None]:
        if not self.on:
            yield
            return
        self.opened.append((name, args))
        with record_function(MARK + name):
            yield


@dataclass(frozen=True)
class SeenComm:
    """What the observer knew of one c10d op the engine dispatched."""

    name: str  # the dispatcher's, e.g. "c10d::send"
    op: str  # send | recv | all_reduce | …
    role: str
    bytes: int
    peer: int | None


def clock_reads(tries: int = CLOCK_TRIES) -> list[tuple[float, float]]:
    """perf_counter just before and just after each `partition:clock<i>` range."""
    reads = []
    for i in range(tries):
        a = time.perf_counter()
        with record_function(f"{CLOCK}{i}"):
            pass
        reads.append((a, time.perf_counter()))
    return reads


def profiler_clock(events: Sequence[Any], reads: list[tuple[float, float]]) -> dict[str, Any]:
    """perf_counter seconds − profiler seconds, from the clock ranges and their readings."""
    by_name = {e.name: e for e in events if e.name.startswith(CLOCK)}
    best: tuple[float, float] | None = None
    for i, (a, b) in enumerate(reads):
        ev = by_name[f"{CLOCK}{i}"]
        s, e = ev.time_range.start * 1e-6, ev.time_range.end * 1e-6
        unc = max(0.0, ((b - a) - (e - s)) / 2)
        if best is None or unc < best[1]:
            best = ((a + b) / 2 - (s + e) / 2, unc)
    assert best is not None
    return {"offset_s": best[0], "uncertainty_s": best[1],
            "source": f"partition:clock ranges between perf_counter readings, best of {len(reads)}"}


def _is_comm(e: Any) -> bool:
    return e.name.startswith(_COMM_NS)


def _outermost_comm(e: Any) -> bool:
    p = e.cpu_parent
    while p is not None:
        if _is_comm(p):
            return False
        p = p.cpu_parent
    return True


def _kind(op: str) -> str:
    return op if op in ("send", "recv") else _COLLECTIVE


def _match(calls: list[Any], seen: list[SeenComm]) -> list[SeenComm | None]:
    """The observer's entry for each profiled call: both saw the engine's c10d ops in
    dispatch order; from the first disagreement on, nothing is claimed."""
    out: list[SeenComm | None] = []
    k = 0
    for c in calls:
        if k < len(seen) and seen[k].name == c.name:
            out.append(seen[k])
            k += 1
        else:
            k = len(seen)
            out.append(None)
    return out


def _subtract(t0: float, t1: float, holes: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """[t0, t1] less the holes (sorted), as the pieces left."""
    pieces, at = [], t0
    for a, b in holes:
        if b <= at or a >= t1:
            continue
        if a > at:
            pieces.append((at, a))
        at = max(at, b)
    if at < t1:
        pieces.append((at, t1))
    return pieces


def step_spans(events: Sequence[Any], *, clock: dict[str, Any], marks: list[tuple[str, dict[str, Any]]],
               seen: list[SeenComm], recorded: list[tuple[float, float]]) -> list[Span]:
    """The spans of one profiled step, on perf_counter's clock.

    `marks`: the runner's `Marks.opened`; `seen`: the observer's c10d ops (waits left out);
    `recorded`: the comm spans `Comm` recorded itself in this step, whose ops are skipped.
    """
    off = clock["offset_s"]

    def t(us: float) -> float:
        return us * 1e-6 + off

    main = next(e.thread for e in events if e.name.startswith(CLOCK))
    mine = [e for e in events if e.thread == main and not e.name.startswith("gloo:")]

    def comm_own(e: Any) -> bool:  # an op Comm recorded: the profiler saw the same call
        x = t(e.time_range.start)
        return any(a <= x <= b for a, b in recorded)

    calls = sorted((e for e in mine if _is_comm(e) and _outermost_comm(e)
                    and op_of(e.name) != "wait" and not comm_own(e)),
                   key=lambda e: e.time_range.start)
    infos = _match(calls, seen)
    posting: list[Span] = []
    for c, info in zip(calls, infos):
        op = info.op if info else op_of(c.name)
        name = {"send": "send", "recv": "post recv"}.get(op, op)
        posting.append((f"{name} {info.role}" if info else name, "comm", t(c.time_range.start),
                        t(c.time_range.end), {**_comm_args(info), "waiting": False}))
    waits = _waits(events, mine, calls, infos, comm_own, t)
    holes = sorted((a, b) for _, _, a, b, _ in posting + waits)
    return posting + waits + _compute(mine, marks, t, holes)


def _comm_args(info: SeenComm | None) -> dict[str, Any]:
    if info is None:
        return {}
    return {"role": info.role, "bytes": info.bytes, "peer": info.peer}


def _waits(events: Sequence[Any], mine: list[Any], calls: list[Any], infos: list[SeenComm | None],
           comm_own: Callable[[Any], bool], t: Callable[[float], float]) -> list[Span]:
    """A wait per completed op whose completion the thread sat idle for (see the module)."""
    done = sorted((e for e in events if e.name.startswith("gloo:") and not comm_own(e)),
                  key=lambda e: e.time_range.end)
    # the thread is busy at x when an op of its own (not a comm call) runs then, innermost
    leaves = [e for e in mine if not e.cpu_children and not _is_comm(e)]
    ends = [e.time_range.end for e in mine]
    poster = _posters(done, calls, infos)
    out: list[Span] = []
    for g in done:
        gs, ge = g.time_range.start, g.time_range.end
        k = poster.get(id(g))
        info = infos[k] if k is not None else None
        if any(e.time_range.start < ge < e.time_range.end for e in leaves):
            continue  # the thread was computing when it completed: nobody waited
        idle_from = max([gs] + [x for x in ends if x <= ge])
        if idle_from >= ge:
            continue
        op = g.name.split(":", 1)[1]
        out.append((f"wait {op} {info.role}" if info else f"wait {op}", "comm", t(idle_from), t(ge),
                    {**_comm_args(info), "waiting": True}))
        ends.append(ge)  # the next wait starts after this one at the earliest
    return out


def _posters(done: list[Any], calls: list[Any], infos: list[SeenComm | None]) -> dict[int, int]:
    """Which call posted each gloo op: a process group runs its ops of one kind in the order
    they were posted, so the k-th op of a kind to start is the k-th call of that kind (gloo
    runs a reduce-scatter as an all-reduce, so collectives are one kind)."""
    by_kind: dict[str, list[int]] = {}
    for k, c in enumerate(calls):
        by_kind.setdefault(_kind(infos[k].op if infos[k] else op_of(c.name)), []).append(k)
    out: dict[int, int] = {}
    for kind, ks in by_kind.items():
        ops = sorted((g for g in done if _kind(g.name.split(":", 1)[1]) == kind),
                     key=lambda g: g.time_range.start)
        out.update({id(g): k for g, k in zip(ops, ks)})
    return out


def _compute(mine: list[Any], marks: list[tuple[str, dict[str, Any]]], t: Callable[[float], float],
             holes: list[tuple[float, float]]) -> list[Span]:
    """Each mark's range, less the comm calls and waits inside it, with its torch range."""
    ranges = sorted((e for e in mine if e.name.startswith(MARK) and not e.name.startswith(CLOCK)),
                    key=lambda e: e.time_range.start)
    names = [MARK + n for n, _ in marks]
    if [e.name for e in ranges] != names:
        raise ValueError(f"the profiler saw ranges {[e.name for e in ranges]}, the runner "
                         f"opened {names}")
    out: list[Span] = []
    for e, (name, args) in zip(ranges, marks):
        torch_range = _torch_range(e)
        for a, b in _subtract(t(e.time_range.start), t(e.time_range.end), holes):
            out.append((name, "compute", a, b, {**args, "torch_range": torch_range}))
    return out


def _torch_range(e: Any) -> str | None:
    p = e.cpu_parent
    while p is not None:
        if _TORCH_RANGE.match(p.name):
            return p.name
        p = p.cpu_parent
    return None
