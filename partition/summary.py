"""The closing summary of a comparison, generated from the results table.

It answers the seed's exercise — partition the graph over P devices, or train on a
smaller minibatch? — with the numbers in the table (`partition.report.build_table`).
Which list a point lands in (advantage or disadvantage of partitioning) is decided by
those numbers, not written in advance; a case the table lacks is said to be missing.

The cases are recognised from the rows themselves: the partitioned runs (any
strategy but `single`) at their most common batch size B; the single-device run at
that B with M = 1 (the full batch) and with M > 1 (gradient accumulation); and the
single-device runs at a smaller B (the smaller minibatch). Single-device runs at B
with recomputation or bf16 (the table's `policy`) are what one device can do instead:
each is weighed on its own — does it fit, how long for the same examples, which J.
"""

from __future__ import annotations

from typing import Any

import pandas as pd

from partition.plots import over_cores
from partition.report import fmt_bytes, num, run_label

# Two J values closer than this (relative) are the same update computed two ways.
SAME_J_RTOL = 1e-4
MISSING_MEM = "peak not measured"


def _mem(r: pd.Series) -> tuple[float | None, str]:
    """The peak per device and where it comes from: measured first, else predicted."""
    v = num(r["peak_bytes"])
    if v is not None:
        return v, "measured"
    v = num(r["pred_peak_bytes"])
    return (v, "predicted") if v is not None else (None, "")


def _mem_text(r: pd.Series) -> str:
    v, kind = _mem(r)
    if v is None:
        return MISSING_MEM
    return fmt_bytes(v) + (" predicted" if kind == "predicted" else "")


CAUSES = (("idle_schedule", "the schedule"), ("idle_imbalance", "stage imbalance"),
          ("idle_comm", "communication and the runtime between actions"))


def _causes(r: Any) -> str:  # noqa: ANN401 - a results row
    """"; simulated X: A on the schedule, B on …, C costs most" (train.idle_causes), or ""."""
    parts = [(num(r.get(k)), what) for k, what in CAUSES]
    sim = num(r.get("sim_idle"))
    if sim is None or any(v is None for v, _ in parts):
        return ""
    most = max(parts, key=lambda p: p[0])[1]
    split = ", ".join(f"{v:.0%} on {what}" for v, what in parts)
    return f"; simulated {sim:.0%}: {split}, {most} costing most"


def _ms(x: float | None) -> str:
    return "—" if x is None else f"{x * 1e3:.1f} ms"


def _time_for(r: pd.Series, examples: int | None) -> float | None:
    """Time to see `examples` examples at this run's pace: median step time × examples / B."""
    step, B = num(r["step_s"]), num(r["B"])
    if step is None or not B or not examples:
        return None
    return step * examples / B


def _tail_mean(r: pd.Series, examples: int) -> float | None:
    """Mean J over the steps that saw the last `examples` examples: a smaller minibatch's
    last few steps cover the same rows as the full batch's last step (data.shuffle=false)."""
    curve = [x for x in (r["loss_curve"] or []) if x is not None]
    k = max(1, examples // int(r["B"]))
    return sum(curve[-k:]) / k if len(curve) >= k else None


def _status_text(r: pd.Series) -> str:
    err = f": {r['error']}" if r["error"] else ""
    return f"{r['status']}{err}"


def _rows(df: pd.DataFrame) -> list[pd.Series]:
    return [r for _, r in df.iterrows()]


def summarize(df: pd.DataFrame, *, timelines: str | None = None) -> list[str]:
    """Markdown lines: the setting, then advantages, disadvantages and what is missing;
    `timelines`, the figure of the pipeline cases' steps, is named where the bubble is."""
    if not len(df):
        return ["No results: nothing to summarise."]
    known = df[df["strategy"].notna() & df["B"].notna()]  # a row without these says nothing
    part_all = known[known["strategy"] != "single"]
    if not len(part_all):
        return ["No partitioned run in these results: nothing to compare with a smaller "
                "minibatch."]
    counts = part_all["B"].value_counts()
    B = int(max(b for b, n in counts.items() if n == counts.max()))
    part = _rows(part_all[part_all["B"] == B])
    singles_all = known[known["strategy"] == "single"]
    has_policy = singles_all["policy"].notna() if "policy" in singles_all else \
        pd.Series(False, index=singles_all.index)
    singles = singles_all[~has_policy]
    alts = _rows(singles_all[has_policy & (singles_all["B"] == B)])
    full = _rows(singles[(singles["B"] == B) & (singles["M"] == 1)])
    accum = _rows(singles[(singles["B"] == B) & (singles["M"] > 1)])
    small = _rows(singles[singles["B"] < B])
    planned = {num(r["planned_examples"]) for r in part} - {None}
    E = int(max(planned)) if planned else None
    # The loss is only comparable after the same number of examples.
    small_same = [r for r in small if E is not None and num(r["planned_examples"]) == E]
    small = small_same or small

    adv: list[str] = []
    dis: list[str] = []
    missing: list[str] = []

    head = [f"Partitioning over P devices versus a smaller minibatch: full batch B={B}"
            + (f", {E:,} examples per run" if E else "")
            + (f"; smaller minibatch B={', '.join(str(r['B']) for r in small)}" if small else "")
            + (f"; optimizer {', '.join(opts)} (its state counts in every device's memory)"
               if (opts := sorted({str(r['optimizer']) for r in part
                                   if r.get('optimizer') not in (None, 'sgd')})) else "")
            + "."]

    f0 = full[0] if full else None
    s0 = min(small, key=lambda r: r["B"]) if small else None
    a0 = accum[0] if accum else None
    ok_part = [r for r in part if r["status"] == "ok"]

    # ---- memory per device
    fits = [(r, _mem(r)[0]) for r in ok_part if _mem(r)[0] is not None]
    best = min(fits, key=lambda t: t[1]) if fits else None
    full_v = _mem(f0)[0] if f0 is not None else None
    limit = num(f0["memory_limit"]) if f0 is not None else None
    if f0 is None:
        missing.append(f"single device, full batch B={B}: no run")
    elif f0["status"] == "oom" and ok_part:
        need = f", needs {_mem_text(f0)}" if full_v is not None else ""
        lim = f" under memory_limit={fmt_bytes(limit)}" if limit else ""
        where = (f"; the lowest is {run_label(best[0])} at {fmt_bytes(best[1])} per device"
                 if best else "")
        adv.append(f"**Memory per device**: the full batch B={B} does not fit one device "
                   f"(oom{lim}{need}); partitioned, {len(ok_part)} of {len(part)} runs train it "
                   f"with the full batch{where}.")
    elif full_v is not None and best is not None:
        ratio = best[1] / full_v
        (adv if ratio < 1 else dis).append(
            f"**Memory per device**: {run_label(best[0])} holds {fmt_bytes(best[1])} per device, "
            f"{ratio:.2f}× the single device's {_mem_text(f0)} for the full batch.")
    oom_part = [r for r in part if r["status"] == "oom"]
    if oom_part:
        dis.append("**Memory per device**: still oom when partitioned: "
                   + "; ".join(f"{run_label(r)} ({_mem_text(r)})" for r in oom_part) + ".")
    if s0 is not None and best is not None:
        sv = _mem(s0)[0]
        if s0["status"] == "oom":
            adv.append(f"**Memory vs smaller minibatch**: even B={s0['B']} is oom on one "
                       f"device; {run_label(best[0])} fits at {fmt_bytes(best[1])} per device.")
        elif sv is not None:
            if sv <= best[1]:
                dis.append(f"**Memory vs smaller minibatch**: one device with B={s0['B']} needs "
                           f"{fmt_bytes(sv)}, no more than the best partition's "
                           f"{fmt_bytes(best[1])} per device ({run_label(best[0])}, which needs "
                           f"{best[0]['P']} devices).")
            else:
                adv.append(f"**Memory vs smaller minibatch**: {run_label(best[0])} needs "
                           f"{fmt_bytes(best[1])} per device, less than the {fmt_bytes(sv)} of "
                           f"one device with B={s0['B']}.")
    if not fits and not any(_mem(r)[0] is not None for r in full + small + accum):
        missing.append("peak memory per device: not measured in these results "
                       "(memory.peak_bytes empty)")

    # ---- bytes moved
    moved = [(r, num(r["bytes_per_step"])) for r in ok_part if num(r["bytes_per_step"])
             is not None]
    if moved:
        lo, hi = min(m for _, m in moved), max(m for _, m in moved)
        span = fmt_bytes(lo) if lo == hi else f"{fmt_bytes(lo)} to {fmt_bytes(hi)}"
        each = ", ".join(f"{run_label(r)} {fmt_bytes(m)}" for r, m in moved)
        zero = [x for x in (s0, a0) if x is not None and x["status"] == "ok"]
        names = ["the smaller minibatch" if x is s0 else "gradient accumulation" for x in zero]
        alt = f" — {' and '.join(names)} move{'s' if len(names) == 1 else ''} 0 B" if zero else ""
        (dis if hi > 0 else adv).append(
            f"**Bytes moved**: each step, partitioned runs move {span} per device between "
            f"devices ({each}){alt}.")
        tl = {r["variant"]: (r, m) for r, m in moved if r["strategy"] == "tensor"
              and r["P"] == moved[0][0]["P"]}
        if "megatron" in tl and "rowwise" in tl and tl["megatron"][1] > 0:
            k = tl["rowwise"][1] / tl["megatron"][1]
            dis.append(f"**Layout matters**: tensor rowwise moves {k:.1f}× the bytes of the "
                       f"Megatron pairing at P={tl['megatron'][0]['P']} "
                       f"({fmt_bytes(tl['rowwise'][1])} vs {fmt_bytes(tl['megatron'][1])}).")
    elif part:
        missing.append("bytes moved: no finished partitioned run")

    # ---- time to see the same examples (only runs that saw them are compared)
    def saw_E(r: pd.Series) -> bool:
        return E is not None and num(r["examples"]) == E

    def crowd(r: pd.Series) -> str:
        return "*" if over_cores(r) else ""

    timed = [(r, _time_for(r, E)) for r in ok_part if saw_E(r) and _time_for(r, E) is not None]
    others = [r for r in ok_part + [x for x in (s0, a0, f0) if x is not None and x["status"] == "ok"]
              if not saw_E(r) and num(r["examples"]) is not None]
    for r in others:
        missing.append(f"time of {run_label(r)} B={r['B']}: it saw {int(num(r['examples'])):,} "
                       f"examples, not {E:,}, so its time is not compared")
    if timed:
        fastest = min(timed, key=lambda t: t[1])
        refs = [(name, x) for name, x in (("smaller minibatch", s0), ("accumulation", a0),
                                          ("full batch", f0))
                if x is not None and x["status"] == "ok" and saw_E(x)
                and _time_for(x, E) is not None]
        parts = ", ".join(f"{run_label(r)} {_ms(t)}{crowd(r)}" for r, t in timed)
        if refs:
            name, x = refs[0]
            tx = _time_for(x, E)
            crowded = sorted({int(num(r["cores"])) for r, _ in timed if over_cores(r)})
            note = (f" (* more ranks than the machine's {crowded[0]} cores: they took turns on "
                    "them)") if crowded else ""
            line = (f"**Time for {E:,} examples** (median step time × {E:,}/B, this machine, "
                    f"every rank with the same threads): fastest partitioned "
                    f"{run_label(fastest[0])} {_ms(fastest[1])}{crowd(fastest[0])} vs {name} "
                    f"B={x['B']} {_ms(tx)} ({_ms(num(x['step_s']))} per step); "
                    f"all partitioned: {parts}{note}.")
            (adv if fastest[1] < tx else dis).append(line)
        else:
            missing.append(f"time: no finished single-device run that saw the same {E:,} "
                           "examples to compare with")
    elif part:
        missing.append("step time: no finished partitioned run that saw the same examples")

    # ---- pipeline bubble
    pipes = [r for r in ok_part if r["strategy"] == "pipeline"]
    if pipes:
        items = []
        for r in pipes:
            meas, pred = num(r["bubble"]), num(r["pred_bubble"])
            m = "—" if meas is None else f"{meas:.0%}"
            p = "—" if pred is None else f"{pred:.0%}"
            ideal = "(P−1)/(M+P−1)" if r["variant"] in ("gpipe", "1f1b") else \
                "with equal stages and free communication"
            items.append(f"{run_label(r)} M={r['M']} spends {m} of a step not computing "
                         f"(predicted bubble {ideal} = {p}{_causes(r)})")
        seen = f" ({timelines}: each of these steps, measured above simulated)" if timelines else ""
        dis.append("**Bubble**: " + "; ".join(items) + seen + ".")

    # ---- loss after the same examples
    ref = next((x for x in (f0, a0) if x is not None and x["status"] == "ok"
                and num(x["final_loss"]) is not None), None)
    jp = [(r, num(r["final_loss"])) for r in ok_part if num(r["final_loss"]) is not None]
    if jp:
        if ref is not None:
            jr = num(ref["final_loss"])
            dj = max(abs(j - jr) for _, j in jp)
            what = "full batch" if ref is f0 else f"gradient accumulation M={ref['M']}"
            if dj <= SAME_J_RTOL * max(1.0, abs(jr)):
                adv.append(f"**Same update**: after the same examples every partitioned run "
                           f"ends at J = {jr:.4f}, as single-device {what} does (largest "
                           f"|ΔJ| = {dj:.1e}): partitioning changes where the work runs, not "
                           f"the optimisation.")
            else:
                dis.append(f"**Not the same update**: partitioned runs end up to {dj:.1e} away "
                           f"from single-device {what}'s J = {jr:.4f}.")
        else:
            missing.append("loss reference: no finished single-device run at the full batch "
                           "(full or accumulated)")
        js = _tail_mean(s0, B) if s0 is not None and s0["status"] == "ok" else None
        if small_same and js is not None:
            jpm = sum(j for _, j in jp) / len(jp)
            steps_p = num(jp[0][0]["steps"])
            k = f"{num(s0['steps']) / steps_p:.0f}× as many" if steps_p else "more"
            tail = B // s0["B"]
            line = (f"**Loss after the same {E:,} examples**: J over the last {B:,} examples "
                    f"seen is {js:.4f} for the smaller minibatch B={s0['B']} ({k} steps; the "
                    f"mean of its last {tail}) and {jpm:.4f} for the partitioned full batch.")
            (dis if js < jpm else adv).append(line)
        elif not small_same:
            missing.append(f"smaller minibatch that sees the same {E:,} examples: no run"
                           if E else "smaller minibatch: no run")
    elif part:
        missing.append("loss: no finished partitioned run")

    # ---- what one device can do instead: recomputation, bf16, both
    jref = num(ref["final_loss"]) if ref is not None else None
    t_fast = min(timed, key=lambda t: t[1]) if timed else None
    for a in alts:
        _weigh_alternative(a, B=B, E=E, limit=limit, best=best, t_fast=t_fast, jp=jp,
                           jref=jref, adv=adv, dis=dis, missing=missing)

    for x in (s0, a0):
        if x is not None and x["status"] != "ok":
            missing.append(f"{run_label(x)} B={x['B']} M={x['M']}: {_status_text(x)}")
    if a0 is None:
        missing.append(f"gradient accumulation at B={B}: no run")
    for r in part:
        if r["status"] not in ("ok", "oom"):
            missing.append(f"{run_label(r)} M={r['M']}: {_status_text(r)}")

    out = head + ["", "Advantages of partitioning:"]
    out += [f"- {x}" for x in adv] or ["- none shown by these numbers"]
    out += ["", "Disadvantages of partitioning:"]
    out += [f"- {x}" for x in dis] or ["- none shown by these numbers"]
    if missing:
        out += ["", "Missing:"] + [f"- {x}" for x in missing]
    return out


def _weigh_alternative(a: pd.Series, *, B: int, E: int | None, limit: float | None,
                       best: tuple[pd.Series, float] | None,
                       t_fast: tuple[pd.Series, float] | None,
                       jp: list[tuple[pd.Series, float]], jref: float | None,
                       adv: list[str], dis: list[str], missing: list[str]) -> None:
    """Partitioning against one single-device alternative at the full batch: memory (does it
    fit under the limit), time for the same examples, J after the same examples."""
    name = f"one device with {a['policy'].replace('+', ' and ')}"
    lim = f" under memory_limit={fmt_bytes(limit)}" if limit else ""
    act = num(a.get("activations_bytes"))
    act = act if act is not None else num(a.get("pred_activations_bytes"))
    kept = f", {fmt_bytes(act)} of it kept activations" if act is not None else ""
    if a["status"] == "oom":
        where = (f"; {run_label(best[0])} trains it at {fmt_bytes(best[1])} per device"
                 if best else "")
        adv.append(f"**vs {name}**: the full batch B={B} still does not fit one device{lim} "
                   f"(oom, needs {_mem_text(a)}{kept}){where}.")
        return
    if a["status"] != "ok":
        missing.append(f"{name} B={B}: {_status_text(a)}")
        return
    mv = _mem(a)[0]
    if mv is not None:
        than = (f", {mv / best[1]:.2f}× the best partition's {fmt_bytes(best[1])} per device "
                f"({run_label(best[0])}, on {best[0]['P']} devices)" if best else "")
        dis.append(f"**vs {name}**: one device trains the full batch B={B}{lim} at "
                   f"{_mem_text(a)}{kept}{than}, with no second device.")
    ta = _time_for(a, E)
    if ta is not None and t_fast is not None:
        line = (f"**Time vs {name}**: {E:,} examples take {_ms(ta)} on one device "
                f"({_ms(num(a['step_s']))} per step) and {_ms(t_fast[1])} on the fastest "
                f"partition ({run_label(t_fast[0])}).")
        (adv if t_fast[1] < ta else dis).append(line)
    ja = num(a["final_loss"])
    if ja is not None and jp:
        jr = jref if jref is not None else sum(j for _, j in jp) / len(jp)
        dj = abs(ja - jr)
        tol = num(a.get("loss_tol"))
        if a.get("precision") == "bf16":
            bound = f", within bf16's bound {tol:.1e}" if tol is not None and dj <= tol else (
                f", over bf16's bound {tol:.1e}" if tol is not None else "")
            adv.append(f"**J vs {name}**: J = {ja:.4f} after the same examples, {dj:.1e} from "
                       f"the partitioned runs' {jr:.4f}{bound} (docs/one-device.md): "
                       f"partitioning computes the {a['dtype']} update exactly, bf16 rounds it.")
        elif dj <= SAME_J_RTOL * max(1.0, abs(jr)):
            # nothing for partitioning to gain here
            dis.append(f"**J vs {name}**: the same J = {ja:.4f} after the same examples as "
                       f"the partitioned runs (|ΔJ| = {dj:.1e}): the same update.")
        else:
            adv.append(f"**J vs {name}**: J = {ja:.4f} after the same examples, {dj:.1e} from "
                       f"the partitioned runs' {jr:.4f}, which compute the {a['dtype']} "
                       f"update exactly (docs/one-device.md bounds bf16's difference).")


__all__ = ["summarize"]
