"""The schedule comparison's table and figure (experiment=schedules), from result.json files.

Per pipeline run: the idle fraction of each rank three ways, the step time, the
kept-activation peak per rank and the bytes per step.

    measured     `ranks[].timing.idle_fraction`: 1 − compute / step time of the traced step's
                 spans (waiting for a neighbour and the transfers count as idle;
                 docs/timeline.md)
    simulated    `predicted.ranks[].timing.idle_fraction`: simulate.py playing the run's
                 action lists with each action's duration measured at the run's shapes
                 (calibrate.action_times) and α + n/β messages
    paper        the schedule's paper formula for equal F, I, W (generators.paper_bubble)
                 over v·M·(F+I+W) of work, and next to it `ideal`, the action lists
                 simulated with unit F = I = W and free communication (predicted.bubble_fraction)

and the simulated idle split by cause (`train.idle_causes`: schedule, imbalance,
communication). Every run folder also has its `timeline.png`, measured over simulated.
Nothing here is read from Hydra; experiments/compare.py calls `write_schedule_report`.
"""

from __future__ import annotations

import math
import os
from typing import Any

import pandas as pd

from partition.config import parse_config
from partition.plans.generators import DEFAULT_VIRTUAL, paper_idle_fraction

ORDER = ["gpipe", "1f1b", "interleaved_1f1b", "looped_bfs", "zb1p", "zbv", "dualpipev"]


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
    pred = res.get("predicted") or {}
    train = res.get("train") or {}
    measured = [(r.get("timing") or {}).get("idle_fraction") for r in ranks]
    sim = [(r.get("timing") or {}).get("idle_fraction") for r in pred.get("ranks") or []]
    sim = sim if sim and all(x is not None for x in sim) else None
    row["step_ms"] = 1e3 * (train.get("step_time_s") or {}).get("median", 0) or None
    row["sim_step_ms"] = 1e3 * pred["step_time_s"] if pred.get("step_time_s") else None
    row["idle_measured"] = measured
    row["idle_simulated"] = sim
    row["idle_paper"] = paper_idle_fraction(name, world=P, micro=M, virtual=v) \
        if name in DEFAULT_VIRTUAL else None
    row["idle_ideal"] = pred.get("bubble_fraction")
    row["idle_causes"] = train.get("idle_causes")
    row["max_abs_diff"] = max(abs(a - b) for a, b in zip(measured, sim, strict=True)) \
        if sim is not None and None not in measured and len(sim) == len(measured) else None
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


def _none(x: Any) -> bool:
    return x is None or (isinstance(x, float) and math.isnan(x))


def _pct(xs: Any) -> str:
    if xs is None:
        return "—"
    if isinstance(xs, (list, tuple)):
        return " / ".join("—" if x is None else f"{100 * x:.1f}" for x in xs)
    return f"{100 * xs:.1f}"


def to_markdown(df: pd.DataFrame) -> str:
    head = ("| run | schedule | P | M | v | step ms (sim.) | idle % measured (per rank) | "
            "idle % simulated | max abs Δ | idle % paper | idle % ideal | simulated idle by cause "
            "% (schedule / imbalance / comm.) | kept activations KiB (per rank) | bytes/step |")
    lines = [head, "|" + "---|" * 14]
    for _, r in df.iterrows():
        kib = " / ".join("—" if x is None else f"{x / 1024:.0f}" for x in r["act_peak_bytes"])
        step = "—" if _none(r.get("step_ms")) else f"{r['step_ms']:.1f}"
        if not _none(r.get("sim_step_ms")):
            step += f" ({r['sim_step_ms']:.1f})"
        diff = "—" if _none(r.get("max_abs_diff")) else f"{r['max_abs_diff']:.3f}"
        c = r.get("idle_causes")
        causes = "—" if not isinstance(c, dict) else " / ".join(
            f"{100 * c[k]:.1f}" for k in ("schedule", "imbalance", "communication"))
        lines.append(f"| {r['run']} | {r['schedule']} | {r['P']} | {r['M']} | {r['v']} | {step} | "
                     f"{_pct(r['idle_measured'])} | {_pct(r['idle_simulated'])} | {diff} | "
                     f"{_pct(r['idle_paper'])} | {_pct(r['idle_ideal'])} | {causes} | {kib} | "
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
            ("idle_simulated", "simulated (simulate.py, calibrated action times)"),
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


def write_schedule_report(results: list[dict[str, Any]], out: str) -> str:
    """schedules.csv, schedules.md and idle_vs_microbatches.png in `out`; returns the text
    the entry point prints."""
    df = schedule_table(results)
    os.makedirs(out, exist_ok=True)
    csv_path = os.path.join(out, "schedules.csv")
    df.to_csv(csv_path, index=False)
    fig = write_figure(df, os.path.join(out, "idle_vs_microbatches.png")) if len(df) else None
    md = ["# Pipeline schedules: idle fraction, memory and bytes", "", to_markdown(df), "",
          "Idle fraction per rank = 1 − compute / step time. measured: the traced step's "
          "spans (ranks[].timing.idle_fraction); simulated: the action lists in "
          "partition/simulate.py with the run's calibrated action times and α + n/β messages "
          "(predicted.ranks[].timing.idle_fraction); max abs Δ: the worst rank's |measured − "
          "simulated|; paper: the schedule's formula for equal F, I, W; ideal: the action "
          "lists with unit F = I = W and free communication; causes: the simulated idle "
          "split into schedule (equal durations, free communication), imbalance and "
          "communication (train.idle_causes). Kept activations: the peak of what the stages "
          "keep for backward (ranks[].memory.activations_bytes); bytes/step: activations and "
          "their gradients sent, all ranks. Each run folder has its timeline.png (measured "
          "over simulated).", ""]
    if fig:
        md.append(f"![idle fraction against M]({os.path.basename(fig)})")
    md_path = os.path.join(out, "schedules.md")
    with open(md_path, "w") as fh:
        fh.write("\n".join(md) + "\n")
    files = [csv_path, md_path] + ([fig] if fig else [])
    return to_markdown(df) + "\n\nwrote " + ", ".join(files)
