"""The dry run: each rank's real runner on the meta device, in one process, exactly measured.

Nothing here restates an engine. Each rank's runner — the same class `experiments.run`
starts — is built on the `meta` device (tensors with shapes and dtypes, no storage
contents, no arithmetic) and trained for the steps a run measures, with a `Comm` whose
transport moves nothing (a receive returns an empty tensor of the planned shape), under
the same `memory.MemoryProbe` that measures a real rank. What the ledger and the probe
record is therefore what a real run records: bytes, wire bytes and messages by role and
phase, and the memory peaks with their breakdown, for a training step and a prediction
forward — at any world size, without starting a process or allocating a byte of the model.

Ranks whose plans are identical (data-parallel replicas with equal row shares, tensor
ranks with equal shard widths, hybrid mesh ranks with the same stage, shards and rows)
are run once and counted; a pipeline's stages all differ. A hybrid rank's Comm per mesh
dimension gets its own transport that moves nothing.

One known difference from a real run: on CUDA the data batch is gathered from the CPU
copy of the dataset before it reaches the device, so the float64 staging copy a CPU run
holds on its "device" is not on the GPU; the dry run models the CPU path.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode, _get_current_dispatch_mode_stack

from partition.comm import Comm, Ledger, Transport
from partition.config import RunConfig
from partition.data import Dataset
from partition.memory import TRAINING, MemoryProbe, StorageTracker, memory_record
from partition.model import weight_names
from partition.plans.data import data_rows
from partition.plans.split import width
from partition.plans.tensor import plan_layers
from partition.strategies import build_runner
from partition.topology import Topology

META = torch.device("meta")


class _Done:
    """The work handle of a call that moved nothing: already complete."""

    def wait(self) -> bool:
        return True


def _moved(*tensors: torch.Tensor | list[torch.Tensor]) -> None:
    """Tell the active storage tracker these buffers were handed to a collective or a send,
    as a real c10d op would (memory.StorageTracker tags a c10d op's tensors `comm`)."""
    flat = [t for x in tensors for t in (x if isinstance(x, list) else [x])]
    for mode in _get_current_dispatch_mode_stack():
        if isinstance(mode, StorageTracker):
            mode.tag("comm", flat)


class DryTransport(Transport):
    """Moves nothing: a receive leaves its (meta) buffer as it is, a collective too.

    One per group: a hybrid mesh's Comm per dimension gets its own (`Transport.on`)."""

    moves = False

    def send(self, t: torch.Tensor, dst: int) -> None:
        _moved(t)

    def recv(self, t: torch.Tensor, src: int) -> None:
        _moved(t)

    def isend(self, t: torch.Tensor, dst: int) -> _Done:
        _moved(t)
        return _Done()

    def irecv(self, t: torch.Tensor, src: int) -> _Done:
        _moved(t)
        return _Done()

    def all_reduce(self, t: torch.Tensor) -> None:
        _moved(t)

    def all_gather(self, bufs: list[torch.Tensor], piece: torch.Tensor) -> None:
        _moved(bufs, piece)

    def reduce_scatter(self, out: torch.Tensor, ins: list[torch.Tensor]) -> None:
        _moved(ins, out)

    def all_gather_into(self, out: torch.Tensor, piece: torch.Tensor) -> None:
        _moved(out, piece)


def meta_weights(cfg: RunConfig) -> dict[str, torch.Tensor]:
    """Full float64 weights of the right shapes, with no storage behind them."""
    spec = cfg.spec
    out: dict[str, torch.Tensor] = {}
    for l in range(spec.num_layers):
        n_out, n_in = spec.weight_shape(l)
        wname, bname = weight_names(l)
        out[wname] = torch.empty(n_out, n_in, dtype=torch.float64, device=META)
        if spec.bias:
            out[bname] = torch.empty(n_out, dtype=torch.float64, device=META)
    return out


@dataclass(frozen=True)
class MetaDataset(Dataset):
    """Row indices on the meta device too (a CPU run holds them on its device); which rows
    they name changes no shape, so none is computed (B may be far beyond this machine)."""

    def rows(self, step: int, batch_size: int, *, shuffle: bool, seed: int) -> torch.Tensor:
        return torch.empty(batch_size, dtype=torch.int64, device=META)


def meta_dataset(cfg: RunConfig) -> Dataset:
    """A dataset of B examples on the meta device: the runners read rows t·B…t·B+B−1 of it,
    so its length changes nothing but the (CPU) row indices, and no file is read."""
    B, d, q = cfg.train.batch_size, cfg.model.dims[0], cfg.model.dims[-1]
    X = torch.empty(B, d, dtype=torch.float64, device=META)
    if cfg.model.loss == "cross_entropy":
        y = torch.empty(B, dtype=torch.int64, device=META)
    else:
        y = torch.empty(B, q, dtype=torch.float64, device=META)
    return MetaDataset(X, y)


_MATMULS = {"mm", "addmm", "addmm_"}


class FlopCounter(TorchDispatchMode):
    """Matrix-product FLOPs of the ops run under it, 2·m·n·k per product (mm, addmm and the
    in-place addmm_ that accumulates a weight gradient, which torch's FlopCounterMode
    misses): what the closed form `costs.rank_flops` counts, counted from the real runner."""

    def __init__(self) -> None:
        super().__init__()
        self.flops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        name = func.overloadpacket.__name__
        if name in _MATMULS:
            a, b = (args[0], args[1]) if name == "mm" else (args[1], args[2])
            self.flops += 2 * a.shape[0] * a.shape[1] * b.shape[1]
        return func(*args, **(kwargs or {}))


@dataclass
class DryRank:
    """What one dry-run rank reports: `ranks[].comm` and `ranks[].memory` of result.json."""

    rank: int
    comm: dict[str, Any]
    memory: dict[str, Any]
    in_flight_max: int
    count: int = 1  # ranks this one stands for (identical plans)
    same_as: list[int] | None = None
    flops: int = 0  # matrix-product FLOPs of the measured step, counted (FlopCounter)


def signature(cfg: RunConfig, rank: int) -> Any:
    """Ranks with equal signatures run the same plan on the same shapes: one dry run serves.

    Rank 0 is always its own (it contributes the loss, owns the biases of row-parallel
    layers and returns the replicas). Unknown strategies: every rank its own.
    """
    name, P = cfg.strategy.name, cfg.world_size
    if name == "single" or rank == 0:
        return ("rank", rank)
    if name == "data":
        return ("rows", data_rows(cfg.train.batch_size, P, rank))
    if name == "tensor":
        shards = plan_layers(cfg.strategy.layout, cfg.model.dims, P, rank)
        return ("shards", tuple((s.kind, width(s.rows) if s.rows else None,
                                 width(s.cols) if s.cols else None, s.bias_owner, s.primary)
                                for s in shards))
    if name == "hybrid":
        return hybrid_signature(cfg, rank)
    return ("rank", rank)


def hybrid_signature(cfg: RunConfig, rank: int) -> Any:
    """A mesh rank is its pipeline coordinate, its stages' shard shapes, its replica's row
    count, and whether it is the one of its dp / tp group that counts s and the loss (a
    1024-rank mesh of dp=8 × pp=8 × tp=16 has a few dozen distinct ranks); with dp_shard
    also how many real elements (and of them W's) its dp piece of each shard holds."""
    from partition.plans.mesh import dp_flat_shards, replica_rows, stage_shards
    from partition.plans.stages import plan_stages
    from partition.strategies.hybrid import config_mesh

    mesh = config_mesh(cfg)
    c = mesh.coords(rank)
    stages = plan_stages(cfg.spec, mesh.pp, cfg.strategy.balance)
    plans = [stage_shards(cfg.strategy.layout, cfg.model.dims, start, end, tp=mesh.tp,
                          rank=c.tp) for start, end in stages]
    shards = tuple(
        (s.kind, width(s.rows) if s.rows else None, width(s.cols) if s.cols else None,
         s.bias_owner, s.primary)
        for plan in plans for s in plan)
    pieces = tuple((f.valid(c.dp), f.weight_valid(c.dp)) for plan in plans
                   for f in dp_flat_shards(cfg.spec, plan, dp=mesh.dp)
                   ) if cfg.strategy.dp_shard else None
    return ("mesh", c.pp, shards, width(replica_rows(cfg.train.batch_size, mesh, rank)),
            c.dp == 0, c.tp == 0, pieces)


def dry_rank(cfg: RunConfig, rank: int) -> DryRank:
    """Run rank `rank`'s runner on the meta device for the steps a run measures."""
    P = cfg.ranks
    topo = Topology(rank, P, rank, META, "none" if P == 1 else "dry")
    ledger = Ledger()
    comm = None if cfg.strategy.name == "single" else Comm(
        rank=rank, world_size=P, ledger=ledger, device=META, transport=DryTransport())
    runner = build_runner(cfg, topo, comm, meta_dataset(cfg), meta_weights(cfg))
    probe = MemoryProbe(META, rank=rank, limit=None, enabled=True)
    # The last step is measured, as in a real run: by then the optimizer state exists.
    steps = min(cfg.train.steps, 2)
    mem, in_flight = None, 0
    counter = FlopCounter()
    for step in range(steps):
        ledger.step = step
        with probe.measure(runner, TRAINING, record=step == steps - 1, enforce=False) as m:
            if step == steps - 1:
                with counter:
                    out = runner.step(step, want_grads=False)
            else:
                out = runner.step(step, want_grads=False)
        ledger.step = None
        mem, in_flight = m, max(in_flight, out.in_flight_max)
    from partition.train import measure_prediction

    pmem = measure_prediction(probe, runner, steps - 1, alone=comm is None)
    summary = ledger.step_summary(steps - 1)
    summary["seconds"] = 0.0
    return DryRank(rank, summary, memory_record(mem, pmem, runner.state_bytes()), in_flight,
                   flops=counter.flops)


def dry_run(cfg: RunConfig, *, progress: Callable[[str], None] | None = None) -> list[DryRank]:
    """Every rank's DryRank, running each distinct plan once."""
    done: dict[Any, DryRank] = {}
    out: list[DryRank] = []
    t0 = time.perf_counter()
    for r in range(cfg.ranks):
        key = signature(cfg, r)
        if key not in done:
            done[key] = dry_rank(cfg, r)
            if progress is not None and time.perf_counter() - t0 > 2.0:
                progress(f"dry run: {len(done)} distinct ranks so far ({r + 1}/{cfg.ranks})")
        base = done[key]
        out.append(DryRank(r, base.comm, base.memory, base.in_flight_max,
                           same_as=None if base.rank == r else [base.rank], flops=base.flops))
    counts: dict[int, int] = {}
    for d in out:
        src = d.same_as[0] if d.same_as else d.rank
        counts[src] = counts.get(src, 0) + 1
    for d in out:
        if not d.same_as:
            d.count = counts[d.rank]
    return out

