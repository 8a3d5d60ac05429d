"""The results table, plots and generated summary; the compare experiment's cases.

Strategies other than single and pipeline, measured memory and the `oom` status come
from hand-made result.json files that follow the result.json contract (docs/results.md),
so the report is tested on every kind of row whatever this branch can run.
"""

from __future__ import annotations

import json
import os

import pytest

from partition.report import build_table, display, load_table, to_markdown, write_report
from partition.results import write_json

MiB = 1024**2
D, H, Q, B = 784, 2048, 10, 1024
LIMIT = 42 * MiB


def fake_result(strategy: str, P: int, batch: int = B, M: int = 1, *, variant: str | None = None,
                status: str = "ok", peak: float | None = None, pred_peak: float | None = None,
                role_bytes: dict[str, int] | None = None, step_s: float | None = 0.1,
                loss: list[float] | None = None, bubble: float | None = None,
                steps: int = 4, error: dict | None = None, cores: int = 2,
                threads: int = 1, boundaries: list | None = None,
                load: list | None = None) -> dict:
    """A result.json as the contract has it (the keys a strategy of this kind would fill)."""
    role_bytes = role_bytes or {}
    loss = [2.3, 2.1, 1.9, 1.7] if loss is None and status == "ok" else (loss or [])
    ranks = []
    if status == "ok":
        for r in range(P):
            roles = {k: {"bytes": v, "messages": 1} for k, v in role_bytes.items()}
            roles["metric"] = {"bytes": 8, "messages": 1}
            sent = sum(v["bytes"] for v in roles.values())
            ranks.append({
                "rank": r, "device": "cpu",
                "comm": {"sent_bytes": sent, "recv_bytes": sent, "collective_bytes": 0,
                         "wire_bytes": sent, "messages": len(roles), "seconds": 0.001,
                         "by_role": roles},
                "memory": {"peak_bytes": None if peak is None else peak - r,
                           "predict_peak_bytes": None if peak is None else peak // 3,
                           "params_bytes": (D * H + H * Q) * 4 // P, "grads_bytes": 0,
                           "optimizer_bytes": 0, "activations_bytes": None,
                           "breakdown": None if peak is None else {
                               "params": MiB, "grads": MiB, "optimizer": 0, "input": MiB,
                               "activations": peak - r - 4 * MiB, "comm": 0,
                               "temporaries": MiB}},
                "timing": {"step_s": step_s, "compute_s": None, "comm_s": None, "other_s": None},
            })
    pranks = [{"comm": {"by_role": {k: {"bytes": v} for k, v in role_bytes.items()}},
               "memory": {"peak_bytes": pred_peak}} for _ in range(P)] if pred_peak else []
    res = {
        "status": status,
        "error": error,
        "run": {"strategy": strategy, "world_size": P, "ranks": P, "device": "cpu",
                "threads_per_rank": threads, "cpu_count": cores, "load_average": load,
                "backend": "gloo" if P > 1 else "none",
                "schedule": variant if strategy == "pipeline" else None,
                "layout": variant if strategy == "tensor" else None,
                "batch_size": batch, "microbatches": M, "dims": [D, H, Q], "dtype": "float32"},
        "config": {"strategy": {"name": strategy}, "world_size": P, "memory_limit": LIMIT,
                   "model": {"dims": [D, H, Q]}, "data": {"name": "synthetic"},
                   "train": {"batch_size": batch, "microbatches": M, "steps": steps,
                             "lr": 0.1, "dtype": "float32"}},
        "train": {"loss": loss, "final_loss": loss[-1] if loss else None,
                  "examples_seen": len(loss) * batch, "steps_done": len(loss),
                  "step_time_s": {"median": step_s if status == "ok" else None,
                                  "min": None, "max": None},
                  "bubble_fraction_measured": bubble},
        "ranks": ranks,
        "predicted": {"ranks": pranks, "flops_per_step": None,
                      "bubble_fraction": (P - 1) / (M + P - 1) if strategy == "pipeline" else 0.0},
        "check": {"grad_max_rel_err": 2e-7 if status == "ok" else None, "reference": "autograd"},
    }
    if boundaries is not None:
        res["boundaries"] = boundaries
    return res


ACT = B * H * 4  # one hidden activation of the full batch, float32
SAME = [2.3, 2.1, 1.9, 1.7]  # the full-batch trajectory, however it is computed

# The compare experiment's cases, as fixtures: (folder, result).
CASES = [
    ("01-single-full-batch", fake_result(
        "single", 1, status="oom", pred_peak=47 * MiB, step_s=None,
        error={"rank": 0, "type": "MemoryLimitExceeded",
               "message": f"needs 49283072 bytes, memory_limit={LIMIT}"})),
    ("02-single-smaller-minibatch", fake_result(
        "single", 1, batch=256, steps=16, peak=19 * MiB, pred_peak=19 * MiB, step_s=0.02,
        loss=[2.3 - 0.05 * i for i in range(16)])),
    ("03-single-grad-accumulation", fake_result(
        "single", 1, M=4, peak=22 * MiB, pred_peak=22 * MiB, step_s=0.09, loss=SAME)),
    ("04-pipeline-gpipe-P2", fake_result(
        "pipeline", 2, M=4, variant="gpipe", peak=29 * MiB, pred_peak=28 * MiB,
        role_bytes={"activation": ACT}, step_s=0.12, bubble=0.35, loss=SAME,
        boundaries=[{"from_stage": 0, "to_stage": 1, "from_rank": 0, "to_rank": 1,
                     "forward_bytes": ACT, "backward_bytes": ACT, "messages": 8}])),
    ("05-pipeline-1f1b-P2", fake_result(
        "pipeline", 2, M=4, variant="1f1b", peak=25 * MiB, pred_peak=25 * MiB,
        role_bytes={"activation": ACT}, step_s=0.11, bubble=0.3, loss=SAME)),
    ("06-tensor-megatron-P2", fake_result(
        "tensor", 2, variant="megatron", peak=21 * MiB, pred_peak=21 * MiB,
        role_bytes={"partial_output": B * Q * 4}, step_s=0.06, loss=SAME)),
    ("07-tensor-rowwise-P2", fake_result(
        "tensor", 2, variant="rowwise", peak=33 * MiB, pred_peak=33 * MiB,
        role_bytes={"gather": ACT // 2}, step_s=0.08, loss=SAME)),
    ("08-data-P2", fake_result(
        "data", 2, peak=26 * MiB, pred_peak=26 * MiB,
        role_bytes={"weight_grad": (D * H + H * Q) * 4}, step_s=0.07, loss=SAME)),
    ("09-data-P4", fake_result(
        "data", 4, status="failed", step_s=None,
        error={"rank": 3, "type": "DistBackendError", "message": "connection closed"})),
]


def _write(tmp_path, cases=CASES) -> str:
    root = tmp_path / "compare"
    for name, res in cases:
        write_json(str(root / name / "result.json"), res)
    return str(root)


def test_table_has_a_row_per_case_with_oom_where_expected(tmp_path):
    df = load_table([_write(tmp_path)], sort=False)
    assert list(df["name"]) == [n for n, _ in CASES]
    assert list(df["status"]) == ["oom"] + ["ok"] * 7 + ["failed"]
    assert list(df["strategy"]) == ["single"] * 3 + ["pipeline"] * 2 + ["tensor"] * 2 + \
        ["data"] * 2
    assert list(df["variant"])[:7] == [None, None, "accum", "gpipe", "1f1b", "megatron",
                                       "rowwise"]
    row = df.set_index("name").loc
    # Peak per device is the max over ranks; training bytes leave out the metric role.
    assert row["04-pipeline-gpipe-P2", "peak_bytes"] == 29 * MiB
    assert row["04-pipeline-gpipe-P2", "bytes_per_step"] == ACT
    assert row["06-tensor-megatron-P2", "bytes_per_step"] == B * Q * 4
    assert row["01-single-full-batch", "peak_bytes"] is None  # oom: nothing measured
    assert row["01-single-full-batch", "pred_peak_bytes"] == 47 * MiB
    assert row["04-pipeline-gpipe-P2", "mem_err"] == pytest.approx(1 / 28)
    assert row["06-tensor-megatron-P2", "comm_err"] == 0.0
    assert row["04-pipeline-gpipe-P2", "pred_bubble"] == pytest.approx(1 / 5)
    assert row["09-data-P4", "error"] == "rank 3: DistBackendError: connection closed"
    # The baseline of the B=1024 rows: the full batch has no result, so the accumulation
    # (the same update); the smaller minibatch is its own baseline.
    assert row["04-pipeline-gpipe-P2", "base"] == 2
    assert row["02-single-smaller-minibatch", "base"] == 1
    assert row["06-tensor-megatron-P2", "mem_x"] == pytest.approx(21 / 22)
    assert row["06-tensor-megatron-P2", "time_x"] == pytest.approx(0.06 / 0.09)
    assert row["06-tensor-megatron-P2", "loss_delta"] == 0.0

    shown = display(df, [("peak_bytes", "peak"), ("step_s", "step"), ("bubble", "bubble")])
    assert list(shown["peak"])[:2] == ["—", "19.0 MiB"]
    assert shown["step"][0] == "—" and shown["step"][2] == "90.00 ms"
    md = to_markdown(shown)
    assert md.splitlines()[0] == "| peak | step | bubble |"
    assert len(md.splitlines()) == 2 + len(CASES)


def test_baseline_prefers_single_full_batch_when_it_ran(tmp_path):
    cases = [("a", fake_result("single", 1, peak=40 * MiB, step_s=0.1)),
             ("b", fake_result("single", 1, M=4, peak=22 * MiB, step_s=0.2)),
             ("c", fake_result("tensor", 2, variant="megatron", peak=20 * MiB, step_s=0.05))]
    df = load_table([_write(tmp_path, cases)])
    assert list(df["base"]) == [0, 0, 0]
    assert df.loc[2, "mem_x"] == 0.5 and df.loc[1, "time_x"] == 2.0


def test_report_files_and_generated_summary(tmp_path):
    folder = _write(tmp_path)
    df = load_table([folder], sort=False)
    rep = write_report(df, str(tmp_path / "out"))
    names = [os.path.basename(f) for f in rep.files]
    assert names == ["results.csv", "results.md", "summary.png", "memory_per_rank.png",
                     "loss.png"]
    # One B per case and one width: the figures against B and width would show nothing;
    # hand-made results have no trace.json, so no pipeline case has a timeline to draw.
    assert rep.notes == [
        "memory_vs_batch.png not drawn: no case was measured at two or more batch sizes",
        "bytes_vs_width.png not drawn: one hidden width",
        "timelines.png not drawn: no pipeline case has a timeline to draw",
        "no timeline for pipeline gpipe P=2 M=4 (04-pipeline-gpipe-P2): no trace.json in its folder",
        "no timeline for pipeline 1f1b P=2 M=4 (05-pipeline-1f1b-P2): no trace.json in its folder"]
    text = "\n".join(rep.summary)
    adv = text.split("Advantages of partitioning:")[1].split("Disadvantages")[0]
    dis = text.split("Disadvantages of partitioning:")[1].split("Missing:")[0]
    missing = text.split("Missing:")[1]
    # Memory: the full batch is oom, partitioned runs fit; the lowest is named with its number.
    assert "does not fit one device (oom under memory_limit=42.0 MiB, needs 47.0 MiB predicted)" \
        in adv
    assert "5 of 6 runs" in adv and "tensor megatron P=2 at 21.0 MiB per device" in adv
    # ... but the smaller minibatch needs even less, on one device: a disadvantage.
    assert "B=256 needs 19.0 MiB, no more than the best partition's 21.0 MiB" in dis
    # Bytes: every partitioned case moves bytes; single-device ones move none.
    assert "move 40.0 KiB to 8.0 MiB per device" in dis
    assert "rowwise moves 102.4× the bytes of the Megatron pairing" in dis
    # Time for the same 4096 examples: megatron 0.06 s × 4 beats 0.02 s × 16.
    assert "fastest partitioned tensor megatron P=2 240.0 ms vs smaller minibatch B=256 " \
        "320.0 ms" in adv
    assert "pipeline gpipe P=2 M=4 spends 35% of a step not computing (predicted bubble " \
        "(P−1)/(M+P−1) = 20%)" in dis
    # The same update as accumulation; the smaller minibatch got further in 4× the steps.
    assert "ends at J = 1.7000, as single-device gradient accumulation M=4 does" in adv
    js = sum(2.3 - 0.05 * i for i in range(12, 16)) / 4
    assert f"is {js:.4f} for the smaller minibatch B=256 (4× as many steps" in dis
    assert "data P=2" in text and "data P=4 M=1: failed: rank 3: DistBackendError" in missing

    md = open(tmp_path / "out" / "results.md").read()
    assert "## Summary" in md and md.index("![summary.png](summary.png)") < md.index("| id |")
    assert md.count("\n| ") == len(CASES) + 1
    assert "| 0→1: 8.0 MiB fwd, 8.0 MiB bwd |" in md  # the pipeline's boundary, both ways
    import pandas as pd

    csv = pd.read_csv(tmp_path / "out" / "results.csv")
    assert len(csv) == len(CASES)
    assert not {"loss_curve", "breakdown", "rank_mem"} & set(csv.columns)
    # Every column of the full table is in the CSV, the breakdown flattened.
    assert csv.loc[3, "bd_activations"] == 29 * MiB - 4 * MiB
    assert csv.loc[3, "metric_bytes"] == 8 and csv.loc[3, "threads"] == 1


def test_summary_flips_with_the_numbers(tmp_path):
    """The same cases with a slow partition and a smaller minibatch that fits worse: the
    points move between the lists (nothing is canned)."""
    cases = [(n, json.loads(json.dumps(r))) for n, r in CASES[:3]] + [
        ("06-tensor-megatron-P2", fake_result(
            "tensor", 2, variant="megatron", peak=15 * MiB, step_s=0.5,
            role_bytes={"partial_output": B * Q * 4},
            loss=[2.3, 2.1, 1.9, 1.2]))]
    cases[1][1]["ranks"][0]["memory"]["peak_bytes"] = 30 * MiB
    df = load_table([_write(tmp_path, cases)], sort=False)
    text = "\n".join(write_report(df, str(tmp_path / "o"), plots=False).summary)
    adv = text.split("Advantages of partitioning:")[1].split("Disadvantages")[0]
    dis = text.split("Disadvantages of partitioning:")[1]
    assert "less than the 30.0 MiB of one device with B=256" in adv
    assert "Time for 4,096 examples" in dis
    assert "Not the same update" in dis  # 1.2 vs accumulation's 1.7
    assert "for the partitioned full batch" in adv  # 1.2 is below the small minibatch's


def test_missing_fields_do_not_break_the_report(tmp_path):
    # Only a status; a result from before the memory probe; an empty folder.
    write_json(str(tmp_path / "a" / "result.json"), {"status": "failed"})
    bare = fake_result("pipeline", 2, variant="gpipe", role_bytes={"activation": 64})
    del bare["predicted"], bare["check"]
    bare["ranks"][0].pop("memory")
    write_json(str(tmp_path / "b" / "result.json"), bare)
    os.makedirs(tmp_path / "c")
    df = load_table([str(tmp_path)])
    assert len(df) == 2
    rep = write_report(df, str(tmp_path))
    assert any("memory_vs_batch.png not drawn" in n for n in rep.notes)
    assert "—" in rep.text
    assert "No partitioned run" not in "\n".join(rep.summary)
    assert any("no run" in s for s in rep.summary)  # no single-device case to compare with

    empty = build_table([{"status": "failed"}])
    rep2 = write_report(empty, str(tmp_path / "e"))
    assert len(rep2.notes) == 6  # every figure skipped, each with its reason
    assert rep2.summary == ["No partitioned run in these results: nothing to compare with a "
                            "smaller minibatch."]


def test_report_command_line(tmp_path, capsys):
    from experiments.report import main

    folder = _write(tmp_path)
    assert main([folder, "--out", str(tmp_path / "r"), "--no-plots"]) == 0
    out = capsys.readouterr().out
    for s in ("single", "pipeline", "tensor", "data", "oom", "failed", "Advantages"):
        assert s in out
    assert main([str(tmp_path / "nope")]) == 2
    os.makedirs(tmp_path / "empty")
    assert main([str(tmp_path / "empty")]) == 2


# ---------------------------------------------------------------- reading it at a glance


def _console_width(text: str) -> int:
    return max(len(line) for line in text.splitlines())


def test_console_fits_120_columns_and_names_the_folder_once(tmp_path):
    out = tmp_path / "a-rather-long-folder-name-for-the-report" / "report"
    rep = write_report(load_table([_write(tmp_path)], sort=False), str(out))
    text = rep.console()
    assert _console_width(text.rsplit("\n", 1)[0]) <= 120  # all but the folder's path
    assert text.count(str(out)) == 1  # "wrote <folder>/: results.csv, …", not once per file
    assert text.splitlines()[-1] == (f"wrote {out}/: results.csv, results.md, summary.png, "
                                     "memory_per_rank.png, loss.png")
    # Every column is in results.md, even those the console leaves out.
    md = (out / "results.md").read_text()
    assert md.splitlines()[4].count(" | ") == 35  # 36 columns
    # Long case names still fit: columns are dropped (and said so), never wrapped.
    many = [(f"{i:02d}-x", fake_result("pipeline", 2, M=4, variant="interleaved_1f1b_long",
                                       peak=20 * MiB, role_bytes={"activation": ACT}))
            for i in range(3)]
    rep2 = write_report(load_table([_write(tmp_path / "m", many)]), str(tmp_path / "r2"),
                        plots=False)
    assert _console_width(rep2.console().rsplit("\n", 1)[0]) <= 120
    assert "Left out here to fit 120 columns: base" in rep2.console()


def test_time_is_compared_only_for_the_same_examples(tmp_path):
    """A smaller minibatch that stopped after 2,048 examples: its time for them is shown as
    not compared, in the figure's entries and in the summary."""
    from partition.plots import time_entries

    cases = [(n, json.loads(json.dumps(r))) for n, r in CASES[:8]]
    cases[1] = ("02-single-smaller-minibatch", fake_result(
        "single", 1, batch=256, steps=8, peak=19 * MiB, pred_peak=19 * MiB, step_s=0.02,
        loss=[2.3 - 0.05 * i for i in range(8)]))
    df = load_table([_write(tmp_path, cases)], sort=False)
    entries = time_entries(df)
    assert [e["kind"] for e in entries] == ["text", "text"] + ["bar"] * 6
    assert entries[0]["text"] == "oom"
    assert entries[1]["text"] == "not compared: saw 2,048 examples, not 4,096"
    assert entries[2]["value"] == pytest.approx(0.36) and entries[2]["text"] == "360 ms"
    text = "\n".join(write_report(df, str(tmp_path / "o"), plots=False).summary)
    assert ("time of single B=256: it saw 2,048 examples, not 4,096, so its time is not "
            "compared") in text.split("Missing:")[1]
    timeline = next(line for line in text.splitlines() if "**Time for" in line)
    assert "vs accumulation B=1024 360.0 ms" in timeline and "B=256" not in timeline


def test_more_ranks_than_cores_are_marked(tmp_path):
    from partition.plots import time_entries

    cases = [("a", fake_result("single", 1, M=4, peak=22 * MiB, step_s=0.09, loss=SAME)),
             ("b", fake_result("data", 2, peak=26 * MiB, step_s=0.07, loss=SAME,
                               role_bytes={"weight_grad": 1000})),
             ("c", fake_result("data", 4, peak=19 * MiB, step_s=0.2, loss=SAME,
                               role_bytes={"weight_grad": 1000})),
             ("d", fake_result("data", 4, peak=19 * MiB, step_s=0.05, loss=SAME, cores=8,
                               role_bytes={"weight_grad": 1000}))]
    df = load_table([_write(tmp_path, cases)], sort=False)
    assert [e["crowded"] for e in time_entries(df)] == [False, False, True, False]
    assert [e["text"] for e in time_entries(df)] == ["360 ms", "280 ms", "800 ms *", "200 ms"]
    rep = write_report(df, str(tmp_path / "o"), plots=False)
    times = [line.split()[-8] for line in rep.text.splitlines()[1:]]
    assert times == ["ms", "ms", "ms*", "ms"]
    assert rep.legend[1] == ("*: a CPU run with more ranks than the 2 cores it had: its ranks "
                             "took turns on them, so its time is the machine's more than the "
                             "strategy's.")


def test_bytes_panel_writes_0_B_and_keeps_predictions(tmp_path):
    from partition.plots import bytes_entries

    df = load_table([_write(tmp_path)], sort=False)
    es = bytes_entries(df)
    assert [e["kind"] for e in es] == ["text", "zero", "zero"] + ["bar"] * 5 + ["text"]
    assert [e["text"] for e in es] == ["oom", "0 B", "0 B", "8.0 MiB", "8.0 MiB", "40.0 KiB",
                                       "4.0 MiB", "6.2 MiB", "failed"]
    assert es[3]["inside"] == "stage 0→1: 8.0 MiB fwd, 8.0 MiB bwd" and es[4]["inside"] is None
    assert es[5]["pred"] == B * Q * 4  # the cost model's figure, drawn as a tick


def test_threads_are_stated_and_a_difference_is_flagged(tmp_path):
    df = load_table([_write(tmp_path)], sort=False)
    rep = write_report(df, str(tmp_path / "o"), plots=False)
    assert ("Every rank, the single device included, computed with 1 intra-op thread "
            "(threads_per_rank).") in rep.legend
    cases = [("a", fake_result("single", 1, peak=20 * MiB, threads=2)),
             ("b", fake_result("data", 2, peak=20 * MiB))]
    rep = write_report(load_table([_write(tmp_path / "t", cases)]), str(tmp_path / "o2"),
                       plots=False)
    assert rep.legend[-1] == ("Intra-op threads per rank differ between rows (1, 2): a device "
                              "is not the same compute in every row (threads/rank in "
                              "results.md).")


def test_a_busy_machine_is_said_once(tmp_path):
    cases = [("a", fake_result("single", 1, peak=20 * MiB, load=[1.5, 1.0, 1.0])),
             ("b", fake_result("data", 2, peak=20 * MiB, load=[7.25, 3.0, 2.0]))]
    rep = write_report(load_table([_write(tmp_path, cases)]), str(tmp_path / "o"), plots=False)
    busy = [line for line in rep.legend if "busy" in line]
    assert busy == ["The machine was busy while these runs ran (1-minute load average up to 7.2 "
                    "on 2 cores): times are noisy, bytes and memory are not."]
    calm = write_report(load_table([_write(tmp_path / "c", cases[:1])]), str(tmp_path / "o2"),
                        plots=False)
    assert not [line for line in calm.legend if "busy" in line]


def test_summary_figure_has_a_row_per_case(tmp_path):
    import matplotlib.pyplot as plt

    from partition.plots import summary_figure

    df = load_table([_write(tmp_path)], sort=False)
    path = summary_figure(df, str(tmp_path / "s.png"))
    # 16 in wide; 2.6 in of titles and legend plus 0.36 in per case, at 110 dpi.
    assert plt.imread(path).shape == (int((2.6 + 0.36 * len(CASES)) * 110), 1760, 4)
    assert summary_figure(df.iloc[0:0], str(tmp_path / "none.png")) is None


def test_identical_loss_curves_are_drawn_once_and_said_so(tmp_path):
    from partition.plots import loss_groups, loss_label

    cases = [(n, json.loads(json.dumps(r))) for n, r in CASES]
    cases[5][1]["train"]["loss"] = [2.3, 2.1, 1.9, 1.7 + 3e-7]  # float32 rounding apart
    df = load_table([_write(tmp_path, cases)], sort=False)
    rows = [r for _, r in df.iterrows() if r["loss_curve"]]
    groups = loss_groups(rows)
    assert [len(m) for m, _ in groups] == [1, 6]
    assert loss_label(*groups[1]) == ("6 runs identical to 3e-07 (single accum, pipeline ×2, "
                                      "tensor ×2, data)")
    assert loss_label(*groups[0]) == "single B=256"


def test_sweep_figures_only_with_two_batch_sizes_or_widths(tmp_path):
    """memory_vs_batch.png needs a case at two B, bytes_vs_width.png two hidden widths."""
    from partition.plots import write_plots

    cases = []
    for b in (256, 512):
        for h in (1024, 2048):
            r = fake_result("data", 2, batch=b, peak=b * h * 16, pred_peak=b * h * 16,
                            role_bytes={"weight_grad": (D * h + h * Q) * 4})
            r["run"]["dims"] = r["config"]["model"]["dims"] = [D, h, Q]
            cases.append((f"b{b}-h{h}", r))
    df = load_table([_write(tmp_path, cases)])
    res = write_plots(df, str(tmp_path))
    assert [os.path.basename(p) for p in res.written] == [
        "summary.png", "memory_per_rank.png", "loss.png", "memory_vs_batch.png",
        "bytes_vs_width.png"]
    assert res.notes == ["timelines.png not drawn: no pipeline case"]


# ---------------------------------------------------------------- the compare experiment


def test_compare_cases_see_the_same_examples():
    from experiments.compare import plan

    out, planned = plan([])
    names = [c.name for c, _ in planned]
    assert out == "outputs/compare"
    assert names == ["01-single-full-batch", "02-single-smaller-minibatch",
                     "03-single-grad-accumulation", "04-single-recompute", "05-single-bf16",
                     "06-single-recompute-bf16", "07-pipeline-gpipe-P2", "08-pipeline-1f1b-P2",
                     "09-tensor-megatron-P2", "10-tensor-megatron-P4", "11-tensor-rowwise-P2",
                     "12-tensor-rowwise-P4", "13-data-P2", "14-data-P4", "15-fsdp-P2",
                     "16-fsdp-P4"]
    cfgs = {n: rc for (c, rc), n in zip(planned, names, strict=True)}
    assert {rc.train.batch_size * rc.train.steps for rc in cfgs.values()} == {4096}
    assert cfgs["02-single-smaller-minibatch"].train.batch_size == 256
    assert cfgs["03-single-grad-accumulation"].train.microbatches == 4
    assert cfgs["08-pipeline-1f1b-P2"].strategy.schedule == "1f1b"
    assert cfgs["12-tensor-rowwise-P4"].strategy.layout == "rowwise"
    assert cfgs["12-tensor-rowwise-P4"].world_size == 4
    assert cfgs["12-tensor-rowwise-P4"].train.microbatches == 2
    assert cfgs["04-single-recompute"].train.recompute == "full"
    assert cfgs["05-single-bf16"].train.precision == "bf16"
    assert (cfgs["06-single-recompute-bf16"].train.recompute,
            cfgs["06-single-recompute-bf16"].train.precision) == ("full", "bf16")
    assert all(rc.memory_limit == 34 * MiB for rc in cfgs.values())
    # The cost model's peaks (= the CPU probe's): only the single full batch is over it, with
    # recomputation or without (one device's backward redoes the whole batch's z and h).
    from partition import costs

    peaks = {n: max(c.train.peak_bytes for c in costs.rank_costs(rc)) for n, rc in cfgs.items()}
    assert [n for n, p in peaks.items() if p > 34 * MiB] == ["01-single-full-batch",
                                                             "04-single-recompute"]
    assert all(rc.model.dims == (784, 2048, 10) for rc in cfgs.values())
    # Overrides apply to every case; compare.only and compare.world_sizes narrow the list.
    _, few = plan(["compare.world_sizes=[2]", "compare.only=[single-full-batch,data]",
                   "train.steps=2"])
    assert [(c.name, rc.train.steps, rc.ranks) for c, rc in few] == [
        ("01-single-full-batch", 2, 1), ("02-data-P2", 2, 2)]


def test_expand_cases_refuses_a_divisor_that_does_not_divide():
    from experiments.compare import expand_cases

    spec = {"cases": [{"name": "s", "overrides": [], "batch_divisor": 3}]}
    with pytest.raises(ValueError, match="batch_divisor=3 does not divide train.batch_size=1024"):
        expand_cases(spec, 1024, 4, {"s": True})


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_compare_end_to_end_small(tmp_path):
    """The real entry point on a tiny net: single-device cases and the pipeline (what runs
    on every branch); each case a row, the summary printed."""
    import subprocess
    import sys

    from tests.conftest import ROOT

    out = tmp_path / "cmp"
    args = [sys.executable, "-m", "experiments.compare", f"compare.out={out}",
            "compare.world_sizes=[2]", "model.dims=[16,32,4]", "train.batch_size=32",
            "data.num_examples=128", "memory_limit=null",
            "compare.only=[single-full-batch,single-smaller-minibatch,"
            "single-grad-accumulation,pipeline-gpipe,pipeline-1f1b]"]
    env = dict(os.environ, PYTHONPATH=ROOT)
    p = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=500)
    assert p.returncode == 0, p.stderr[-3000:]
    df = load_table([str(out)], sort=False)
    assert list(df["name"]) == ["01-single-full-batch", "02-single-smaller-minibatch",
                                "03-single-grad-accumulation", "04-pipeline-gpipe-P2",
                                "05-pipeline-1f1b-P2"]
    assert set(df["status"]) == {"ok"}
    assert set(df["examples"]) == {128}
    # Full batch, accumulation and both pipelines: one update, float32 rounding apart.
    finals = [df.loc[i, "final_loss"] for i in (0, 2, 3, 4)]
    assert max(finals) - min(finals) < 1e-5
    assert "Advantages of partitioning:" in p.stdout and "[compare] 5 cases in" in p.stdout
    p2 = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert p2.stdout.count("skipped: already done") == 5


def test_the_bubble_line_names_the_costliest_cause():
    """The summary's bubble explained by cause (train.idle_causes), the largest named."""
    from partition.summary import _causes

    row = {"sim_idle": 0.5, "idle_schedule": 0.2, "idle_imbalance": 0.25, "idle_comm": 0.05}
    assert _causes(row) == ("; simulated 50%: 20% on the schedule, 25% on stage imbalance, "
                            "5% on communication and the runtime between actions, stage "
                            "imbalance costing most")
    assert _causes({**row, "idle_comm": 0.3}).endswith(
        "communication and the runtime between actions costing most")
    assert _causes({**row, "sim_idle": None}) == ""  # not simulated: nothing to split
