"""Where the time goes: each rank's measured timeline next to the simulated one.

From the rank records of a run (`train.RankRecord`: the traced step's spans, and the
per-action durations `calibrate.action_times` measured at start-up) this module derives

    measured    per rank: step time, compute inside the step, idle fraction
                1 − compute / step time, and MFU (FLOP/s ÷ the rank's calibrated matmul rate)
    simulated   the same from simulate.py, on the plan with the calibrated durations
    causes      the idle fraction split by cause: the schedule (equal stages, free
                communication), stage imbalance (the real durations, free communication)
                and communication (the rest)

and writes `trace.json` (Chrome trace events) and `timeline.png` (measured above,
simulated below, one row per rank, on one time axis). A report reads a run's timeline back
from its folder (`load_case`: the spans from trace.json, the simulation replayed from
result.json) and draws several runs' in one figure (`draw_cases`: timelines.png).
"""

from __future__ import annotations

import os
import statistics
from dataclasses import dataclass
from typing import Any

from partition.simulate import (
    PIECE_PREFIXES,
    START,
    Links,
    Timeline,
    as_measured,
    key_uses,
    simulate,
    step_ops,
    sent_key,
    transfer_key,
)
from partition.trace import chrome_trace, compute_seconds, read_trace, step_spans

TRACE_FILE = "trace.json"
TIMELINE_FILE = "timeline.png"

PerRank = list[tuple[int, list[dict[str, Any]]]]  # (rank, its spans), rank order
TRACED_TIMES = "traced_action_times"  # result.json ranks[]: the traced step's durations


def drawn_key(ranks: list[dict[str, Any]]) -> str:
    """The durations of result.json's `ranks` that its timeline is replayed from: the
    traced step's, where every rank has them, else those `predicted` was simulated from."""
    return TRACED_TIMES if ranks and all(r.get(TRACED_TIMES) for r in ranks) else "action_times"
# keys of a rank's times that are no action: a collective's measured seconds, the runtime's
# time after an action, a message's transfer, how late the rank began (simulate.as_measured)
MEASURED_PREFIXES = ("coll:", "after:", "xfer:", "sent:", "late:", *PIECE_PREFIXES)


def _last_traced(spans: list[dict[str, Any]]) -> int | None:
    steps = [s["step"] for s in spans if s["name"] == "step"]
    return max(steps) if steps else None


def measured(records: list[Any]) -> list[dict[str, Any]] | None:
    """Per rank (rank order) the traced step's step time, compute and idle fraction."""
    return measured_spans([(r.rank, r.spans) for r in records])


def measured_spans(per_rank: PerRank) -> list[dict[str, Any]] | None:
    """`measured` from (rank, spans) pairs: the records' own, or a trace.json's (read_trace)."""
    # Every rank needs compute spans (the torch engines' come from the profiler, engines/profiled.py).
    if not per_rank or not all(any(s["name"] != "step" and s["tid"] == "compute" for s in spans)
                               for _, spans in per_rank):
        return None
    # The last step every rank traced (trace.steps=all keeps several).
    step = min(_last_traced(spans) for _, spans in per_rank)
    out = []
    for rank, all_spans in per_rank:
        spans = step_spans(all_spans, step)
        total = next(s for s in spans if s["name"] == "step")
        T = total["t1"] - total["t0"]
        comp = compute_seconds(spans)
        wait = sum(s["t1"] - s["t0"] for s in spans if s["tid"] == "comm" and s["args"].get("waiting"))
        out.append({"rank": rank, "step": step, "step_s": T, "compute_s": comp, "wait_s": wait,
                    "idle_fraction": 1.0 - comp / T if T > 0 else 0.0})
    return out


def links_of(params: Any) -> Links:  # costs.CostParams
    return Links(params.alpha_s, params.beta_Bps, params.collective_alpha_s,
                 params.collective_beta_Bps)


def _schedule(cfg: Any):  # noqa: ANN202
    if cfg.strategy.name != "pipeline":
        return None
    from partition.plans.schedule import load_schedule

    return load_schedule(cfg.strategy.schedule, world=cfg.world_size, micro=cfg.train.microbatches,
                         virtual=cfg.strategy.virtual_stages)


def simulate_step(cfg: Any, times: list[dict[str, float]], links: Links, *,
                  measured: bool = True) -> Timeline:
    """The simulated step; `measured`: with the collectives and the runtime's time between
    actions as the run's steps measured them, where `times` has them (`as_measured`)."""
    ops = step_ops(cfg, times, links, schedule=_schedule(cfg))
    # start-up times alone (experiments.predict) have nothing to replay: leave the ops be
    replay = measured and any("@" in k or k.startswith(MEASURED_PREFIXES) for t in times for k in t)
    return simulate(as_measured(ops, times) if replay else ops, cfg.ranks)


def step_times(cfg: Any, startup: list[dict[str, float]],
               actions: list[dict[str, float] | None],
               collectives: list[dict[str, float]] | None = None,
               transfers: dict[str, float] | None = None, *,
               uses: list[dict[str, int]] | None = None) -> list[dict[str, float]]:
    """Each rank's durations as one of the run's own steps took them: an action key's
    seconds in that step (`Tracer.step_samples`) ÷ the number of ops it times in the
    simulated step, the same for the runtime's time after it ("after:<key>"), and each
    collective's seconds per call on each rank ("coll:<name>", `collective_times`) and
    each message's transfer ("xfer:<role>", `transfer_times`). A key the step did not time keeps its
    start-up value (`calibrate.action_times`; a transfer, α + n/β).

    Timed in place, an action pays what timing it alone in a loop at start-up misses: on
    the 2-core development machine the first matmul after a few ms of other work (a wait,
    the runtime's Python) runs up to ~0.3 ms slower than the same matmul back to back, a
    near-doubling of the small actions of a pipeline step (docs/benchmarks.md)."""
    uses = uses if uses is not None else op_uses(cfg, startup)
    out = []
    for t, got, u, coll in zip(startup, actions, uses, collectives or [{}] * len(startup),
                               strict=True):
        per_use = {}
        for k, v in (got or {}).items():
            action = k.removeprefix("after:")
            # a step starts once; a message call's pieces are its own
            n = 1 if action == START or k.startswith(PIECE_PREFIXES) else u.get(action)
            if n:
                per_use[k] = v / n
        out.append({**t, **per_use, **coll, **(transfers or {})})
    return out


def op_uses(cfg: Any, startup: list[dict[str, float]]) -> list[dict[str, int]]:
    """Per rank, how many ops of the simulated step each action key times (`key_uses`)."""
    return key_uses(step_ops(cfg, startup, Links(0.0, 1.0, 0.0, 1.0), schedule=_schedule(cfg)),
                    cfg.ranks)


def collective_times(per_rank: list[list[list[Any]] | None],
                     offsets: list[float]) -> list[dict[str, float]]:
    """Per rank, "coll:<name>": its seconds in a collective of that name in one step, from
    when the call's last member arrived (the simulator starts a collective's members
    together, then) to when this rank left it — members may leave at different times —,
    the mean over its calls. A call is the k-th of its name among the same members on each
    of them (`Tracer.step_collectives`, clocks put on rank 0's by `offsets`)."""
    calls: dict[tuple[str, tuple[int, ...]], dict[int, list[tuple[float, float]]]] = {}
    for rank, (events, off) in enumerate(zip(per_rank, offsets, strict=True)):
        for name, group, t0, t1 in events or []:
            calls.setdefault((name, tuple(group)), {}).setdefault(rank, []).append(
                (t0 - off, t1 - off))
    took: list[dict[str, list[float]]] = [{} for _ in per_rank]
    for (name, group), by_rank in calls.items():
        if set(by_rank) != set(group):
            continue  # a member's calls are missing: no line-up
        for k in range(min(len(c) for c in by_rank.values())):
            start = max(c[k][0] for c in by_rank.values())
            for rank, c in by_rank.items():
                took[rank].setdefault(name, []).append(max(0.0, c[k][1] - start))
    return [{f"coll:{n}": statistics.mean(v) for n, v in sorted(d.items())} for d in took]


WAITED_S = 50e-6  # a receive waited for longer than this: its message arrived as the wait ended


def transfer_times(per_rank: list[list[list[Any]] | None],
                   offsets: list[float]) -> dict[str, float]:
    """A message's transfer in one step, from the moment it could move (its isend made and
    its receive posted, whichever came last: the calls' starts — gloo may move the data
    inside either call, and an irecv may block long after it did) to its arrival, for the
    messages whose receiver waited for them (only then is the end of the wait the
    arrival): each such message's own ("xfer:<from>><to>#<seq>", `transfer_key`) and the
    median of its role's ("xfer:<role>"); a message that had arrived before its wait took
    at most until then, and is given the least of that and its role's median (that bound
    alone where no message of its role was waited for). And per
    message whose send was waited for, when that wait ended, from the same moment
    ("sent:<from>><to>#<seq>", `sent_key`): a send completes once its data is taken, not
    when its receiver looks (rank 1's irecv blocked 4.85 ms in one ZB-H1 step while its
    sender's wait ended 0.15 ms after the post began). Each rank's events are
    `Tracer.step_messages`', on its own clock: `offsets` (its clock minus rank 0's) put
    them on one."""
    sends: dict[tuple[int, int, int], float] = {}  # (from, to, seq) -> isend made
    posts: dict[tuple[int, int, int], float] = {}  # (from, to, seq) -> receive posted
    done: dict[tuple[int, int, int], float] = {}  # (from, to, seq) -> its send waited for until
    waits: list[tuple[tuple[int, int, int], str, float, float]] = []
    for rank, (events, off) in enumerate(zip(per_rank, offsets, strict=True)):
        for what, peer, seq, role, t0, t1 in events or []:
            if what == "send":
                sends[(rank, peer, seq)] = t0 - off
            elif what == "post":
                posts[(peer, rank, seq)] = t0 - off
            elif what == "wsend":
                done[(rank, peer, seq)] = t1 - off
            else:
                waits.append(((peer, rank, seq), role, t0 - off, t1 - off))
    took: dict[str, list[float]] = {}
    each: dict[str, float] = {}
    early: list[tuple[str, str, float]] = []  # arrived before its wait: at most this long
    for key, role, t0, t1 in waits:
        if key in sends and key in posts:
            x = max(0.0, t1 - max(sends[key], posts[key]))
            if t1 - t0 > WAITED_S:
                took.setdefault(role, []).append(x)
                each[transfer_key(*key)] = x
            else:
                early.append((transfer_key(*key), role, x))
    median = {role: statistics.median(v) for role, v in sorted(took.items())}
    for k, role, bound in early:  # without a median of its role, what it is known to have taken
        each[k] = min(bound, median[role]) if role in median else bound
    sent = {sent_key(*key): max(0.0, t - max(sends[key], posts[key]))
            for key, t in done.items() if key in sends and key in posts}
    return {**{f"xfer:{role}": m for role, m in median.items()}, **each, **sent}


@dataclass(frozen=True)
class RunTimes:
    """A run's durations for the simulator, per rank: `times`, those of the sampled step
    whose replay is nearest the replays' median (what `predicted` is simulated from), and
    `startup`, timed alone at start-up; `replays`, per sampled step its number, its
    simulated step, its measured one (the slowest rank's) and each rank's simulated idle
    fraction."""

    times: list[dict[str, float]]
    startup: list[dict[str, float]]
    replays: list[dict[str, float]]
    # the traced step's durations (the step timeline.png draws measured, replayed below it),
    # where it was sampled
    traced: list[dict[str, float]] | None = None


def run_times(cfg: Any, records: list[Any], params: Any, *,
              traced_step: int | None = None) -> RunTimes | None:
    """Each sampled step of the run replayed: every rank's ops at the durations that step
    measured, simulated; the median replay's durations are the run's. One step's durations
    on every rank together, so that what slowed a step (a stall, a late rank) is replayed
    as it happened: the median of the sums of medians would be no step at all, and a
    synchronised step is as slow as its slowest path. `traced_step` (the measured
    timeline's, `measured`): its durations are kept too (`RunTimes.traced`). None where
    some rank has no action times (engine=torch); the start-up times alone where no step
    was sampled."""
    rs = sorted(records, key=lambda r: r.rank)
    startup = [r.action_times for r in rs]
    if len(startup) != cfg.ranks or not all(startup):
        return None
    actions = [getattr(r, "step_action_s", None) or [] for r in rs]
    colls = [getattr(r, "step_collectives", None) or [] for r in rs]
    msgs = [getattr(r, "step_messages", None) or [] for r in rs]
    offsets = [((r.clock or {}).get("offset_s") or 0.0) for r in rs]
    n = min(len(a) for a in actions)
    links = links_of(params)

    def at(xs: list[Any], j: int) -> Any:  # noqa: ANN401
        return xs[j] if j < len(xs) else None

    starts = [getattr(r, "step_starts", None) or [] for r in rs]

    def late(j: int) -> list[dict[str, float]]:
        """Each rank's start of step j after the first rank's ("late:start")."""
        t = [at(s, j) for s in starts]
        if any(x is None for x in t):
            return [{} for _ in rs]
        t = [x - off for x, off in zip(t, offsets, strict=True)]
        return [{f"late:{START}": x - min(t)} for x in t]

    def sample(j: int, uses: list[dict[str, int]]) -> list[dict[str, float]]:
        times = step_times(cfg, startup, [a[j] for a in actions],
                           collective_times([at(c, j) for c in colls], offsets),
                           transfer_times([at(m, j) for m in msgs], offsets), uses=uses)
        return [{**t, **d} for t, d in zip(times, late(j), strict=True)]

    try:
        uses = op_uses(cfg, startup) if n else []  # the same plan for every sampled step
        samples = [sample(j, uses) for j in range(n)]
        played = [simulate_step(cfg, s, links) for s in samples]
        replays = [tl.step_time for tl in played]
    except (KeyError, ValueError):  # a plan the simulator cannot lay out: its own error later
        return RunTimes(startup, startup, [])
    if not samples:
        return RunTimes(startup, startup, [])
    mid = statistics.median(replays)
    near = min(range(n), key=lambda j: (abs(replays[j] - mid), j))
    steps = rs[0].sampled_steps[:n]
    traced = samples[steps.index(traced_step)] if traced_step in steps else None
    return RunTimes(samples[near], startup, [
        {"step": s, "simulated_s": tl.step_time, "measured_s": max(r.step_s[s] for r in rs),
         "idle_fraction": [tl.idle_fraction(q) for q in range(cfg.ranks)]}
        for s, tl in zip(steps, played, strict=True)], traced)


def _equalised(cfg: Any, times: list[dict[str, float]]) -> list[dict[str, float]]:
    """Every rank's actions at the mean duration of their kind: equal stages (what the runs'
    steps measured besides the actions, `MEASURED_PREFIXES`, is left as it is)."""
    def kind(k: str) -> str:
        return k.split(":")[-1] if ":" in k else k

    keys: dict[str, list[float]] = {}
    for t in times:
        for k, v in t.items():
            if not k.startswith(MEASURED_PREFIXES):
                keys.setdefault(kind(k), []).append(v)
    mean = {k: statistics.mean(v) for k, v in keys.items()}
    return [{k: v if k.startswith(MEASURED_PREFIXES) else mean[kind(k)] for k, v in t.items()}
            for t in times]


def simulated_block(cfg: Any, times: list[dict[str, float]], params: Any) -> dict[str, Any] | None:
    """`predicted` timing from the simulator: per rank step, compute, idle; and the causes."""
    return simulation(cfg, times, params)[0]


def simulation(cfg: Any, times: list[dict[str, float]] | None,
               params: Any) -> tuple[dict[str, Any] | None, str | None]:
    """`simulated_block`'s block and None, or None and why the step is not simulated."""
    if not times or not all(times) or len(times) != cfg.ranks:
        return None, f"no action times for each of the {cfg.ranks} ranks"
    links = links_of(params)
    try:
        tl = simulate_step(cfg, times, links)
        # the causes: communication free (and the runtime's time between actions, mostly
        # posting and sending, with it), then stages equal too
        free = simulate_step(cfg, times, links.free(), measured=False)
        equal = simulate_step(cfg, _equalised(cfg, times), links.free(), measured=False)
    except ValueError as e:  # a strategy (or setting) without a simulation, a stuck plan
        return None, str(e)
    except KeyError as e:  # an action the calibration does not cover
        return None, f"the action times have no {e}"
    P = cfg.ranks

    def mean_idle(t: Timeline) -> float:
        return statistics.mean(t.idle_fraction(r) for r in range(P))

    ranks = [{"rank": r, "step_s": tl.step_time, "compute_s": tl.compute(r),
              "idle_fraction": tl.idle_fraction(r)} for r in range(P)]
    sched, imb, comm = mean_idle(equal), mean_idle(free), mean_idle(tl)
    return {"timeline": tl, "ranks": ranks, "step_time_s": tl.step_time,
            "idle_fraction": mean_idle(tl),
            "causes": {"schedule": sched, "imbalance": max(0.0, imb - sched),
                       "communication": max(0.0, comm - imb)}}, None


def stage_imbalance(rows: list[dict[str, Any]]) -> float | None:
    """max ÷ mean of the ranks' compute inside the step (1 = perfectly balanced)."""
    comp = [r["compute_s"] for r in rows]
    return max(comp) / statistics.mean(comp) if comp and statistics.mean(comp) > 0 else None


def timeline_spans(tl: Timeline) -> PerRank:
    """A simulated timeline in the measured spans' form (for drawing), with a `step` span
    per rank from its start: 0, or the end of its late start (a replayed step's rank that
    began after another); the drawing puts each rank's step start at its left edge, as
    the measured side's."""
    out = []
    for r in range(tl.world):
        mine = tl.rank_spans(r)
        begin = max((s.end for s in mine if s.kind == "late"), default=0.0)
        step = {"name": "step", "tid": "compute", "t0": begin, "t1": tl.step_time, "args": {}}
        # the runtime's time between actions is drawn as the measured side's non-waiting
        # calls are: a comm span that is no wait (blank); a collective and the time a rank
        # waited for a message (a marker's span) as waits (hatched)
        waits = [s for s in tl.spans if s.rank == r and s.kind == "post" and s.end > s.start]
        spans, free = [step], begin
        for s in sorted(mine + waits, key=lambda s: s.start):
            if s.kind == "late":
                continue
            # a collective is drawn from when its rank got there, as a measured one is
            t0 = min(s.start, free) if s.kind == "comm" else s.start
            spans.append({"name": s.label,
                          "tid": "comm" if s.kind in ("runtime", "post") else s.kind,
                          "t0": t0, "t1": s.end,
                          "args": {**s.args, "waiting": s.kind in ("comm", "post")}})
            free = max(free, s.end)
        out.append((r, spans))
    return out


def write_trace(run_dir: str, records: list[Any]) -> str | None:
    if not any(r.spans for r in records):
        return None
    from partition.results import write_json

    path = os.path.join(run_dir, TRACE_FILE)
    recs = sorted(records, key=lambda r: r.rank)
    # Each rank's times on rank 0's clock (the offset is 0 for ranks of one host).
    shifted = [(r.rank, [{**s, "t0": s["t0"] - off, "t1": s["t1"] - off} for s in r.spans])
               for r in recs for off in [((r.clock or {}).get("offset_s") or 0.0)]]
    clocks = {str(r.rank): r.clock for r in recs}
    write_json(path, chrome_trace(shifted, clock={"per_rank": clocks}))
    return path


_COLOURS = {"F": "#4c72b0", "B": "#55a868", "I": "#dd8452", "W": "#8172b2", "update": "#999999",
            "loss": "#c44e52", "inputs": "#e5c07b"}
WAIT = "wait"  # a Box's kind for a wait in communication (drawn hatched)
# A micro-batch label needs about this share of the time axis per character to be read.
LABEL_SHARE_PER_CHAR = 0.006
EDGE_SHARE = 0.004  # boxes narrower than this share of the time axis are drawn without an edge


@dataclass(frozen=True)
class Box:
    """One box of a timeline panel, in ms from its rank's step start."""

    rank: int
    x0: float
    width: float
    kind: str  # F, B, I, W, update, loss (compute), inputs (reading the batch), or WAIT
    mb: int | None = None


def boxes(per_rank: PerRank) -> list[Box]:
    """What a panel draws: each compute span, and each wait in communication (a comm span
    that is not a wait is the call's own work, too short to see), from each rank's step
    start (its `step` span; without one, its first span)."""
    out = []
    for rank, spans in per_rank:
        steps = [s for s in spans if s["name"] == "step"]
        origin = steps[0]["t0"] if steps else min((s["t0"] for s in spans), default=0.0)
        for s in spans:
            x0, w = (s["t0"] - origin) * 1e3, (s["t1"] - s["t0"]) * 1e3
            if s["name"] == "step" or w <= 0 or (s["tid"] == "comm" and not s["args"].get("waiting")):
                continue
            if s["tid"] == "comm":
                out.append(Box(rank, x0, w, WAIT))
            else:
                mb = s["args"].get("mb")
                out.append(Box(rank, x0, w, s["args"].get("kind", ""),
                               mb if isinstance(mb, int) and mb >= 0 else None))
    return out


def legend_handles() -> list[Any]:
    from matplotlib.patches import Patch

    handles = [Patch(facecolor=c, label=k) for k, c in _COLOURS.items()]
    handles.append(Patch(facecolor="white", edgecolor="#444444", hatch="////",
                         label="waiting in communication"))
    return handles


def _draw_boxes(ax: Any, bs: list[Box], *, ranks: int, horizon: float) -> None:
    for b in bs:
        y = ranks - 1 - b.rank  # rank 0 on top, as in the papers' charts
        if b.kind == WAIT:
            ax.broken_barh([(b.x0, b.width)], (y - 0.3, 0.6), facecolors="white",
                           edgecolors="#444444", hatch="////", linewidth=0.5)
            continue
        colour = _COLOURS.get(b.kind, "#cccccc")
        # The white edge that parts neighbouring boxes would hide a box narrower than it.
        edge = "white" if b.width >= EDGE_SHARE * horizon else colour
        ax.broken_barh([(b.x0, b.width)], (y - 0.4, 0.8), facecolors=colour, edgecolors=edge,
                       linewidth=0.5)
        # A label on a box too narrow for it would run into its neighbours' and read as noise.
        if b.mb is not None and b.width >= (len(str(b.mb)) + 1) * LABEL_SHARE_PER_CHAR * horizon:
            ax.text(b.x0 + b.width / 2, y, str(b.mb), ha="center", va="center", fontsize=7,
                    color="white", clip_on=True)


def draw_panels(axes: list[Any], panels: list[tuple[str, PerRank | str]]) -> None:
    """One case's panels (measured, simulated), one row per rank, onto axes that share the
    time axis: compute boxes coloured by kind and labelled with the micro-batch,
    communication waits hatched, idle left blank. A panel given as a string has nothing to
    draw and says why."""
    drawn = [(label, boxes(p) if not isinstance(p, str) else p) for label, p in panels]
    ranks = 1 + max((r for _, p in panels if not isinstance(p, str) for r, _ in p), default=0)
    horizon = max((b.x0 + b.width for _, bs in drawn if not isinstance(bs, str) for b in bs),
                  default=0.0)
    for ax, (label, bs) in zip(axes, drawn, strict=True):
        if isinstance(bs, str):
            ax.text(0.5, 0.5, bs, ha="center", va="center", fontsize=8, color="#666666",
                    transform=ax.transAxes)
        else:
            _draw_boxes(ax, bs, ranks=ranks, horizon=horizon)
        ax.set_yticks(range(ranks))
        ax.set_yticklabels([f"rank {ranks - 1 - i}" for i in range(ranks)], fontsize=8)
        ax.set_ylabel(label, fontsize=8)
        ax.set_ylim(-0.6, ranks - 0.4)
        ax.tick_params(axis="x", labelsize=8)
    axes[-1].set_xlim(0, horizon * 1.02 if horizon > 0 else 1)
    axes[-1].set_xlabel("time in the step (ms)", fontsize=8)


def draw(path: str, measured_spans: PerRank, simulated: Timeline | None, *, title: str) -> None:
    """A run's timeline.png: measured on top, simulated below, on the same time axis (each
    from its own step start)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels: list[tuple[str, PerRank | str]] = [("measured", measured_spans)]
    if simulated is not None:
        panels.append(("simulated", timeline_spans(simulated)))
    P = len(measured_spans)
    fig, axes = plt.subplots(len(panels), 1, figsize=(11, 0.9 + 0.55 * P * len(panels) + 0.6),
                             sharex=True, squeeze=False)
    draw_panels(list(axes[:, 0]), panels)
    handles = legend_handles()
    axes[0, 0].legend(handles=handles, ncol=len(handles), fontsize=7, loc="lower left",
                      bbox_to_anchor=(0, 1.02), frameon=False)
    fig.suptitle(title, fontsize=9, y=0.995)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------- a run's timeline, read back


def step_text(step: int, measured_s: float, simulated_s: float | None) -> str:
    """What a timeline's title says of its step: its number, measured and simulated time."""
    return (f"step {step} measured {measured_s * 1e3:.1f} ms"
            + (f", simulated {simulated_s * 1e3:.1f} ms" if simulated_s is not None else ""))


@dataclass(frozen=True)
class CaseTimeline:
    """One run's traced step as its folder keeps it: the measured spans (trace.json) and the
    simulated ones (replayed from result.json), ready for `draw_panels`."""

    measured: PerRank
    simulated: PerRank | str  # or why there is no simulation
    step: int
    step_s: float  # rank 0's measured step
    simulated_step_s: float | None
    pipeline: bool  # whether any rank ran pipeline actions (F/B/I/W on a stage)

    @property
    def text(self) -> str:
        return step_text(self.step, self.step_s, self.simulated_step_s)


def simulated_from_result(res: dict[str, Any]) -> Timeline:
    """A run's traced step replayed again, from what its result.json keeps: the config, each
    rank's `traced_action_times` (else its `action_times`: the step `predicted` was
    simulated from) and the α, β of its prediction. The simulator is pure, so this is the
    timeline the run itself drew; ValueError says why it cannot be replayed."""
    from dataclasses import fields

    from partition.calibrate import result_times
    from partition.config import ConfigError, parse_config
    from partition.costs import CostParams

    try:
        cfg = parse_config(res.get("config") or {})
    except ConfigError as e:
        raise ValueError(f"its config does not parse ({e})") from e
    times = result_times(res, cfg, where="result.json", key=drawn_key(res.get("ranks") or []))
    p = (res.get("predicted") or {}).get("cost_params") or {}
    params = CostParams(**{f.name: p[f.name] for f in fields(CostParams) if f.name in p}) \
        if p else CostParams.from_config(cfg)
    try:
        return simulate_step(cfg, times, links_of(params))
    except (KeyError, OSError) as e:  # an action the times do not cover; a schedule file gone
        raise ValueError(f"its plan does not replay ({type(e).__name__}: {e})") from e


def load_case(run_dir: str) -> CaseTimeline | str:
    """A run folder's timeline (trace.json, result.json), or why it has none to draw."""
    import json

    from partition.results import RESULT_FILE  # results reads this module: import it late

    path = os.path.join(run_dir, TRACE_FILE)
    if not os.path.exists(path):
        return f"no {TRACE_FILE} in its folder"
    try:
        with open(path, encoding="utf-8") as f:
            per_rank = read_trace(json.load(f))
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"its {TRACE_FILE} does not read ({type(e).__name__}: {e})"
    meas = measured_spans(per_rank)
    if meas is None:
        return f"its {TRACE_FILE} has no compute spans on every rank"
    step = meas[0]["step"]
    spans = [(r, step_spans(ss, step)) for r, ss in per_rank]
    # A pipeline: actions of two stages or more (a hybrid mesh with pp=1 runs the pipeline
    # runtime over one stage, which is no pipeline to draw).
    pipeline = len({s["args"]["stage"] for _, ss in spans for s in ss
                    if s["tid"] == "compute" and "stage" in s["args"]}) > 1
    try:
        with open(os.path.join(run_dir, RESULT_FILE), encoding="utf-8") as f:
            tl = simulated_from_result(json.load(f))
        simulated: PerRank | str = timeline_spans(tl)
    except (OSError, ValueError) as e:
        tl, simulated = None, f"not simulated: {e}"
    return CaseTimeline(spans, simulated, step, meas[0]["step_s"],
                        tl.step_time if tl is not None else None, pipeline)


def case_height(ranks: int) -> float:
    """Inches one case takes in `draw_cases`: its title, two panels of `ranks` rows, the axis."""
    return 0.75 + 2 * (0.25 + 0.32 * ranks)


def draw_cases(path: str, cases: list[tuple[str, CaseTimeline]]) -> int:
    """Several runs' timelines in one figure (the report's timelines.png): per case a pair of
    panels, measured above simulated, on the case's own time axis, titled; one legend on
    top. Returns the number of panels drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    heights = [case_height(len(c.measured)) for _, c in cases]
    fig = plt.figure(figsize=(11, 0.5 + sum(heights)), layout="constrained")
    subs = fig.subfigures(len(cases), 1, height_ratios=heights, squeeze=False)[:, 0]
    for sub, (title, case) in zip(subs, cases, strict=True):
        axes = sub.subplots(2, 1, sharex=True)
        draw_panels(list(axes), [("measured", case.measured), ("simulated", case.simulated)])
        sub.suptitle(f"{title}: {case.text}", fontsize=9, x=0.01, ha="left")
    handles = legend_handles()
    fig.legend(handles=handles, ncol=len(handles), fontsize=7, loc="outside upper left",
               frameon=False)
    n = len(fig.axes)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return n
