"""The simulator on hand-computed schedules (unit durations, free communication)."""

from __future__ import annotations

import pytest

from partition.plans.schedule import gpipe_bubble, named_schedule
from partition.simulate import Op, pipeline_ops, simulate


def _unit(name: str, P: int, M: int, **kw):
    s = named_schedule(name, world=P, micro=M)
    return simulate(pipeline_ops(s, compute=lambda a: 1.0, transfer=lambda m: 0.0, **kw), P)


def test_gpipe_two_by_two_takes_six_units():
    tl = _unit("gpipe", 2, 2)
    assert tl.step_time == 6.0
    r0 = [(s.label, s.start) for s in tl.rank_spans(0) if s.kind == "compute"]
    assert r0 == [("0F0", 0.0), ("0F1", 1.0), ("0B0", 4.0), ("0B1", 5.0)]


@pytest.mark.parametrize("name", ["gpipe", "1f1b"])
@pytest.mark.parametrize("P,M", [(2, 1), (2, 4), (3, 5), (4, 8)])
def test_equal_stages_give_the_closed_form_bubble(name, P, M):
    tl = _unit(name, P, M)
    for r in range(P):
        assert tl.idle_fraction(r) == pytest.approx(gpipe_bubble(P, M), abs=1e-12)


def test_transfer_time_delays_the_next_stage():
    s = named_schedule("gpipe", world=2, micro=1)
    tl = simulate(pipeline_ops(s, compute=lambda a: 1.0, transfer=lambda m: 0.5), 2)
    # 0F0 [0,1], +0.5 -> 1F0 [1.5,2.5], 1B0 [2.5,3.5], +0.5 -> 0B0 [4,5]
    assert tl.step_time == 5.0


def test_collectives_start_together():
    ops = [Op(0, "compute", "a", 2.0), Op(0, "comm", "ar", 1.0, sync="x"),
           Op(1, "compute", "b", 5.0), Op(1, "comm", "ar", 1.0, sync="x")]
    tl = simulate(ops, 2)
    assert [(s.label, s.start, s.end) for s in tl.spans if s.kind == "comm"] == [
        ("ar", 5.0, 6.0), ("ar", 5.0, 6.0)]
    assert tl.idle_fraction(0) == pytest.approx(1 - 2 / 6)
