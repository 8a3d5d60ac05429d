"""The explicit engine against PyTorch's own, strategy by strategy (`python -m experiments.bench`).

For each case both engines train the same net on the same data on P ranks:

- one *measuring* run each through `train.run_rank`, exactly as `experiments.run` does
  (ledger or dispatch-mode observer for the bytes, the memory probe where there is one);
- then timing runs, alternating explicit and torch (A B A B …) so that drift on a
  shared machine hits both alike. A timing run is `train.run_rank`'s loop (the same
  clock around `runner.step`, per step the slowest rank, the median over the steps
  after warm-up) with the measuring instruments off: the torch engines' observer
  costs a Python call per aten op, which is not torch's cost.

The ranks are started once for the whole benchmark (torch's elastic launcher, as for
a run); every run builds its runner afresh from the same initial weights. Rank 0 prints
a progress line per case and per timed pair. Bytes are per device: the most any one
rank sends or hands to collectives per step (the J reduction apart), as everywhere.
"""

from __future__ import annotations

import contextlib
import copy
import datetime
import gc
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from partition.boundaries import NOT_TRAINING, device_bytes
from partition.comm import Comm, Ledger
from partition.config import RunConfig, parse_config
from partition.data import load_dataset
from partition.results import atomic_write
from partition.strategies import build_runner
from partition.topology import Topology, destroy, from_env, init_process_group, rank_threads
from partition.trace import Tracer
from partition.train import RankRecord, attach_tracer, run_rank
from partition.weights import initial_weights

ENGINES = ("explicit", "torch")
# Roles that are not the strategy's training traffic: the J reduction, torch's one-off votes.
NON_PAYLOAD = NOT_TRAINING
# Fewer timed pairs than this give a median and a range that mean little on a shared machine.
MIN_PAIRS = 5


@dataclass(frozen=True)
class Case:
    label: str
    overrides: dict[str, Any]  # dotted keys onto the base config


DEFAULT_CASES = (
    Case("pipeline gpipe", {"strategy.name": "pipeline", "strategy.schedule": "gpipe",
                            "train.microbatches": 4}),
    Case("pipeline 1f1b", {"strategy.name": "pipeline", "strategy.schedule": "1f1b",
                           "train.microbatches": 4}),
    Case("tensor", {"strategy.name": "tensor"}),
    Case("data", {"strategy.name": "data"}),
)


def with_overrides(base: dict[str, Any], dotted: dict[str, Any]) -> dict[str, Any]:
    d = copy.deepcopy(base)
    for key, value in dotted.items():
        node = d
        parts = key.split(".")
        for p in parts[:-1]:
            if not isinstance(node.get(p), dict):
                node[p] = {"name": node[p]} if isinstance(node.get(p), str) else {}
            node = node[p]
        node[parts[-1]] = value
    return d


def case_configs(base: dict[str, Any], case: Case) -> dict[str, RunConfig]:
    return {e: parse_config(with_overrides(base, {**case.overrides, "engine": e}))
            for e in ENGINES}


# ---------------------------------------------------------------- on every rank


def _not_implemented(e: Exception) -> bool:
    return isinstance(e, (ValueError, NotImplementedError)) and "not implemented" in str(e)


def timed_run(cfg: RunConfig, topo: Topology, comm: Comm, data: Any,
              full: dict[str, torch.Tensor], *,
              tracer: Tracer | None = None) -> tuple[list[float], list[float]]:
    """Wall and CPU seconds per step on this rank: run_rank's loop and clock, instruments off.

    CPU time (this process, all its threads — gloo's included) does not count time spent
    waiting, so it shows each engine's own work even when other jobs share the cores.
    With `tracer`, the runner and `comm` record spans through it as in run_rank (the
    trace's cost, `partition.bench_timeline`); without, nothing records them.
    """
    runner = build_runner(cfg, topo, comm, data, full)
    if hasattr(runner, "observe"):
        runner.observe = False  # torch engines: no dispatch-mode observer while timing
    attach_tracer(runner, comm, tracer)  # None: no spans (and no stale tracer on `comm`)
    wall, cpu = [], []
    for step in range(cfg.train.steps):
        comm.ledger.step = step
        if topo.device.type == "cuda":
            torch.cuda.synchronize(topo.device)
        if tracer is not None:
            tracer.begin(step)
        c0, t0 = time.process_time(), time.perf_counter()
        runner.step(step, want_grads=False)
        if topo.device.type == "cuda":
            torch.cuda.synchronize(topo.device)
        t1 = time.perf_counter()
        wall.append(t1 - t0)
        cpu.append(time.process_time() - c0)
        if tracer is not None:
            tracer.add("step", "compute", t0, t1)
            tracer.step = None
        comm.ledger.step = None
    comm.ledger.records.clear()
    comm.tracer = None
    return wall, cpu


def fresh_comm(topo: Topology) -> tuple[Comm, Ledger]:
    ledger = Ledger()
    return Comm(rank=topo.rank, world_size=topo.world_size, ledger=ledger,
                device=topo.device), ledger


def say(topo: Topology, line: str) -> None:
    if topo.rank == 0:
        print(f"[bench] {line}", flush=True)


def bench_case(cfgs: dict[str, RunConfig], topo: Topology, *, pairs: int,
               warmup_pairs: int, label: str = "", where: str = "") -> dict[str, Any]:
    """One case on this rank: a measuring run per engine, then the alternating timing runs."""
    cfg0 = cfgs["explicit"]
    with rank_threads(cfg0.threads_per_rank, topo.device):
        return _bench_case(cfgs, topo, pairs=pairs, warmup_pairs=warmup_pairs,
                           label=label, where=where)


def _bench_case(cfgs: dict[str, RunConfig], topo: Topology, *, pairs: int,
                warmup_pairs: int, label: str, where: str) -> dict[str, Any]:
    cfg0 = cfgs["explicit"]
    t_start = time.monotonic()
    say(topo, f"{where}{label}: measuring bytes and memory (one run per engine)")
    data = load_dataset(cfg0.data, cfg0.spec, seed=cfg0.seed)
    full = initial_weights(cfg0.spec, init=cfg0.model.init, init_path=cfg0.model.init_path,
                           seed=cfg0.seed)
    measured: dict[str, RankRecord] = {}
    for e in ENGINES:
        comm, ledger = fresh_comm(topo)
        try:
            measured[e] = run_rank(cfgs[e], topo, comm, ledger, data=data)
        except Exception as exc:  # every rank raises the same, before any crossing
            if _not_implemented(exc):
                return {"skip": f"{e} engine: {exc}"}
            raise
    times: dict[str, list[list[float]]] = {e: [] for e in ENGINES}
    cpu: dict[str, list[list[float]]] = {e: [] for e in ENGINES}
    comm, _ = fresh_comm(topo)
    for i in range(warmup_pairs + pairs):
        what = (f"warm-up pair {i + 1}/{warmup_pairs}" if i < warmup_pairs
                else f"timed pair {i - warmup_pairs + 1}/{pairs}")
        say(topo, f"{where}{label}: {what} (explicit, torch) | "
                   f"{time.monotonic() - t_start:.0f} s in this case")
        for e in ENGINES:
            gc.collect()
            comm.barrier()  # both ranks start each run together
            w, c = timed_run(cfgs[e], topo, comm, data, full)
            times[e].append(w)
            cpu[e].append(c)
    return {"measured": measured, "times": times, "cpu": cpu}


@contextlib.contextmanager
def rank_world(base: dict[str, Any]) -> Iterator[Topology]:
    """This spawned rank's topology, inside the process group for the whole benchmark."""
    topo = from_env(base.get("device", "cpu"))
    init_process_group(topo, timeout_s=float(base.get("timeout_s", 60)))
    try:
        yield topo
    finally:
        destroy()


def bench_rank(base: dict[str, Any], cases: list[Case], pairs: int,
               warmup_pairs: int) -> dict[str, Any]:
    """Entry point of a spawned rank."""
    with rank_world(base) as topo:
        return {c.label: bench_case(case_configs(base, c), topo, pairs=pairs,
                                    warmup_pairs=warmup_pairs, label=c.label,
                                    where=f"case {i + 1}/{len(cases)} ")
                for i, c in enumerate(cases)}


# ---------------------------------------------------------------- summarising


@dataclass
class Row:
    label: str
    skip: str | None = None
    explicit_s: float | None = None  # median step time over the timing runs
    torch_s: float | None = None
    ratios: list[float] = field(default_factory=list)  # explicit ÷ torch, one per pair
    cpu_s: dict[str, float] = field(default_factory=dict)  # CPU s per step, all ranks together
    cpu_ratios: list[float] = field(default_factory=list)
    payload: dict[str, int] = field(default_factory=dict)  # training bytes per step per device
    other_bytes: dict[str, int] = field(default_factory=dict)  # metric + metadata, per device
    peak: dict[str, int | None] = field(default_factory=dict)  # largest rank's peak, bytes
    losses_agree: bool | None = None

    @property
    def ratio(self) -> tuple[float, float, float] | None:
        return spread(self.ratios)

    @property
    def cpu_ratio(self) -> tuple[float, float, float] | None:
        return spread(self.cpu_ratios)


def spread(xs: list[float]) -> tuple[float, float, float] | None:
    """Median, min and max of xs (None for none)."""
    return (statistics.median(xs), min(xs), max(xs)) if xs else None


def run_step_time(per_rank: list[list[float]], warmup_steps: int, *, combine=max) -> float:  # noqa: ANN001
    """A run's step time as result.json has it: per step the slowest rank (`combine`=max),
    median after warm-up. CPU time adds the ranks up instead (`combine`=sum)."""
    steps = [combine(ts) for ts in zip(*per_rank, strict=True)]
    steady = steps[warmup_steps:] if len(steps) > warmup_steps else steps
    return statistics.median(steady)


def summarize_case(label: str, by_rank: list[dict[str, Any]], *, warmup_steps: int,
                   warmup_pairs: int) -> Row:
    if "skip" in by_rank[0]:
        return Row(label, skip=by_rank[0]["skip"])
    row = Row(label)
    med: dict[str, list[float]] = {}
    cpu: dict[str, list[float]] = {}
    for e in ENGINES:
        # per run: every rank's step times
        runs = zip(*(r["times"][e] for r in by_rank), strict=True)
        med[e] = [run_step_time(list(per_rank), warmup_steps) for per_rank in runs][warmup_pairs:]
        runs = zip(*(r["cpu"][e] for r in by_rank), strict=True)
        cpu[e] = [run_step_time(list(per_rank), warmup_steps, combine=sum)
                  for per_rank in runs][warmup_pairs:]
        row.cpu_s[e] = statistics.median(cpu[e])
        recs: list[RankRecord] = [r["measured"][e] for r in by_rank]
        # Per device: the rank that moves the most (as in result.json and the report).
        moved = [device_bytes(rec.comm) for rec in recs]
        row.payload[e] = max((t or 0 for t, _ in moved), default=0)
        row.other_bytes[e] = max((m for _, m in moved), default=0)
        peaks = [rec.memory.get("peak_bytes") for rec in recs]
        row.peak[e] = None if any(p is None for p in peaks) else max(peaks)
    row.explicit_s = statistics.median(med["explicit"])
    row.torch_s = statistics.median(med["torch"])
    row.ratios = [a / b for a, b in zip(med["explicit"], med["torch"], strict=True)]
    row.cpu_ratios = [a / b for a, b in zip(cpu["explicit"], cpu["torch"], strict=True)]
    le = by_rank[0]["measured"]["explicit"].objective
    lt = by_rank[0]["measured"]["torch"].objective
    row.losses_agree = all(abs(a - b) <= 1e-4 * max(1.0, abs(a))
                           for a, b in zip(le, lt, strict=True))
    return row


# ---------------------------------------------------------------- the whole benchmark


def spawn(entry: Callable[..., Any], args: tuple[Any, ...], *, nprocs: int) -> list[Any]:
    """Start nprocs ranks of entry(*args) once (the same loopback launcher as every run);
    their return values by rank."""
    from partition.launch import launch_local

    with tempfile.TemporaryDirectory(prefix="partition-bench-") as logs:
        return launch_local(entry, args, nprocs=nprocs, log_dir=logs, timeout_s=60,
                            redirect=False)


def spawn_bench(base: dict[str, Any], cases: list[Case], *, pairs: int,
                warmup_pairs: int) -> list[dict[str, Any]]:
    return spawn(bench_rank, (base, cases, pairs, warmup_pairs), nprocs=int(base["world_size"]))


def run_bench(base: dict[str, Any], cases: list[Case] | None = None, *, pairs: int = 10,
              warmup_pairs: int = 1) -> tuple[list[Row], dict[str, Any]]:
    if pairs < 1:
        raise ValueError(f"pairs must be >= 1, got {pairs}")
    if warmup_pairs < 0:
        raise ValueError(f"warmup_pairs must be >= 0, got {warmup_pairs}")
    cases = list(cases or DEFAULT_CASES)
    for c in cases:  # bad settings fail here, before any rank starts
        case_configs(base, c)
    load_before = os.getloadavg()
    t0 = time.time()
    by_rank = spawn_bench(base, cases, pairs=pairs, warmup_pairs=warmup_pairs)
    warm = int(base["train"]["warmup_steps"])
    rows = [summarize_case(c.label, [r[c.label] for r in by_rank], warmup_steps=warm,
                           warmup_pairs=warmup_pairs) for c in cases]
    info = machine() | {"load_before": load_before, "load_after": os.getloadavg(),
                        "seconds": time.time() - t0, "pairs": pairs,
                        "warmup_pairs": warmup_pairs}
    return rows, info


def machine() -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "cores_usable": usable_cores(),
            "os": platform.platform(),
            "python": platform.python_version(), "torch": torch.__version__,
            "host": platform.node(),
            "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds")}


def usable_cores() -> int:
    """Cores this process may run on (its affinity where the system says): ranks beyond
    them share cores."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


# ---------------------------------------------------------------- the table


def _mib(n: int | None) -> str:
    return "n/a" if n is None else f"{n / 2**20:.2f} MiB"


TABLE_TITLE = "Step time, bytes and peak memory per device: explicit engine vs torch's own"
CPU_TITLE = "CPU time per step (both ranks, waiting excluded): explicit engine vs torch's own"


def table(rows: list[Row]) -> str:
    head = ("| strategy | explicit ms/step | torch ms/step | explicit ÷ torch: median [min, max] "
            "| payload B/step/device explicit | torch | peak memory explicit | torch |")
    lines = [head, "|" + "---|" * 8]
    for r in rows:
        if r.skip:
            lines.append(f"| {r.label} | skipped: {r.skip} |" + " |" * 6)
            continue
        med, lo, hi = r.ratio or (float("nan"),) * 3
        pe, pt = r.payload["explicit"], r.payload["torch"]
        lines.append(
            f"| {r.label} | {r.explicit_s * 1e3:.2f} | {r.torch_s * 1e3:.2f} | "
            f"**{med:.2f}** [{lo:.2f}, {hi:.2f}] | {pe:,} | {pt:,} | "
            f"{_mib(r.peak['explicit'])} | {_mib(r.peak['torch'])} |")
    return "\n".join(lines)


def cpu_table(rows: list[Row]) -> str:
    """CPU time (both ranks, waiting excluded): each engine's own work, less hit by other jobs."""
    lines = ["| strategy | explicit CPU ms/step | torch CPU ms/step "
             "| explicit ÷ torch: median [min, max] |", "|---|---|---|---|"]
    for r in rows:
        if r.skip:
            continue
        med, lo, hi = r.cpu_ratio or (float("nan"),) * 3
        lines.append(f"| {r.label} | {r.cpu_s['explicit'] * 1e3:.2f} | "
                     f"{r.cpu_s['torch'] * 1e3:.2f} | **{med:.2f}** [{lo:.2f}, {hi:.2f}] |")
    return "\n".join(lines)


def settings_line(base: dict[str, Any], cases: list[Case]) -> str:
    t, m = base["train"], base["model"]
    return (f"P={base['world_size']} ranks on {base.get('device', 'cpu')}, "
            f"model.dims={list(m['dims'])}, {m['activation']}, {m['loss']}, λ={m['weight_decay']}, "
            f"B={t['batch_size']}, {t['dtype']}, {t['steps']} steps per run "
            f"(first {t['warmup_steps']} left out); micro-batches M: "
            + ", ".join(f"{c.label} {c.overrides.get('train.microbatches', t['microbatches'])}"
                        for c in cases))


def threads_text(base: dict[str, Any]) -> str:
    n = base.get("threads_per_rank")
    n = int(n or 1)
    return f"{n} intra-op thread{'s' if n > 1 else ''} per rank"


def markdown(rows: list[Row], info: dict[str, Any], base: dict[str, Any], cases: list[Case],
             command: str) -> str:
    notes = []
    for r in rows:
        if r.skip:
            continue
        extra = {e: r.other_bytes[e] for e in ENGINES}
        notes.append(f"- {r.label}: besides the payload, the J reduction (and torch's metadata) "
                     f"moved {extra['explicit']:,} B (explicit) and {extra['torch']:,} B (torch) "
                     f"per step per device; J agreed between the engines: {r.losses_agree}.")
    return "\n".join([
        f"## {ENGINES_TITLE}",
        "",
        *header_lines(info, command, note="(other work shared the cores: absolute times are "
                                           "noisy, the ratios of alternated runs less so)."),
        "",
        f"Settings: {settings_line(base, cases)}. {info['pairs']} timed pairs (A B A B …) after "
        f"{info['warmup_pairs']} warm-up pair(s); {threads_text(base)}.",
        "",
        f"### {TABLE_TITLE}",
        "",
        table(rows),
        "",
        f"### {CPU_TITLE}",
        "",
        "CPU time of the same timing runs (both ranks' processes, all their threads; time spent "
        "waiting does not count), which shows each engine's own work even on a busy machine:",
        "",
        cpu_table(rows),
        "",
        "Step time is the median over a run's steps of the slowest rank (as in result.json), "
        "then the median over runs; the ratio is per pair, then median, min and max over pairs. "
        "Payload is the training traffic per step of one device: the most any rank sends or hands "
        "to a collective (the J reduction apart, below), from the ledger for the explicit engine "
        "and the dispatch-mode observer for torch. Peak memory is the largest rank's, from the "
        "memory probe "
        "(n/a where it measured nothing). The torch engines are timed without the "
        "dispatch-mode observer that counts their bytes (a Python call per aten op, which is not "
        "torch's own cost); the explicit engine keeps its ledger, which is part of it.",
        "",
        *notes,
        "",
    ])


def header_lines(info: dict[str, Any], command: str, *, note: str) -> list[str]:
    """A section's command and date, then the machine and its load, and `note`: what the
    load means for the section's numbers."""
    return [
        f"`{command}` — {info['date']}",
        "",
        f"Machine: {info['cpu']}, {info['cores']} cores, {info['os']}; Python {info['python']}, "
        f"torch {info['torch']}. Load average before / after: "
        f"{', '.join(f'{x:.1f}' for x in info['load_before'])} / "
        f"{', '.join(f'{x:.1f}' for x in info['load_after'])} {note}",
    ]


# ---------------------------------------------------------------- docs/benchmarks.md

DOC_HEAD = ("# Benchmarks\n\nEach section below is written by `python -m experiments.bench "
            "--suite <name> --write` (`engines`, `timeline`, or `all` for both), which rewrites "
            "its own section and keeps the others; each says its command, date, machine and "
            "load.")
ENGINES_TITLE = "The explicit engine against PyTorch's own"
SECTIONS = ("engines", "timeline")  # the file's sections, in this order; each suite writes one


def _marks(name: str) -> tuple[str, str]:
    return f"<!-- bench:{name} -->", f"<!-- /bench:{name} -->"


def replace_section(doc: str, name: str, text: str) -> str:
    """`doc` with section `name` (between its two comment marks) replaced by `text`; a
    section the file lacks goes after those that come before it in SECTIONS (so that a
    rewritten suite keeps every other suite's section as it was)."""
    if name not in SECTIONS:
        raise ValueError(f"unknown benchmark section {name!r}: one of {', '.join(SECTIONS)}")
    begin, end = _marks(name)
    block = f"{begin}\n{text.strip()}\n{end}"
    if not doc.strip():
        return f"{DOC_HEAD}\n\n{block}\n"
    i, j = doc.find(begin), doc.find(end)
    if i >= 0 and j > i:
        return doc[:i] + block + doc[j + len(end):]
    if i >= 0 or j >= 0:
        raise ValueError(f"section {name!r} has only one of its marks {begin} {end}")
    # Before the first later section present, else at the end.
    later = [doc.find(_marks(n)[0]) for n in SECTIONS[SECTIONS.index(name) + 1:]]
    at = min((k for k in later if k >= 0), default=-1)
    if at < 0:
        return doc.rstrip("\n") + "\n\n" + block + "\n"
    return doc[:at] + block + "\n\n" + doc[at:]


def write_markdown(path: str, text: str, *, section: str = "engines") -> None:
    """Rewrite one section of the Markdown file at `path` (created if missing), atomically."""
    try:
        with open(path, encoding="utf-8") as fh:
            doc = fh.read()
    except FileNotFoundError:
        doc = ""
    out = replace_section(doc, section, text)
    atomic_write(path, lambda fh: fh.write(out.encode()))
