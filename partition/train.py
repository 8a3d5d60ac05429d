"""The step loop of one rank: timing, checks, and the rank's record for result.json."""

from __future__ import annotations

import contextlib
import math
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from partition.boundaries import p2p_sends
from partition.comm import Comm, Ledger
from partition.config import FaultConfig, RunConfig
from partition.data import Dataset, load_dataset
from partition.memory import PREDICTION, TRAINING, Measurement, MemoryProbe, memory_record
from partition.model import Grads, Layer, weight_names
from partition.reference import reference_grads
from partition.strategies import build_runner
from partition.strategies.base import Runner, saved_layers
from partition.topology import Topology, rank_threads
from partition.trace import Tracer, sampled_steps, traced_steps
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
    memory_steps_equal: bool = True  # every steady step reached the same peak
    calibration: dict[str, Any] | None = None  # cost.calibrate: this rank's micro-benchmark
    in_flight_max: int = 0
    spans: list[dict[str, Any]] = field(default_factory=list)  # trace.Tracer's, traced steps
    action_times: dict[str, float] | None = None  # calibrate.action_times, timed at start-up
    sampled_steps: list[int] = field(default_factory=list)  # steps timed for the simulator
    # per sampled step, per action key the seconds that step spent in it (Tracer.step_samples)
    step_action_s: list[dict[str, float]] | None = None
    # per sampled step, its collective calls (Tracer.step_collectives)
    step_collectives: list[list[list[Any]]] | None = None
    # per sampled step, its posted messages' events (Tracer.step_messages)
    step_messages: list[list[list[Any]]] | None = None
    step_starts: list[float] | None = None  # when it began each sampled step (perf_counter)
    clock: dict[str, Any] | None = None  # calibrate.clock_offset: this clock minus rank 0's
    sends: list[dict[str, Any]] = field(default_factory=list)  # one steady step's stage crossings
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


def _expected_peaks(cfg: RunConfig, topo: Topology) -> dict[str, int] | None:
    """The dry run's peaks for this rank, named in an out-of-memory message."""
    if cfg.memory_limit is None:
        return None
    from partition import costs

    try:
        c = costs.rank_cost(cfg, topo.rank, topo.device.type)
    except (KeyError, ValueError):
        return None
    return {TRAINING: c.train.peak_bytes, PREDICTION: c.predict.peak_bytes}


def measure_prediction(probe: MemoryProbe, runner: Runner, step: int, *,
                        alone: bool) -> Measurement | None:
    """One prediction forward, measured, after training.

    With exchange=False every rank runs its part alone, on a local input of the shape it
    would receive: the same buffers, and no traffic outside the steps (which the ledger
    and the c10d observer would otherwise see). A runner that cannot do that is left
    unmeasured when it has peers, rather than made to communicate here.
    """
    import inspect

    if "exchange" in inspect.signature(runner.predict).parameters:
        call = lambda: runner.predict(step, exchange=False)  # noqa: E731
    elif alone:
        call = lambda: runner.predict(step)  # noqa: E731
    else:
        return None
    # Not held to memory_limit: a full-batch prediction can need more than a micro-batched
    # training step, and this measurement must not end a run whose training fits.
    with probe.measure(runner, PREDICTION, exclude=("grads", "optimizer"),
                       enforce=False) as pmem:
        call()
    return pmem


def _steady(values: list[float], warmup: int) -> list[float]:
    return values[warmup:] if len(values) > warmup else values


def run_rank(cfg: RunConfig, topo: Topology, comm: Comm | None, ledger: Ledger, *,
             data: Dataset | None = None,
             on_step: Callable[[int], None] | None = None,
             run_dir: str | None = None) -> RankRecord:
    """Train for cfg.train.steps on this rank and return its record.

    `run_dir`: where `trace.profiler` writes torch.profiler's trace of the traced step.

    `on_step(step)` is called as each step starts (the launcher's step watchdog). The rank
    computes with `threads_per_rank` intra-op threads (1 on CPU by default), `single` too.
    """
    with rank_threads(cfg.threads_per_rank, topo.device):
        return _run_rank(cfg, topo, comm, ledger, data=data, on_step=on_step, run_dir=run_dir)


def _run_rank(cfg: RunConfig, topo: Topology, comm: Comm | None, ledger: Ledger, *,
              data: Dataset | None, on_step: Callable[[int], None] | None,
              run_dir: str | None) -> RankRecord:
    spec = cfg.spec
    data = data if data is not None else load_dataset(cfg.data, spec, seed=cfg.seed)
    full = initial_weights(spec, init=cfg.model.init, init_path=cfg.model.init_path, seed=cfg.seed)
    runner: Runner = build_runner(cfg, topo, comm, data, full)
    rec = RankRecord(rank=topo.rank, device=str(topo.device), backend=topo.backend)
    t = cfg.train
    # Memory is recorded on the first steady step and the last (every step when a limit
    # must be enforced on CPU): the other steps run unprobed, so the median step time
    # carries none of the probe's cost (about 20 µs per tensor op, see README).
    recorded = {min(t.warmup_steps, t.steps - 1), t.steps - 1}
    traced = traced_steps(cfg.trace.steps, steps=t.steps, warmup=t.warmup_steps, probed=recorded)
    tracer = Tracer(traced, sampled=sampled_steps(steps=t.steps, warmup=t.warmup_steps))
    attach_tracer(runner, comm, tracer)
    from partition.calibrate import action_times

    # The simulator's durations: each of this rank's actions timed at the run's shapes.
    rec.action_times = action_times(cfg, runner) if cfg.engine == "explicit" else None
    from partition.calibrate import clock_offset
    from partition.engines.profiled import clock_reads

    local = int(os.environ.get("LOCAL_WORLD_SIZE", topo.world_size))
    rec.clock = clock_offset(comm, same_host=local == topo.world_size)
    check = t.grad_check
    if cfg.cost.calibrate:
        from partition.calibrate import calibrate

        rec.calibration = calibrate(comm, topo.device, getattr(torch, t.dtype))
    probe = MemoryProbe(topo.device, rank=topo.rank, limit=cfg.memory_limit,
                        enabled=cfg.memory_probe, expected=_expected_peaks(cfg, topo))
    mems: list[Measurement | None] = []
    if (cfg.trace.profiler or hasattr(runner, "profiled_spans")) and tracer.steps != set():
        # torch.profiler's first start in a process takes seconds (Kineto's set-up): pay it
        # here, not between two steps, where the other ranks would wait through it.
        with torch_profiler(topo):
            pass
    for step in range(t.steps):
        if on_step is not None:
            on_step(step)
        inject_fault(cfg.fault, topo.rank, step)
        ledger.step = step
        if topo.device.type == "cuda":
            torch.cuda.synchronize(topo.device)
        tracer.begin(step)
        exporting = cfg.trace.profiler and run_dir is not None and tracer.on
        # engine=torch: the traced step's spans come from torch.profiler (engines/profiled.py).
        from_profiler = tracer.on and hasattr(runner, "profiled_spans")
        profiling = exporting or from_profiler
        # The profiler starts before the step's clock and stops after it: its own start-up
        # is no part of the step time.
        with torch_profiler(topo) if profiling else contextlib.nullcontext() as prof:
            reads = clock_reads() if from_profiler else []
            t0 = time.perf_counter()
            with probe.measure(runner, TRAINING, record=step in recorded) as mem:
                out = runner.step(step, want_grads=check and step == 0)
            if topo.device.type == "cuda":
                torch.cuda.synchronize(topo.device)
            t1 = time.perf_counter()
        if from_profiler:
            spans, clock = runner.profiled_spans(prof.events(), reads)
            for name, tid, a, b, args in spans:
                tracer.add(name, tid, a, b, **args)
            rec.clock = {**(rec.clock or {}), "profiler": clock}
        tracer.add("step", "compute", t0, t1)
        step_compute = tracer.compute_s
        tracer.step = None
        if exporting:
            prof.export_chrome_trace(os.path.join(run_dir, f"profiler_rank{topo.rank}.json"))
        dt = t1 - t0
        ledger.step = None
        mems.append(mem)
        rec.objective.append(out.objective)
        rec.data_loss.append(out.data_loss)
        rec.accuracy.append(None if out.correct is None else out.correct / t.batch_size)
        rec.step_s.append(dt)
        rec.comm_s.append(ledger.seconds(step))
        # One definition of compute time: the step's compute spans (each action, each layer's
        # forward and backward, the update); the torch engines report their own.
        rec.compute_s.append(out.compute_s if out.compute_s is not None else step_compute)
        rec.in_flight_max = max(rec.in_flight_max, out.in_flight_max)
        if out.grads is not None:
            X, y = data.batch(0, t.batch_size, shuffle=cfg.data.shuffle, seed=cfg.seed,
                              dtype=torch.float64)
            _, ref = reference_grads(spec, full, X, y)
            if not out.grads_have_decay:  # AdamW: compare the data term, λW is the optimizer's
                ref = {k: v - spec.weight_decay * full[k] if k.startswith("W") else v
                       for k, v in ref.items()}
            rec.grad_rel_err = grad_rel_err(runner.layers, out.grads, ref)
        if not math.isfinite(out.objective):
            # Every rank sees the same reduced J, so all stop at the same step.
            rec.status, rec.stopped_at = "diverged", step
            break

    steady = list(range(len(rec.step_s)))[t.warmup_steps:] or list(range(len(rec.step_s)))
    summaries = [ledger.step_summary(s) for s in steady]
    rec.comm = summaries[-1]
    rec.sends = p2p_sends(ledger.step_records(steady[-1]))  # result.json's boundaries[]
    keys = ("sent_bytes", "recv_bytes", "collective_bytes", "wire_bytes", "messages", "by_role")
    rec.comm_steps_equal = all(all(s.get(k) == summaries[0].get(k) for k in keys + ("by_dim",))
                               for s in summaries)
    rec.comm["seconds"] = statistics.median(rec.comm_s[i] for i in steady)
    pmem = measure_prediction(probe, runner, len(rec.step_s) - 1, alone=comm is None)
    measured = [mems[i] for i in steady if mems[i] is not None] or [
        m for m in mems if m is not None]
    rec.memory = memory_record(measured[-1] if measured else None, pmem, runner.state_bytes())
    rec.memory_steps_equal = len({m.peak_bytes for m in measured}) <= 1
    rec.shards = layer_shards(saved_layers(runner))
    rec.spans = tracer.spans
    rec.sampled_steps = tracer.sampled_steps()
    rec.step_action_s = tracer.step_samples()
    rec.step_collectives = tracer.step_collectives()
    rec.step_messages = tracer.step_messages()
    rec.step_starts = tracer.step_starts()
    return rec


def torch_profiler(topo: Topology):  # noqa: ANN201 - torch.profiler.profile
    """torch.profiler over one step: CPU ops, and CUDA kernels on a GPU."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if topo.device.type == "cuda" else [])
    return profile(activities=acts)


def attach_tracer(runner: Runner, comm: Comm | None, tracer: Tracer) -> None:
    """Hand the tracer to whatever records spans: the runner, its stages, its Comm."""
    if comm is not None:
        comm.tracer = tracer
    if hasattr(runner, "tracer"):
        runner.tracer = tracer
