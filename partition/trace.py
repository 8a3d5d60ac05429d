"""Per-rank timelines: timestamped spans of compute and communication, in Chrome's format.

A `Tracer` is handed to the runner, its stages and its `Comm` (no global state); it records
only while the train loop has switched it on for a traced step (`trace.steps`). A span is
what a rank did between two `time.perf_counter()` readings: a compute action (pipeline
F/B/I/W with stage and micro-batch; a layer's forward or backward; the update) or a
communication call, split where the backend lets us see it into posting and *waiting*
(a posted receive's wait, a collective's whole duration: gloo does not say when the last
member arrived). perf_counter is CLOCK_MONOTONIC, shared by every process of one host.

`chrome_trace` writes the trace event format that Perfetto and chrome://tracing open:
`traceEvents` of `ph: "X"` events, `pid` = rank, `tid` 0 for compute, 1 for comm and 2 for
reading the step's batch (`inputs`).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from typing import Any

from partition.simulate import START, op_keys, piece_key

# the comm spans of a posted message (comm.py's names, up to the role) and the event each
# is, as `simulate.piece_key` names them: its isend, its receive posted, its send waited
# for, its receive waited for
MESSAGE_EVENTS = (("send ", "send"), ("post recv ", "post"), ("wait send ", "wsend"),
                  ("wait recv ", "wrecv"))
TIDS = {"compute": 0, "comm": 1, "other": 2}  # other: reading the batch (inputs_span)


@dataclass
class Tracer:
    """Spans of the traced steps of one rank. `step` is set by the train loop.

    Every step is timed the same way — `compute_s` sums its compute spans, the one
    definition of compute time for the explicit engine — but only the traced steps
    keep their spans.
    """

    steps: set[int] | None = None  # None: every step
    step: int | None = None
    spans: list[dict[str, Any]] = field(default_factory=list)
    compute_s: float = 0.0  # compute spans of the current step, traced or not
    # The sampled steps: what the simulator's ops took in the run's own steps (step_samples,
    # step_collectives). Per action key (`simulate.time_key`) a span's own time, less the
    # collectives inside it (a hybrid stage's tp collectives are ops of their own); per
    # "after:<key>" the rank's time from that action's end to the next action's start but
    # for the waits the simulator plays itself (a posted receive's wait and a send's: a
    # message's transfer; a collective: a synchronised op): posting, sending, the runtime's
    # Python; each collective call with its members and clock readings (the launcher lines
    # the members' calls up: a call starts when its last member arrives). Where that time
    # holds message calls (a pipeline's isends, posted receives and their waits) it is
    # split at them, so that a replay makes each call when the step made it: per call
    # "lead:<piece>", the time since the previous call or action but for modeled waits,
    # and for an isend or irecv "call:<piece>", its own time (`simulate.piece_key`);
    # "after:<key>" is then what follows the last call.
    sampled: set[int] = field(default_factory=set)
    sums: dict[int, dict[str, float]] = field(default_factory=dict)
    colls: dict[int, list[list[Any]]] = field(default_factory=dict)  # [name, group, t0, t1]
    # per sampled step, each posted message's events: [what, peer, seq, role, t0, t1] with
    # what = an event of MESSAGE_EVENTS (send, post, wsend, wrecv)
    msgs: dict[int, list[list[Any]]] = field(default_factory=dict)
    begun: dict[int, float] = field(default_factory=dict)  # per sampled step, when it began
    _waits: list[tuple[float, float]] = field(default_factory=list)  # since the last action
    _last: tuple[tuple[str, ...], float] | None = None  # the last action's keys and end
    _mark: float = 0.0  # the end of the last action, or of the last message call after it
    _calls: list[tuple[str, float, float]] = field(default_factory=list)  # since the last action

    @property
    def on(self) -> bool:
        return self.step is not None and (self.steps is None or self.step in self.steps)

    def begin(self, step: int) -> None:
        self.step, self.compute_s = step, 0.0
        self._waits.clear()
        # the runtime's time before the first action counts as after "start"
        now = time.perf_counter()
        self._last = ((START,), now) if step in self.sampled else None
        self._mark = now
        self._calls.clear()
        if step in self.sampled:
            self.begun[step] = now

    def add(self, name: str, tid: str, t0: float, t1: float, **args: Any) -> None:
        if tid == "compute" and name != "step":
            self.compute_s += t1 - t0
        if self.step in self.sampled:
            if name == "step":  # the step's end: what followed the last action
                self._gap(t1)
            else:
                self._sample(name, tid, t0, t1, args)
        if self.on:
            self.spans.append({"name": name, "tid": tid, "t0": t0, "t1": t1, "step": self.step,
                               "args": args})

    def _sample(self, name: str, tid: str, t0: float, t1: float, args: dict[str, Any]) -> None:
        if tid == "comm":  # spans are added as they end: a call inside an action comes first
            what = next((w for prefix, w in MESSAGE_EVENTS if name.startswith(prefix)), None)
            if what is not None and "seq" in args:
                self.msgs.setdefault(self.step, []).append(
                    [what, args["peer"], args["seq"], args["role"], t0, t1])
            self._piece(name, t0, t1, args)
            collective = args.get("peer") is None
            if collective and "group" in args:
                self.colls.setdefault(self.step, []).append([name, args["group"], t0, t1])
            if collective or name.startswith(("wait recv", "recv ", "wait send")):
                self._waits.append((t0, t1))
            return
        keys = op_keys(args)
        if not keys:
            return
        sums = self.sums.setdefault(self.step, {})
        inner = sum(b - a for a, b in self._waits if a >= t0 and b <= t1)
        for k in keys:
            sums[k] = sums.get(k, 0.0) + (t1 - t0 - inner)
        self._inside(t0)
        self._gap(t0)
        self._last = (keys, t1)
        self._mark = t1
        self._calls.clear()

    def _inside(self, t0: float) -> None:
        """An action that began at `t0` has ended: message calls made inside it (added
        before it, as spans are added as they end) are its own, no piece of the gap."""
        sums = self.sums.setdefault(self.step, {})
        for key, _, _ in [c for c in self._calls if c[1] >= t0]:
            sums.pop("lead:" + key, None)
            sums.pop("call:" + key, None)
        self._calls[:] = [c for c in self._calls if c[1] < t0]
        if self._last is not None:
            self._mark = max([self._last[1], *(c1 for _, _, c1 in self._calls)])

    def _piece(self, name: str, t0: float, t1: float, args: dict[str, Any]) -> None:
        """A message call after the last action: its lead and its own time (`piece_key`)."""
        event = next((e for prefix, e in MESSAGE_EVENTS if name.startswith(prefix)), None)
        if event is None or "seq" not in args or self._last is None:
            return  # not a posted message's call, or before the step's first mark
        key = piece_key(event, args["peer"], args["seq"])
        self._calls.append((key, t0, t1))
        waited = sum(b - a for a, b in self._waits if a >= self._mark and b <= t0)
        sums = self.sums.setdefault(self.step, {})
        sums["lead:" + key] = max(0.0, t0 - self._mark - waited)
        if event in ("send", "post"):  # a wait's own time is the simulator's to play
            sums["call:" + key] = t1 - t0
        self._mark = t1

    def _gap(self, until: float) -> None:
        """The runtime's time from the last action's end, or its last message call's, to
        `until`, but for modeled waits."""
        if self._last is not None:
            keys, _ = self._last
            waited = sum(b - a for a, b in self._waits if a >= self._mark and b <= until)
            sums = self.sums.setdefault(self.step, {})
            for k in keys:
                sums["after:" + k] = sums.get("after:" + k, 0.0) + max(
                    0.0, until - self._mark - waited)
        self._waits.clear()
        self._last = None

    def step_collectives(self) -> list[list[list[Any]]] | None:
        """Per sampled step (in `step_samples`' order), its collective calls in order:
        [name, members (global ranks), t0, t1]."""
        return [self.colls.get(step, []) for step in sorted(self.sums)] or None

    def sampled_steps(self) -> list[int]:
        """The sampled steps that ran, in order (`step_samples` and `step_collectives`)."""
        return sorted(self.sums)

    def step_starts(self) -> list[float] | None:
        """Per sampled step (in `step_samples`' order), when this rank began it."""
        return [self.begun[step] for step in sorted(self.sums)] or None

    def step_messages(self) -> list[list[list[Any]]] | None:
        """Per sampled step (in `step_samples`' order), its posted messages' events."""
        return [self.msgs.get(step, []) for step in sorted(self.sums)] or None

    def step_samples(self) -> list[dict[str, float]] | None:
        """Per sampled step (in order), per action key its seconds in that step."""
        return [d for _, d in sorted(self.sums.items())] or None

    @contextmanager
    def span(self, name: str, tid: str = "compute", **args: Any) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.add(name, tid, t0, time.perf_counter(), **args)


@contextmanager
def maybe_span(tracer: Tracer | None, name: str, tid: str = "compute", **args: Any) -> Iterator[None]:
    """`tracer.span(...)`, or nothing when the object carries no tracer."""
    if tracer is None:
        yield
        return
    with tracer.span(name, tid, **args):
        yield


def inputs_span(tracer: Tracer | None) -> AbstractContextManager[None]:
    """Around a runner's read of its rows of the step's batch: neither compute nor
    communication (tid `other`), but on a stage-0 rank a good part of the step, so the
    timeline shows it and the simulator has it (calibrate's `inputs`)."""
    return maybe_span(tracer, "inputs", "other", kind="inputs")


def traced_steps(setting: str | tuple[int, ...], *, steps: int, warmup: int,
                 probed: set[int] = frozenset()) -> set[int] | None:
    """`trace.steps` as a set of step numbers (None = all). `last` is the last steady step
    the memory probe leaves alone (the probe slows every op it sees), else the last step."""
    if setting == "all":
        return None
    if setting == "last":
        quiet = [s for s in range(warmup, steps) if s not in probed]
        return {quiet[-1] if quiet else steps - 1}
    return {s for s in setting if s < steps}


def sampled_steps(*, steps: int, warmup: int) -> set[int]:
    """The steps whose durations feed the simulator: the steady ones, those
    `train.step_time_s` is the median of — probed and traced steps too, since their
    measured time counts there as well — but never step 0 (one-time costs)."""
    return set(range(max(1, warmup), steps))


def chrome_trace(per_rank: list[tuple[int, list[dict[str, Any]]]], *,
                 clock: dict[str, Any] | None = None) -> dict[str, Any]:
    """Chrome trace events from every rank's spans, times in µs from the earliest span."""
    starts = [s["t0"] for _, spans in per_rank for s in spans]
    origin = min(starts) if starts else 0.0
    events: list[dict[str, Any]] = []
    for rank, spans in per_rank:
        events.append({"name": "process_name", "ph": "M", "pid": rank,
                       "args": {"name": f"rank {rank}"}})
        for name, tid in TIDS.items():
            events.append({"name": "thread_name", "ph": "M", "pid": rank, "tid": tid,
                           "args": {"name": name}})
        for s in spans:
            events.append({"name": s["name"], "cat": s["tid"], "ph": "X", "pid": rank,
                           "tid": TIDS[s["tid"]], "ts": round((s["t0"] - origin) * 1e6, 3),
                           "dur": round((s["t1"] - s["t0"]) * 1e6, 3),
                           "args": {"step": s["step"], **s["args"]}})
    return {"traceEvents": events, "displayTimeUnit": "ms",
            "otherData": {"clock": clock or {"source": "time.perf_counter (CLOCK_MONOTONIC)",
                                             "offset_s": 0.0}}}


def read_trace(trace: dict[str, Any]) -> list[tuple[int, list[dict[str, Any]]]]:
    """`chrome_trace`'s input back from its output: per rank (rank order) the spans, times
    in seconds from the trace's origin (what a report reads from a run folder's trace.json)."""
    names = {v: k for k, v in TIDS.items()}
    per_rank: dict[int, list[dict[str, Any]]] = {}
    for e in trace.get("traceEvents") or []:
        if e.get("ph") != "X":
            continue
        args = dict(e.get("args") or {})
        t0 = e["ts"] / 1e6
        per_rank.setdefault(int(e["pid"]), []).append(
            {"name": e["name"], "tid": names.get(e.get("tid"), e.get("cat")), "t0": t0,
             "t1": t0 + e["dur"] / 1e6, "step": args.pop("step", None), "args": args})
    return sorted(per_rank.items())


def step_spans(spans: list[dict[str, Any]], step: int) -> list[dict[str, Any]]:
    return [s for s in spans if s["step"] == step]


def compute_seconds(spans: list[dict[str, Any]]) -> float:
    """Time in compute spans, outermost only (a step span contains the others)."""
    return sum(s["t1"] - s["t0"] for s in spans if s["tid"] == "compute" and s["name"] != "step")
