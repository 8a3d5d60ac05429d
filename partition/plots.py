"""The report's figures, from the results table (`partition.report.build_table`).

- `summary.png`, the headline: one row per case, three panels sharing the case axis —
  (a) peak memory per device stacked by what was live at the peak, the memory limit
  as a line, an `oom` case as the outline of its predicted need; (b) training bytes
  per step per device on a log axis, each bar labelled (a run that moves nothing says
  "0 B"); (c) the time for the same examples, a case with more ranks than cores
  marked as such.
- `memory_per_rank.png`: every rank of every partitioned case (a pipeline's stages
  hold very different amounts).
- `loss.png`: J against examples seen, curves that coincide drawn once and said so,
  and |ΔJ| against the single-device baseline on a log axis.
- `memory_vs_batch.png` only when the runs have more than one B, `bytes_vs_width.png`
  only when they have more than one hidden width.
- `timelines.png` (and `timelines-2.png`, … past eight cases): each pipeline case's traced
  step, measured above simulated, read back from its run folder (`timeline.load_case`).

Measured values are bars or filled markers; the cost model's predictions are black
ticks, so the two stay distinguishable where they are equal. A figure with nothing
to show is not drawn, and the note says why.
"""

from __future__ import annotations

import math
import os
from collections import Counter
from typing import Any

import pandas as pd

from partition.report import (
    CATEGORIES,
    STRATEGY_ORDER,
    Plots,
    busy_machine,
    fmt_bytes,
    fmt_seconds,
    num,
    run_label,
)

MiB = 1024**2
COLORS = {"params": "#4C72B0", "grads": "#55A868", "optimizer": "#8172B2", "input": "#CCB974",
          "activations": "#C44E52", "gathered": "#DD8452", "comm": "#64B5CD",
          "temporaries": "#B0B0B0"}
CATEGORY_TEXT = {"comm": "comm buffers", "input": "input batch", "gathered": "gathered weights"}
PRED = {"marker": "|", "color": "black", "ms": 15, "mew": 2, "ls": "none"}
# Two J curves closer than this everywhere (relative to |J|) are drawn as one.
SAME_CURVE_RTOL = 1e-5


def _plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _rows(df: pd.DataFrame) -> list[pd.Series]:
    return [r for _, r in df.iterrows()]


def _labels(df: pd.DataFrame) -> list[str]:
    return [r["label"] or run_label(r) for _, r in df.iterrows()]


def common_examples(df: pd.DataFrame) -> int | None:
    """The number of examples most finished runs saw (the larger on a tie)."""
    seen = Counter(int(num(r["examples"])) for _, r in df.iterrows()
                   if r["status"] == "ok" and num(r["examples"]))
    if not seen:
        return None
    top = max(seen.values())
    return max(e for e, n in seen.items() if n == top)


def over_cores(r: pd.Series) -> bool:
    """A CPU run whose ranks × threads exceed the cores it had: its ranks share cores."""
    cores, P, threads = num(r["cores"]), num(r["P"]), num(r["threads"]) or 1
    return r["device"] == "cpu" and bool(cores) and bool(P) and P * threads > cores


def _limits(df: pd.DataFrame) -> list[float]:
    return sorted({num(x) for x in df["memory_limit"] if num(x)})


def _setting(df: pd.DataFrame) -> str:
    """model.dims, dtype, device, threads and cores of these runs, where they agree."""
    parts = []
    for col, fmt in (("dims", "model.dims=[{}]"), ("dtype", "{}"), ("device", "{}")):
        vals = {v for v in df[col] if v}
        if len(vals) == 1:
            v = vals.pop()
            parts.append(fmt.format(v.replace("-", ", ") if col == "dims" else v))
    threads = {int(t) for t in df["threads"] if num(t)}
    if len(threads) == 1:
        t = threads.pop()
        parts.append(f"{t} thread{'s' if t > 1 else ''} per rank")
    cores = {int(c) for c in df["cores"] if num(c)}
    if len(cores) == 1:
        parts.append(f"{cores.pop()} cores")
    return ", ".join(parts)


def _bytes_ticks(ax: Any, lo: float, hi: float) -> None:
    """Log-axis ticks at 1 B, 32 B, 1 KiB, 32 KiB, 1 MiB, … labelled in binary units."""
    from matplotlib.ticker import FixedLocator, NullFormatter, NullLocator

    ticks = [2.0**k for k in range(0, 41, 5) if lo <= 2.0**k <= hi]
    ax.xaxis.set_major_locator(FixedLocator(ticks))
    ax.xaxis.set_minor_locator(NullLocator())
    ax.xaxis.set_minor_formatter(NullFormatter())
    units = ["B", "KiB", "MiB", "GiB", "TiB"]
    ax.set_xticklabels([f"{int(t / 1024 ** (int(math.log2(t)) // 10))} "
                        f"{units[int(math.log2(t)) // 10]}" for t in ticks], fontsize=8)


def _mem_bars(ax: Any, ys: list[float], rows: list[dict[str, Any]], *, height: float,
              labelled: set[str]) -> float:
    """Stacked bars of live bytes by category at the peak; returns the largest extent (MiB).

    Each item of `rows`: peak, pred_peak, breakdown, status."""
    top = 0.0
    for y, r in zip(ys, rows):
        peak, pred, bd = num(r["peak"]), num(r["pred_peak"]), r["breakdown"]
        if peak is None:
            need = pred
            if need is not None:  # oom (or not measured): the outline of the predicted need
                ax.barh(y, need / MiB, height=height, fill=False, edgecolor="black", ls="--",
                        lw=1.2, label=None if "need" in labelled else "predicted need (not run)")
                labelled.add("need")
                what = r["status"] if r["status"] != "ok" else "not measured"
                ax.text(need / MiB, y, f" {what}: needs {fmt_bytes(need)} (predicted)",
                        va="center", fontsize=8)
                top = max(top, need / MiB)
            else:
                ax.text(0, y, f" {r['status']}: no memory figure", va="center", fontsize=8)
            continue
        left = 0.0
        if bd and sum(bd.values()) > 0:
            for c in CATEGORIES:
                w = bd.get(c, 0) / MiB
                if w <= 0:
                    continue
                ax.barh(y, w, left=left, height=height, color=COLORS[c],
                        label=None if c in labelled else CATEGORY_TEXT.get(c, c))
                labelled.add(c)
                left += w
        else:
            ax.barh(y, peak / MiB, height=height, color="#777777",
                    label=None if "?" in labelled else "(no breakdown)")
            labelled.add("?")
        ax.text(peak / MiB, y, f" {fmt_bytes(peak)}", va="center", fontsize=8)
        if pred is not None:
            ax.plot([pred / MiB], [y], **PRED,
                    label=None if "pred" in labelled else "predicted (cost model)")
            labelled.add("pred")
        top = max(top, peak / MiB, (pred or 0) / MiB)
    return top


def _legend_handles(labelled: set[str], df: pd.DataFrame, *, crowded: bool = False) -> list[Any]:
    """Legend entries in stacking order, for what a figure actually drew."""
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    out = [Patch(color=COLORS[c], label=CATEGORY_TEXT.get(c, c)) for c in CATEGORIES
           if c in labelled]
    if "?" in labelled:
        out.append(Patch(color="#777777", label="(no breakdown)"))
    if "pred" in labelled:
        out.append(Line2D([], [], **PRED, label="predicted (cost model)"))
    if "need" in labelled:
        out.append(Patch(fill=False, edgecolor="black", ls="--", label="predicted need (oom)"))
    if "limit" in labelled:
        lims = ", ".join(fmt_bytes(x) for x in _limits(df))
        out.append(Line2D([], [], color="red", ls=":", lw=1.6, label=f"memory_limit {lims}"))
    if crowded:
        out.append(Patch(facecolor="white", edgecolor="black", hatch="///",
                         label="more ranks than cores"))
    return out


def _limit_lines(ax: Any, df: pd.DataFrame, labelled: set[str]) -> float:
    top = 0.0
    for lim in _limits(df):
        ax.axvline(lim / MiB, color="red", ls=":", lw=1.6,
                   label=None if "limit" in labelled else f"memory_limit {fmt_bytes(lim)}")
        labelled.add("limit")
        top = max(top, lim / MiB)
    return top


# ---------------------------------------------------------------- summary.png


def bytes_entries(df: pd.DataFrame) -> list[dict[str, Any]]:
    """Panel (b), one entry per row: a bar with its label, "0 B" for a run that moves nothing,
    or the status of a run that has no figure; `pred` the cost model's bytes."""
    out = []
    for r in _rows(df):
        v = num(r["bytes_per_step"]) if r["status"] == "ok" else None
        p = num(r["pred_bytes_per_step"]) if v is not None else None
        if v is None:
            out.append({"kind": "text", "value": None, "pred": None,
                        "text": r["status"] if r["status"] != "ok" else "—"})
        elif v == 0:
            out.append({"kind": "zero", "value": 0.0, "pred": p, "text": "0 B"})
        else:  # a pipeline's stage boundaries too: what crosses each, each way
            out.append({"kind": "bar", "value": v, "pred": p, "text": fmt_bytes(v),
                        "inside": f"stage {r['boundaries']}" if r["boundaries"] else None})
    return out


def time_entries(df: pd.DataFrame) -> list[dict[str, Any]]:
    """Panel (c), one entry per row: a bar for a run that saw the common number of examples
    (`crowded`: more ranks than cores), else why there is none — a run that saw other
    examples is not compared."""
    E = common_examples(df)
    out = []
    for r in _rows(df):
        t, ex = num(r["time_s"]), num(r["examples"])
        if r["status"] != "ok" or t is None:
            out.append({"kind": "text", "value": None, "crowded": False,
                        "text": r["status"] if r["status"] != "ok" else "—"})
        elif E is not None and ex != E:
            out.append({"kind": "text", "value": None, "crowded": False,
                        "text": f"not compared: saw {int(ex or 0):,} examples, not {E:,}"})
        else:
            crowd = over_cores(r)
            out.append({"kind": "bar", "value": t, "crowded": crowd,
                        "text": fmt_seconds(t) + (" *" if crowd else "")})
    return out



def summary_figure(df: pd.DataFrame, path: str) -> str | None:
    """The headline figure; None when no row has anything to draw."""
    rows = _rows(df)
    if not rows or not any(num(r["peak_bytes"]) or num(r["pred_peak_bytes"])
                           or num(r["bytes_per_step"]) is not None or num(r["time_s"])
                           for r in rows):
        return None
    plt = _plt()
    n = len(rows)
    fig, axes = plt.subplots(1, 3, figsize=(16, 2.6 + 0.36 * n), sharey=True,
                             gridspec_kw={"width_ratios": [1.3, 1, 1]})
    ys = list(range(n))
    labels = _labels(df)

    # (a) memory
    ax = axes[0]
    labelled: set[str] = set()
    top = _mem_bars(ax, ys, [{"peak": r["peak_bytes"], "pred_peak": r["pred_peak_bytes"],
                              "breakdown": r["breakdown"], "status": r["status"]} for r in rows],
                    height=0.62, labelled=labelled)
    top = max(top, _limit_lines(ax, df, labelled))
    ax.set_xlim(0, top * 1.45 or 1)
    ax.set_xlabel("MiB live at the step's peak (the largest rank), by category")
    ax.set_title("(a) peak memory per device", fontsize=10, loc="left")

    # (b) bytes
    ax = axes[1]
    entries = bytes_entries(df)
    pos = [v for e in entries for v in (e["value"], e["pred"]) if v]
    lo = 2.0 ** math.floor(math.log2(min(pos) / 8)) if pos else 1.0
    hi = 2.0 ** math.ceil(math.log2(max(pos) * 64)) if pos else 2.0**20
    ax.set_xscale("log")
    ax.set_xlim(lo, hi)
    for y, r, e in zip(ys, rows, entries):
        if e["kind"] == "bar":
            ax.barh(y, e["value"] - lo, left=lo, height=0.62,
                    color=f"C{STRATEGY_ORDER.get(r['strategy'], 4)}")
            ax.text(e["value"], y, f" {e['text']}", va="center", fontsize=8)
            if e.get("inside"):
                ax.text(lo * 1.3, y, e["inside"], va="center", fontsize=7.5, color="white")
        else:
            ax.text(lo, y, f" {e['text']}", va="center", fontsize=8,
                    fontweight="bold" if e["kind"] == "zero" else None,
                    color=None if e["kind"] == "zero" else "#555555")
        if e["pred"]:
            ax.plot([e["pred"]], [y], **PRED)
            labelled.add("pred")
    _bytes_ticks(ax, lo, hi)
    ax.set_xlabel("bytes per training step, the largest rank (log; J's reduction apart)")
    ax.set_title("(b) bytes each device sends per step", fontsize=10, loc="left")

    # (c) time for the same examples
    ax = axes[2]
    E = common_examples(df)
    entries = time_entries(df)
    crowded = [r for r, e in zip(rows, entries) if e["crowded"]]
    tmax = max((e["value"] for e in entries if e["kind"] == "bar"), default=0.0)
    for y, r, e in zip(ys, rows, entries):
        if e["kind"] != "bar":
            ax.text(0, y, f" {e['text']}", va="center", fontsize=8, color="#555555")
            continue
        crowd = e["crowded"]
        ax.barh(y, e["value"], height=0.62, color=f"C{STRATEGY_ORDER.get(r['strategy'], 4)}",
                alpha=0.45 if crowd else 1.0, hatch="///" if crowd else None,
                edgecolor="black" if crowd else None, lw=0)
        ax.text(e["value"], y, f" {e['text']}", va="center", fontsize=8)
    ax.set_xlim(0, tmax * 1.35 or 1)
    ax.set_xlabel("seconds (median step time × steps)")
    what = f"the same {E:,} examples" if E else "the examples seen"
    ax.set_title(f"(c) time for {what}", fontsize=10, loc="left")
    foot = ""
    if crowded:
        cores = int(num(crowded[0]["cores"]) or 0)
        foot = (f"Hatched (*): more ranks than the {cores} cores of this machine, so its ranks "
                "take turns on the cores; that time says more about the machine than about "
                "the strategy.")
    busy = busy_machine(df)
    if busy:
        foot += ("  " if foot else "") + (f"The machine was busy (load average up to "
                                          f"{busy[0]:.1f} on {busy[1]} cores): times are "
                                          "noisy, memory and bytes are not.")

    axes[0].set_yticks(ys, labels, fontsize=8.5)
    axes[0].invert_yaxis()
    for ax in axes:
        ax.grid(axis="x", alpha=0.25)
        ax.tick_params(axis="y", length=0)
    setting = _setting(df)
    fig.suptitle("Per device, for the same examples: memory, bytes moved, time"
                 + (f"   ({setting})" if setting else ""), fontsize=11, x=0.01, ha="left")
    bottom = 1.05 / fig.get_figheight()
    handles = _legend_handles(labelled, df, crowded=bool(crowded))
    fig.legend(handles=handles, loc="lower left", bbox_to_anchor=(0.01, 0.4 * bottom),
               ncol=len(handles), fontsize=8, frameon=False, handletextpad=0.5,
               columnspacing=1.4)
    if foot:
        fig.text(0.01, 0.12 * bottom, foot, fontsize=8)
    fig.tight_layout(rect=(0, bottom, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ---------------------------------------------------------------- memory_per_rank.png


def memory_per_rank_figure(df: pd.DataFrame, path: str) -> str | None:
    """Each rank of every partitioned case: None when no such case has per-rank figures."""
    cases = [(r, [m for m in (r["rank_mem"] or []) if num(m["peak"]) or num(m["pred_peak"])])
             for r in _rows(df) if r["strategy"] != "single" and r["status"] == "ok"]
    cases = [(r, ms) for r, ms in cases if len(ms) > 1]
    if not cases:
        return None
    plt = _plt()
    ys, items, labels, y = [], [], [], 0.0
    for r, ms in cases:
        for m in ms:
            ys.append(y)
            items.append(m | {"status": r["status"]})
            labels.append(f"{r['label'] or run_label(r)} · rank {m['rank']}")
            y += 1
        y += 0.6  # a gap between cases
    fig, ax = plt.subplots(figsize=(11, 1.6 + 0.3 * len(ys)))
    labelled: set[str] = set()
    top = _mem_bars(ax, ys, items, height=0.75, labelled=labelled)
    top = max(top, _limit_lines(ax, df, labelled))
    ax.set_xlim(0, top * 1.3 or 1)
    ax.set_yticks(ys, labels, fontsize=8)
    ax.invert_yaxis()
    ax.tick_params(axis="y", length=0)
    ax.grid(axis="x", alpha=0.25)
    ax.set_xlabel("MiB live at the rank's peak, by category")
    ax.set_title("Peak memory of every rank (a device), partitioned cases", fontsize=10)
    ax.legend(handles=_legend_handles(labelled, df), fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ---------------------------------------------------------------- loss.png


def _curve(r: pd.Series) -> tuple[list[float], list[float]]:
    ys = [x for x in (r["loss_curve"] or [])]
    B = num(r["B"]) or 1
    return [(i + 1) * B for i in range(len(ys))], ys


def _same(a: list[float | None], b: list[float | None]) -> float | None:
    """The largest |ΔJ| between two curves of the same length, None if they differ."""
    if len(a) != len(b) or any(x is None for x in a + b):
        return None
    d = max((abs(x - y) for x, y in zip(a, b)), default=0.0)
    scale = max(1.0, max(abs(x) for x in a))
    return d if d <= SAME_CURVE_RTOL * scale else None


def _who(rows: list[pd.Series]) -> str:
    """`single accum, pipeline ×2, tensor ×4, data ×2`."""
    counts = Counter(r["variant"] if r["strategy"] == "single" and r["variant"] else r["strategy"]
                     for r in rows)
    return ", ".join(f"{'single ' if k == 'accum' else ''}{k}" + (f" ×{n}" if n > 1 else "")
                     for k, n in counts.items())


def loss_groups(rows: list[pd.Series]) -> list[tuple[list[pd.Series], float]]:
    """Runs whose J curves coincide (the same update computed by different strategies),
    each group with the largest |ΔJ| between its first run and the others."""
    groups: list[tuple[list[pd.Series], float]] = []
    for r in rows:
        for i, (members, d) in enumerate(groups):
            first = members[0]
            alike = num(first["B"]) == num(r["B"]) and first["dims"] == r["dims"]
            same = _same(first["loss_curve"], r["loss_curve"]) if alike else None
            if same is not None:
                groups[i] = ([*members, r], max(d, same))
                break
        else:
            groups.append(([r], 0.0))
    return groups


def loss_label(members: list[pd.Series], d: float) -> str:
    if len(members) == 1:
        return members[0]["label"] or run_label(members[0])
    if d > 0:
        return f"{len(members)} runs identical to {d:.0e} ({_who(members)})"
    return f"{len(members)} runs, exactly equal ({_who(members)})"


def loss_deltas(df: pd.DataFrame) -> tuple[list[tuple[pd.Series, list[tuple[int, float]]]],
                                            list[str]]:
    """|ΔJ| of each run against its single-device baseline, step by step (the steps where it
    is not 0), and the runs that equal their baseline exactly at every step."""
    drawn, zeros = [], []
    for r in _rows(df):
        bid = r["base"]
        if bid is None or bid == r["id"] or not r["loss_curve"]:
            continue
        base = df.loc[df["id"] == bid].iloc[0]
        a, b = r["loss_curve"], base["loss_curve"] or []
        if len(a) != len(b):
            continue
        B = int(num(r["B"]) or 1)
        ds = [abs(x - y) if x is not None and y is not None else None for x, y in zip(a, b)]
        if all(d == 0 for d in ds):
            zeros.append(r["label"] or run_label(r))
        else:
            drawn.append((r, [((i + 1) * B, d) for i, d in enumerate(ds) if d]))
    return drawn, zeros


def loss_figure(df: pd.DataFrame, path: str) -> str | None:
    rows = [r for r in _rows(df) if r["loss_curve"]
            and any(x is not None for x in r["loss_curve"])]
    if not rows:
        return None
    plt = _plt()
    groups = loss_groups(rows)
    deltas, zeros = loss_deltas(df)
    if deltas:
        fig, (a1, a2) = plt.subplots(1, 2, figsize=(14, 4.6))
    else:
        fig, a1 = plt.subplots(figsize=(8, 4.6))
    several_b = len({num(m[0]["B"]) for m, _ in groups}) > 1
    for k, (members, d) in enumerate(groups):
        xs, ys = _curve(members[0])
        label = loss_label(members, d)
        if several_b and len(members) > 1:
            label = f"B={members[0]['B']}: " + label
        a1.plot(xs, ys, marker="o" if len(xs) < 30 else None, ms=4, lw=2 if len(members) > 1
                else 1.3, color=f"C{k}", ls=["-", "--", "-.", ":"][k % 4], label=label)
    a1.set_xlabel("examples seen")
    a1.set_ylabel("J (loss + λ/2 ‖W‖²)")
    a1.set_title("J against examples seen", fontsize=10)
    a1.legend(fontsize=7.5, loc="best")
    a1.grid(alpha=0.25)
    if not deltas:
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        return path

    # |ΔJ| against each row's single-device baseline, step by step.
    for k, (r, pts) in enumerate(deltas):
        a2.plot(*zip(*pts), marker="o", ms=4, lw=1, label=r["label"] or run_label(r),
                color=f"C{STRATEGY_ORDER.get(r['strategy'], 4)}", ls=["-", "--", "-.", ":"][k % 4])
    a2.set_yscale("log")
    a2.set_xlabel("examples seen")
    a2.set_ylabel("|J − J of the single-device baseline|")
    bname = ""
    bases = {r["base"] for r, _ in deltas}
    if len(bases) == 1:
        b = df.loc[df["id"] == bases.pop()].iloc[0]
        bname = f" ({b['label'] or run_label(b)})"
    a2.set_title(f"|ΔJ| against the baseline{bname}, log axis", fontsize=10)
    a2.legend(fontsize=7, loc="best", ncol=2)
    a2.grid(alpha=0.25, which="both")
    if zeros:
        a2.text(0.01, 0.02, "exactly equal to the baseline: " + ", ".join(zeros),
                transform=a2.transAxes, fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ---------------------------------------------------------------- sweeps: against B, width


def _series_key(r: pd.Series, df: pd.DataFrame, *, against: str) -> str:
    """A case without the swept quantity (`B` or `hidden`): the line it is drawn on."""
    s = run_label(r)
    if against != "hidden" and df["hidden"].nunique(dropna=True) > 1:
        s += f" h={r['hidden']}"
    if against != "B" and df["B"].nunique(dropna=True) > 1:
        s += f" B={r['B']}"
    return s + (f" M={r['M']}" if (r["M"] or 1) > 1 else "")


def batch_sweeps(df: pd.DataFrame) -> int:
    """The most batch sizes any one case was measured at (a line against B needs two)."""
    m = df[df["peak_bytes"].notna()]
    if not len(m):
        return 0
    keys = m.apply(_series_key, axis=1, df=df, against="B")
    return int(m.groupby(keys)["B"].nunique().max())


def _sweep_axes(ax: Any, xs: list[float], *, ybytes: bool) -> None:
    """Log-2 x axis with the swept values as plain numbers; a y axis in bytes if asked."""
    from matplotlib.ticker import FixedLocator, FuncFormatter, NullLocator

    ax.set_xscale("log", base=2)
    ticks = sorted(set(xs))
    ax.xaxis.set_major_locator(FixedLocator(ticks))
    ax.xaxis.set_minor_locator(NullLocator())
    ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _: f"{x:,.0f}"))
    if ybytes:  # ticks at the values themselves (few), or at powers of two
        from matplotlib.ticker import LogLocator

        vals = sorted({float(v) for line in ax.get_lines() for v in line.get_ydata() if v > 0})
        ax.yaxis.set_major_locator(FixedLocator(vals) if len(vals) <= 8 else LogLocator(base=2))
        ax.yaxis.set_minor_locator(NullLocator())
        ax.yaxis.set_major_formatter(FuncFormatter(lambda y, _: fmt_bytes(y)))


def _series_style(k: int) -> dict[str, Any]:
    """Lines that may coincide stay visible: each its own colour and dash, and each marker
    smaller than the one before, drawn on top of it."""
    return {"color": f"C{k % 10}", "ls": ["-", "--", "-.", ":"][k % 4], "marker": "o",
            "ms": max(3, 10 - 2 * (k % 4)), "zorder": 3 + k}


def _pred_handle() -> Any:
    from matplotlib.lines import Line2D

    return Line2D([], [], marker="_", ms=16, mew=2, ls="none", color="black",
                  label="predicted (cost model)")


def memory_vs_batch_figure(df: pd.DataFrame, path: str) -> str | None:
    if batch_sweeps(df) < 2:
        return None
    mem = df[df["peak_bytes"].notna() | df["pred_peak_bytes"].notna()]
    plt = _plt()
    fig, ax = plt.subplots(figsize=(9, 4.5))
    keys = mem.apply(_series_key, axis=1, df=df, against="B")
    handles, oom_done = [], False
    for k, (label, g) in enumerate(mem.groupby(keys, sort=False)):
        g = g.sort_values("B")
        m = g[g["peak_bytes"].notna()]
        if len(m):
            (line,) = ax.plot(m["B"], [x / MiB for x in m["peak_bytes"]], **_series_style(k),
                              label=label)
            handles.append(line)
        p = g[g["pred_peak_bytes"].notna()]
        if len(p):
            ax.plot(p["B"], [x / MiB for x in p["pred_peak_bytes"]], marker="_", ms=16, mew=2,
                    ls="none", color="black")
        for _, r in g[g["status"] == "oom"].iterrows():
            y = num(r["pred_peak_bytes"]) or num(r["peak_bytes"])
            if y is not None:
                (x,) = ax.plot([r["B"]], [y / MiB], "x", ms=12, mew=2, color="red",
                               label="oom (predicted need)")
                if not oom_done:
                    handles.append(x)
                oom_done = True
    for lim in _limits(df):
        ax.axhline(lim / MiB, color="red", ls=":", lw=1)
        ax.annotate(f"memory_limit {fmt_bytes(lim)}", (0.01, lim / MiB),
                    xycoords=("axes fraction", "data"), va="bottom", fontsize=8, color="red")
    _sweep_axes(ax, list(mem["B"]), ybytes=False)
    ax.set_xlabel("batch size B")
    ax.set_ylabel("peak memory per device (MiB)")
    ax.set_title("Peak memory per device against B (dots measured, black ticks predicted)",
                 fontsize=10)
    ax.legend(handles=[*handles, _pred_handle()], fontsize=7, loc="upper left",
              bbox_to_anchor=(1.01, 1))
    ax.grid(alpha=0.25)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def bytes_vs_width_figure(df: pd.DataFrame, path: str) -> str | None:
    byt = df[df["bytes_per_step"].notna() & df["hidden"].notna()]
    if byt["hidden"].nunique() < 2:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(9, 4.5))
    keys = byt.apply(_series_key, axis=1, df=df, against="hidden")
    handles = []
    for label, g in byt.groupby(keys, sort=False):
        g = g.sort_values("hidden")
        pos = g[g["bytes_per_step"] > 0]
        if not len(pos):
            continue  # 0 B at every width (single device): nothing on a log axis
        (line,) = ax.plot(pos["hidden"], list(pos["bytes_per_step"]),
                          **_series_style(len(handles)), label=label)
        handles.append(line)
        p = g[g["pred_bytes_per_step"].notna() & (g["pred_bytes_per_step"] > 0)]
        if len(p):
            ax.plot(p["hidden"], list(p["pred_bytes_per_step"]), marker="_", ms=16, mew=2,
                    ls="none", color="black")
    ax.set_yscale("log")
    _sweep_axes(ax, list(byt["hidden"]), ybytes=True)
    ax.set_xlabel("hidden width (largest of model.dims[1:-1])")
    ax.set_ylabel("training bytes per step per device")
    ax.set_title("Bytes each device sends per step against the hidden width "
                 "(single-device runs: 0 B, not drawn)", fontsize=10)
    ax.legend(handles=[*handles, _pred_handle()], fontsize=7, loc="upper left",
              bbox_to_anchor=(1.01, 1))
    ax.grid(alpha=0.25, which="both")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


MESH_DIMS = ("dp", "pp", "tp")  # report.MESH_DIMS: a hybrid row's {dim}_bytes columns


def _mesh_rows(df: pd.DataFrame) -> pd.DataFrame:
    cols = [f"{d}_bytes" for d in MESH_DIMS]
    if not all(c in df for c in cols):
        return df.iloc[0:0]
    return df[df[cols].notna().any(axis=1)]


def bytes_by_dim_figure(df: pd.DataFrame, path: str) -> str | None:
    """Hybrid meshes: bytes per step per device along each dimension (max over ranks) —
    which links carry what, so what must be fast and what may be slow."""
    mesh = _mesh_rows(df)
    if not len(mesh):
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(8, 1.2 + 0.3 * len(mesh) * len(MESH_DIMS)))
    h = 0.8 / len(MESH_DIMS)
    for j, d in enumerate(MESH_DIMS):
        ax.barh([i + j * h for i in range(len(mesh))],
                [(v or 0) / MiB for v in mesh[f"{d}_bytes"]], height=h, label=d)
    ax.set_yticks([i + h for i in range(len(mesh))], _labels(mesh), fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("MiB per step per device (max over ranks)")
    ax.set_title("Bytes per mesh dimension (hybrid runs)", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ---------------------------------------------------------------- pipeline timelines

TIMELINES_PER_PAGE = 8  # cases per timelines*.png: a page stays readable on a screen
TIMELINE_PAGES_MAX = 6  # past this, each run's own timeline.png is the place to look


def timeline_files(n: int, per_page: int = TIMELINES_PER_PAGE) -> list[str]:
    """The files n cases' timelines go into: timelines.png, timelines-2.png, …"""
    pages = min(math.ceil(n / per_page), TIMELINE_PAGES_MAX)
    return ["timelines.png" if i == 0 else f"timelines-{i + 1}.png" for i in range(pages)]


def _timeline_title(r: pd.Series) -> str:
    label = r["label"] or run_label(r)
    if "M=" not in label and r["M"]:
        label += f" M={r['M']}"  # the micro-batches shape a pipeline's timeline: always said
    return f"{label} ({os.path.basename(str(r['path']))})"


def timeline_cases(df: pd.DataFrame) -> tuple[list[tuple[pd.Series, Any]], list[str]]:
    """The pipeline cases (strategy=pipeline, or a run whose trace has pipeline actions)
    with their timelines (`timeline.CaseTimeline`), and a note for each pipeline case that
    has none to draw."""
    from partition.timeline import TRACE_FILE, load_case

    cases, notes = [], []
    for r in _rows(df):
        pipeline = r["strategy"] == "pipeline"
        folder = r["path"] if isinstance(r["path"], str) else None
        if folder is None or not (pipeline or os.path.exists(os.path.join(folder, TRACE_FILE))):
            if pipeline:
                notes.append(f"no timeline for {r['label'] or run_label(r)}: no run folder")
            continue
        case = load_case(folder)
        if isinstance(case, str):
            if pipeline:
                status = f" (status {r['status']})" if r["status"] != "ok" else ""
                notes.append(f"no timeline for {_timeline_title(r)}: {case}{status}")
        elif pipeline or case.pipeline:
            cases.append((r, case))
    return cases, notes


def timelines_figures(df: pd.DataFrame, out: str) -> Plots:
    """timelines.png (and timelines-2.png, … past TIMELINES_PER_PAGE cases): each pipeline
    case's traced step, measured above simulated; `timelines` lists each case's own
    timeline.png."""
    from partition.timeline import TIMELINE_FILE, draw_cases

    cases, notes = timeline_cases(df)
    res = Plots(notes=notes)
    if not cases:
        res.notes.insert(0, "timelines.png not drawn: " + (
            "no pipeline case" if not notes else "no pipeline case has a timeline to draw"))
        return res
    files = timeline_files(len(cases))
    shown = cases[:len(files) * TIMELINES_PER_PAGE]
    if len(shown) < len(cases):
        res.notes.append(f"timelines: {len(cases) - len(shown)} more pipeline cases not drawn "
                         f"(the first {len(shown)} are; each run folder has its own "
                         f"{TIMELINE_FILE})")
    for i, name in enumerate(files):
        page = shown[i * TIMELINES_PER_PAGE:(i + 1) * TIMELINES_PER_PAGE]
        path = os.path.join(out, name)
        draw_cases(path, [(_timeline_title(r), c) for r, c in page])
        res.written.append(path)
    res.timelines = [(_timeline_title(r), own) for r, _ in shown
                     for own in [os.path.join(r["path"], TIMELINE_FILE)] if os.path.exists(own)]
    return res


# ---------------------------------------------------------------- all of them


def write_plots(df: pd.DataFrame, out: str) -> Plots:
    """Every figure that has something to show, summary.png first; a note for each other."""
    res = Plots()
    n_w = df.loc[df["bytes_per_step"].notna(), "hidden"].nunique()
    figures = [
        ("summary.png", summary_figure,
         "no run has a memory, bytes or time figure"),
        ("memory_per_rank.png", memory_per_rank_figure,
         "no finished partitioned run with per-rank memory figures"),
        ("loss.png", loss_figure, "no run has a loss curve"),
        ("memory_vs_batch.png", memory_vs_batch_figure,
         "no case was measured at two or more batch sizes"),
        ("bytes_vs_width.png", bytes_vs_width_figure,
         "one hidden width" if n_w == 1 else "no run with a bytes figure and a hidden layer"),
    ]
    if len(_mesh_rows(df)):  # only where the table has a mesh (no note otherwise)
        figures.append(("bytes_by_dim.png", bytes_by_dim_figure, "no hybrid run"))
    for name, draw, why in figures:
        path = draw(df, os.path.join(out, name)) if len(df) else None
        if path:
            res.written.append(path)
        else:
            res.notes.append(f"{name} not drawn: {why}")
    tl = timelines_figures(df, out)
    res.written += tl.written
    res.notes += tl.notes
    res.timelines = tl.timelines
    return res


__all__ = ["bytes_by_dim_figure", "bytes_vs_width_figure", "common_examples", "loss_figure",
           "memory_per_rank_figure", "memory_vs_batch_figure", "over_cores", "summary_figure",
           "timeline_cases", "timeline_files", "timelines_figures", "write_plots"]
