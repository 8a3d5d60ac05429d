"""Tables, plots and the generated comparison summary, from any set of result.json files.

Every figure is read defensively: a key that a run does not have (an older
result, a failed run, a measurement that was off) becomes a missing value, shown
as "—", never an error. The table has one row per run:

- what ran: strategy, P (ranks), B, M, variant (pipeline schedule, tensor layout,
  `accum` for single-device gradient accumulation), dims, status;
- memory: the peak per device (max over ranks) measured and predicted, their
  relative error, and the peak of a prediction-only forward;
- communication: training bytes per step per device (max over ranks, all roles but
  `metric`) measured and predicted, and ring-model wire bytes;
- time and quality: median step time, bubble (measured and predicted), J after the
  last step, examples seen, the step-0 gradient check;
- a baseline: the single-device run with the same dims, dtype, data and B
  (M = 1 and `ok` if there is one), and ratios against it.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import pandas as pd

from partition.costs import rel_err
from partition.results import load_results

STRATEGY_ORDER = {"single": 0, "pipeline": 1, "tensor": 2, "data": 3}
# Identical curves (every strategy computes the same update) stay visible on top of each other.
LINESTYLE = {"single": "-", "pipeline": "--", "tensor": "-.", "data": ":"}
MISSING = "—"

# (column, header) of the compact table printed on the terminal.
COMPACT = [
    ("id", "id"), ("name", "run"), ("strategy", "strategy"), ("P", "P"), ("B", "B"),
    ("M", "M"), ("variant", "variant"), ("status", "status"), ("peak_bytes", "peak/dev"),
    ("bytes_per_step", "bytes/step/dev"), ("step_s", "step"), ("bubble", "bubble"),
    ("final_loss", "J final"), ("examples", "examples"), ("grad_err", "grad err"),
    ("mem_err", "mem err"), ("comm_err", "comm err"), ("time_err", "time err"),
    ("base", "base"), ("mem_x", "mem ×base"), ("time_x", "time ×base"),
]
# results.md: the same with the predictions and the details next to the measurements.
FULL = [
    ("id", "id"), ("name", "run"), ("strategy", "strategy"), ("P", "P"), ("B", "B"),
    ("M", "M"), ("variant", "variant"), ("status", "status"),
    ("peak_bytes", "peak/dev"), ("pred_peak_bytes", "pred peak"),
    ("infer_peak_bytes", "infer peak"), ("params_bytes", "params/dev"),
    ("bytes_per_step", "bytes/step/dev"), ("pred_bytes_per_step", "pred bytes"),
    ("wire_bytes", "wire/dev"), ("step_s", "step"), ("pred_step_s", "pred step"),
    ("bubble", "bubble"), ("pred_bubble", "pred bubble"), ("final_loss", "J final"),
    ("examples", "examples"), ("grad_err", "grad err"), ("mem_err", "mem err"),
    ("comm_err", "comm err"), ("time_err", "time err"), ("base", "base"),
    ("mem_x", "mem ×base"), ("time_x", "time ×base"), ("loss_delta", "ΔJ vs base"),
    ("error", "error"),
]


# ---------------------------------------------------------------- reading one result


def _get(d: Any, path: str, default: Any = None) -> Any:
    for part in path.split("."):
        if not isinstance(d, dict) or part not in d:
            return default
        d = d[part]
    return d


def num(x: Any) -> float | None:
    """A finite number, or None (missing, null, NaN, a dict without a median)."""
    if isinstance(x, dict):
        x = x.get("median", x.get("total"))
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return None
    return float(x) if math.isfinite(x) else None


def _max(xs: Iterable[Any]) -> float | None:
    vals = [v for v in (num(x) for x in xs) if v is not None]
    return max(vals) if vals else None


def _training_bytes(comm: Any) -> float | None:
    """Bytes this rank sends or hands to collectives per step, for training (not `metric`)."""
    if not isinstance(comm, dict):
        return None
    roles = comm.get("by_role")
    if isinstance(roles, dict):
        return float(sum(num(_get(v, "bytes")) or 0 for k, v in roles.items() if k != "metric"))
    parts = [num(comm.get("sent_bytes")), num(comm.get("collective_bytes"))]
    return None if all(p is None for p in parts) else float(sum(p or 0 for p in parts))


def _worst(pairs: list[tuple[float | None, float | None]]) -> float | None:
    """The largest relative error (by magnitude, sign kept) over the ranks."""
    errs = [e for e in (rel_err(m, p) for m, p in pairs) if e is not None]
    return max(errs, key=abs) if errs else None


def _error_text(err: Any) -> str | None:
    if not isinstance(err, dict) or not err:
        return None
    rank = err.get("rank")
    who = f"rank {rank}: " if rank is not None else ""
    return f"{who}{err.get('type') or 'Error'}: {err.get('message') or ''}".strip()


def result_row(res: dict[str, Any]) -> dict[str, Any]:
    """One table row from one result.json (any subset of DESIGN §5's keys)."""
    run, cfg, tr = res.get("run") or {}, res.get("config") or {}, res.get("train") or {}
    ranks = [r for r in res.get("ranks") or [] if isinstance(r, dict)]
    pred = res.get("predicted") or {}
    pranks = [r for r in pred.get("ranks") or [] if isinstance(r, dict)]
    strategy = run.get("strategy") or _get(cfg, "strategy.name")
    P = run.get("ranks") or (1 if strategy == "single" else run.get("world_size")
                             or cfg.get("world_size"))
    B = run.get("batch_size") or _get(cfg, "train.batch_size")
    M = run.get("microbatches") or _get(cfg, "train.microbatches")
    if strategy == "pipeline":
        variant = run.get("schedule") or _get(cfg, "strategy.schedule")
    elif strategy == "tensor":
        variant = run.get("layout") or _get(cfg, "strategy.layout")
    elif strategy == "single" and (M or 1) > 1:
        variant = "accum"
    else:
        variant = None
    # What one device can do instead (train.recompute / precision / optimizer): part of the
    # variant, so that single-recompute is not read as the plain full batch.
    dtype = run.get("dtype") or _get(cfg, "train.dtype")
    recompute = _get(cfg, "train.recompute") or "none"
    precision = _get(cfg, "train.precision") or {"float64": "fp64"}.get(dtype, "fp32")
    policy = "+".join(p for p in ("recompute" if recompute == "full" else "",
                                  "bf16" if precision == "bf16" else "") if p) or None
    if policy:
        variant = f"{variant}+{policy}" if variant else policy
    dims = run.get("dims") or _get(cfg, "model.dims") or []
    steps_cfg = _get(cfg, "train.steps")
    loss = list(tr.get("loss") or [])

    # Measured next to predicted, rank by rank (predicted.ranks mirrors ranks).
    pr = [pranks[i] if i < len(pranks) else {} for i in range(max(len(ranks), len(pranks)))]
    peaks = [num(_get(r, "memory.peak_bytes")) for r in ranks]
    ppeaks = [num(_get(p, "memory.peak_bytes")) for p in pr]
    tbytes = [_training_bytes(r.get("comm")) for r in ranks]
    pbytes = [_training_bytes(p.get("comm")) for p in pr]
    step_s = num(_get(tr, "step_time_s.median"))
    # The cost model's step time, under whichever of these names it is recorded.
    pred_step = next((num(pred[k]) for k in ("step_time_s", "step_s", "time_s") if k in pred),
                     None)
    return {
        "name": os.path.basename(res.get("path") or "") or None,
        "strategy": strategy,
        "P": P,
        "B": B,
        "M": M,
        "variant": variant,
        "dims": "-".join(str(d) for d in dims) or None,
        "hidden": max(dims[1:-1]) if len(dims) > 2 else None,
        "dtype": dtype,
        "recompute": recompute,
        "precision": precision,
        "optimizer": _get(cfg, "train.optimizer") or "sgd",
        "policy": policy,  # None: no recomputation, the dtype's own precision
        "data": _get(cfg, "data.name"),
        "lr": _get(cfg, "train.lr"),
        "status": res.get("status") or "unknown",
        "error": _error_text(res.get("error")),
        "memory_limit": cfg.get("memory_limit"),
        "peak_bytes": _max(peaks),
        "pred_peak_bytes": _max(ppeaks),
        "mem_err": _worst(list(zip(peaks, ppeaks, strict=False))),
        "infer_peak_bytes": _max(_get(r, "memory.predict_peak_bytes") for r in ranks),
        "activations_bytes": _max(_get(r, "memory.activations_bytes") for r in ranks),
        "pred_activations_bytes": _max(_get(p, "memory.activations_bytes") for p in pr),
        "params_bytes": _max(_get(r, "memory.params_bytes") for r in ranks),
        "bytes_per_step": _max(tbytes),
        "pred_bytes_per_step": _max(pbytes),
        "comm_err": _worst(list(zip(tbytes, pbytes, strict=False))),
        "wire_bytes": _max(_get(r, "comm.wire_bytes") for r in ranks),
        "step_s": step_s,
        "pred_step_s": pred_step,
        "time_err": rel_err(step_s, pred_step),
        "bubble": num(tr.get("bubble_fraction_measured")),
        "pred_bubble": num(pred.get("bubble_fraction")),
        "steps": len(loss) if loss else num(tr.get("steps_done")),
        "planned_examples": steps_cfg * B if isinstance(steps_cfg, int) and B else None,
        "examples": num(tr.get("examples_seen")),
        "final_loss": num(tr.get("final_loss", loss[-1] if loss else None)),
        "grad_err": num(_get(res, "check.grad_max_rel_err")),
        # bf16: the bound on |J − J_float64| after these steps (docs/one-device.md)
        "loss_tol": num(_get(res, "check.final_loss_tolerance")),
        "loss_curve": [num(x) for x in loss],
        "path": res.get("path"),
    }


# ---------------------------------------------------------------- the table


def build_table(results: list[dict[str, Any]], *, sort: bool = True) -> pd.DataFrame:
    """One row per result, sorted by strategy, P, B, M, variant (or in the given order),
    with an `id`, the baseline row's id in `base`, and ratios against it."""
    rows = [result_row(r) for r in results]
    df = pd.DataFrame(rows, columns=list(result_row({}).keys()))
    if sort and len(df):
        key = df.apply(lambda r: (STRATEGY_ORDER.get(r["strategy"], 9), r["P"] or 0,
                                  r["B"] or 0, r["M"] or 0, str(r["variant"] or ""),
                                  str(r["path"] or "")), axis=1)
        df = df.loc[key.sort_values().index]
    df = df.reset_index(drop=True)
    df.insert(0, "id", range(len(df)))
    df = df.astype(object).where(pd.notna(df), None)
    _add_baselines(df)
    return df


def _baseline_id(df: pd.DataFrame, row: pd.Series) -> int | None:
    """The single-device run this row is compared with: same dims, dtype, data, optimizer
    and B; without recomputation or bf16 first; M = 1 and `ok` first, then any `ok`
    (accumulation gives the same update), then M = 1."""
    same = df[(df["strategy"] == "single") & (df["dims"] == row["dims"])
              & (df["dtype"] == row["dtype"]) & (df["data"] == row["data"])
              & (df["optimizer"] == row["optimizer"]) & (df["B"] == row["B"])]
    plain = same[same["policy"].isna()]
    for pick in (plain[(plain["M"] == 1) & (plain["status"] == "ok")],
                 plain[plain["status"] == "ok"], plain[plain["M"] == 1],
                 same[(same["M"] == 1) & (same["status"] == "ok")],
                 same[same["status"] == "ok"], same[same["M"] == 1]):
        if len(pick):
            return int(pick["id"].iloc[0])
    return None


def _ratio(a: Any, b: Any) -> float | None:
    a, b = num(a), num(b)
    return a / b if a is not None and b else None


def _add_baselines(df: pd.DataFrame) -> None:
    bases, mem_x, time_x, dloss = [], [], [], []
    for _, row in df.iterrows():
        bid = _baseline_id(df, row)
        bases.append(bid)
        base = df.loc[df["id"] == bid].iloc[0] if bid is not None else None
        if base is None:
            mem_x.append(None), time_x.append(None), dloss.append(None)
            continue
        mem_x.append(_ratio(row["peak_bytes"], base["peak_bytes"]))
        time_x.append(_ratio(row["step_s"], base["step_s"]))
        same_examples = row["examples"] is not None and row["examples"] == base["examples"]
        fl, bl = num(row["final_loss"]), num(base["final_loss"])
        dloss.append(fl - bl if same_examples and fl is not None and bl is not None else None)
    df["base"], df["mem_x"], df["time_x"], df["loss_delta"] = bases, mem_x, time_x, dloss


def load_table(folders: Iterable[str], *, sort: bool = True) -> pd.DataFrame:
    return build_table(load_results(folders), sort=sort)


# ---------------------------------------------------------------- formatting


def fmt_bytes(x: Any) -> str:
    v = num(x)
    if v is None:
        return MISSING
    if abs(v) < 10 * 1024:
        return f"{int(v):,} B"
    if abs(v) < 1024**2:
        return f"{v / 1024:.1f} KiB"
    return f"{v / 1024**2:.1f} MiB"


def _fmt(col: str, x: Any) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return MISSING
    if col.endswith("bytes") or col.endswith("bytes_per_step"):
        return fmt_bytes(x)
    if col in ("step_s", "pred_step_s"):
        return f"{x * 1e3:.2f} ms"
    if col in ("bubble", "pred_bubble"):
        return f"{x:.2f}"
    if col.endswith("_err") and col != "grad_err":
        return f"{x * 100:+.1f}%"
    if col == "grad_err":
        return f"{x:.1e}"
    if col in ("mem_x", "time_x"):
        return f"{x:.2f}×"
    if col == "final_loss":
        return f"{x:.4f}"
    if col == "loss_delta":
        return f"{x:+.2e}"
    if isinstance(x, float) and x.is_integer():
        return str(int(x))
    return str(x)


def display(df: pd.DataFrame, columns: list[tuple[str, str]]) -> pd.DataFrame:
    """The table as strings, missing values as "—"."""
    out = pd.DataFrame({head: [_fmt(col, v) for v in df[col]] for col, head in columns})
    return out


def to_markdown(df: pd.DataFrame) -> str:
    """A GitHub-flavoured Markdown table (pandas' own needs the optional `tabulate`)."""
    def cell(s: Any) -> str:
        return str(s).replace("|", "\\|").replace("\n", " ")

    head = "| " + " | ".join(cell(c) for c in df.columns) + " |"
    sep = "|" + "|".join("---" for _ in df.columns) + "|"
    body = ["| " + " | ".join(cell(v) for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join([head, sep, *body])


def to_text(df: pd.DataFrame) -> str:
    return df.to_string(index=False) if len(df) else "(no results)"


# ---------------------------------------------------------------- plots


def run_label(row: pd.Series, *, with_b: bool = False) -> str:
    s = str(row["strategy"])
    if row["variant"]:
        s += f" {row['variant']}"
    if row["strategy"] != "single":
        s += f" P={row['P']}"
    if with_b:
        s += f" B={row['B']}"
    return s


def _mib(x: Any) -> float | None:
    v = num(x)
    return None if v is None else v / 1024**2


@dataclass
class Plots:
    written: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def write_plots(df: pd.DataFrame, out: str) -> Plots:
    """The four PNGs; a plot with nothing to show is skipped with a note saying why."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    res = Plots()

    def save(fig: Any, name: str) -> None:
        path = os.path.join(out, name)
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        res.written.append(path)

    # 1. Peak memory per device against batch size, one line per strategy (and P).
    mem = df[df["peak_bytes"].notna() | df["pred_peak_bytes"].notna()]
    if len(mem):
        fig, ax = plt.subplots(figsize=(9, 4.5))
        for label, g in mem.groupby(mem.apply(run_label, axis=1), sort=False):
            g = g.sort_values("B")
            color = None
            m = g[g["peak_bytes"].notna()]
            if len(m):
                (line,) = ax.plot(m["B"], [_mib(x) for x in m["peak_bytes"]], "o-", label=label)
                color = line.get_color()
            p = g[g["pred_peak_bytes"].notna()]
            if len(p):
                ax.plot(p["B"], [_mib(x) for x in p["pred_peak_bytes"]], "s--", mfc="none",
                        color=color, label=None if len(m) else label)
            oom = g[g["status"] == "oom"]
            for _, r in oom.iterrows():
                y = _mib(r["peak_bytes"]) or _mib(r["pred_peak_bytes"])
                if y is not None:
                    ax.plot([r["B"]], [y], "x", ms=12, mew=2, color="red")
        limits = {num(x) for x in df["memory_limit"] if num(x)}
        for lim in sorted(limits):
            ax.axhline(lim / 1024**2, color="red", ls=":", lw=1)
            ax.annotate(f"memory_limit {fmt_bytes(lim)}", (0.01, lim / 1024**2),
                        xycoords=("axes fraction", "data"), va="bottom", fontsize=8, color="red")
        ax.set_xlabel("batch size B")
        ax.set_ylabel("peak memory per device (MiB)")
        ax.set_title("Peak memory per device (filled: measured, hollow: predicted, × oom)",
                     fontsize=10)
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1))
        save(fig, "memory_vs_batch.png")
    else:
        res.notes.append("memory_vs_batch.png skipped: no run has a measured or predicted "
                         "peak memory (memory.peak_bytes is empty)")

    # 2. Bytes per step per device against the hidden width.
    byt = df[df["bytes_per_step"].notna() & df["hidden"].notna()]
    if len(byt):
        with_b = byt["B"].nunique() > 1
        labels = byt.apply(run_label, axis=1, with_b=with_b)
        fig, ax = plt.subplots(figsize=(9, 4.5))
        if byt["hidden"].nunique() == 1:  # one width: a bar per strategy says it better
            ax.bar(range(len(byt)), [x / 1024 for x in byt["bytes_per_step"]],
                   color=[f"C{STRATEGY_ORDER.get(s, 4)}" for s in byt["strategy"]])
            ax.set_xticks(range(len(byt)), list(labels), rotation=30, ha="right", fontsize=8)
            ax.set_xlabel(f"hidden width {int(byt['hidden'].iloc[0])}")
        else:
            for label, g in byt.groupby(labels, sort=False):
                g = g.sort_values("hidden")
                ax.plot(g["hidden"], [x / 1024 for x in g["bytes_per_step"]], "o-", label=label)
            ax.set_xlabel("hidden width (largest of model.dims[1:-1])")
            ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1))
        ax.set_ylabel("training bytes per step per device (KiB)")
        ax.set_title("Bytes crossing device boundaries per step")
        save(fig, "bytes_vs_width.png")
    else:
        res.notes.append("bytes_vs_width.png skipped: no finished run with communication "
                         "figures and a hidden layer")

    # 3. Median step time by run.
    tim = df[df["step_s"].notna()]
    if len(tim):
        fig, ax = plt.subplots(figsize=(7, 0.9 + 0.32 * len(tim)))
        labels = [f"{run_label(r, with_b=True)} M={r['M']}" for _, r in tim.iterrows()]
        colors = [f"C{STRATEGY_ORDER.get(s, 4)}" for s in tim["strategy"]]
        ax.barh(range(len(tim)), [x * 1e3 for x in tim["step_s"]], color=colors)
        ax.set_yticks(range(len(tim)), labels, fontsize=8)
        ax.invert_yaxis()
        ax.set_xlabel("median step time (ms)")
        ax.set_title("Step time by strategy")
        save(fig, "step_time.png")
    else:
        res.notes.append("step_time.png skipped: no finished run has a step time")

    # 4. J against step, and against examples seen (a smaller minibatch takes more steps).
    cur = df[df["loss_curve"].apply(lambda c: bool(c) and any(x is not None for x in c))]
    if len(cur):
        fig, (a1, a2) = plt.subplots(1, 2, figsize=(13, 4.2), sharey=True)
        for _, r in cur.iterrows():
            ys = r["loss_curve"]
            label = f"{run_label(r, with_b=True)} M={r['M']}"
            ls = LINESTYLE.get(r["strategy"], "-")
            a1.plot(range(len(ys)), ys, marker=".", ls=ls, label=label)
            a2.plot([(i + 1) * r["B"] for i in range(len(ys))], ys, marker=".", ls=ls, label=label)
        a1.set_xlabel("step")
        a2.set_xlabel("examples seen")
        a1.set_ylabel("J (loss + λ/2 ‖W‖²)")
        a1.set_title("J vs step")
        a2.set_title("J vs examples seen")
        a2.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1))
        save(fig, "loss.png")
    else:
        res.notes.append("loss.png skipped: no run has a loss curve")
    return res


# ---------------------------------------------------------------- the whole report


@dataclass
class Report:
    table: pd.DataFrame
    text: str
    summary: list[str]
    files: list[str]
    notes: list[str]

    def console(self) -> str:
        """What the entry points print: the table, its notes, the summary, the files written."""
        notes = [f"note: {n}" for n in self.notes]
        return "\n".join([self.text, *notes, "", *self.summary, "", "wrote " + ", ".join(self.files)])


def write_report(df: pd.DataFrame, out: str, *, plots: bool = True,
                 title: str = "Results") -> Report:
    """results.csv (every column, raw numbers), results.md (table, notes, summary), PNGs."""
    from partition.summary import summarize  # it reads this module's table

    os.makedirs(out, exist_ok=True)
    csv_path = os.path.join(out, "results.csv")
    df.drop(columns=["loss_curve"]).to_csv(csv_path, index=False)
    pl = write_plots(df, out) if plots else Plots()
    summary = summarize(df)
    md = [f"# {title}", "", to_markdown(display(df, FULL)), "",
          "Bytes are per step per device (max over ranks), training roles only; errors are "
          "(measured − predicted) / predicted, the worst rank; `base` is the id of the "
          "single-device row each row is compared with; — = not in the result.", ""]
    md += [f"![{os.path.basename(p)}]({os.path.basename(p)})" for p in pl.written]
    md += [f"- {n}" for n in pl.notes]
    md += ["", "## Summary", "", *summary, ""]
    md_path = os.path.join(out, "results.md")
    with open(md_path, "w") as fh:
        fh.write("\n".join(md))
    return Report(table=df, text=to_text(display(df, COMPACT)), summary=summary,
                  files=[csv_path, md_path, *pl.written], notes=pl.notes)

