"""The benchmark's bookkeeping, without processes: step times, ratios, bytes, tables, options."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from partition.bench import (
    Case,
    cpu_table,
    run_step_time,
    summarize_case,
    table,
    with_overrides,
)


def _rec(by_role: dict, peak: int | None, objective: list[float]):
    return SimpleNamespace(comm={"by_role": by_role}, memory={"peak_bytes": peak},
                           objective=objective)


def test_a_runs_step_time_is_the_slowest_rank_then_the_median_after_warmup():
    per_rank = [[9.0, 1.0, 2.0, 3.0], [0.0, 2.0, 1.0, 5.0]]
    assert run_step_time(per_rank, 1) == 2.0  # max per step: 9, 2, 2, 5 -> median of 2, 2, 5
    assert run_step_time(per_rank, 1, combine=sum) == 3.0  # sums 3, 3, 8


def test_summary_pairs_runs_and_takes_payload_per_device():
    def rank(e_times, t_times, roles_e, roles_t):
        return {"measured": {"explicit": _rec(roles_e, None, [1.0, 0.5]),
                             "torch": _rec(roles_t, None, [1.0, 0.5])},
                "times": {"explicit": e_times, "torch": t_times},
                "cpu": {"explicit": e_times, "torch": t_times}}

    # Two runs per engine (the first a warm-up pair), two steps each with none left out.
    act = {"bytes": 100, "messages": 2}
    r0 = rank([[5, 5], [1, 1]], [[5, 5], [2, 2]],
              {"activation": act, "metric": {"bytes": 24, "messages": 1}},
              {"activation": act, "metadata": {"bytes": 4, "messages": 1}})
    r1 = rank([[5, 5], [3, 3]], [[5, 5], [4, 4]],
              {"activation_grad": {"bytes": 100, "messages": 2}},
              {"activation_grad": {"bytes": 100, "messages": 2}})
    row = summarize_case("pipeline", [r0, r1], warmup_steps=0, warmup_pairs=1)
    assert row.ratios == [3 / 4]  # slowest rank: 3 (explicit) against 4 (torch)
    assert row.cpu_ratios == [4 / 6]  # both ranks' CPU added: 1+3 against 2+4
    # Per device, as everywhere: the rank that moves the most (each sends 100 B here).
    assert row.payload == {"explicit": 100, "torch": 100}
    assert row.other_bytes == {"explicit": 24, "torch": 4}
    assert row.peak == {"explicit": None, "torch": None}
    assert row.losses_agree
    text = table([row])
    assert "**0.75** [0.75, 0.75]" in text and "| 100 | 100 |" in text and "n/a" in text
    assert "payload B/step/device" in text.splitlines()[0]
    assert "**0.67**" in cpu_table([row])


def test_skipped_case_says_why():
    row = summarize_case("tensor", [{"skip": "explicit engine: not implemented yet"}] * 2,
                         warmup_steps=1, warmup_pairs=1)
    assert row.skip and "skipped: explicit engine: not implemented yet" in table([row])


def test_overrides_reach_nested_keys_and_string_groups():
    base = {"strategy": "single", "train": {"steps": 10}}
    d = with_overrides(base, {"strategy.name": "pipeline", "train.steps": 3, "engine": "torch"})
    assert d == {"strategy": {"name": "pipeline"}, "train": {"steps": 3}, "engine": "torch"}
    assert base["train"]["steps"] == 10  # the base is not changed
    assert Case("x", {}).label == "x"


def test_options_say_their_limits_and_nothing_is_written_by_default(capsys):
    import pytest

    from experiments.bench import main, parser
    from partition.bench import MIN_PAIRS

    help_text = parser().format_help()
    assert f"at least {MIN_PAIRS}" in help_text and MIN_PAIRS == 5
    assert "issue" not in help_text
    described = {a.option_strings[-1] for a in parser()._actions if a.option_strings and a.help}
    assert described == {"--help", "--suite", "--pairs", "--warmup-pairs", "--runs", "--steps",
                         "--warmup-steps", "--write", "--out"}
    args = parser().parse_args([])
    assert (args.write, args.out, args.pairs) == (False, "docs/benchmarks.md", 10)
    assert (args.suite, args.runs) == ("engines", 5)  # the engine comparison, as before
    with pytest.raises(SystemExit) as e:
        main(["--pairs", "3"])
    assert e.value.code == 2
    assert capsys.readouterr().err == ("error: --pairs=3: must be >= 5 (a median and range over "
                                       "fewer alternated pairs mean little on a shared machine)\n")
    with pytest.raises(SystemExit) as e:
        main(["--suite", "timeline", "--runs", "2"])
    assert e.value.code == 2
    assert capsys.readouterr().err == ("error: --runs=2: must be >= 3 (the targets are on the "
                                       "median over at least 3 runs)\n")
    with pytest.raises(SystemExit) as e:
        main(["--suite", "all", "--steps", "3", "--warmup-steps", "2"])
    assert e.value.code == 2
    assert capsys.readouterr().err == (
        "error: --steps=3 with --warmup-steps=2: the timeline suite needs at least two steady "
        "steps (the trace's cost compares a traced one with an untraced one)\n")


def test_markdown_tables_have_titles():
    from partition.bench import CPU_TITLE, ENGINES_TITLE, TABLE_TITLE, Row, markdown

    row = Row("data", explicit_s=0.01, torch_s=0.02, ratios=[0.5], cpu_s={"explicit": 0.01,
              "torch": 0.02}, cpu_ratios=[0.5], payload={"explicit": 8, "torch": 8},
              other_bytes={"explicit": 24, "torch": 24}, peak={"explicit": None, "torch": None},
              losses_agree=True)
    info = {"date": "d", "cpu": "c", "cores": 2, "os": "o", "python": "p", "torch": "t",
            "load_before": (0, 0, 0), "load_after": (0, 0, 0), "pairs": 5, "warmup_pairs": 1}
    base = {"world_size": 2, "device": "cpu", "threads_per_rank": None,
            "train": {"batch_size": 8, "dtype": "float32", "steps": 3, "warmup_steps": 1,
                      "microbatches": 1},
            "model": {"dims": [4, 3, 2], "activation": "relu", "loss": "cross_entropy",
                      "weight_decay": 0.0}}
    text = markdown([row], info, base, [Case("data", {})], "python -m experiments.bench")
    heads = [line for line in text.splitlines() if line.startswith("#")]
    assert heads == [f"## {ENGINES_TITLE}", f"### {TABLE_TITLE}", f"### {CPU_TITLE}"]
    assert text.splitlines()[2] == "`python -m experiments.bench` — d"
    assert "one intra-op thread per rank" not in text and "1 intra-op thread per rank" in text
    assert "DESIGN" not in text


# ---------------------------------------------------------------- docs/benchmarks.md sections


def test_each_suite_rewrites_its_own_section_and_keeps_the_others(tmp_path):
    import pytest

    from partition.bench import DOC_HEAD, replace_section, write_markdown

    doc = replace_section("", "timeline", "## T\n\nold timeline")
    assert doc == f"{DOC_HEAD}\n\n<!-- bench:timeline -->\n## T\n\nold timeline\n" \
                  "<!-- /bench:timeline -->\n"
    # A missing section goes before the sections that follow it in the file's order ...
    doc = replace_section(doc, "engines", "## E\n\nengines 1\n")
    assert doc.index("<!-- bench:engines -->") < doc.index("<!-- bench:timeline -->")
    # ... and a present one is replaced in place, everything else kept to the byte.
    again = replace_section(doc, "engines", "## E\n\nengines 2")
    assert again == doc.replace("engines 1", "engines 2")
    assert replace_section(again, "timeline", "## T\n\nnew") == again.replace("old timeline", "new")
    path = tmp_path / "b.md"
    write_markdown(str(path), "## E\n\nx", section="engines")
    write_markdown(str(path), "## T\n\ny", section="timeline")
    write_markdown(str(path), "## E\n\nz", section="engines")
    assert path.read_text() == (f"{DOC_HEAD}\n\n<!-- bench:engines -->\n## E\n\nz\n"
                                "<!-- /bench:engines -->\n\n<!-- bench:timeline -->\n## T\n\ny\n"
                                "<!-- /bench:timeline -->\n")
    with pytest.raises(ValueError, match="unknown benchmark section 'x'"):
        replace_section(doc, "x", "")
    with pytest.raises(ValueError, match="only one of its marks"):
        replace_section("<!-- bench:engines -->\nhalf", "engines", "")


def test_the_checked_in_benchmarks_file_has_both_sections():
    import os

    from partition.bench import DOC_HEAD, ENGINES_TITLE
    from partition.bench_timeline import TIMELINE_TITLE
    from tests.conftest import ROOT

    text = open(os.path.join(ROOT, "docs", "benchmarks.md"), encoding="utf-8").read()
    assert text.startswith(DOC_HEAD + "\n\n<!-- bench:engines -->\n")
    heads = [line for line in text.splitlines() if line.startswith("## ")]
    assert heads == [f"## {ENGINES_TITLE}", f"## {TIMELINE_TITLE}"]
    assert text.index("<!-- /bench:engines -->") < text.index("<!-- bench:timeline -->")


# ---------------------------------------------------------------- the timeline suite


def _figs(step, sim, idle, sim_idle, startup=None):
    from partition.bench_timeline import RunFigures

    return RunFigures(step, sim, startup, tuple(idle), tuple(sim_idle))


def test_figures_read_result_jsons_own_keys():
    from partition.bench_timeline import figures

    result = {"train": {"step_time_s": {"median": 0.01, "min": 0.009, "max": 0.02}},
              "ranks": [{"timing": {"idle_fraction": 0.4}}, {"timing": {"idle_fraction": 0.8}}],
              "predicted": {"step_time_s": 0.008, "startup_step_time_s": 0.006,
                            "ranks": [{"timing": {"idle_fraction": 0.1}},
                                      {"timing": {"idle_fraction": 0.75}}]}}
    assert figures(result) == _figs(0.01, 0.008, [0.4, 0.8], [0.1, 0.75], startup=0.006)
    # The traced step replayed: its idle fractions are the ones compared with it.
    result["ranks"][0]["timing"]["traced_step"] = 8
    result["predicted"]["sampled_steps"] = [
        {"step": 7, "simulated_s": 0.007, "measured_s": 0.009, "idle_fraction": [0.0, 0.0]},
        {"step": 8, "simulated_s": 0.011, "measured_s": 0.012, "idle_fraction": [0.3, 0.7]}]
    assert figures(result) == _figs(0.01, 0.008, [0.4, 0.8], [0.3, 0.7], startup=0.006)
    # A strategy the simulator does not cover: no step, no ranks.
    bare = {"train": {"step_time_s": {"median": 0.01}}, "ranks": [{"timing": {}}],
            "predicted": {"step_time_s": None, "ranks": []}}
    assert figures(bare) == _figs(0.01, None, [None], [])


def test_step_time_error_is_the_medians_and_the_target_decides():
    from partition.bench_timeline import SimRow, mark, step_table, within

    row = SimRow("pipeline gpipe", 2, [_figs(0.010, 0.011, [0.5, 0.5], [0.5, 0.5], 0.006),
                                       _figs(0.012, 0.012, [0.5, 0.5], [0.5, 0.5], 0.007),
                                       _figs(0.008, 0.010, [0.5, 0.5], [0.5, 0.5], 0.005)])
    assert (row.measured_s, row.simulated_s) == (0.010, 0.011)
    assert round(row.step_error, 12) == 0.1
    assert [round(e, 12) for e in row.step_errors] == [0.1, 0.0, 0.25]
    assert within(0.15, 0.15) and within(-0.15, 0.15) and not within(-0.16, 0.15)
    assert not within(None, 0.15) and (mark(True), mark(False)) == ("✓", "✗")
    lines = step_table([row], cores=2).splitlines()
    assert lines[0] == ("| case | P | measured ms/step | simulated ms/step | simulated ÷ measured "
                        "− 1 | per run [min, max] | within 15 % | from start-up timing alone |")
    # the start-up column: the medians' error of the simulation on start-up timing, 6 ÷ 10 − 1
    assert lines[2] == ("| pipeline gpipe | 2 | 10.00 | 11.00 | **+10.0 %** | [+0.0 %, +25.0 %] | "
                        "✓ | -40.0 % |")
    slow = SimRow("tensor", 2, [_figs(0.010, 0.0125, [], [])] * 3)
    assert step_table([slow], cores=2).splitlines()[2] == (
        "| tensor | 2 | 10.00 | 12.50 | **+25.0 %** | [+25.0 %, +25.0 %] | ✗ | n/a |")
    # More ranks than cores: the row says so (the target holds for P <= cores).
    assert step_table([slow], cores=1).splitlines()[2].endswith("| ✗ ⚠ P=2 > 1 cores | n/a |")
    unsim = SimRow("fsdp", 2, [_figs(0.019, None, [0.9, 0.9], [])] * 3)
    assert unsim.step_error is None and unsim.idle_error(0) is None
    assert step_table([unsim], cores=2).splitlines()[2] == (
        "| fsdp | 2 | 19.00 | not simulated | n/a | n/a | ✗ | n/a |")
    skipped = SimRow("pipeline zbv", 4, skip="needs 8 layers")
    assert step_table([skipped], cores=2).splitlines()[2] == (
        "| pipeline zbv | 4 | skipped: needs 8 layers | | | | | |")


def test_idle_fraction_per_rank_within_five_hundredths():
    from partition.bench_timeline import SimRow, idle_table

    row = SimRow("pipeline 1f1b", 2, [_figs(0.01, 0.01, [0.25, 0.5], [0.25, 0.625]),
                                      _figs(0.01, 0.01, [0.375, 0.5], [0.25, 0.5]),
                                      _figs(0.01, 0.01, [0.25, 0.75], [0.375, 0.75])])
    meas, sim, diffs = row.idle(0)
    assert (meas, sim, diffs) == (0.25, 0.25, [0.0, -0.125, 0.125])
    assert row.idle_error(0) == 0.0 and row.idle_error(1) == 0.125
    lines = idle_table([row, SimRow("tensor", 2, skip="why")], cores=2).splitlines()
    assert lines[0] == ("| case | rank | measured | simulated | simulated − measured | "
                        "per run [min, max] | within 0.05 |")
    assert lines[2:] == ["| pipeline 1f1b | 0 | 0.250 | 0.250 | **+0.000** | [-0.125, +0.125] | ✓ |",
                         "| pipeline 1f1b | 1 | 0.500 | 0.625 | **+0.125** | [+0.000, +0.125] | ✗ |"]


def test_the_trace_cost_rounds_and_the_interleaved_run():
    from partition.bench_timeline import (
        OWN,
        TRACE_VARIANTS,
        alternate_steps,
        interleaved_cost,
        summarize_trace,
        trace_setting,
        trace_table,
    )

    assert alternate_steps(12, 2) == (3, 5, 7, 9, 11)
    assert trace_setting("off", steps=12, warmup=2) == ()  # trace.steps=[]: tracing off
    assert trace_setting("alternate", steps=6, warmup=1) == (2, 4)
    assert [trace_setting(v, steps=6, warmup=1) for v in ("last", "all")] == ["last", "all"]
    # Steps 2 and 4 traced: per step the slowest rank, 0 left out; traced 1.04, untraced 1.0.
    per_rank = [[9.0, 1.0, 1.04, 1.0, 1.04, 1.0], [0.0, 0.5, 0.5, 0.5, 0.5, 0.5]]
    assert round(interleaved_cost(per_rank, {2, 4}, 1), 12) == 0.04

    def rank(scale, own):  # per variant two rounds (the first a warm-up) of 6 steps
        steps = {"none": 1.0, "off": 1.0, "last": 1.0, "all": 1.01, "alternate": 1.0}
        trace = {v: [[2.0] * 6, [steps[v] * scale] * 6] for v in TRACE_VARIANTS}
        return {"trace": {**trace, OWN: [[1.0] * 6, own]}}

    # the tracer's own seconds per step of the `all` run: step 0 left out; per step the
    # larger share of the two ranks' (0.0101 s and 0.00505 s steps), the median over steps
    own0 = [9.0, 1e-4, 2e-4, 1e-4, 1e-4, 3e-4]
    own1 = [9.0, 1e-4, 1e-4, 1e-4, 1e-4, 1e-4]
    row = summarize_trace("data", [rank(0.01, own0), rank(0.005, own1)], warmup_steps=1,
                          warmup_pairs=1)
    assert row.steps["off"] == [0.01] and row.steps["all"] == [0.0101]
    assert row.own == [pytest.approx(1e-4 / 0.00505)]  # rank 1's 1.98 %: under 2 %
    assert row.alternate == [0.0]  # the same time traced or not
    assert [round(c, 12) for c in row.costs("all", "off")] == [0.01]
    lines = trace_table([row]).splitlines()
    assert lines[0].startswith("| case | untraced ms/step (trace.steps=[]) | traced ms/step "
                               "(trace.steps=all) | the tracer's own time in a traced step | "
                               "traced ÷ untraced step, in one run |")
    assert lines[2] == ("| data | 10.00 | 10.10 | **+2.0 %** [+2.0 %, +2.0 %] ✓ | "
                        "**+0.0 %** [+0.0 %, +0.0 %] ✓ | "
                        "**+1.0 %** [+1.0 %, +1.0 %] ✓ | **+0.0 %** [+0.0 %, +0.0 %] ✓ | "
                        "**+1.0 %** [+1.0 %, +1.0 %] ✓ |")


def test_the_clocked_tracer_counts_its_own_time_in_the_step():
    from partition.bench_timeline import ClockedTracer

    tr = ClockedTracer(None)
    tr.begin(3)
    tr.add("F0", "compute", 0.0, 1.0, kind="F", layer=0)
    tr.add("B0", "compute", 1.0, 2.0, kind="B", layer=0)
    took = tr.own_s[3]
    assert 0.0 < took < 0.1  # two adds' bookkeeping, not the spans' own seconds
    tr.add("step", "compute", 0.0, 2.0)  # after the step's clock stopped: not counted
    assert tr.own_s == {3: took} and len(tr.spans) == 3


def test_trace_variants_hand_the_loop_its_tracer():
    from partition.bench_timeline import traced_variant
    from partition.config import parse_config

    cfg = parse_config({"model": {"dims": [4, 3, 2]}, "train": {"steps": 6, "warmup_steps": 1}})
    same, none = traced_variant(cfg, "none")
    assert same is cfg and none is None  # no tracer at all
    off, tracer = traced_variant(cfg, "off")
    assert off.trace.steps == () and tracer.steps == set()
    _, tracer = traced_variant(cfg, "alternate")
    assert tracer.steps == {2, 4}
    _, tracer = traced_variant(cfg, "all")
    assert tracer.steps is None  # every step


def test_nets_too_shallow_for_a_schedule_are_deepened_and_say_so():
    from partition.bench import Case
    from partition.bench_timeline import TIMELINE_CASES, fit_net, timeline_configs

    base = {"world_size": 2, "model": {"dims": [784, 256, 10]}, "strategy": {"name": "single"}}
    by_label = {c.label: c for c in TIMELINE_CASES}
    assert fit_net(base, by_label["pipeline gpipe"]) == by_label["pipeline gpipe"]
    assert fit_net(base, by_label["tensor"]) == by_label["tensor"]
    zbv = fit_net(base, by_label["pipeline zbv"])
    assert zbv.label == "pipeline zbv (dims [784, 256, 256, 256, 10])"
    assert zbv.overrides["model.dims"] == [784, 256, 256, 256, 10]
    assert fit_net(base, zbv) == zbv
    four = fit_net({**base, "world_size": 4}, Case("p", {"strategy.name": "pipeline",
                                                         "strategy.schedule": "1f1b"}))
    assert four.overrides["model.dims"] == [784, 256, 256, 256, 10]
    # Every named schedule is a case, and each strategy with more than one rank.
    assert [c.label for c in TIMELINE_CASES] == [
        "pipeline gpipe", "pipeline 1f1b", "pipeline interleaved_1f1b", "pipeline looped_bfs",
        "pipeline zb1p", "pipeline zbv", "pipeline dualpipev", "tensor", "data", "fsdp",
        "hybrid pp=2"]
    from partition.config import SCHEDULES, STRATEGIES

    assert {c.label.split()[1] for c in TIMELINE_CASES if c.label.startswith("pipeline")} == \
        set(SCHEDULES)
    assert {c.label.split()[0] for c in TIMELINE_CASES} == set(STRATEGIES) - {"single"}
    # What cannot run at this P is skipped with the reason, the rest is configured.
    from experiments.bench import _base, parser

    args = parser().parse_args(["--suite", "timeline"])
    cfgs = timeline_configs(_base(["world_size=4"], args),
                            [by_label["pipeline dualpipev"], by_label["data"]])
    (dual, cfg, why), (data, dcfg, none) = cfgs
    assert cfg is None and why == ("strategy.schedule=dualpipev: dualpipev needs at least "
                                   "2P=8 micro-batches (one per stage), got M=4")
    assert dual.label == "pipeline dualpipev (dims [784, 256, 256, 256, 256, 256, 256, 256, 10])"
    assert none is None and dcfg.strategy.name == "data" and dcfg.engine == "explicit"


def test_predict_rows_and_their_target():
    from partition.bench_timeline import (
        _OWN,
        PREDICT_CASES,
        PredictCase,
        PredictRow,
        predict_limit_s,
        predict_table,
    )

    assert {c.world_size for c in PREDICT_CASES} == {8, 64, 1024}
    assert {c.target_s for c in PREDICT_CASES if c.world_size == 8} == {3.0}
    assert {c.target_s for c in PREDICT_CASES if c.world_size > 8} == {30.0}
    assert [c.overrides[0] for c in PREDICT_CASES if c.world_size == 1024] == [
        "strategy=data", "strategy=tensor", "strategy=hybrid", "strategy=pipeline"]
    pipe = PREDICT_CASES[-1]
    dims = next(o for o in pipe.overrides if o.startswith("model.dims="))
    assert dims.count(",") == 1024  # one layer per stage at P=1024
    case = PredictCase("data", 8, ("strategy=data", "world_size=8"), 3.0)
    assert predict_limit_s(case) == 30.0 and predict_limit_s(PREDICT_CASES[-1]) == 120.0
    fast = PredictRow(case, walls=[2.5, 2.0, 2.75], own=[1.5, 1.25, 1.0])
    slow = PredictRow(case, walls=[3.0, 3.5, 2.0])
    broke = PredictRow(case, failed="exit 1: RecursionError: maximum recursion depth exceeded")
    assert (fast.ok, slow.ok, broke.ok) == (True, False, False)  # < 3 s, strictly
    lines = predict_table([fast, slow, broke]).splitlines()
    assert lines[2:] == [
        "| data | 8 | **2.50** [2.00, 2.75] | 1.25 | < 3 s | ✓ |",
        "| data | 8 | **3.00** [2.00, 3.50] | n/a | < 3 s | ✗ |",
        "| data | 8 | exit 1: RecursionError: maximum recursion depth exceeded | n/a | < 3 s | ✗ |"]
    out = "data P=8\nsimulated step 1.67 ms\nwrote outputs/p/prediction.json in 2.3 s\n"
    assert float(_OWN.search(out).group(1)) == 2.3


def test_timeline_markdown_has_its_sections_and_warns_when_ranks_share_cores():
    from partition.bench import Case
    from partition.bench_timeline import (
        IDLE_TITLE,
        PREDICT_TITLE,
        STEP_TITLE,
        TIMELINE_TITLE,
        TRACE_TITLE,
        SimRow,
        TimelineBench,
        TraceRow,
        markdown,
    )

    info = {"date": "d", "cpu": "c", "cores": 2, "cores_usable": 2, "os": "o", "python": "p",
            "torch": "t", "load_before": (0, 0, 0), "load_after": (1, 1, 1), "runs": 3,
            "pairs": 5, "warmup_pairs": 1}
    base = {"world_size": 2, "device": "cpu", "threads_per_rank": None,
            "cost": {"calibrate": True},
            "train": {"batch_size": 1024, "dtype": "float32", "steps": 12, "warmup_steps": 2,
                      "microbatches": 1},
            "model": {"dims": [784, 256, 10], "activation": "relu", "loss": "cross_entropy",
                      "weight_decay": 0.0}}
    steps = {v: [0.01] for v in ("none", "off", "last", "all", "alternate")}
    bench = TimelineBench([SimRow("data", 2, [_figs(0.01, 0.01, [0.1, 0.1], [0.1, 0.1])] * 3)],
                          [TraceRow("data", steps, [0.0], own=[0.005])], [])
    cases = [Case("data", {"strategy.name": "data"})]
    text = markdown(bench, info, base, cases, "python -m experiments.bench --suite timeline")
    heads = [line for line in text.splitlines() if line.startswith("#")]
    assert heads == [f"## {TIMELINE_TITLE}", f"### {STEP_TITLE}", f"### {IDLE_TITLE}",
                     f"### {TRACE_TITLE}", f"### {PREDICT_TITLE}"]
    assert text.splitlines()[2] == "`python -m experiments.bench --suite timeline` — d"
    assert "B=1024" in text and "cost.calibrate=true" in text and "⚠" not in text
    assert "| data | 2 | 10.00 | 10.00 | **+0.0 %** | [+0.0 %, +0.0 %] | ✓ |" in text
    assert "DESIGN" not in text and "issue" not in text
    assert ("Targets met: step time within 15 % in 1 of 1 cases; idle fraction within 0.05 in "
            "2 of 2 ranks; a traced step under 2 % in 1 of 1 cases; experiments.predict in time "
            "in 0 of 0 cases.") in text
    assert "α and β measured at start-up too" in text
    crowded = markdown(bench, {**info, "cores_usable": 1}, base, cases, "c")
    assert ("⚠ P=2 ranks on 1 cores: ranks share cores, so measured times include waiting for "
            "a core that the simulator does not model; the targets hold for P ≤ cores.") in crowded


def test_the_summary_counts_the_rows_that_meet_their_targets():
    from partition.bench_timeline import (
        PREDICT_CASES,
        PredictRow,
        SimRow,
        TimelineBench,
        TraceRow,
        summary,
    )

    good = SimRow("data", 2, [_figs(0.01, 0.0105, [0.2, 0.3], [0.2, 0.5])] * 3)
    bad = SimRow("tensor", 2, [_figs(0.01, 0.02, [0.2, 0.2], [0.2, 0.2])] * 3)
    steps = {v: [0.01] for v in ("none", "off", "last", "all", "alternate")}
    bench = TimelineBench(
        [good, bad, SimRow("pipeline zbv", 2, skip="why")],
        # the tracer's own share is the target's (the whole-step A/B is not): data meets it
        [TraceRow("data", steps, [0.05, 0.03, 0.0], own=[0.01, 0.03, 0.005]),
         TraceRow("tensor", steps, [0.0], own=[0.03]), TraceRow("pipeline zbv", skip="why")],
        [PredictRow(PREDICT_CASES[0], walls=[1.0, 1.0, 1.0]),
         PredictRow(PREDICT_CASES[-1], failed="stopped after 120 s")])
    assert summary(bench) == (
        "Targets met: step time within 15 % in 1 of 2 cases; idle fraction within 0.05 in 3 of "
        "4 ranks; a traced step under 2 % in 1 of 2 cases; experiments.predict in time in 1 of 2 "
        "cases (1 case skipped).")
