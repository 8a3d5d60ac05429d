"""The report's timelines.png: each pipeline case's traced step, measured above simulated.

One real pipeline run (P = 2, a tiny net) and one real single-device run make the folder;
the other cases are copies of the pipeline run with a file taken away or changed, and a
hand-made `oom` result, so every way a case can lack a timeline is seen for one spawn.
"""

from __future__ import annotations

import json
import os
import shutil

import pytest
from conftest import make_config, traced_replay_s
from test_report import fake_result

from partition.launch import run
from partition.plots import timeline_cases, timeline_files, timelines_figures
from partition.report import load_table, write_report
from partition.results import write_json
from partition.timeline import case_height, draw_cases, load_case

PIPE = "01-pipeline-gpipe-P2"
SMALL = {"model.dims": [16, 12, 4], "train.batch_size": 8, "train.steps": 3,
         "train.dtype": "float32", "data.num_examples": 64}
DPI, WIDTH_PX = 110, 1210  # draw_cases: 11 in wide at 110 dpi


def _edit(folder: str, name: str, change) -> None:  # noqa: ANN001
    path = os.path.join(folder, name)
    with open(path) as f:
        res = json.load(f)
    change(res)
    write_json(path, res)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("cmp")
    pipe = str(root / PIPE)
    cfg = make_config(strategy="pipeline", world_size=2, **SMALL,
                      **{"strategy.schedule": "gpipe", "train.microbatches": 2})
    assert run(cfg, pipe)["status"] == "ok"
    assert run(make_config(**SMALL), str(root / "02-single"))["status"] == "ok"
    notrace = str(root / "03-pipeline-notrace")
    shutil.copytree(pipe, notrace)
    os.remove(os.path.join(notrace, "trace.json"))
    write_json(str(root / "04-pipeline-oom" / "result.json"),
               fake_result("pipeline", 2, M=4, variant="1f1b", status="oom"))
    return str(root)


def test_pipeline_cases_are_drawn_and_the_others_said_or_skipped(runs):
    cases, notes = timeline_cases(load_table([runs], sort=False))
    # The single-device run has a trace.json too, but no pipeline actions: left out silently.
    assert [os.path.basename(r["path"]) for r, _ in cases] == [PIPE]
    assert notes == [
        "no timeline for pipeline gpipe P=2 M=2 (03-pipeline-notrace): no trace.json in its folder",
        "no timeline for pipeline 1f1b P=2 M=4 (04-pipeline-oom): no trace.json in its folder "
        "(status oom)"]


def test_a_case_reads_back_what_the_run_measured_and_simulated(runs):
    folder = os.path.join(runs, PIPE)
    with open(os.path.join(folder, "result.json")) as f:
        res = json.load(f)
    case = load_case(folder)
    rank0 = res["ranks"][0]["timing"]
    assert case.pipeline and case.step == rank0["traced_step"]
    assert case.step_s == pytest.approx(rank0["traced_step_s"], rel=1e-6)  # µs in trace.json
    # The simulator is pure: replayed from result.json, the traced step gives the run's own
    # replay of that step (the panel under its measured spans).
    assert case.simulated_step_s == pytest.approx(traced_replay_s(res), rel=1e-12)
    for r, spans in case.measured:
        acts = [s["name"] for s in spans if "stage" in s["args"]]
        assert acts == [f"{r}F0", f"{r}F1", f"{r}B0", f"{r}B1"]  # GPipe, M = 2, this step only
    assert [r for r, _ in case.simulated] == [0, 1]
    assert case.text == (f"step {case.step} measured {case.step_s * 1e3:.1f} ms, "
                         f"simulated {case.simulated_step_s * 1e3:.1f} ms")


def test_report_draws_timelines_png_and_links_each_run(runs, tmp_path):
    import matplotlib.pyplot as plt

    out = os.path.join(runs, "report")
    rep = write_report(load_table([runs], sort=False), out)
    assert [os.path.basename(f) for f in rep.files][-1] == "timelines.png"
    # One case: a title, the legend and two panels of two rank rows.
    img = plt.imread(os.path.join(out, "timelines.png"))
    assert img.shape == (int((0.5 + case_height(2)) * DPI), WIDTH_PX, 4)
    md = open(os.path.join(out, "results.md")).read()
    assert "![timelines.png](timelines.png)" in md
    assert f"- [pipeline gpipe P=2 M=2 ({PIPE})](../{PIPE}/timeline.png)" in md
    bubble = next(line for line in rep.summary if line.startswith("- **Bubble**"))
    assert bubble.endswith("(timelines.png: each of these steps, measured above simulated).")
    assert "on the schedule" in bubble and "costing most" in bubble  # its idle time by cause
    assert [n for n in rep.notes if "timeline" in n] == [
        "no timeline for pipeline gpipe P=2 M=2 (03-pipeline-notrace): no trace.json in its folder",
        "no timeline for pipeline 1f1b P=2 M=4 (04-pipeline-oom): no trace.json in its folder "
        "(status oom)"]
    # Panels: two per case, however many cases.
    case = load_case(os.path.join(runs, PIPE))
    assert draw_cases(str(tmp_path / "one.png"), [("a", case)]) == 2
    assert draw_cases(str(tmp_path / "three.png"), [(t, case) for t in "abc"]) == 6


def test_many_cases_go_on_pages_of_eight(runs, tmp_path):
    assert timeline_files(0) == []
    assert timeline_files(1) == timeline_files(8) == ["timelines.png"]
    assert timeline_files(9) == ["timelines.png", "timelines-2.png"]
    assert timeline_files(17) == ["timelines.png", "timelines-2.png", "timelines-3.png"]
    assert len(timeline_files(1000)) == 6  # past 48 cases each run's own timeline.png
    import matplotlib.pyplot as plt

    for i in range(9):
        shutil.copytree(os.path.join(runs, PIPE), tmp_path / "runs" / f"{i:02d}-pipe")
    pl = timelines_figures(load_table([str(tmp_path / "runs")]), str(tmp_path))
    assert [os.path.basename(p) for p in pl.written] == ["timelines.png", "timelines-2.png"]
    assert [plt.imread(p).shape[0] for p in pl.written] == [
        int((0.5 + 8 * case_height(2)) * DPI), int((0.5 + case_height(2)) * DPI)]
    assert len(pl.timelines) == 9 and pl.notes == []


def test_pipeline_actions_make_a_pipeline_case_whatever_the_strategy(runs, tmp_path):
    other = str(tmp_path / "hybrid")
    shutil.copytree(os.path.join(runs, PIPE), other)
    _edit(other, "result.json", lambda r: r["run"].update(strategy="hybrid"))
    cases, notes = timeline_cases(load_table([other]))
    assert [r["strategy"] for r, _ in cases] == ["hybrid"] and notes == []


def test_an_unreadable_trace_or_a_missing_calibration_is_said(runs, tmp_path):
    broken = str(tmp_path / "broken")
    shutil.copytree(os.path.join(runs, PIPE), broken)
    with open(os.path.join(broken, "trace.json"), "w") as f:
        f.write("{")
    _, notes = timeline_cases(load_table([broken]))
    assert notes == ["no timeline for pipeline gpipe P=2 M=2 (broken): its trace.json does not read "
                     "(JSONDecodeError: Expecting property name enclosed in double quotes: "
                     "line 1 column 2 (char 1))"]
    # Without the ranks' action times there is nothing to simulate: the measured panel alone,
    # the simulated one says why.
    bare = str(tmp_path / "bare")
    shutil.copytree(os.path.join(runs, PIPE), bare)
    _edit(bare, "result.json", lambda r: [x.update(action_times=None, traced_action_times=None)
                                         for x in r["ranks"]])
    case = load_case(bare)
    assert case.simulated == "not simulated: result.json holds action times for 0 ranks, not 2"
    assert case.simulated_step_s is None and case.text.endswith(" ms") and "simulated" not in case.text
    assert draw_cases(str(tmp_path / "bare.png"), [("bare", case)]) == 2
