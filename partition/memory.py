"""Peak memory per device, by category (docs/measurement.md): measured, never process RSS.

CPU has no allocator statistics, so `StorageTracker` — a TorchDispatchMode — keeps a
ledger of live tensor storages on the rank's device: it is seeded with what exists
before the step (params, grads, optimizer state), adds the storage of every tensor an
op returns (in-place ops and views return storages it already knows, so they cost
nothing), and sees a storage die through a weak reference to it (torch keeps one
Python object per storage alive as long as the storage lives, so the callback fires
exactly when the memory is released). Every live storage has a category:

    params, grads, optimizer   seeded from the runner before the step
    input                      the data batch (X, y) on the device
    activations                what the stages keep for backward (tagged by `Stage`)
    gathered                   a layer's full weights all-gathered from its shards (fsdp; tagged by the runner)
    comm                       buffers handed to or filled by a c10d op (recv, send, all-reduce)
    temporaries                everything else: backward temporaries, loss, masks, ...

A storage can move up this list, never down (a received activation is first a comm
buffer, then kept for backward). The breakdown at the peak is taken at the first
release after the peak, so it is the live set *at* the peak; tags given a moment
later (a buffer sent just after the peak) still reach it.

On CUDA the authoritative peak is `torch.cuda.max_memory_allocated`, reset per phase
(it includes the caching allocator's rounding to 512-byte blocks); the tracker still
runs for the breakdown. `memory_limit` is enforced by the tracker on CPU (it raises
`MemoryLimitExceeded` as soon as the live bytes pass the limit) and by the allocator
on CUDA (`set_per_process_memory_fraction`; its OutOfMemoryError is turned into
`MemoryLimitExceeded`), so a run ends the same way on both.
"""

from __future__ import annotations

import re
import weakref
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

CATEGORIES = ("params", "grads", "optimizer", "input", "activations", "gathered", "comm",
              "temporaries")
# Higher wins when a storage is tagged twice; seeded categories are never re-tagged.
_RANK = {"temporaries": 0, "comm": 1, "gathered": 2, "activations": 3, "input": 4}
_SEEDED = ("params", "grads", "optimizer")

TRAINING = "training step"
PREDICTION = "prediction forward"


def mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


class MemoryLimitExceeded(RuntimeError):
    """A rank needs more bytes than `memory_limit` allows: the run ends with status `oom`."""

    def __init__(self, *, rank: int, needed: int, limit: int, where: str, device: str,
                 expected: int | None = None) -> None:
        self.rank, self.needed, self.limit = rank, needed, limit
        self.where, self.device = where, device
        self.expected = expected
        whole = (f"; the whole {where.split(' (')[0]} needs {expected:,} bytes ({mib(expected)}) "
                 f"by the cost model" if expected and expected > needed else "")
        super().__init__(
            f"rank {rank}: the {where} needs {needed:,} bytes ({mib(needed)}) on {device}, "
            f"over memory_limit={limit:,} bytes ({mib(limit)}){whole}")


@dataclass
class _Entry:
    nbytes: int
    category: str


@dataclass
class Measurement:
    """One phase (a training step or a prediction forward) on one rank."""

    where: str
    peak_bytes: int = 0
    breakdown: dict[str, int] = field(default_factory=dict)  # live bytes by category at the peak
    category_peaks: dict[str, int] = field(default_factory=dict)  # each category's own peak
    seeded: dict[str, int] = field(default_factory=dict)  # params / grads / optimizer bytes
    allocator_peak_bytes: int | None = None  # CUDA: max_memory_allocated, the authoritative peak
    tracked_peak_bytes: int = 0  # the storage tracker's own peak (what the cost model replays)
    # CUDA: allocated at the start beyond the tracked state — cuBLAS workspace, leftovers.
    untracked_bytes: int | None = None

    @property
    def activations_bytes(self) -> int:
        """The most bytes kept for backward at any moment of the phase."""
        return self.category_peaks.get("activations", 0)


class StorageTracker(TorchDispatchMode):
    """Live tensor storages on one device while active; see the module docstring."""

    def __init__(self, device: torch.device, *, rank: int = 0, limit: int | None = None,
                 where: str = TRAINING, expected: int | None = None) -> None:
        super().__init__()
        self.device = torch.device(device)
        self._dtype, self._dindex = self.device.type, self.device.index or 0
        self.rank, self.limit, self.where, self.expected = rank, limit, where, expected
        self.live: dict[int, _Entry] = {}
        self._refs: dict[int, weakref.ref] = {}
        self.live_bytes = 0
        self.peak = 0
        self.totals = dict.fromkeys(CATEGORIES, 0)
        self.category_peaks = dict.fromkeys(CATEGORIES, 0)
        self._peak_entries: list[_Entry] = []
        self._dirty = False  # a new peak was reached and no storage died since
        self.active = False

    # ------------------------------------------------------------ bookkeeping

    def _storage(self, t: Any) -> torch.UntypedStorage | None:
        if not isinstance(t, torch.Tensor) or t.layout != torch.strided:
            return None
        d = t.device
        if d.type != self._dtype or (d.index or 0) != self._dindex:
            return None
        return t.untyped_storage()

    def _add(self, st: torch.UntypedStorage, category: str) -> _Entry | None:
        key = id(st)
        entry = self.live.get(key)
        if entry is not None:
            return entry
        n = st.nbytes()
        if n == 0:
            return None
        entry = _Entry(n, category)
        self.live[key] = entry
        self._refs[key] = weakref.ref(st, partial(self._released, key))
        self.live_bytes += n
        self._count(category, n)
        if self.live_bytes > self.peak:
            self.peak = self.live_bytes
            self._dirty = True
            if self.limit is not None and self.live_bytes > self.limit:
                raise MemoryLimitExceeded(rank=self.rank, needed=self.live_bytes,
                                          limit=self.limit, where=self.where,
                                          device=str(self.device), expected=self.expected)
        return entry

    def _count(self, category: str, n: int) -> None:
        self.totals[category] += n
        if self.totals[category] > self.category_peaks[category]:
            self.category_peaks[category] = self.totals[category]

    def _released(self, key: int, _ref: weakref.ref) -> None:
        # Runs inside a tensor's deallocation: only plain bookkeeping here.
        if not self.active:
            return
        entry = self.live.get(key)
        if entry is None:
            return
        if self._dirty:  # the live set right now is the peak's
            self._peak_entries = list(self.live.values())
            self._dirty = False
        del self.live[key]
        self._refs.pop(key, None)
        self.live_bytes -= entry.nbytes
        self.totals[entry.category] -= entry.nbytes

    # ------------------------------------------------------------ what callers use

    def seed(self, category: str, tensors: Iterable[torch.Tensor]) -> None:
        """Storages alive before the phase (params, grads, optimizer state)."""
        for t in tensors:
            st = self._storage(t)
            if st is not None:
                self._add(st, category)

    def tag(self, category: str, tensors: Iterable[torch.Tensor | None]) -> None:
        """Say what live storages are (`input`, `activations`, `comm`); only ever upgrades."""
        for t in tensors:
            st = self._storage(t)
            if st is None:
                continue
            entry = self.live.get(id(st))
            if entry is None:
                entry = self._add(st, category)  # made outside any op (torch.from_numpy, ...)
                continue
            if entry.category in _SEEDED or _RANK[entry.category] >= _RANK[category]:
                continue
            self.totals[entry.category] -= entry.nbytes
            entry.category = category
            self._count(category, entry.nbytes)

    # `Stage` calls these two when a tracker is attached to it (stage.probe).
    def kept(self, caches: list[Any], *, holds_input: bool) -> None:
        """A forward's caches; the first layer's x is the data batch if the stage holds layer 0."""
        for i, c in enumerate(caches):
            if i == 0 and holds_input:
                self.tag("input", [c.x])
            else:
                self.tag("activations", [c.x])
            self.tag("activations", [c.z])

    def inputs(self, *tensors: torch.Tensor | None) -> None:
        self.tag("input", tensors)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if not self.active:
            return out
        if func.namespace == "c10d":
            self.tag("comm", [t for t in tree_leaves((args, kwargs, out))
                              if isinstance(t, torch.Tensor)])
        # Most ops return one tensor: skip pytree for them (this runs for every op).
        for t in (out,) if isinstance(out, torch.Tensor) else tree_leaves(out):
            st = self._storage(t)
            if st is not None and id(st) not in self.live:
                self._add(st, "temporaries")
        return out

    def __enter__(self) -> StorageTracker:
        self.active = True
        return super().__enter__()

    def __exit__(self, *exc: Any) -> None:
        try:
            super().__exit__(*exc)
        finally:
            if self._dirty:
                self._peak_entries = list(self.live.values())
                self._dirty = False
            self.active = False
            self._refs.clear()  # dead weak references never call back

    def breakdown(self) -> dict[str, int]:
        out = dict.fromkeys(CATEGORIES, 0)
        for e in self._peak_entries:
            out[e.category] += e.nbytes
        return out

    def check_seeded(self) -> None:
        """State alone can already be over the limit (the weights do not fit)."""
        if self.limit is not None and self.live_bytes > self.limit:
            raise MemoryLimitExceeded(rank=self.rank, needed=self.live_bytes, limit=self.limit,
                                      where=self.where, device=str(self.device),
                                      expected=self.expected)


# ---------------------------------------------------------------- what a runner holds


def state_tensors(runner: Any) -> dict[str, list[torch.Tensor]]:
    """Params, grads and optimizer state of a runner, by category.

    A runner may say it itself (`memory_state()`); otherwise: params are its layers'
    tensors and, under mixed precision, their compute copies (`runner.compute`), grads its
    stage's, optimizer state its optimizer's `buffers` (momentum; Adam's m and v).
    """
    if hasattr(runner, "memory_state"):
        return runner.memory_state()
    return layer_state_tensors(runner)


def layer_state_tensors(runner: Any) -> dict[str, list[torch.Tensor]]:
    """`state_tensors` of a runner whose layers and stages' grads are its state."""
    params = [t for layer in runner.layers for t in layer.tensors()]
    copies = getattr(runner, "compute", None)
    if copies is not None:
        from partition.model import copy_tensors

        params += copy_tensors(runner.layers, copies)
    grads = [t for st in stages_of(runner) for g in st.grads for t in g.tensors()]
    opt = list(getattr(getattr(runner, "opt", None), "buffers", []) or [])
    return {"params": params, "grads": grads, "optimizer": opt}


def stages_of(runner: Any) -> list[Any]:
    """The `Stage` objects whose forwards keep activations (`memory_stages()` or `.stage`)."""
    if hasattr(runner, "memory_stages"):
        return list(runner.memory_stages())
    st = getattr(runner, "stage", None)
    return [st] if st is not None else []


# ---------------------------------------------------------------- the probe


_TRIED = re.compile(r"Tried to allocate ([0-9.]+) (B|KiB|MiB|GiB|TiB)")
_UNIT = {"B": 1, "KiB": 2**10, "MiB": 2**20, "GiB": 2**30, "TiB": 2**40}


def _requested(message: str) -> int:
    m = _TRIED.search(message)
    return int(float(m.group(1)) * _UNIT[m.group(2)]) if m else 0


class MemoryProbe:
    """Measures each phase of one rank and enforces `memory_limit`; cheap enough to stay on.

    Off (`enabled=False`) and without a limit it does nothing. On CPU with a limit but
    off, the tracker still runs: it is what enforces the limit.
    """

    def __init__(self, device: torch.device, *, rank: int, limit: int | None,
                 enabled: bool = True, expected: dict[str, int] | None = None) -> None:
        self.device = torch.device(device)
        self.rank, self.limit, self.enabled = rank, limit, enabled
        self.expected = expected or {}  # the cost model's peak per phase, for error messages
        self.cuda = self.device.type == "cuda"
        self._fraction = 1.0
        if self.cuda and limit is not None:
            total = torch.cuda.get_device_properties(self.device).total_memory
            self._fraction = min(1.0, limit / total)
            torch.cuda.set_per_process_memory_fraction(self._fraction, self.device)
        if enabled or (limit is not None and not self.cuda):
            # The first dispatch through any Python mode imports torch's compiler stack
            # (about 2 s): pay it here, at set-up, not inside a measured step.
            with StorageTracker(self.device):
                torch.empty(0, device=self.device)

    @contextmanager
    def measure(self, runner: Any, where: str = TRAINING, *, exclude: tuple[str, ...] = (),
                enforce: bool = True, record: bool = True) -> Iterator[Measurement | None]:
        """Measure one phase of `runner`; yields the Measurement (filled on exit) or None.

        `exclude`: seeded categories that the phase does not need and the reported
        peak leaves out (prediction needs no grads or optimizer state).
        `enforce=False`: measure without the limit (the prediction forward that train.py
        adds as a measurement must not end a run whose training fits).
        `record=False`: only enforce the limit (yields None).
        """
        enabled = self.enabled and record
        if not enforce:
            if not enabled:
                yield None
                return
            with self._unlimited(), self.measure(runner, where, exclude=exclude) as m:
                yield m
            return
        if not enabled and (self.limit is None or self.cuda):
            # Nothing to measure; on CUDA the allocator alone enforces a limit.
            try:
                yield None
            except torch.cuda.OutOfMemoryError as e:
                raise self._oom(e, where) from None
            return
        m = Measurement(where) if enabled else None
        tracker = StorageTracker(self.device, rank=self.rank,
                                 limit=None if self.cuda else self.limit, where=where,
                                 expected=self.expected.get(where))
        if self.cuda and m is not None:
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        stages = stages_of(runner)
        seeded = {}
        # Read before the tracker starts: a torch engine's state comes out through detach /
        # to_local, ops the tracker would otherwise register as temporaries, not as state.
        state = state_tensors(runner)
        try:
            with tracker:
                for cat, ts in state.items():
                    tracker.seed(cat, ts)
                seeded = {c: tracker.totals[c] for c in _SEEDED}
                if self.cuda and m is not None:
                    m.untracked_bytes = (torch.cuda.memory_allocated(self.device)
                                         - tracker.live_bytes)
                tracker.check_seeded()
                for st in stages:
                    st.probe = tracker
                try:
                    yield m
                except torch.cuda.OutOfMemoryError as e:
                    raise self._oom(e, where) from None
                finally:
                    for st in stages:
                        st.probe = None
        finally:
            if m is not None:
                drop = sum(seeded.get(c, 0) for c in exclude)
                m.seeded = seeded
                m.breakdown = tracker.breakdown()
                for c in exclude:
                    m.breakdown[c] = 0
                m.category_peaks = dict(tracker.category_peaks)
                m.peak_bytes = m.tracked_peak_bytes = tracker.peak - drop
                if self.cuda:
                    torch.cuda.synchronize(self.device)
                    m.allocator_peak_bytes = torch.cuda.max_memory_allocated(self.device) - drop
                    m.peak_bytes = m.allocator_peak_bytes

    @contextmanager
    def _unlimited(self) -> Iterator[None]:
        limit = self.limit
        self.limit = None
        if self.cuda and self._fraction < 1.0:
            torch.cuda.set_per_process_memory_fraction(1.0, self.device)
        try:
            yield
        finally:
            self.limit = limit
            if self.cuda and self._fraction < 1.0:
                torch.cuda.set_per_process_memory_fraction(self._fraction, self.device)

    def _oom(self, e: BaseException, where: str) -> MemoryLimitExceeded:
        """The allocator's OutOfMemoryError as our error: bytes needed = held + requested."""
        needed = torch.cuda.memory_allocated(self.device) + _requested(str(e))
        return MemoryLimitExceeded(rank=self.rank, needed=needed, limit=self.limit or 0,
                                   where=where, device=str(self.device),
                                   expected=self.expected.get(where))


def memory_record(train: Measurement | None, predict: Measurement | None,
                  state: dict[str, int]) -> dict[str, Any]:
    """The `ranks[].memory` block of result.json."""
    seeded = train.seeded if train is not None else {}
    return {
        "peak_bytes": train.peak_bytes if train else None,
        "predict_peak_bytes": predict.peak_bytes if predict else None,
        "params_bytes": seeded.get("params", state.get("params_bytes")),
        "grads_bytes": seeded.get("grads", state.get("grads_bytes")),
        "optimizer_bytes": seeded.get("optimizer", state.get("optimizer_bytes")),
        "activations_bytes": train.activations_bytes if train else None,
        # fsdp: the most bytes of gathered full layers alive at once (0 elsewhere)
        "gathered_bytes": train.category_peaks.get("gathered", 0) if train else None,
        "breakdown": train.breakdown if train else None,
        "predict_breakdown": predict.breakdown if predict else None,
        # CUDA only: peak_bytes is the allocator's; these say what it holds beyond the
        # tensors the tracker saw (512-byte rounding, the cuBLAS workspace).
        "tracked_peak_bytes": None if train is None or train.allocator_peak_bytes is None
        else train.tracked_peak_bytes,
        "untracked_bytes": train.untracked_bytes if train else None,
    }
