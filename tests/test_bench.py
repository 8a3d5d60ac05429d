"""The benchmark's bookkeeping (issue 8), without processes: step times, ratios, bytes, table."""

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


def test_summary_pairs_runs_and_sums_payload_over_ranks():
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
    assert row.payload == {"explicit": 200, "torch": 200}
    assert row.other_bytes == {"explicit": 24, "torch": 4}
    assert row.peak == {"explicit": None, "torch": None}
    assert row.losses_agree
    text = table([row])
    assert "**0.75** [0.75, 0.75]" in text and "| 200 | 200 |" in text and "n/a" in text
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
