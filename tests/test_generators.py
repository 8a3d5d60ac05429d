"""Interleaved, looped, zero-bubble and V-shaped schedules as data (issue 15): pure checks.

Our generators (plans/generators.py) against torch 2.13's own orders, action by action;
the layouts and what crosses them; the papers' bubbles on the simulator; the config's
refusals. Nothing here starts a rank (tests/test_schedule_runs.py does).
"""

from __future__ import annotations

import logging
import subprocess
import sys
from unittest import mock

import pytest
from conftest import ROOT, make_config

from partition import costs
from partition.config import ConfigError
from partition.dryrun import dry_run
from partition.plans import generators as g
from partition.plans.schedule import (
    ScheduleError,
    eager_sends,
    from_csv,
    held_at_once,
    in_flight,
    named_schedule,
    transfers,
)
from partition.plans.stages import plan_stages
from partition.simulate import UNIT, ideal_idle, pipeline_ops, simulate

NEW = ("interleaved_1f1b", "looped_bfs", "zb1p", "zbv", "dualpipev")


# ---------------------------------------------------------------- torch's own orders


def torch_schedule(name: str, P: int, M: int, v: int):
    """torch's schedule object for P ranks, v stages each (mock stages, as torch's own
    `_schedule_visualizer.get_schedule_ops` builds them, but any v)."""
    from torch.distributed.pipelining.stage import PipelineStage

    from partition.engines.pipeline import MULTI

    st = mock.create_autospec(PipelineStage, instance=True)
    st.group_rank, st.group_size, st.submod, st.num_stages = 0, P, None, P * v
    logging.getLogger("torch.distributed.pipelining.schedules").setLevel(logging.ERROR)
    return MULTI[name]([st] * v, M)


def torch_order(name: str, P: int, M: int, v: int):
    from partition.engines.pipeline import compute_order

    t = torch_schedule(name, P, M, v)
    layout = tuple(t.stage_index_to_group_rank[s] for s in range(P * v))
    return tuple(compute_order(t.pipeline_order, r) for r in range(P)), layout


CROSS = [(name, v, P, M) for name in NEW for v in ((2,) if name in ("zbv", "dualpipev") else (1, 2))
         for P in (2, 4) for M in (1, 2, 3, 4, 5, 8, 16)]


@pytest.mark.parametrize("name,v,P,M", CROSS)
def test_order_and_layout_are_torchs(name, v, P, M):
    try:
        theirs = torch_order(name, P, M, v)
    except ValueError as e:  # what torch refuses, we refuse (one pinned exception below)
        if v == 1 and "rounds" in str(e):  # the difference test_one_stage_per_rank_... pins
            assert named_schedule(name, world=P, micro=M, virtual=v).micro == M
            return
        with pytest.raises(ScheduleError):
            named_schedule(name, world=P, micro=M, virtual=v)
        return
    ours = named_schedule(name, world=P, micro=M, virtual=v)
    assert (ours.ranks, ours.stage_rank) == theirs


@pytest.mark.parametrize("name", ["interleaved_1f1b", "zb1p"])
def test_one_stage_per_rank_needs_no_rounds(name):
    """The one deliberate difference: torch orders its interleaved schedules in
    max(1, M // P) equal rounds and refuses M = 5 on P = 2 even with one stage per rank,
    where a rank has no stages to alternate between; ours runs it. engine=torch refuses it
    before any rank starts."""
    with pytest.raises(ValueError, match="multiple of the number of rounds"):
        torch_schedule(name, 2, 5, 1)
    s = named_schedule(name, world=2, micro=5, virtual=1)
    assert sorted(a.mb for a in s.ranks[0] if a.kind == "F") == [0, 1, 2, 3, 4]
    with pytest.raises(ScheduleError, match="not a multiple of 2"):
        named_schedule(name, world=2, micro=5, virtual=2)
    kw = {"strategy": "pipeline", "world_size": 2, "model.dims": [8, 7, 6, 5],
          "train.batch_size": 10, "train.microbatches": 5, "strategy.schedule": name,
          "strategy.virtual_stages": 1}
    make_config(**kw)
    with pytest.raises(ConfigError, match=r"microbatches=5: engine=torch's .* must be a multiple of 2"):
        make_config(**kw, engine="torch")


# ---------------------------------------------------------------- shapes of the plans


@pytest.mark.parametrize("name", NEW)
@pytest.mark.parametrize("P", [1, 2, 3, 4])
@pytest.mark.parametrize("M", [2, 4, 5, 8])
def test_every_generated_schedule_is_valid_and_crosses_each_boundary_once(name, P, M):
    try:
        s = named_schedule(name, world=P, micro=M)
    except ScheduleError as e:
        assert "micro-batches" in str(e) or "rounds" in str(e)
        return
    v = g.DEFAULT_VIRTUAL[name]
    assert s.stages == P * v and s.micro == M
    assert s.stage_rank == (g.v_shape(P) if name in ("zbv", "dualpipev") else g.round_robin(P, v))
    for r in range(P):
        assert len(s.rank_stages(r)) == v
        recv, send = transfers(s, r)
        # every stage boundary between two ranks carries each micro-batch once each way;
        # a boundary inside a rank (a V's turn on the last rank) carries nothing
        crossing = [k for k in range(1, s.stages) if s.stage_rank[k - 1] != s.stage_rank[k]
                    and r in (s.stage_rank[k - 1], s.stage_rank[k])]
        assert len(send) == len(recv) == M * len(crossing)


def test_layouts():
    assert g.round_robin(2, 3) == (0, 1, 0, 1, 0, 1)
    assert g.v_shape(3) == (0, 1, 2, 2, 1, 0)
    s = named_schedule("zbv", world=3, micro=6)
    assert [s.rank_stages(r) for r in range(3)] == [[0, 5], [1, 4], [2, 3]]
    # the V's turn (stage 2 -> 3) is on rank 2: no message names it
    assert not any(m.from_stage in (2, 3) and m.to_stage in (2, 3)
                   for r in range(3) for m in transfers(s, r)[1])


@pytest.mark.parametrize("P", [2, 3, 4])
def test_in_flight_counts(P):
    M = 2 * P
    # ZB-H1 holds at most min(P, M) micro-batches from F to W on every rank (1F1B's first rank)
    zb = named_schedule("zb1p", world=P, micro=M)
    assert [in_flight(zb.ranks[r]) for r in range(P)] == [{r: P} for r in range(P)]
    one = named_schedule("1f1b", world=P, micro=M)
    assert max(held_at_once(zb.ranks[r]) for r in range(P)) == held_at_once(one.ranks[0])
    # looped BFS holds every micro-batch on each of its stages, like GPipe
    bfs = named_schedule("looped_bfs", world=P, micro=M)
    assert all(held_at_once(bfs.ranks[r]) == 2 * M for r in range(P))
    # ZB-V: 2P half-size stages at most, the activation memory of 1F1B's first rank
    v = named_schedule("zbv", world=P, micro=M)
    assert [held_at_once(v.ranks[r]) for r in range(P)] == [2 * P] * P


def test_when_the_runtime_may_wait_for_each_send_at_once():
    """ZB-H1 keeps 1F1B's property that a send may be waited for at once (its buffer freed
    as a blocking send would); with several stages per rank two neighbours would each
    wait for a send whose receive the other posts only later (interleaved, P=2: 2B0's and
    3B1's gradients), so those sends are waited for at the end of the step, as torch's
    runtime always does. Pinned: the runtime's memory depends on it."""
    for P in (2, 3, 4):
        for M in (P, 2 * P, 4 * P):
            assert eager_sends(named_schedule("zb1p", world=P, micro=M))
        for name in ("interleaved_1f1b", "looped_bfs", "zbv", "dualpipev"):
            assert not eager_sends(named_schedule(name, world=P, micro=2 * P)), (name, P)


# ---------------------------------------------------------------- the papers' bubbles


def _bubble(s) -> list[float]:
    """Idle time per rank with unit F = I = W (B = 2) and free communication."""
    tl = simulate(pipeline_ops(s, compute=lambda a: UNIT[a.kind], transfer=lambda m: 0.0),
                  s.world)
    return [tl.step_time - tl.compute(r) for r in range(s.world)]


@pytest.mark.parametrize("P", [2, 3, 4])
@pytest.mark.parametrize("k", [1, 2, 4])
def test_simulated_bubbles_are_the_papers(P, k):
    M = k * P
    F, I, W = 1.0, 1.0, 1.0
    B = I + W
    # 1F1B: (P−1)(F+B); interleaved and looped BFS: the same per (v-times thinner) stage
    for name in ("1f1b", "gpipe", "interleaved_1f1b", "looped_bfs"):
        assert _bubble(named_schedule(name, world=P, micro=M)) == [(P - 1) * (F + B)] * P
    # ZB-H1: (P−1)(F+B−2W), a third of 1F1B's
    zb = _bubble(named_schedule("zb1p", world=P, micro=M))
    assert zb == [(P - 1) * (F + B - 2 * W)] * P
    assert zb[0] * 3 == _bubble(named_schedule("1f1b", world=P, micro=M))[0]
    for name in ("1f1b", "zb1p", "interleaved_1f1b", "looped_bfs"):
        assert g.paper_bubble(name, world=P) == _bubble(named_schedule(name, world=P, micro=M))[0]


@pytest.mark.parametrize("P", [2, 3, 4])
def test_zbv_bubble_goes_to_zero(P):
    """ZB-V's only idle time is the fill of the first forward, (P−1)·F, which no synchronous
    step avoids (rank P−1 cannot start before the first micro-batch reaches it): constant
    in M, so its share of the step goes to 0. The paper's 0 overlaps successive steps."""
    fractions = []
    for M in (2 * P, 4 * P, 8 * P, 16 * P):
        s = named_schedule("zbv", world=P, micro=M)
        assert _bubble(s) == [P - 1.0] * P
        fractions.append(ideal_idle(s)[0])
        assert fractions[-1] == pytest.approx((P - 1) / (6 * M + P - 1))
    assert fractions == sorted(fractions, reverse=True) and fractions[-1] < 0.01
    assert g.paper_bubble("zbv", world=P) == 0.0
    # fewer micro-batches than 2P leave more than the fill
    assert _bubble(named_schedule("zbv", world=P, micro=P)) == [2.0 * (P - 1)] * P


@pytest.mark.parametrize("P", [2, 3, 4])
def test_dualpipev_bubble_with_sequential_pairs(P):
    """DualPipeV's F&B pairs run one after the other here (F&B = F+B): the README's
    (P−1)(F&B+B−3W) is then 2(P−1)·F; the action list simulates to the fill, (P−1)·F."""
    assert g.paper_bubble("dualpipev", world=P) == 2.0 * (P - 1)
    for M in (2 * P, 4 * P):
        assert _bubble(named_schedule("dualpipev", world=P, micro=M)) == [P - 1.0] * P


def test_ideal_idle_is_the_closed_form_for_gpipe_and_1f1b():
    from partition.plans.schedule import gpipe_bubble

    for name in ("gpipe", "1f1b"):
        for P, M in ((2, 2), (3, 5), (4, 8)):
            assert ideal_idle(named_schedule(name, world=P, micro=M)) == pytest.approx(
                [gpipe_bubble(P, M)] * P, abs=1e-12)
    assert g.paper_idle_fraction("interleaved_1f1b", world=4, micro=8, virtual=2) == \
        pytest.approx(3 / (2 * 8 + 3))


# ---------------------------------------------------------------- bytes and memory, exactly


DEEP = [24, 20, 18, 16, 14, 12, 10, 8, 6]  # 8 layers: P·v stages for P ≤ 4


def test_zb1p_holds_1f1b_counts_but_not_1f1b_bytes():
    """ZB-H1 keeps 1F1B's most micro-batches per rank (P, on rank 0), but every rank holds
    min(P, M) and a deferred W keeps x and ∂J/∂z, as much as F kept: on an equal-width net
    its later ranks, and so its peak over the ranks, hold more bytes than 1F1B's."""
    P, M, B = 2, 4, 64
    kw = {"strategy": "pipeline", "world_size": P, "model.dims": [32] * 5,
          "train.batch_size": B, "train.microbatches": M, "train.dtype": "float32"}
    zb = make_config(**kw, **{"strategy.schedule": "zb1p"})
    one = make_config(**kw, **{"strategy.schedule": "1f1b"})
    kept = {c.strategy.schedule: [costs.kept_activation_bytes(c, r) for r in range(P)]
            for c in (zb, one)}
    rows, n = B // M, 32
    # rank 0 (layers 0, 1): z0, x1 and z1 per micro-batch either way, P of them
    assert kept["1f1b"][0] == kept["zb1p"][0] == P * rows * 3 * n * 4
    # rank 1 (layers 2, 3): F keeps x2, z2, x3; after I, x2, dz2, x3 and dz3 = dJ/do
    assert kept["1f1b"][1] == 1 * rows * 3 * n * 4
    assert kept["zb1p"][1] == P * rows * 4 * n * 4 > max(kept["1f1b"])
    assert [d.memory["activations_bytes"] for d in dry_run(zb)] == kept["zb1p"]


@pytest.mark.parametrize("name", NEW)
@pytest.mark.parametrize("P", [2, 4])
def test_bytes_and_kept_activations_closed_forms_are_the_dry_run(name, P):
    """Every stage boundary between two ranks carries B·n_k·b each way; the closed forms
    (costs.py) equal the dry run (the real runner on the meta device) to the byte, the
    kept-activation peak included (F keeps, I trades what it keeps for what W needs)."""
    B, M = 48, 2 * P
    cfg = make_config(strategy="pipeline", world_size=P, **{
        "model.dims": DEEP[: 2 * P + 1], "model.bias": True, "train.batch_size": B,
        "train.microbatches": M, "strategy.schedule": name})
    s = named_schedule(name, world=P, micro=M)
    plan = plan_stages(cfg.spec, s.stages)
    for d in dry_run(cfg):
        r = d.rank
        fwd = sum(B * cfg.model.dims[plan[k][0]] * 8 for k in range(1, s.stages)
                  if s.stage_rank[k - 1] == r != s.stage_rank[k])
        bwd = sum(B * cfg.model.dims[plan[k][0]] * 8 for k in range(1, s.stages)
                  if s.stage_rank[k] == r != s.stage_rank[k - 1])
        roles = {k: v["bytes"] for k, v in d.comm["by_role"].items()}
        assert roles == {k: n for k, n in (("activation", fwd), ("activation_grad", bwd),
                                            ("metric", 24)) if n}
        assert d.comm["sent_bytes"] == fwd + bwd
        f = costs.formula(cfg, r)
        for k in ("sent_bytes", "recv_bytes", "wire_bytes", "messages", "by_role"):
            assert f["comm"][k] == d.comm[k], k
        assert d.memory["activations_bytes"] == costs.kept_activation_bytes(cfg, r)
        assert d.in_flight_max == held_at_once(s.ranks[r])


# ---------------------------------------------------------------- config and command line


BASE = {"strategy": "pipeline", "world_size": 2, "model.dims": [8, 7, 6, 5, 4],
        "train.batch_size": 16, "train.microbatches": 4}


@pytest.mark.parametrize("over,message", [
    ({"strategy.schedule": "zbv", "strategy.virtual_stages": 3},
     "strategy.virtual_stages=3: zbv holds exactly two stages per rank (a V), not 3"),
    ({"strategy.schedule": "1f1b", "strategy.virtual_stages": 2},
     "strategy.virtual_stages=2: 1f1b holds one stage per rank, not 2"),
    ({"strategy.schedule": "interleaved_1f1b", "strategy.virtual_stages": 0},
     "strategy.virtual_stages=0: must be >= 1"),
    ({"strategy.schedule": "zbv", "model.dims": [8, 6, 4]},
     "strategy.virtual_stages=2: zbv on world_size=2 cuts the net into 2×2=4 stages; "
     "model.dims has 2 layers and every stage needs at least one"),
    ({"strategy.schedule": "interleaved_1f1b", "strategy.virtual_stages": 3},
     "strategy.virtual_stages=3: interleaved_1f1b on world_size=2 cuts the net into 2×3=6 "
     "stages; model.dims has 4 layers"),
    ({"strategy.schedule": "dualpipev", "train.microbatches": 2},
     "strategy.schedule=dualpipev: dualpipev needs at least 2P=4 micro-batches"),
    ({"strategy.schedule": "interleaved_1f1b", "train.microbatches": 5, "train.batch_size": 20},
     "strategy.schedule=interleaved_1f1b: interleaved_1f1b with 2 stages per rank runs its "
     "micro-batches in 2 equal rounds (max(1, M // P) for P=2); M=5 is not a multiple of 2"),
])
def test_config_refuses_what_cannot_run(over, message):
    with pytest.raises(ConfigError) as e:
        make_config(**{**BASE, **over})
    assert message in str(e.value)


def test_config_resolves_the_stages_per_rank():
    assert make_config(**BASE, **{"strategy.schedule": "zbv"}).strategy.virtual_stages == 2
    assert make_config(**BASE, **{"strategy.schedule": "zb1p"}).strategy.virtual_stages == 1
    assert make_config(**BASE, **{"strategy.schedule": "looped_bfs",
                                  "strategy.virtual_stages": 2}).strategy.virtual_stages == 2
    # four layers on four ranks is fine (one stage each); four on two with v=2 too
    make_config(**{**BASE, "world_size": 4, "strategy.schedule": "1f1b"})


def test_a_csv_says_its_own_stages_per_rank(tmp_path):
    path = tmp_path / "v.csv"
    path.write_text(named_schedule("zbv", world=2, micro=4).to_csv())
    cfg = make_config(**BASE, **{"strategy.schedule": str(path)})
    assert cfg.strategy.virtual_stages is None
    make_config(**BASE, **{"strategy.schedule": str(path), "strategy.virtual_stages": 2})
    with pytest.raises(ConfigError, match="holds 2 stages per rank, not virtual_stages=1"):
        make_config(**BASE, **{"strategy.schedule": str(path), "strategy.virtual_stages": 1})
    # and the torch engine runs it too (its _PipelineScheduleRuntime reads the same file)
    make_config(**BASE, engine="torch", **{"strategy.schedule": str(path)})


def test_run_refuses_in_one_line_with_exit_2(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "experiments.run", "strategy=pipeline", "world_size=2",
         "strategy.schedule=zbv", f"hydra.run.dir={tmp_path}/run"],
        cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert [l for l in out.stderr.splitlines() if l.strip()] == [
        "error: strategy.virtual_stages=2: zbv on world_size=2 cuts the net into 2×2=4 stages; "
        "model.dims has 2 layers and every stage needs at least one"]


def test_schedule_command_prints_the_v_and_writes_its_csv(tmp_path):
    path = tmp_path / "zbv.csv"
    out = subprocess.run(
        [sys.executable, "-m", "experiments.schedule", "strategy.schedule=zbv", "world_size=2",
         "train.microbatches=4", "--csv", str(path)],
        cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[1].split()[1:7] == ["0F0", "0F1", "0F2", "3F0", "3I0", "3W0"]
    assert "zbv: 2 ranks, 4 stages, 4 micro-batches; 2 of 50 slots idle" in out.stdout
    assert from_csv(path.read_text(), name="p", world=2, micro=4) == named_schedule(
        "zbv", world=2, micro=4)


# ---------------------------------------------------------------- the schedules experiment


def test_schedules_experiment_cases():
    from omegaconf import OmegaConf

    from experiments.cli import compose_config
    from experiments.compare import _parse, expand_cases

    spec = OmegaConf.to_container(compose_config(["experiment=schedules"]).compare)
    assert spec["out"] == "outputs/schedules" and spec["report"] == "schedules"
    cases = expand_cases(spec, 512, 10, {c["name"]: False for c in spec["cases"]})
    assert len(cases) == 20 and cases[0].name == "01-gpipe-P2-M2"
    assert [c.name for c in cases if "dualpipev" in c.name] == ["19-dualpipev-P2-M4",
                                                                "20-dualpipev-P2-M8"]
    _, rc = _parse(["experiment=schedules", *cases[17].overrides])  # every case is valid: a
    assert (rc.strategy.schedule, rc.world_size, rc.train.microbatches,  # slow test runs them
            rc.strategy.virtual_stages, rc.model.dims) == ("zbv", 2, 8, 2, (256,) * 9)
    from experiments.compare import expand_cases

    spec = {"world_sizes": [2, 4], "cases": [{"name": "zbv", "microbatches_per_rank": [1, 4],
                                              "world_sizes": [2, 4], "overrides": ["x=1"]}]}
    assert [(c.name, c.overrides) for c in expand_cases(spec, 512, 10, {"zbv": False})] == [
        ("01-zbv-P2-M2", ("x=1", "world_size=2", "train.microbatches=2")),
        ("02-zbv-P2-M8", ("x=1", "world_size=2", "train.microbatches=8")),
        ("03-zbv-P4-M4", ("x=1", "world_size=4", "train.microbatches=4")),
        ("04-zbv-P4-M16", ("x=1", "world_size=4", "train.microbatches=16"))]


def test_schedule_report_reads_the_runs_figures(tmp_path):
    from partition.schedule_report import schedule_table, write_schedule_report

    cfg = make_config(**BASE, **{"strategy.schedule": "zbv"})
    res = {"status": "ok", "path": str(tmp_path / "01-zbv-P2-M4"), "config": cfg.to_dict(),
           "train": {"step_time_s": {"median": 0.02},
                     "idle_causes": {"schedule": 0.04, "imbalance": 0.1, "communication": 0.06}},
           "ranks": [{"timing": {"idle_fraction": 0.3}, "memory": {"activations_bytes": 2048},
                      "comm": {"by_role": {"activation": {"bytes": 100},
                                           "activation_grad": {"bytes": 50},
                                           "metric": {"bytes": 24}}}},
                     {"timing": {"idle_fraction": 0.25}, "memory": {"activations_bytes": 1024},
                      "comm": {"by_role": {"activation": {"bytes": 50},
                                           "activation_grad": {"bytes": 100}}}}],
           "predicted": {"bubble_fraction": 0.04, "step_time_s": 0.015,
                         "ranks": [{"timing": {"idle_fraction": 0.2}},
                                   {"timing": {"idle_fraction": 0.22}}]}}
    df = schedule_table([res, {"config": make_config().to_dict()}])  # single: not a row
    assert len(df) == 1
    r = df.iloc[0]
    assert (r["schedule"], r["P"], r["M"], r["v"]) == ("zbv", 2, 4, 2)
    assert r["idle_measured"] == [0.3, 0.25] and r["idle_simulated"] == [0.2, 0.22]
    assert r["max_abs_diff"] == pytest.approx(0.1)
    assert r["idle_paper"] == 0.0 and r["bytes_per_step"] == 300
    text = write_schedule_report([res], str(tmp_path))
    assert "| 01-zbv-P2-M4 | zbv | 2 | 4 | 2 | 20.0 (15.0) | 30.0 / 25.0 | 20.0 / 22.0 | 0.100 |" \
        in text
    assert (tmp_path / "idle_vs_microbatches.png").stat().st_size > 0
    assert (tmp_path / "schedules.csv").exists() and (tmp_path / "schedules.md").exists()


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_schedules_experiment_end_to_end_small(tmp_path):
    """Every case of both world sizes is a valid config; two schedules run for real on a
    small net, and the schedule table and figure are written."""
    from experiments.compare import plan

    _, both = plan(["experiment=schedules", "compare.world_sizes=[2,4]"])
    assert len(both) == 40
    out = tmp_path / "sch"
    p = subprocess.run(
        [sys.executable, "-m", "experiments.compare", "experiment=schedules", f"compare.out={out}",
         "model.dims=[32,32,32,32,32]", "train.batch_size=64", "train.steps=3",
         "data.num_examples=192", "compare.only=[zb1p,zbv]"],
        cwd=ROOT, capture_output=True, text=True, timeout=800)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "| 04-zbv-P2-M2 | zbv | 2 | 2 | 2 |" in p.stdout
    for f in ("schedules.md", "schedules.csv", "idle_vs_microbatches.png"):
        assert (out / f).exists()
