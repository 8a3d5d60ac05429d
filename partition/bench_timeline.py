"""The simulator against the measured timeline, the trace's own cost, and how fast the dry run
predicts (`python -m experiments.bench --suite timeline`).

Four measurements, each against its target, with the engine comparison's machinery
(`partition.bench`: the ranks started once, alternated runs, the machine and its load,
the Markdown section):

- **step time**: per case (every strategy, every named pipeline schedule that runs at
  this P) `runs` runs through `train.run_rank`, as `experiments.run` trains, each made
  into its result.json by `results.build_result` in this process; per run the simulated
  step (`predicted.step_time_s`, the simulator on that run's calibration) against the
  measured (`train.step_time_s.median`); the error per run, then its median over the runs
  (target: within 15 %);
- **idle fraction per rank**: the same runs, the traced step's measured idle fraction
  (`ranks[].timing.idle_fraction`) against that step's replay
  (`predicted.sampled_steps[]`, the entry of `ranks[].timing.traced_step`) (target: within
  0.05 absolute);
- **the trace's cost**: timing runs (run_rank's loop and clock, as the engine comparison
  times) alternated over four settings — no tracer at all, `trace.steps=[]` (the setting
  that turns tracing off: every action is still clocked for compute_s, no span is kept),
  the default `trace.steps=last`, and `trace.steps=all` — per round each run's step time,
  then the median over rounds of the ratios (target: a traced step costs < 2 %);
- **experiments.predict's wall time**: the command as a user runs it (a fresh
  interpreter, imports included), at P = 8 (target < 3 s) and P = 1024 (< 30 s).

A net with fewer layers than a schedule's stages (P × stages per rank) runs with its first
hidden layer repeated until every stage has one, and says so in its label.
"""

from __future__ import annotations

import gc
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field, replace
from typing import Any

from partition.bench import (
    Case,
    _not_implemented,
    fresh_comm,
    header_lines,
    machine,
    rank_world,
    run_step_time,
    say,
    settings_line,
    spawn,
    spread,
    threads_text,
    timed_run,
    with_overrides,
)
from partition.config import ConfigError, RunConfig, TraceConfig, parse_config
from partition.trace import Tracer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

STEP_TARGET = 0.15  # |simulated ÷ measured − 1| of the step time
IDLE_TARGET = 0.05  # |simulated − measured| idle fraction, per rank
TRACE_TARGET = 0.02  # a traced step's extra time ÷ an untraced step's
MIN_RUNS = 3  # a median over fewer runs is no median
TIMELINE_TITLE = "Where the time goes: the simulator against the measured timeline"
STEP_TITLE = "Simulated vs measured step time"
IDLE_TITLE = "Simulated vs measured idle fraction per rank"
TRACE_TITLE = "The trace's own cost"
PREDICT_TITLE = "How long experiments.predict takes"
# What the suite sets before the user's overrides: the issue's condition (the seed at
# B = 1024) and α, β measured at start-up, so the simulator has the run's own links.
DEFAULT_OVERRIDES = ("train.batch_size=1024", "cost.calibrate=true")

_PIPE = {"strategy.name": "pipeline", "train.microbatches": 4}
TIMELINE_CASES = (
    *(Case(f"pipeline {s}", {**_PIPE, "strategy.schedule": s})
      for s in ("gpipe", "1f1b", "interleaved_1f1b", "looped_bfs", "zb1p", "zbv", "dualpipev")),
    Case("tensor", {"strategy.name": "tensor"}),
    Case("data", {"strategy.name": "data"}),
    Case("fsdp", {"strategy.name": "fsdp"}),
    # pipeline stages over the mesh runtime (at P=4 a dp=2 × pp=2 mesh)
    Case("hybrid pp=2", {"strategy.name": "hybrid", "strategy.pp": 2, "train.microbatches": 4}),
)

# The trace settings timed against each other, in the order each round runs them.
TRACE_VARIANTS = ("none", "off", "last", "all", "alternate")
OWN = "own"  # per round, the `all` run's tracer's own seconds per step (`ClockedTracer`)
VARIANT_TEXT = {"none": "no tracer", "off": "trace.steps=[]", "last": "trace.steps=last",
                "all": "trace.steps=all", "alternate": "every other steady step traced"}


def alternate_steps(steps: int, warmup: int) -> tuple[int, ...]:
    """Every other steady step, from the second: traced and untraced steps interleave in one
    run, so that drift on a shared machine hits both alike."""
    return tuple(range(warmup + 1, steps, 2))


def trace_setting(variant: str, *, steps: int, warmup: int) -> str | tuple[int, ...]:
    """`trace.steps` of a variant (not "none", which has no tracer at all)."""
    return {"off": (), "last": "last", "all": "all",
            "alternate": alternate_steps(steps, warmup)}[variant]


def fit_net(base: dict[str, Any], case: Case) -> Case:
    """`case`, with the net deepened where a pipeline schedule cuts more stages than it has
    layers: the first hidden width repeated, [d, h, …, h, q] with one layer per stage."""
    d = with_overrides(base, case.overrides)
    if (d.get("strategy") or {}).get("name") != "pipeline":
        return case
    from partition.plans.generators import DEFAULT_VIRTUAL

    s = d["strategy"]
    v = s.get("virtual_stages") or DEFAULT_VIRTUAL.get(s.get("schedule"), 1)
    stages = int(d["world_size"]) * int(v)
    dims = list(d["model"]["dims"])
    if len(dims) - 1 >= stages or len(dims) < 3:
        return case
    deep = [dims[0], *[dims[1]] * (stages - 1), dims[-1]]
    return Case(f"{case.label} (dims {deep})", {**case.overrides, "model.dims": deep})


def timeline_configs(base: dict[str, Any],
                     cases: list[Case]) -> list[tuple[Case, RunConfig | None, str | None]]:
    """Each case's config (explicit engine: the simulator times its actions), or why it
    cannot run at this P; strategy.balance=time is resolved here, once, as a run does."""
    from partition.calibrate import resolve_balance

    out = []
    for c in cases:
        c = fit_net(base, c)
        try:
            cfg = parse_config(with_overrides(base, {**c.overrides, "engine": "explicit"}))
        except ConfigError as e:
            out.append((c, None, str(e)))
            continue
        out.append((c, resolve_balance(cfg), None))
    return out


# ---------------------------------------------------------------- on every rank


@dataclass
class ClockedTracer(Tracer):
    """A `Tracer` that also clocks itself: per step (`own_s`) the seconds spent inside its
    `add` during the step — every span it is handed, kept or not — which is all the work
    tracing adds to a step (the clock readings around each action are every step's, traced
    or not: that is how compute_s is measured). An A/B of whole steps cannot resolve a
    cost of this size on a shared 2-core machine: its rounds spread by up to ±50 %."""

    own_s: dict[int, float] = field(default_factory=dict)

    def add(self, name: str, tid: str, t0: float, t1: float, **args: Any) -> None:
        if name == "step":  # the step's own end: added after its clock stopped
            super().add(name, tid, t0, t1, **args)
            return
        a = time.perf_counter()
        super().add(name, tid, t0, t1, **args)
        if self.step is not None:
            self.own_s[self.step] = self.own_s.get(self.step, 0.0) + time.perf_counter() - a


def traced_variant(cfg: RunConfig, variant: str) -> tuple[RunConfig, Any]:
    """The config and the tracer (None: none at all) of one trace-cost variant; `all`'s
    tracer clocks itself (`ClockedTracer`)."""
    from partition.trace import traced_steps

    if variant == "none":
        return cfg, None
    t = cfg.train
    cfg = replace(cfg, trace=TraceConfig(
        steps=trace_setting(variant, steps=t.steps, warmup=t.warmup_steps),
        profiler=cfg.trace.profiler))
    steps = traced_steps(cfg.trace.steps, steps=t.steps, warmup=t.warmup_steps)
    return cfg, ClockedTracer(steps) if variant == "all" else Tracer(steps)


def timeline_case(cfg: RunConfig, topo: Any, *, runs: int, pairs: int, warmup_pairs: int,
                  label: str, where: str) -> dict[str, Any]:
    """One case on this rank: `runs` recorded runs, then the alternated trace-cost runs."""
    from partition.data import load_dataset
    from partition.topology import rank_threads
    from partition.train import run_rank
    from partition.weights import initial_weights

    t_start = time.monotonic()

    def progress(what: str) -> None:
        say(topo, f"{where}{label}: {what} | {time.monotonic() - t_start:.0f} s in this case")

    data = load_dataset(cfg.data, cfg.spec, seed=cfg.seed)
    full = initial_weights(cfg.spec, init=cfg.model.init, init_path=cfg.model.init_path,
                           seed=cfg.seed)
    records = []
    with rank_threads(cfg.threads_per_rank, topo.device):
        for i in range(runs):
            progress(f"run {i + 1}/{runs} (simulated vs measured)")
            comm, ledger = fresh_comm(topo)
            gc.collect()
            comm.barrier()
            try:
                rec = run_rank(cfg, topo, comm, ledger, data=data)
            except Exception as exc:  # every rank raises the same, before any crossing
                if _not_implemented(exc):
                    return {"skip": str(exc)}
                raise
            rec.shards = []  # the weights: not needed here, and the largest part
            records.append(rec)
        comm, _ = fresh_comm(topo)
        times: dict[str, list[list[float]]] = {v: [] for v in (*TRACE_VARIANTS, OWN)}
        for i in range(warmup_pairs + pairs):
            what = (f"trace warm-up round {i + 1}/{warmup_pairs}" if i < warmup_pairs
                    else f"trace round {i - warmup_pairs + 1}/{pairs}")
            progress(f"{what} ({', '.join(VARIANT_TEXT[v] for v in TRACE_VARIANTS)})")
            for v in TRACE_VARIANTS:
                vcfg, tracer = traced_variant(cfg, v)
                gc.collect()
                comm.barrier()  # every rank starts each run together
                wall, _ = timed_run(vcfg, topo, comm, data, full, tracer=tracer)
                times[v].append(wall)
                if v == "all":  # the tracer's own seconds per step
                    times[OWN].append([tracer.own_s.get(k, 0.0) for k in range(len(wall))])
    return {"records": records, "trace": times}


def timeline_rank(base: dict[str, Any], cases: list[tuple[str, RunConfig]], runs: int,
                  pairs: int, warmup_pairs: int) -> dict[str, Any]:
    """Entry point of a spawned rank."""
    with rank_world(base) as topo:
        return {label: timeline_case(cfg, topo, runs=runs, pairs=pairs,
                                     warmup_pairs=warmup_pairs, label=label,
                                     where=f"case {i + 1}/{len(cases)} ")
                for i, (label, cfg) in enumerate(cases)}


# ---------------------------------------------------------------- summarising


@dataclass(frozen=True)
class RunFigures:
    """One run's result.json, the figures the tables compare."""

    step_s: float | None  # train.step_time_s.median
    sim_step_s: float | None  # predicted.step_time_s
    startup_sim_step_s: float | None  # predicted.startup_step_time_s
    idle: tuple[float | None, ...]  # ranks[].timing.idle_fraction
    sim_idle: tuple[float | None, ...]  # predicted.ranks[].timing.idle_fraction


def figures(result: dict[str, Any]) -> RunFigures:
    """The run's figures; the simulated idle fractions are the replay of the step whose
    measured idle fractions they are compared with (the traced one), where it was replayed."""
    pred = result.get("predicted") or {}
    ranks = result.get("ranks") or []
    traced = ((ranks[0].get("timing") or {}).get("traced_step") if ranks else None)
    same = next((x.get("idle_fraction") for x in pred.get("sampled_steps") or []
                 if x.get("step") == traced and traced is not None), None)
    return RunFigures(
        step_s=((result.get("train") or {}).get("step_time_s") or {}).get("median"),
        sim_step_s=pred.get("step_time_s"),
        startup_sim_step_s=pred.get("startup_step_time_s"),
        idle=tuple((r.get("timing") or {}).get("idle_fraction")
                   for r in result.get("ranks") or []),
        sim_idle=tuple(same) if same is not None else tuple(
            (r.get("timing") or {}).get("idle_fraction") for r in pred.get("ranks") or []))


def _median(xs: list[float | None]) -> float | None:
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def within(x: float | None, target: float) -> bool:
    """|x| within the target (an error that could not be computed is not)."""
    return x is not None and abs(x) <= target


def mark(ok: bool) -> str:
    return "✓" if ok else "✗"


@dataclass
class SimRow:
    """A case's simulated against measured step time and idle fraction, over its runs."""

    label: str
    ranks: int
    runs: list[RunFigures] = field(default_factory=list)
    skip: str | None = None

    @property
    def measured_s(self) -> float | None:
        return _median([f.step_s for f in self.runs])

    @property
    def simulated_s(self) -> float | None:
        return _median([f.sim_step_s for f in self.runs])

    @property
    def startup_error(self) -> float | None:
        """The same, simulated on the durations timed alone at start-up."""
        m, s = self.measured_s, _median([f.startup_sim_step_s for f in self.runs])
        return None if m is None or s is None or m == 0 else s / m - 1

    @property
    def step_errors(self) -> list[float]:
        """Per run: simulated ÷ measured − 1."""
        return [f.sim_step_s / f.step_s - 1 for f in self.runs
                if f.sim_step_s is not None and f.step_s]

    @property
    def step_error(self) -> float | None:
        """The medians' error, simulated ÷ measured − 1: what the target is held to."""
        m, s = self.measured_s, self.simulated_s
        return None if m is None or s is None or m == 0 else s / m - 1

    def idle(self, rank: int) -> tuple[float | None, float | None, list[float]]:
        """Rank's measured and simulated idle fraction (medians over runs) and, per run,
        simulated − measured."""
        pairs = [(f.idle[rank] if rank < len(f.idle) else None,
                  f.sim_idle[rank] if rank < len(f.sim_idle) else None) for f in self.runs]
        return (_median([m for m, _ in pairs]), _median([s for _, s in pairs]),
                [s - m for m, s in pairs if m is not None and s is not None])

    def idle_error(self, rank: int) -> float | None:
        """The medians' difference, simulated − measured: what the target is held to."""
        m, s, _ = self.idle(rank)
        return None if m is None or s is None else s - m


def summarize_runs(label: str, cfg: RunConfig, by_rank: list[dict[str, Any]]) -> SimRow:
    """Every run's rank records made into its result.json (as the launcher writes it)."""
    from partition.results import build_result

    if "skip" in by_rank[0]:
        return SimRow(label, cfg.ranks, skip=by_rank[0]["skip"])
    runs = zip(*(r["records"] for r in by_rank), strict=True)
    return SimRow(label, cfg.ranks,
                  [figures(build_result(cfg, list(recs), seconds=0.0)) for recs in runs])


@dataclass
class TraceRow:
    """A case's alternated trace-cost runs: per variant, each timed round's step time; and
    per round, in the run that traces every other step, traced ÷ untraced − 1."""

    label: str
    steps: dict[str, list[float]] = field(default_factory=dict)
    alternate: list[float] = field(default_factory=list)
    skip: str | None = None
    # per round, in the `all` run: the tracer's own time in a steady step ÷ that step
    own: list[float] = field(default_factory=list)

    def costs(self, variant: str, against: str) -> list[float]:
        """Per round: the variant's step time ÷ the other's − 1 ("alternate": within its run)."""
        if variant == "alternate":
            return list(self.alternate)
        return [a / b - 1 for a, b in zip(self.steps[variant], self.steps[against], strict=True)]

    def median_s(self, variant: str) -> float:
        return statistics.median(self.steps[variant])


# (variant, against): a traced step against an untraced one in the same run, and in runs of
# their own (the trace's cost); a run with the default setting against one with tracing off
# (what result.json's step time pays); every instrument against none (the per-action clock
# of compute_s as well).
TRACE_COMPARISONS = (("alternate", "alternate"), ("all", "off"), ("last", "off"), ("all", "none"))
OWN_TEXT = "the tracer's own time in a traced step"
COMPARISON_TEXT = {
    ("alternate", "alternate"): "traced ÷ untraced step, in one run",
    ("all", "off"): "all ÷ [] runs",
    ("last", "off"): "a run's step time: last ÷ []",
    ("all", "none"): "all ÷ no tracer",
}


def interleaved_cost(per_rank: list[list[float]], traced: set[int], warmup_steps: int) -> float:
    """One run that traced some steady steps: the median traced step (the slowest rank's)
    ÷ the median untraced one − 1."""
    steps = [max(ts) for ts in zip(*per_rank, strict=True)]
    on = [t for i, t in enumerate(steps) if i >= warmup_steps and i in traced]
    off = [t for i, t in enumerate(steps) if i >= warmup_steps and i not in traced]
    return statistics.median(on) / statistics.median(off) - 1


def own_cost(walls: list[list[float]], own: list[list[float]], warmup_steps: int) -> float:
    """One run traced throughout: per steady step the largest share of its step that a
    rank's tracer spent on itself (own ÷ that rank's step), the median over the steps."""
    n = len(walls[0])
    return statistics.median(max(o[i] / w[i] for w, o in zip(walls, own, strict=True))
                             for i in range(warmup_steps, n))


def summarize_trace(label: str, by_rank: list[dict[str, Any]], *, warmup_steps: int,
                    warmup_pairs: int) -> TraceRow:
    if "skip" in by_rank[0]:
        return TraceRow(label, skip=by_rank[0]["skip"])
    rounds = len(by_rank[0]["trace"][OWN])
    own = [own_cost([r["trace"]["all"][i] for r in by_rank], [r["trace"][OWN][i] for r in by_rank],
                    warmup_steps) for i in range(warmup_pairs, rounds)]
    steps, alternate = {}, []
    for v in TRACE_VARIANTS:
        runs = [list(per_rank) for per_rank in zip(*(r["trace"][v] for r in by_rank),
                                                   strict=True)][warmup_pairs:]
        steps[v] = [run_step_time(per_rank, warmup_steps) for per_rank in runs]
        if v == "alternate":
            traced = set(alternate_steps(len(runs[0][0]), warmup_steps))
            alternate = [interleaved_cost(per_rank, traced, warmup_steps) for per_rank in runs]
    return TraceRow(label, steps, alternate, own=own)


# ---------------------------------------------------------------- experiments.predict


@dataclass(frozen=True)
class PredictCase:
    label: str
    world_size: int
    overrides: tuple[str, ...]
    target_s: float


def _dims(*widths: int) -> str:
    return "model.dims=[" + ",".join(map(str, widths)) + "]"


PREDICT_CASES = (
    PredictCase("data", 8, ("strategy=data", "world_size=8"), 3.0),
    PredictCase("tensor", 8, ("strategy=tensor", "world_size=8"), 3.0),
    PredictCase("fsdp", 8, ("strategy=fsdp", "world_size=8"), 3.0),
    PredictCase("pipeline 1f1b, dims [784, 256 ×7, 10], M=8", 8,
                ("strategy=pipeline", "strategy.schedule=1f1b", "world_size=8",
                 "train.microbatches=8", _dims(784, *[256] * 7, 10)), 3.0),
    PredictCase("data, B=4096", 1024, ("strategy=data", "world_size=1024",
                                       "train.batch_size=4096"), 30.0),
    PredictCase("tensor, dims [784, 65536, 10]", 1024,
                ("strategy=tensor", "world_size=1024", _dims(784, 65536, 10)), 30.0),
    # the dry run's own example of a deep pipeline (P=64 on a 65-layer net), held to the
    # P=1024 target; a 1024-stage pipeline is 1024 distinct ranks, each dry-run and timed
    PredictCase("pipeline 1f1b, dims [784, 64 ×64, 10], B=4096, M=8 (P=64)", 64,
                ("strategy=pipeline", "strategy.schedule=1f1b", "world_size=64",
                 "train.batch_size=4096", "train.microbatches=8",
                 _dims(784, *[64] * 64, 10)), 30.0),
    PredictCase("hybrid dp8×pp8×tp16, dims [784, 1024 ×15, 10], B=4096, M=8", 1024,
                ("strategy=hybrid", "world_size=1024", "strategy.pp=8", "strategy.tp=16",
                 "strategy.balance=[2,2,2,2,2,2,2,2]", "train.batch_size=4096",
                 "train.microbatches=8", _dims(784, *[1024] * 15, 10)), 30.0),
    PredictCase("pipeline 1f1b, dims [784, 64 ×1023, 10], B=4096, M=8", 1024,
                ("strategy=pipeline", "strategy.schedule=1f1b", "world_size=1024",
                 "train.batch_size=4096", "train.microbatches=8",
                 _dims(784, *[64] * 1023, 10)), 30.0),
)


def predict_limit_s(case: PredictCase) -> float:
    """How long one predict run may take before it is stopped (and not repeated)."""
    return max(4 * case.target_s, 30.0)


@dataclass
class PredictRow:
    case: PredictCase
    walls: list[float] = field(default_factory=list)  # the command's wall time per run
    own: list[float] = field(default_factory=list)  # what predict says it took ("in X s")
    failed: str | None = None  # why a run gave no time (its last error line, or a timeout)

    @property
    def wall_s(self) -> float | None:
        return _median(self.walls)

    @property
    def ok(self) -> bool:
        return self.failed is None and self.wall_s is not None and self.wall_s < self.case.target_s


_OWN = re.compile(r"^wrote .* in ([0-9.]+) s$", re.MULTILINE)


def predict_once(case: PredictCase, *, folder: str) -> tuple[float | None, float | None, str | None]:
    """One `python -m experiments.predict` as a user runs it: (wall s, its own report, error)."""
    argv = [sys.executable, "-m", "experiments.predict", *case.overrides,
            f"hydra.run.dir={folder}"]
    limit = predict_limit_s(case)
    t0 = time.perf_counter()
    try:
        p = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=limit)
    except subprocess.TimeoutExpired:
        return None, None, f"stopped after {limit:.0f} s"
    wall = time.perf_counter() - t0
    if p.returncode != 0:
        lines = [x for x in (p.stderr or p.stdout).strip().splitlines() if x.strip()]
        return None, None, f"exit {p.returncode}: {lines[-1].strip() if lines else '?'}"
    m = _OWN.search(p.stdout)
    return wall, float(m.group(1)) if m else None, None


def time_predict(cases: list[PredictCase], *, runs: int) -> list[PredictRow]:
    rows = []
    with tempfile.TemporaryDirectory(prefix="partition-bench-predict-") as tmp:
        for i, c in enumerate(cases):
            row = PredictRow(c)
            for k in range(runs):
                wall, own, err = predict_once(c, folder=os.path.join(tmp, str(i)))
                shown = err or f"{wall:.2f} s"
                print(f"[bench] predict {i + 1}/{len(cases)} {c.label} P={c.world_size}: "
                      f"run {k + 1}/{runs}: {shown}", flush=True)
                if err:  # a failure or a timeout says enough once
                    row.failed = err
                    break
                row.walls.append(wall)
                if own is not None:
                    row.own.append(own)
            rows.append(row)
    return rows


# ---------------------------------------------------------------- the whole suite


@dataclass
class TimelineBench:
    sim: list[SimRow]
    trace: list[TraceRow]
    predict: list[PredictRow]


def run_timeline(base: dict[str, Any], cases: list[Case] | None = None, *, runs: int = 5,
                 pairs: int = 10, warmup_pairs: int = 1,
                 predict_cases: list[PredictCase] | None = None
                 ) -> tuple[TimelineBench, dict[str, Any]]:
    if runs < MIN_RUNS:
        raise ValueError(f"runs must be >= {MIN_RUNS}, got {runs}")
    if pairs < 1 or warmup_pairs < 0:
        raise ValueError(f"pairs must be >= 1 and warmup_pairs >= 0, got {pairs}, {warmup_pairs}")
    steps, warm = int(base["train"]["steps"]), int(base["train"]["warmup_steps"])
    if steps - warm < 2:
        raise ValueError(f"{steps} steps with {warm} left out: the trace's cost needs at least "
                         "two steady steps (one traced, one not)")
    parse_config(base)  # a bad base fails here, before any rank starts
    planned = timeline_configs(base, list(cases or TIMELINE_CASES))
    todo = [(c.label, cfg) for c, cfg, why in planned if why is None]
    load_before = os.getloadavg()
    t0 = time.time()
    by_rank = spawn(timeline_rank, (base, todo, runs, pairs, warmup_pairs),
                    nprocs=int(base["world_size"])) if todo else []
    sim, trace = [], []
    for c, cfg, why in planned:
        if why is not None:
            sim.append(SimRow(c.label, int(base["world_size"]), skip=why))
            trace.append(TraceRow(c.label, skip=why))
            continue
        mine = [r[c.label] for r in by_rank]
        sim.append(summarize_runs(c.label, cfg, mine))
        trace.append(summarize_trace(c.label, mine, warmup_steps=warm, warmup_pairs=warmup_pairs))
    predict = time_predict(list(PREDICT_CASES if predict_cases is None else predict_cases),
                           runs=runs)
    info = machine() | {"load_before": load_before, "load_after": os.getloadavg(),
                        "seconds": time.time() - t0, "runs": runs, "pairs": pairs,
                        "warmup_pairs": warmup_pairs}
    return TimelineBench(sim, trace, predict), info


# ---------------------------------------------------------------- the tables


def _ms(x: float | None) -> str:
    return "n/a" if x is None else f"{x * 1e3:.2f}"


def _pct(x: float) -> str:
    return f"{x * 100:+.1f} %"


def _range(xs: list[float], fmt) -> str:  # noqa: ANN001
    med, lo, hi = spread(xs) or (None,) * 3
    return "n/a" if med is None else f"**{fmt(med)}** [{fmt(lo)}, {fmt(hi)}]"


def _bounds(xs: list[float], fmt) -> str:  # noqa: ANN001
    return f"[{fmt(min(xs))}, {fmt(max(xs))}]" if xs else "n/a"


def _share(ranks: int, cores: int) -> str:
    return f" ⚠ P={ranks} > {cores} cores" if ranks > cores else ""


def step_table(rows: list[SimRow], *, cores: int) -> str:
    lines = ["| case | P | measured ms/step | simulated ms/step | simulated ÷ measured − 1 "
             "| per run [min, max] | within 15 % | from start-up timing alone |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r.skip:
            lines.append(f"| {r.label} | {r.ranks} | skipped: {r.skip} | | | | | |")
            continue
        err, start = r.step_error, r.startup_error
        sim = _ms(r.simulated_s) if r.simulated_s is not None else "not simulated"
        lines.append(f"| {r.label} | {r.ranks} | {_ms(r.measured_s)} | {sim} | "
                     f"{'n/a' if err is None else '**' + _pct(err) + '**'} | "
                     f"{_bounds(r.step_errors, _pct)} | "
                     f"{mark(within(err, STEP_TARGET))}{_share(r.ranks, cores)} | "
                     f"{'n/a' if start is None else _pct(start)} |")
    return "\n".join(lines)


def idle_table(rows: list[SimRow], *, cores: int) -> str:
    lines = ["| case | rank | measured | simulated | simulated − measured | per run [min, max] "
             "| within 0.05 |", "|---|---|---|---|---|---|---|"]

    def f3(x: float | None) -> str:
        return "n/a" if x is None else f"{x:.3f}"

    def d3(x: float) -> str:
        return f"{x:+.3f}"

    for r in rows:
        if r.skip:
            continue
        for rank in range(r.ranks):
            meas, sim, diffs = r.idle(rank)
            err = r.idle_error(rank)
            lines.append(f"| {r.label} | {rank} | {f3(meas)} | "
                         f"{f3(sim) if sim is not None else 'not simulated'} | "
                         f"{'n/a' if err is None else '**' + d3(err) + '**'} | "
                         f"{_bounds(diffs, d3)} | "
                         f"{mark(within(err, IDLE_TARGET))}{_share(r.ranks, cores)} |")
    return "\n".join(lines)


def trace_table(rows: list[TraceRow]) -> str:
    head = ("| case | untraced ms/step (trace.steps=[]) | traced ms/step (trace.steps=all) | "
            f"{OWN_TEXT} | " + " | ".join(COMPARISON_TEXT[c] for c in TRACE_COMPARISONS) + " |")
    lines = [head, "|" + "---|" * (4 + len(TRACE_COMPARISONS))]
    for r in rows:
        if r.skip:
            lines.append(f"| {r.label} | skipped: {r.skip} |" + " |" * (2 + len(TRACE_COMPARISONS)))
            continue
        cells = [f"{_range(r.own, _pct)} {mark(statistics.median(r.own) < TRACE_TARGET)}"
                 if r.own else "n/a"]
        for v, against in TRACE_COMPARISONS:
            costs = r.costs(v, against)
            cells.append(f"{_range(costs, _pct)} {mark(statistics.median(costs) < TRACE_TARGET)}")
        lines.append(f"| {r.label} | {_ms(r.median_s('off'))} | {_ms(r.median_s('all'))} | "
                     + " | ".join(cells) + " |")
    return "\n".join(lines)


def predict_table(rows: list[PredictRow]) -> str:
    lines = ["| case | P | wall s: median [min, max] | predict's own report, s | target "
             "| meets |", "|---|---|---|---|---|---|"]
    for r in rows:
        c = r.case
        wall = _range(r.walls, lambda x: f"{x:.2f}") if r.walls else "n/a"
        if r.failed:
            wall = f"{wall}; {r.failed}" if r.walls else r.failed
        own = f"{statistics.median(r.own):.2f}" if r.own else "n/a"
        lines.append(f"| {c.label} | {c.world_size} | {wall} | {own} | < {c.target_s:g} s "
                     f"| {mark(r.ok)} |")
    return "\n".join(lines)


def summary(bench: TimelineBench) -> str:
    """How many rows meet their target, table by table."""
    sim = [r for r in bench.sim if not r.skip]
    ranks = [(r, k) for r in sim for k in range(r.ranks)]
    trace = [r for r in bench.trace if not r.skip]
    step_ok = sum(within(r.step_error, STEP_TARGET) for r in sim)
    idle_ok = sum(within(r.idle_error(k), IDLE_TARGET) for r, k in ranks)
    trace_ok = sum(bool(r.own) and statistics.median(r.own) < TRACE_TARGET for r in trace)
    predict_ok = sum(r.ok for r in bench.predict)
    skipped = len(bench.sim) - len(sim)
    return (f"Targets met: step time within 15 % in {step_ok} of {len(sim)} cases; idle "
            f"fraction within 0.05 in {idle_ok} of {len(ranks)} ranks; a traced step under "
            f"2 % in {trace_ok} of {len(trace)} cases; experiments.predict in time in "
            f"{predict_ok} of {len(bench.predict)} cases"
            + (f" ({skipped} case{'s' if skipped > 1 else ''} skipped)." if skipped else "."))


def markdown(bench: TimelineBench, info: dict[str, Any], base: dict[str, Any],
             cases: list[Case], command: str) -> str:
    cores = int(info.get("cores_usable") or info["cores"])
    P = int(base["world_size"])
    warn = ([f"⚠ P={P} ranks on {cores} cores: ranks share cores, so measured times include "
             "waiting for a core that the simulator does not model; the targets hold for "
             "P ≤ cores.", ""] if P > cores else [])
    deepened = [c.label for c in cases if "(dims " in c.label]
    deep_note = (" Schedules with more stages than the net has layers run it with its first "
                 "hidden layer repeated, one layer per stage (the dims in their label)."
                 if deepened else "")
    calibrated = (base.get("cost") or {}).get("calibrate")
    links = "measured at start-up too" if calibrated else "the config's"
    return "\n".join([
        f"## {TIMELINE_TITLE}",
        "",
        *header_lines(info, command, note="(other work sharing the cores shows as noise in "
                                           "the measured side and in the calibration)."),
        "",
        f"Settings: {settings_line(base, cases)}; explicit engine, "
        f"cost.calibrate={str(bool(calibrated)).lower()}; {threads_text(base)}.{deep_note}",
        "",
        *warn,
        summary(bench),
        "",
        f"### {STEP_TITLE}",
        "",
        f"{info['runs']} runs per case through the same `train.run_rank` as `experiments.run` "
        "(the memory probe and the ledger on; the ranks started once for the suite), each made "
        "into its result.json by `results.build_result`: measured is "
        "`train.step_time_s.median` (per step the slowest rank, the median after warm-up), "
        "simulated `predicted.step_time_s` (the simulator replaying each of the run's steady "
        "steps at the durations that step measured — its actions, the runtime between them, "
        "its collectives and transfers —, the replay nearest the replays' median), each the "
        "median over the runs; the error is the medians' (what the target is held to), beside "
        "it the range of the runs' own errors. The last column simulates the same runs from "
        f"their actions timed alone at start-up (α and β {links}): "
        "`predicted.startup_step_time_s`, what `experiments.predict` has before any run.",
        "",
        step_table(bench.sim, cores=cores),
        "",
        f"### {IDLE_TITLE}",
        "",
        "The same runs: measured is `ranks[].timing.idle_fraction` (1 − compute ÷ the rank's "
        "step time in the traced step), simulated the same step's replay "
        "(`predicted.sampled_steps[].idle_fraction` of the traced step), each the median over "
        "the runs; the difference is the medians', beside it the range of the runs' own "
        "differences.",
        "",
        idle_table(bench.sim, cores=cores),
        "",
        f"### {TRACE_TITLE}",
        "",
        f"Timing runs (run_rank's loop and clock, the memory probe off) alternated over "
        f"{', '.join(VARIANT_TEXT[v] for v in TRACE_VARIANTS)}, {info['pairs']} rounds after "
        f"{info['warmup_pairs']} warm-up round(s). `trace.steps=[]` is the setting that turns "
        "tracing off: every action is still clocked (that is how compute_s is measured) but no "
        "span is kept. The target is a traced step's cost, measured by the tracer's own clock "
        "(first column: in the `all` run, per steady step the largest share of a rank's step "
        "spent inside the tracer's `add` — every span it is handed, kept or not: all the work "
        "tracing adds —, the median over the steps). The other columns time whole steps "
        "against each other, and on a shared 2-core machine their rounds spread far wider "
        "than the cost: within one run that traces every other steady step (the median traced "
        "step ÷ the median untraced one − 1, so that drift hits both alike), then as runs of "
        "their own (`all` ÷ `[]`, per round one run's step time ÷ the other's). A run's "
        "reported step time (the default `last` ÷ `[]`) traces one of its steady steps, so its "
        "median hardly sees the trace; the last column adds the per-action clock that every "
        "step pays. Each cell: the share or ratio − 1, the median, min and max over the rounds, "
        "✓ where the median is under 2 %.",
        "",
        trace_table(bench.trace),
        "",
        f"### {PREDICT_TITLE}",
        "",
        f"`python -m experiments.predict <case>` as a user runs it (a fresh interpreter, its "
        f"imports and the actions it times included), {info['runs']} runs per case, the median, "
        "min and max; beside it the time predict reports itself (from its start, after "
        "Python's). A run that fails or passes 4× its target (at least 30 s) is stopped and "
        "not repeated.",
        "",
        predict_table(bench.predict),
        "",
    ])
