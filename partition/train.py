"""The step loop of one rank: timing, checks, and the rank's record for result.json."""

from __future__ import annotations

import math
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from partition.comm import Comm, Ledger
from partition.config import FaultConfig, RunConfig
from partition.data import Dataset, load_dataset
from partition.model import Grads, Layer, weight_names
from partition.reference import reference_grads
from partition.strategies import build_runner
from partition.strategies.base import Runner, saved_layers
from partition.topology import Topology
from partition.weights import Shard, initial_weights, layer_shards


class Diverged(RuntimeError):
    """J stopped being finite: the run ends with status `diverged`."""

    def __init__(self, step: int, value: float) -> None:
        self.step, self.value = step, value
        super().__init__(f"J is {value} at step {step}")


class InjectedFault(RuntimeError):
    """Raised by fault.kind=raise, to show (and test) how a failing rank is reported."""


@dataclass
class RankRecord:
    """What one rank hands back to the launcher; the launcher writes result.json."""

    rank: int
    device: str
    backend: str
    objective: list[float] = field(default_factory=list)  # J per step
    data_loss: list[float] = field(default_factory=list)  # L per step
    accuracy: list[float | None] = field(default_factory=list)
    step_s: list[float] = field(default_factory=list)
    compute_s: list[float] = field(default_factory=list)
    comm_s: list[float] = field(default_factory=list)
    comm: dict[str, Any] = field(default_factory=dict)  # one steady-state step's ledger summary
    comm_steps_equal: bool = True  # every steady step moved the same bytes
    memory: dict[str, Any] = field(default_factory=dict)
    in_flight_max: int = 0
    grad_rel_err: float | None = None
    shards: list[Shard] = field(default_factory=list)
    status: str = "ok"
    stopped_at: int | None = None


def inject_fault(fault: FaultConfig, rank: int, step: int) -> None:
    if not fault.enabled or fault.rank != rank or fault.step != step:
        return
    if fault.kind == "raise":
        raise InjectedFault(f"fault injected on rank {rank} at step {step}")
    if fault.kind == "exit":
        os._exit(3)
    if fault.kind == "hang":
        while True:  # the peers' process-group timeout must catch this
            time.sleep(3600)


def grad_rel_err(layers: list[Layer], grads: list[Grads], ref: dict[str, torch.Tensor]) -> float:
    """Largest ‖g − g_ref‖ / ‖g_ref‖ over the tensors (or shards) this rank holds."""
    worst = 0.0
    for layer, g in zip(layers, grads):
        wname, bname = weight_names(layer.index)
        r = slice(*layer.rows) if layer.rows else slice(None)
        c = slice(*layer.cols) if layer.cols else slice(None)
        pairs = [(g.W, ref[wname][r, c])]
        if g.b is not None and layer.bias_owner:
            pairs.append((g.b, ref[bname][r]))
        for mine, want in pairs:
            num = float((mine.double().cpu() - want).norm())
            den = float(want.norm())
            worst = max(worst, num / den if den > 0 else num)
    return worst


def _steady(values: list[float], warmup: int) -> list[float]:
    return values[warmup:] if len(values) > warmup else values


def run_rank(cfg: RunConfig, topo: Topology, comm: Comm | None, ledger: Ledger, *,
             data: Dataset | None = None,
             on_step: Callable[[int], None] | None = None) -> RankRecord:
    """Train for cfg.train.steps on this rank and return its record.

    `on_step(step)` is called as each step starts (the launcher's step watchdog).
    """
    spec = cfg.spec
    data = data if data is not None else load_dataset(cfg.data, spec, seed=cfg.seed)
    full = initial_weights(spec, init=cfg.model.init, init_path=cfg.model.init_path, seed=cfg.seed)
    runner: Runner = build_runner(cfg, topo, comm, data, full)
    rec = RankRecord(rank=topo.rank, device=str(topo.device), backend=topo.backend)
    t = cfg.train
    check = t.grad_check
    for step in range(t.steps):
        if on_step is not None:
            on_step(step)
        inject_fault(cfg.fault, topo.rank, step)
        ledger.step = step
        if topo.device.type == "cuda":
            torch.cuda.synchronize(topo.device)
        t0 = time.perf_counter()
        out = runner.step(step, want_grads=check and step == 0)
        if topo.device.type == "cuda":
            torch.cuda.synchronize(topo.device)
        dt = time.perf_counter() - t0
        ledger.step = None
        rec.objective.append(out.objective)
        rec.data_loss.append(out.data_loss)
        rec.accuracy.append(None if out.correct is None else out.correct / t.batch_size)
        rec.step_s.append(dt)
        rec.comm_s.append(ledger.seconds(step))
        rec.compute_s.append(out.compute_s)
        rec.in_flight_max = max(rec.in_flight_max, out.in_flight_max)
        if out.grads is not None:
            X, y = data.batch(0, t.batch_size, shuffle=cfg.data.shuffle, seed=cfg.seed,
                              dtype=torch.float64)
            _, ref = reference_grads(spec, full, X, y)
            rec.grad_rel_err = grad_rel_err(runner.layers, out.grads, ref)
        if not math.isfinite(out.objective):
            # Every rank sees the same reduced J, so all stop at the same step.
            rec.status, rec.stopped_at = "diverged", step
            break

    steady = list(range(len(rec.step_s)))[t.warmup_steps:] or list(range(len(rec.step_s)))
    summaries = [ledger.step_summary(s) for s in steady]
    rec.comm = summaries[-1]
    keys = ("sent_bytes", "recv_bytes", "collective_bytes", "wire_bytes", "messages", "by_role")
    rec.comm_steps_equal = all(all(s[k] == summaries[0][k] for k in keys) for s in summaries)
    rec.comm["seconds"] = statistics.median(rec.comm_s[i] for i in steady)
    rec.memory = {**runner.state_bytes(), "peak_bytes": None, "predict_peak_bytes": None,
                  "activations_bytes": None}
    rec.shards = layer_shards(saved_layers(runner))
    return rec
