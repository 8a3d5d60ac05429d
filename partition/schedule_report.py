"""The schedule comparison's table and figure (experiment=schedules), from result.json files.

Per pipeline run: the idle fraction of each rank three ways, the step time, the
kept-activation peak per rank and the bytes per step.

    measured     1 − compute_s / step_s of `ranks[].timing` (medians over the steady
                 steps; compute = the step's wall time less its time in comm.py calls,
                 so waiting for a neighbour and the transfers count as idle)
    simulated    simulate.py playing the run's action lists. Per-action durations are
                 FLOP-proportional: each rank's measured compute time per step split over
                 its actions by their matrix-product FLOPs (F: z = W x of every layer, I: the
                 input gradients but the net's first layer's, W: every dJ/dW). No per-action
                 calibration is recorded yet, so this is the closest the run itself says;
                 a message takes α + n/β with the run's cost parameters (calibrated when
                 cost.calibrate is on), J's all-reduce the collective α + wire/β.
    paper        the schedule's paper formula for equal F, I, W (generators.paper_bubble)
                 over v·M·(F+I+W) of work, and next to it `ideal`, the action lists
                 simulated with unit F = I = W and free communication (predicted.bubble_fraction)

Nothing here is read from Hydra; experiments/compare.py calls `write_schedule_report`.
"""

from __future__ import annotations

import os
from typing import Any

import pandas as pd

from partition.config import parse_config
from partition.plans.generators import DEFAULT_VIRTUAL, paper_idle_fraction
from partition.plans.schedule import Action, Message, load_schedule
from partition.plans.stages import plan_stages
from partition.plans.traffic import METRIC_BYTES, ring_wire_bytes
from partition.simulate import pipeline_ops, simulate

ITEMSIZE = {"float32": 4, "float64": 8}
ORDER = ["gpipe", "1f1b", "interleaved_1f1b", "looped_bfs", "zb1p", "zbv", "dualpipev"]


def _schedule_of(cfg):  # noqa: ANN001, ANN202 - RunConfig -> Schedule
    return load_schedule(cfg.strategy.schedule, world=cfg.world_size,
                         micro=cfg.train.microbatches, virtual=cfg.strategy.virtual_stages)


def action_flops(cfg, plan: list[tuple[int, int]], a: Action) -> int:  # noqa: ANN001
    """Matrix-product FLOPs of one action on one micro-batch (2·m·n·k per product)."""
    rows, dims = cfg.train.batch_size // cfg.train.microbatches, cfg.model.dims
    start, end = plan[a.stage]
    one = [2 * rows * dims[l] * dims[l + 1] for l in range(start, end)]
    f = sum(one)
    i = sum(x for l, x in zip(range(start, end), one, strict=True) if l > 0)
    return {"F": f, "I": i, "W": f, "B": i + f}[a.kind]


def simulated_timeline(res: dict[str, Any]):  # noqa: ANN201 - simulate.Timeline
    """The run's action lists played with FLOP-proportional durations scaled to each rank's
    measured compute time, and its α + n/β messages (see the module docstring)."""
    cfg = parse_config(res["config"])
    sched = _schedule_of(cfg)
    plan = plan_stages(cfg.spec, sched.stages, cfg.strategy.balance)
    P, item = cfg.world_size, ITEMSIZE[cfg.train.dtype]
    rows = cfg.train.batch_size // cfg.train.microbatches
    measured = [(r.get("timing") or {}).get("compute_s") for r in res["ranks"]]
    scale = []
    for r in range(P):
        total = sum(action_flops(cfg, plan, a) for a in sched.ranks[r])
        scale.append((measured[r] or 0.0) / total if total else 0.0)
    owner = {a: r for r in range(P) for a in sched.ranks[r]}
    cp = (res.get("predicted") or {}).get("cost_params") or {}
    alpha, beta = cp.get("alpha_s", cfg.cost.alpha_s), cp.get("beta_Bps", cfg.cost.beta_Bps)
    c_alpha = cp.get("collective_alpha_s", cfg.cost.collective_alpha_s)
    c_beta = cp.get("collective_beta_Bps", cfg.cost.collective_beta_Bps)

    def compute(a: Action) -> float:
        return action_flops(cfg, plan, a) * scale[owner[a]]

    def transfer(m: Message) -> float:
        n = rows * cfg.model.dims[plan[max(m.from_stage, m.to_stage)][0]] * item
        return alpha + n / beta

    metric = c_alpha + ring_wire_bytes("all_reduce", METRIC_BYTES, P) / c_beta if P > 1 else 0.0
    return simulate(pipeline_ops(sched, compute=compute, transfer=transfer, metric=metric), P)


def schedule_row(res: dict[str, Any]) -> dict[str, Any] | None:
    """One table row for a pipeline run; None for anything else."""
    cfg_d = res.get("config") or {}
    if (cfg_d.get("strategy") or {}).get("name") != "pipeline":
        return None
    cfg = parse_config(cfg_d)
    name, P, M = cfg.strategy.schedule, cfg.world_size, cfg.train.microbatches
    v = cfg.strategy.virtual_stages or 1
    row: dict[str, Any] = {"run": os.path.basename(res.get("path") or ""), "schedule": name,
                           "P": P, "M": M, "v": v, "status": res.get("status")}
    ranks = res.get("ranks") or []
    timing = [r.get("timing") or {} for r in ranks]
    measured = [1.0 - t["compute_s"] / t["step_s"] if t.get("step_s") and
                t.get("compute_s") is not None else None for t in timing]
    row["step_ms"] = 1e3 * ((res.get("train") or {}).get("step_time_s") or {}).get("median", 0) \
        or None
    row["idle_measured"] = measured
    sim = None
    if res.get("status") == "ok" and all(m is not None for m in measured) and len(ranks) == P:
        tl = simulated_timeline(res)
        sim = [tl.idle_fraction(r) for r in range(P)]
        row["sim_step_ms"] = 1e3 * tl.step_time
    row["idle_simulated"] = sim
    row["idle_paper"] = paper_idle_fraction(name, world=P, micro=M, virtual=v) \
        if name in DEFAULT_VIRTUAL else None
    row["idle_ideal"] = (res.get("predicted") or {}).get("bubble_fraction")
    row["max_abs_diff"] = max(abs(a - b) for a, b in zip(measured, sim, strict=True)) \
        if sim is not None else None
    row["act_peak_bytes"] = [(r.get("memory") or {}).get("activations_bytes") for r in ranks]
    roles = [((r.get("comm") or {}).get("by_role") or {}) for r in ranks]
    row["bytes_per_step"] = sum(v2.get("bytes", 0) for rr in roles for k, v2 in rr.items()
                                if k in ("activation", "activation_grad")) if ranks else None
    return row


def schedule_table(results: list[dict[str, Any]]) -> pd.DataFrame:
    rows = [r for r in (schedule_row(x) for x in results) if r is not None]
    df = pd.DataFrame(rows)
    if len(df):
        df["_o"] = [ORDER.index(s) if s in ORDER else len(ORDER) for s in df["schedule"]]
        df = df.sort_values(["P", "_o", "M"]).drop(columns="_o").reset_index(drop=True)
    return df


def _mean(xs: Any) -> float | None:
    xs = [x for x in (xs or []) if x is not None]
    return sum(xs) / len(xs) if xs else None


def _pct(xs: Any) -> str:
    if xs is None:
        return "—"
    if isinstance(xs, (list, tuple)):
        return " / ".join("—" if x is None else f"{100 * x:.1f}" for x in xs)
    return f"{100 * xs:.1f}"


def to_markdown(df: pd.DataFrame) -> str:
    head = ("| run | schedule | P | M | v | step ms | idle % measured (per rank) | "
            "idle % simulated | idle % paper | idle % ideal | max abs Δ | "
            "kept activations KiB (per rank) | bytes/step |")
    lines = [head, "|" + "---|" * 13]
    for _, r in df.iterrows():
        kib = " / ".join("—" if x is None else f"{x / 1024:.0f}" for x in r["act_peak_bytes"])
        step = "—" if pd.isna(r.get("step_ms")) else f"{r['step_ms']:.1f}"
        diff = "—" if r.get("max_abs_diff") is None or pd.isna(r.get("max_abs_diff")) \
            else f"{r['max_abs_diff']:.3f}"
        lines.append(f"| {r['run']} | {r['schedule']} | {r['P']} | {r['M']} | {r['v']} | {step} | "
                     f"{_pct(r['idle_measured'])} | {_pct(r['idle_simulated'])} | "
                     f"{_pct(r['idle_paper'])} | {_pct(r['idle_ideal'])} | {diff} | {kib} | "
                     f"{'—' if r['bytes_per_step'] is None else format(r['bytes_per_step'], ',')} |")
    return "\n".join(lines)


def write_figure(df: pd.DataFrame, path: str) -> str | None:
    """Idle fraction (mean over ranks) against M, one line per schedule: measured,
    simulated and the paper's formula side by side, a row of panels per P."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = df[df["status"] == "ok"]
    if not len(ok):
        return None
    Ps = sorted(ok["P"].unique())
    fig, axes = plt.subplots(len(Ps), 3, figsize=(13, 3.8 * len(Ps)), squeeze=False,
                             sharey=True)
    cols = [("idle_measured", "measured (ranks[].timing)"),
            ("idle_simulated", "simulated (simulate.py, FLOP-proportional)"),
            ("idle_paper", "paper formula (solid); unit F = I = W simulated (dashed)")]
    for i, P in enumerate(Ps):
        sub = ok[ok["P"] == P]
        for j, (col, title) in enumerate(cols):
            ax = axes[i][j]
            for s in [x for x in ORDER if x in set(sub["schedule"])]:
                g = sub[sub["schedule"] == s].sort_values("M")
                ys = [(_mean(y) if isinstance(y, list) else y) for y in g[col]]
                pts = [(m, y) for m, y in zip(g["M"], ys, strict=True) if y is not None]
                if pts:
                    ax.plot([p[0] for p in pts], [100 * p[1] for p in pts], "o-",
                            color=f"C{ORDER.index(s)}", label=s)
                if col == "idle_paper":  # the exact action lists, equal stages, free comm
                    ideal = [(m, y) for m, y in zip(g["M"], g["idle_ideal"], strict=True)
                             if y is not None]
                    ax.plot([p[0] for p in ideal], [100 * p[1] for p in ideal], "s--",
                            mfc="none", color=f"C{ORDER.index(s)}")
            ax.set_xscale("log", base=2)
            ax.set_xticks(sorted(sub["M"].unique()), [str(m) for m in sorted(sub["M"].unique())])
            ax.set_title(f"P={P}: {title}", fontsize=9)
            ax.set_xlabel("micro-batches M")
            ax.grid(alpha=0.3)
            if j == 0:
                ax.set_ylabel("idle fraction, mean over ranks (%)")
        axes[i][2].legend(fontsize=8, loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


_COLORS = {"F": "#4c72b0", "B": "#dd8452", "I": "#55a868", "W": "#8172b3"}


def write_timelines(results: list[dict[str, Any]], path: str) -> str | None:
    """The simulated timeline (as `schedule_row` simulates it) of every `ok` run with
    M = 2P at the smallest P: ranks as rows, F / B / I / W as coloured spans labelled by
    stage and micro-batch, white where the rank waits."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = []
    for res in results:
        row = schedule_row(res)
        if row and row["status"] == "ok" and row["M"] == 2 * row["P"] and row["idle_simulated"]:
            runs.append((row, res))
    if not runs:
        return None
    P0 = min(r["P"] for r, _ in runs)
    runs = sorted([x for x in runs if x[0]["P"] == P0],
                  key=lambda x: ORDER.index(x[0]["schedule"]) if x[0]["schedule"] in ORDER else 99)
    fig, axes = plt.subplots(len(runs), 1, figsize=(13, 0.6 + 0.55 * P0 * len(runs) + 0.4 * len(runs)),
                             squeeze=False)
    for ax, (row, res) in zip(axes[:, 0], runs, strict=True):
        tl = simulated_timeline(res)
        for sp in tl.spans:
            if sp.kind != "compute" or "kind" not in sp.args or sp.args["kind"] == "update":
                continue
            ax.barh(sp.rank, (sp.end - sp.start) * 1e3, left=sp.start * 1e3, height=0.8,
                    color=_COLORS[sp.args["kind"]], edgecolor="white", linewidth=0.5)
            if (sp.end - sp.start) / max(tl.step_time, 1e-12) > 0.012:
                ax.text((sp.start + sp.end) / 2 * 1e3, sp.rank, sp.label, ha="center",
                        va="center", fontsize=6, color="white")
        ax.set_yticks(range(P0), [f"rank {r}" for r in range(P0)], fontsize=8)
        ax.invert_yaxis()
        ax.set_xlim(0, tl.step_time * 1e3)
        idle = " / ".join(f"{100 * x:.0f}" for x in row["idle_simulated"])
        meas = " / ".join(f"{100 * x:.0f}" for x in row["idle_measured"])
        ax.set_title(f"{row['schedule']}  P={P0} M={row['M']}: simulated idle {idle} %, "
                     f"measured {meas} %", fontsize=9, loc="left")
    axes[-1, 0].set_xlabel("ms (simulated step; F blue, B orange, I green, W purple)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_schedule_report(results: list[dict[str, Any]], out: str) -> str:
    """schedules.csv, schedules.md and idle_vs_microbatches.png in `out`; returns the text
    the entry point prints."""
    df = schedule_table(results)
    os.makedirs(out, exist_ok=True)
    csv_path = os.path.join(out, "schedules.csv")
    df.to_csv(csv_path, index=False)
    fig = write_figure(df, os.path.join(out, "idle_vs_microbatches.png")) if len(df) else None
    tls = write_timelines(results, os.path.join(out, "timelines.png"))
    md = ["# Pipeline schedules: idle fraction, memory and bytes", "", to_markdown(df), "",
          "Idle fraction per rank = 1 − compute / step time. measured: ranks[].timing; "
          "simulated: the action lists in partition/simulate.py with each rank's measured "
          "compute split over its actions by FLOPs and α + n/β messages; paper: the "
          "schedule's formula for equal F, I, W; ideal: the action lists with unit F = I = W "
          "and free communication. Kept activations: the peak of what the stages keep for "
          "backward (ranks[].memory.activations_bytes); bytes/step: activations and their "
          "gradients sent, all ranks.", ""]
    if fig:
        md.append(f"![idle fraction against M]({os.path.basename(fig)})")
    if tls:
        md += ["", "Simulated timelines at M = 2P (measured per-action spans are not recorded "
               "yet; the runs record per-step compute and communication time only):", "",
               f"![simulated timelines]({os.path.basename(tls)})"]
    md_path = os.path.join(out, "schedules.md")
    with open(md_path, "w") as fh:
        fh.write("\n".join(md) + "\n")
    files = [csv_path, md_path] + [p for p in (fig, tls) if p]
    return to_markdown(df) + "\n\nwrote " + ", ".join(files)
