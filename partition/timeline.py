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
simulated below, one row per rank, on one time axis).
"""

from __future__ import annotations

import os
import statistics
from typing import Any

from partition.simulate import Links, Timeline, simulate, step_ops
from partition.trace import chrome_trace, compute_seconds

TRACE_FILE = "trace.json"
TIMELINE_FILE = "timeline.png"


def _last_traced(spans: list[dict[str, Any]]) -> int | None:
    steps = [s["step"] for s in spans if s["name"] == "step"]
    return max(steps) if steps else None


def measured(records: list[Any]) -> list[dict[str, Any]] | None:
    """Per rank (rank order) the traced step's step time, compute and idle fraction."""
    # Every rank needs compute spans (the torch engines' come from the profiler, engines/profiled.py).
    if not records or not all(any(s["name"] != "step" and s["tid"] == "compute" for s in r.spans)
                              for r in records):
        return None
    step = min(_last_traced(r.spans) for r in records)
    out = []
    for r in records:
        spans = [s for s in r.spans if s["step"] == step]
        total = next(s for s in spans if s["name"] == "step")
        T = total["t1"] - total["t0"]
        comp = compute_seconds(spans)
        wait = sum(s["t1"] - s["t0"] for s in spans if s["tid"] == "comm" and s["args"].get("waiting"))
        out.append({"rank": r.rank, "step": step, "step_s": T, "compute_s": comp, "wait_s": wait,
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


def simulate_step(cfg: Any, times: list[dict[str, float]], links: Links) -> Timeline:
    return simulate(step_ops(cfg, times, links, schedule=_schedule(cfg)), cfg.ranks)


def _equalised(cfg: Any, times: list[dict[str, float]]) -> list[dict[str, float]]:
    """Every rank's actions at the mean duration of their kind: equal stages."""
    keys: dict[str, list[float]] = {}
    for t in times:
        for k, v in t.items():
            kind = k.split(":")[-1] if ":" in k else k
            keys.setdefault(kind, []).append(v)
    mean = {k: statistics.mean(v) for k, v in keys.items()}
    return [{k: mean[k.split(":")[-1] if ":" in k else k] for k in t} for t in times]


def simulated_block(cfg: Any, times: list[dict[str, float]], params: Any) -> dict[str, Any] | None:
    """`predicted` timing from the simulator: per rank step, compute, idle; and the causes."""
    if not times or not all(times) or len(times) != cfg.ranks:
        return None
    links = links_of(params)
    try:
        tl = simulate_step(cfg, times, links)
        free = simulate_step(cfg, times, links.free())
        equal = simulate_step(cfg, _equalised(cfg, times), links.free())
    except (KeyError, ValueError):  # a strategy or an action the calibration does not cover
        return None
    P = cfg.ranks

    def mean_idle(t: Timeline) -> float:
        return statistics.mean(t.idle_fraction(r) for r in range(P))

    ranks = [{"rank": r, "step_s": tl.step_time, "compute_s": tl.compute(r),
              "idle_fraction": tl.idle_fraction(r)} for r in range(P)]
    sched, imb, comm = mean_idle(equal), mean_idle(free), mean_idle(tl)
    return {"timeline": tl, "ranks": ranks, "step_time_s": tl.step_time,
            "idle_fraction": mean_idle(tl),
            "causes": {"schedule": sched, "imbalance": max(0.0, imb - sched),
                       "communication": max(0.0, comm - imb)}}


def stage_imbalance(rows: list[dict[str, Any]]) -> float | None:
    """max ÷ mean of the ranks' compute inside the step (1 = perfectly balanced)."""
    comp = [r["compute_s"] for r in rows]
    return max(comp) / statistics.mean(comp) if comp and statistics.mean(comp) > 0 else None


def timeline_spans(tl: Timeline) -> list[tuple[int, list[dict[str, Any]]]]:
    """A simulated timeline in the measured spans' form (for drawing)."""
    out = []
    for r in range(tl.world):
        out.append((r, [{"name": s.label, "tid": s.kind, "t0": s.start, "t1": s.end,
                         "args": {**s.args, "waiting": s.kind == "comm"}}
                        for s in tl.rank_spans(r)]))
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
            "loss": "#c44e52"}


def draw(path: str, measured_spans: list[tuple[int, list[dict[str, Any]]]],
         simulated: Timeline | None, *, title: str) -> None:
    """Paper-style chart: one row per rank, compute boxes coloured by kind and labelled with
    the micro-batch, communication waits hatched, idle left blank; measured on top,
    simulated below, on the same time axis (each from its own step start)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    panels = [("measured", measured_spans)]
    if simulated is not None:
        panels.append(("simulated", timeline_spans(simulated)))
    P = len(measured_spans)
    fig, axes = plt.subplots(len(panels), 1, figsize=(11, 0.9 + 0.55 * P * len(panels) + 0.6),
                             sharex=True, squeeze=False)
    horizon = 0.0
    for ax, (label, per_rank) in zip(axes[:, 0], panels):
        for rank, spans in per_rank:
            steps = [s for s in spans if s["name"] == "step"]
            origin = steps[0]["t0"] if steps else min((s["t0"] for s in spans), default=0.0)
            for s in spans:
                if s["name"] == "step":
                    continue
                x0, w = (s["t0"] - origin) * 1e3, (s["t1"] - s["t0"]) * 1e3
                horizon = max(horizon, x0 + w)
                y = P - 1 - rank
                if s["tid"] == "comm":
                    if not s["args"].get("waiting") or w <= 0:
                        continue
                    ax.broken_barh([(x0, w)], (y - 0.3, 0.6), facecolors="white",
                                   edgecolors="#444444", hatch="////", linewidth=0.5)
                    continue
                kind = s["args"].get("kind", "")
                ax.broken_barh([(x0, w)], (y - 0.4, 0.8), facecolors=_COLOURS.get(kind, "#cccccc"),
                               edgecolors="white", linewidth=0.5)
                mb = s["args"].get("mb")
                if mb is not None and mb >= 0 and w > 0:
                    ax.text(x0 + w / 2, y, str(mb), ha="center", va="center", fontsize=7,
                            color="white", clip_on=True)
        ax.set_yticks(range(P))
        ax.set_yticklabels([f"rank {P - 1 - i}" for i in range(P)])
        ax.set_ylabel(label)
        ax.set_ylim(-0.6, P - 0.4)
    axes[-1, 0].set_xlim(0, horizon * 1.02 if horizon > 0 else 1)
    axes[-1, 0].set_xlabel("time in the step (ms)")
    handles = [Patch(facecolor=c, label=k) for k, c in _COLOURS.items()]
    handles.append(Patch(facecolor="white", edgecolor="#444444", hatch="////",
                         label="waiting in communication"))
    axes[0, 0].legend(handles=handles, ncol=len(handles), fontsize=7, loc="lower left",
                      bbox_to_anchor=(0, 1.02), frameon=False)
    fig.suptitle(title, fontsize=9, y=0.995)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
