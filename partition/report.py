"""Tables, plots and the generated comparison summary, from any set of result.json files.

Every figure is read defensively: a key that a run does not have (an older
result, a failed run, a measurement that was off) becomes a missing value, shown
as "—", never an error. The table has one row per run:

- what ran: strategy, P (ranks), B, M, variant (pipeline schedule, tensor layout,
  `accum` for single-device gradient accumulation), dims, status, intra-op threads
  per rank and the cores the run had;
- memory: the peak per device (max over ranks) measured and predicted, their
  relative error, what was live at that peak by category (`bd_*`, `pred_bd_*`),
  and the peak of a prediction-only forward;
- communication: training bytes per step per device (max over ranks, every role but
  the `metric` reduction of J, which is `metric_bytes`) measured and predicted,
  ring-model wire bytes, and for a pipeline the bytes each way per stage boundary;
- time and quality: median step time, the time for the examples the run saw
  (median step time × steps), bubble (measured and predicted), J after the last
  step, examples seen, the step-0 gradient check;
- a baseline: the single-device run with the same dims, dtype, data and B
  (M = 1 and `ok` if there is one), and ratios against it.

The figures are drawn by `partition.plots`.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable
import dataclasses
from dataclasses import dataclass
from typing import Any

import pandas as pd

from partition.costs import rel_err
from partition.boundaries import device_bytes, short_bytes
from partition.results import load_results

STRATEGY_ORDER = {"single": 0, "pipeline": 1, "tensor": 2, "data": 3, "hybrid": 4}
MESH_DIMS = ("dp", "pp", "tp")  # a hybrid run's by_dim columns (plans/mesh.py)
MISSING = "—"

# The memory categories of a breakdown, in the order the figures stack them.
from partition.memory import CATEGORIES  # noqa: E402 - the probe's own list, one definition

# (column, header) of the compact table printed on the terminal (fits 120 columns;
# results.md and results.csv have every column).
COMPACT = [
    ("id", "id"), ("label", "case"), ("B", "B"), ("status", "status"),
    ("peak_bytes", "peak/dev"), ("bytes_per_step", "bytes/step/dev"), ("time_s", "time"),
    ("bubble", "bubble"), ("final_loss", "J final"), ("mem_err", "mem err"),
    ("comm_err", "comm err"), ("base", "base"), ("mem_x", "mem×"), ("time_x", "time×"),
]
# results.md: the same with the predictions and the details next to the measurements.
FULL = [
    ("id", "id"), ("name", "run"), ("strategy", "strategy"), ("P", "P"), ("B", "B"),
    ("M", "M"), ("variant", "variant"), ("status", "status"),
    ("threads", "threads/rank"), ("cores", "cores"), ("load", "load"),
    ("peak_bytes", "peak/dev"), ("pred_peak_bytes", "pred peak"),
    ("infer_peak_bytes", "infer peak"), ("params_bytes", "params/dev"),
    ("bytes_per_step", "bytes/step/dev"), ("pred_bytes_per_step", "pred bytes"),
    ("metric_bytes", "metric/dev"), ("wire_bytes", "wire/dev"), ("boundaries", "boundaries"),
    ("step_s", "step"), ("pred_step_s", "pred step"), ("time_s", "time"),
    ("bubble", "bubble"), ("pred_bubble", "pred bubble"), ("final_loss", "J final"),
    ("examples", "examples"), ("grad_err", "grad err"), ("mem_err", "mem err"),
    ("comm_err", "comm err"), ("time_err", "time err"), ("base", "base"),
    ("mem_x", "mem ×base"), ("time_x", "time ×base"), ("loss_delta", "ΔJ vs base"),
    ("error", "error"),
]
# Columns that hold lists or dicts (for the figures), left out of results.csv.
NESTED = ("loss_curve", "breakdown", "pred_breakdown", "rank_mem")


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
    train, _ = device_bytes(comm)
    return None if train is None else float(train)


def _breakdown(mem: Any) -> dict[str, float] | None:
    """What was live at the peak, by category (None if the result has no breakdown)."""
    bd = _get(mem, "breakdown")
    if not isinstance(bd, dict):
        return None
    return {c: num(bd.get(c)) or 0.0 for c in CATEGORIES}


def _boundaries_text(bounds: Any) -> str | None:
    if not isinstance(bounds, list) or not bounds:
        return None
    return "; ".join(f"{b.get('from_stage')}→{b.get('to_stage')}: "
                     f"{short_bytes(b.get('forward_bytes') or 0)} fwd, "
                     f"{short_bytes(b.get('backward_bytes') or 0)} bwd"
                     for b in bounds if isinstance(b, dict))


def _mesh_variant(cfg: dict[str, Any], P: Any) -> str | None:
    """dp×pp×tp of a hybrid run's config (dp=auto resolved against the world size); a
    sharded data dimension (dp_shard) reads dp2(shard)."""
    pp, tp, dp = _get(cfg, "strategy.pp", 1), _get(cfg, "strategy.tp", 1), _get(cfg, "strategy.dp")
    if dp in (None, "auto") and isinstance(P, int) and isinstance(pp, int) and isinstance(tp, int):
        dp = P // (pp * tp) if pp * tp else None
    shard = "(shard)" if _get(cfg, "strategy.dp_shard") else ""
    return f"dp{dp}{shard}×pp{pp}×tp{tp}"


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
    """One table row from one result.json (any subset of its keys, docs/results.md)."""
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
    elif strategy == "hybrid":
        variant = _mesh_variant(cfg, P)
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
    steps_done = len(loss) if loss else num(tr.get("steps_done"))
    # The rank whose peak is the row's (measured, else predicted) gives the breakdown.
    top = max(range(len(peaks)), key=lambda i: peaks[i] or 0) if any(peaks) else None
    ptop = max(range(len(ppeaks)), key=lambda i: ppeaks[i] or 0) if any(ppeaks) else None
    rank_mem = [{"rank": i, "peak": peaks[i] if i < len(peaks) else None,
                 "pred_peak": ppeaks[i] if i < len(ppeaks) else None,
                 "breakdown": _breakdown(ranks[i].get("memory")) if i < len(ranks) else None,
                 "pred_breakdown": _breakdown(pr[i].get("memory")) if i < len(pr) else None}
                for i in range(max(len(peaks), len(ppeaks)))]
    bd = _breakdown(ranks[top].get("memory")) if top is not None else None
    pbd = _breakdown(pr[ptop].get("memory")) if ptop is not None else None
    metric = [device_bytes(r.get("comm"))[1] for r in ranks]
    device = str(run.get("device") or "").split(":")[0] or None
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
        "label": None,  # filled in by build_table (it depends on the other rows)
        "device": device,
        # Intra-op threads per rank (older results: cpu_threads_per_rank) and usable cores.
        "threads": run.get("threads_per_rank", run.get("cpu_threads_per_rank")),
        "cores": run.get("cpu_count"),
        "load": num((run.get("load_average") or [None])[0]),  # 1-minute, as the run ended
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
        "metric_bytes": _max(metric),
        "wire_bytes": _max(_get(r, "comm.wire_bytes") for r in ranks),
        "boundaries": _boundaries_text(res.get("boundaries")),
        # hybrid: bytes per step per device along each mesh dimension (max over ranks)
        **{f"{d}_bytes": _max(_get(r, f"comm.by_dim.{d}.bytes", 0 if _get(r, "comm.by_dim")
                                     else None) for r in ranks) for d in MESH_DIMS},
        "step_s": step_s,
        "pred_step_s": pred_step,
        "time_err": rel_err(step_s, pred_step),
        # The time for the examples this run saw: median step time × steps done.
        "time_s": step_s * steps_done if step_s is not None and steps_done else None,
        "bubble": num(tr.get("bubble_fraction_measured")),
        "pred_bubble": num(pred.get("bubble_fraction")),
        # the simulated idle fraction and its split by cause (train.idle_causes)
        "sim_idle": num(_get(res, "train.idle_fraction.simulated")),
        "idle_schedule": num(_get(res, "train.idle_causes.schedule")),
        "idle_imbalance": num(_get(res, "train.idle_causes.imbalance")),
        "idle_comm": num(_get(res, "train.idle_causes.communication")),
        "steps": steps_done,
        "planned_examples": steps_cfg * B if isinstance(steps_cfg, int) and B else None,
        "examples": num(tr.get("examples_seen")),
        "final_loss": num(tr.get("final_loss", loss[-1] if loss else None)),
        "grad_err": num(_get(res, "check.grad_max_rel_err")),
        # bf16: the bound on |J − J_float64| after these steps (docs/one-device.md)
        "loss_tol": num(_get(res, "check.final_loss_tolerance")),
        "loss_curve": [num(x) for x in loss],
        "breakdown": bd,
        "pred_breakdown": pbd,
        "rank_mem": rank_mem,
        **{f"bd_{c}": (bd or {}).get(c) for c in CATEGORIES},
        **{f"pred_bd_{c}": (pbd or {}).get(c) for c in CATEGORIES},
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
    df["label"] = [case_label(r, df) for _, r in df.iterrows()]
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
    for col, vals in (("base", bases), ("mem_x", mem_x), ("time_x", time_x),
                      ("loss_delta", dloss)):  # object columns: a missing value stays None
        df[col] = pd.Series(vals, index=df.index, dtype=object)


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


def fmt_seconds(x: Any) -> str:
    v = num(x)
    if v is None:
        return MISSING
    return f"{v * 1e3:.0f} ms" if v < 10 else f"{v:.1f} s"


def _fmt(col: str, x: Any) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return MISSING
    if col.endswith("bytes") or col.endswith("bytes_per_step"):
        return fmt_bytes(x)
    if col in ("step_s", "pred_step_s"):
        return f"{x * 1e3:.2f} ms"
    if col == "time_s":
        return fmt_seconds(x)
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
    if col == "load":
        return f"{x:.1f}"
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


def to_text(df: pd.DataFrame, *, left: tuple[str, ...] = ("case", "run")) -> str:
    """The table as fixed-width text, the name columns aligned left."""
    if not len(df):
        return "(no results)"
    df = df.copy()
    for col in left:
        if col in df.columns:
            w = max(len(col), *(len(str(v)) for v in df[col]))
            df[col] = [str(v).ljust(w) for v in df[col]]
            df = df.rename(columns={col: col.ljust(w)})
    return df.to_string(index=False)


WIDTH = 120  # what the console output fits in
# Compact columns left out, in this order, while the table is wider than WIDTH.
DROPPABLE = ("base", "bubble", "comm err", "mem err", "B")


def fit(shown: pd.DataFrame, width: int = WIDTH) -> tuple[str, list[str]]:
    """The table as text no wider than `width`, and the columns it had to leave out."""
    dropped: list[str] = []
    text = to_text(shown)
    for col in DROPPABLE:
        if max((len(line) for line in text.splitlines()), default=0) <= width:
            break
        if col in shown.columns:
            shown = shown.drop(columns=[col])
            dropped.append(col)
            text = to_text(shown)
    return text, dropped


def wrap(lines: list[str], width: int = WIDTH) -> list[str]:
    """Lines of prose (Markdown bullets kept as bullets) wrapped for a terminal."""
    import textwrap

    out = []
    for line in lines:
        if len(line) <= width:
            out.append(line)
            continue
        indent = "  " if line.startswith("- ") else ""
        out += textwrap.wrap(line, width, subsequent_indent=indent, break_on_hyphens=False)
    return out


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


def _text(v: Any) -> str:
    return v if isinstance(v, str) else ""


def case_label(row: pd.Series, df: pd.DataFrame) -> str:
    """What tells this row apart in a table or figure: strategy, variant, P, and B and M
    where the rows differ in them (`single B=256`, `pipeline 1f1b P=2 M=4`)."""
    s = run_label(row)
    kin = df[(df["strategy"] == row["strategy"]) & (df["P"] == row["P"])
             & (df["variant"].map(_text) == _text(row["variant"]))]
    if kin["hidden"].nunique(dropna=True) > 1 and row["hidden"] is not None:
        s += f" h={row['hidden']}"
    if (kin if row["strategy"] != "single" else df[df["strategy"] == "single"])[
            "B"].nunique(dropna=True) > 1:
        s += f" B={row['B']}"
    if (row["M"] or 1) > 1 and (row["variant"] == "accum" or df["M"].nunique(dropna=True) > 1):
        s += f" M={row['M']}"
    return s


# ---------------------------------------------------------------- the whole report


def legend(df: pd.DataFrame) -> list[str]:
    """What the table's figures mean, said once (and what differs between its rows)."""
    lines = ["Per device = the largest rank's figure. bytes/step/dev: what that rank sends or hands "
             "to collectives per training step, training roles only; the J reduction "
             "(`metric`) is apart (metric/dev in results.md). time = median step time × steps: "
             "the time for the examples the run saw. Errors: (measured − predicted) / predicted, "
             "worst rank; base: the id of the single-device row compared with (×)."]
    crowded = sorted({int(num(r["cores"])) for _, r in df.iterrows() if _crowded(r)})
    if crowded:
        lines.append(f"*: a CPU run with more ranks than the {crowded[0]} cores it had: its ranks "
                     "took turns on them, so its time is the machine's more than the strategy's.")
    busy = busy_machine(df)
    if busy:
        lines.append(f"The machine was busy while these runs ran (1-minute load average up to "
                     f"{busy[0]:.1f} on {busy[1]} cores): times are noisy, bytes and memory "
                     "are not.")
    ex = sorted({int(x) for x in df["examples"] if num(x)}) if len(df) else []
    if len(ex) > 1:
        lines.append("The runs saw different numbers of examples (" + ", ".join(f"{e:,}" for e in ex)
                     + "): compare their times only among rows with the same count.")
    threads = sorted({int(t) for t in df["threads"] if num(t)}) if len(df) else []
    if len(threads) == 1:
        lines.append(f"Every rank, the single device included, computed with {threads[0]} "
                     f"intra-op thread{'s' if threads[0] > 1 else ''} (threads_per_rank).")
    elif len(threads) > 1:
        lines.append("Intra-op threads per rank differ between rows ("
                     + ", ".join(map(str, threads)) + "): a device is not the same compute in "
                     "every row (threads/rank in results.md).")
    return lines


def busy_machine(df: pd.DataFrame) -> tuple[float, int] | None:
    """(the highest load, the cores) when some CPU run ended with more load than cores."""
    if not len(df) or "load" not in df.columns:
        return None
    over = [(num(r["load"]), int(num(r["cores"]))) for _, r in df.iterrows()
            if r["device"] == "cpu" and num(r["load"]) and num(r["cores"])
            and num(r["load"]) > num(r["cores"])]
    return max(over) if over else None


def _crowded(r: pd.Series) -> bool:
    from partition.plots import over_cores

    return r["status"] == "ok" and over_cores(r)


def _mark_crowded(shown: pd.DataFrame, df: pd.DataFrame, col: str) -> pd.DataFrame:
    if col in shown.columns:
        shown[col] = [v + "*" if _crowded(r) and v != MISSING else v
                      for v, (_, r) in zip(shown[col], df.iterrows())]
    return shown


def _shown(path: str) -> str:
    """A folder as the user would type it: relative to here when it is under here."""
    rel = os.path.relpath(path)
    return path if rel.startswith("..") else rel


@dataclass
class Report:
    table: pd.DataFrame
    text: str
    summary: list[str]
    files: list[str]
    notes: list[str]
    legend: list[str] = dataclasses.field(default_factory=list)

    def console(self) -> str:
        """What the entry points print: the table, its legend and notes, the summary, and
        the files written (their folder once)."""
        notes = [f"note: {n}" for n in self.notes]
        folders = {os.path.dirname(os.path.abspath(f)) for f in self.files}
        if len(folders) == 1:
            wrote = (f"wrote {_shown(folders.pop())}/: "
                     + ", ".join(os.path.basename(f) for f in self.files))
        else:
            wrote = "wrote " + ", ".join(_shown(os.path.abspath(f)) for f in self.files)
        return "\n".join([self.text, *wrap([*self.legend, *notes]), "", *wrap(self.summary), "",
                          wrote])


def write_report(df: pd.DataFrame, out: str, *, plots: bool = True,
                 title: str = "Results") -> Report:
    """results.csv (every column, raw numbers), results.md (table, notes, summary), PNGs."""
    from partition.plots import write_plots
    from partition.summary import summarize  # it reads this module's table

    os.makedirs(out, exist_ok=True)
    csv_path = os.path.join(out, "results.csv")
    df.drop(columns=[c for c in NESTED if c in df.columns]).to_csv(csv_path, index=False)
    pl = write_plots(df, out) if plots else Plots()
    drawn = [os.path.basename(p) for p in pl.written]
    summary = summarize(df, timelines="timelines.png" if "timelines.png" in drawn else None)
    lines = legend(df)
    md = [f"# {title}", ""]
    md += [f"![{os.path.basename(p)}]({os.path.basename(p)})" for p in pl.written[:1]]
    md += ["", to_markdown(_mark_crowded(display(df, FULL), df, "time")), "", *lines, ""]
    md += [f"![{os.path.basename(p)}]({os.path.basename(p)})" for p in pl.written[1:]]
    md += timeline_links(pl.timelines, out)
    md += [f"- {n}" for n in pl.notes]
    md += ["", "## Summary", "", *summary, ""]
    md_path = os.path.join(out, "results.md")
    with open(md_path, "w") as fh:
        fh.write("\n".join(md))
    text, dropped = fit(_mark_crowded(display(df, COMPACT), df, "time"))
    if dropped:
        lines = [f"(Left out here to fit {WIDTH} columns: {', '.join(dropped)}; results.md has "
                 "every column.)", *lines]
    return Report(table=df, text=text, summary=summary,
                  files=[csv_path, md_path, *pl.written], notes=pl.notes, legend=lines)


def timeline_links(timelines: list[tuple[str, str]], out: str) -> list[str]:
    """results.md's links to each drawn case's own timeline.png, relative to the report."""
    if not timelines:
        return []
    return ["", "Each pipeline case's own timeline.png (measured above, simulated below):", "",
            *[f"- [{case}]({os.path.relpath(png, out).replace(' ', '%20')})"
              for case, png in timelines], ""]


@dataclass
class Plots:
    written: list[str] = dataclasses.field(default_factory=list)
    notes: list[str] = dataclasses.field(default_factory=list)
    # (case, its run folder's timeline.png) for each case timelines.png draws
    timelines: list[tuple[str, str]] = dataclasses.field(default_factory=list)


def write_plots(df: pd.DataFrame, out: str) -> Plots:
    """The figures (partition.plots), for callers of this module."""
    from partition.plots import write_plots as draw

    return draw(df, out)
