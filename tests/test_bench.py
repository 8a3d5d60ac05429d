"""The benchmark's bookkeeping, without processes: step times, ratios, bytes, tables, options."""

from __future__ import annotations

from types import SimpleNamespace

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
    assert described == {"--help", "--pairs", "--warmup-pairs", "--steps", "--warmup-steps",
                         "--write", "--out"}
    args = parser().parse_args([])
    assert (args.write, args.out, args.pairs) == (False, "docs/benchmarks.md", 10)
    with pytest.raises(SystemExit) as e:
        main(["--pairs", "3"])
    assert e.value.code == 2
    assert capsys.readouterr().err == ("error: --pairs=3: must be >= 5 (a median and range over "
                                       "fewer alternated pairs mean little on a shared machine)\n")


def test_markdown_tables_have_titles():
    from partition.bench import CPU_TITLE, TABLE_TITLE, Row, markdown

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
    heads = [line for line in text.splitlines() if line.startswith("## ")]
    assert heads == [f"## {TABLE_TITLE}", f"## {CPU_TITLE}"]
    assert "one intra-op thread per rank" not in text and "1 intra-op thread per rank" in text
    assert "DESIGN" not in text
