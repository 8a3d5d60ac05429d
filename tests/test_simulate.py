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


# ---------------------------------------------------------------- hybrid meshes and fsdp

INF = float("inf")


def _hybrid(**kw):
    from conftest import make_config

    base = {"model.dims": [12, 8, 6, 8, 4], "train.batch_size": 16, "train.microbatches": 2,
            "data.num_examples": 64}
    return make_config(strategy="hybrid", world_size=4, **{**base, **kw})


def _units(cfg, kinds="FBIW"):
    """Every rank's action times: 1 per action of each stage it holds, a free update."""
    from partition.plans.mesh import resolve_mesh
    from partition.plans.schedule import load_schedule

    s = cfg.strategy
    mesh = resolve_mesh(world=cfg.world_size, dp=s.dp, pp=s.pp, tp=s.tp)
    sched = load_schedule(s.schedule, world=mesh.pp, micro=cfg.train.microbatches)
    return [{**{f"s{st}:{k}": 1.0 for st in sched.rank_stages(mesh.coords(r).pp) for k in kinds},
             "update": 0.0} for r in range(cfg.world_size)]


def test_hybrid_dp2_pp2_is_the_pipeline_then_the_dp_all_reduce():
    """GPipe over pp=2 at M=2 with unit actions takes 6 units (as above) in both replicas;
    each stage's dp pair then all-reduces its gradients (0.5: α only) as soon as both have
    finished their backwards — stage 1 at 5, stage 0 at 6 — and J's all-reduce (0.5)
    starts when the last rank is there: 6 + 0.5 + 0.5."""
    from partition.simulate import Links, step_ops

    cfg = _hybrid(**{"strategy.dp": 2, "strategy.pp": 2})
    tl = simulate(step_ops(cfg, _units(cfg), Links(0.0, INF, 0.5, INF)), 4)
    assert tl.step_time == 7.0
    dp = {r: [(s.start, s.end) for s in tl.rank_spans(r) if s.label == "all_reduce weight_grad"]
          for r in range(4)}
    # ranks 0, 2 hold stage 0 (replicas 0, 1); ranks 1, 3 stage 1
    assert dp == {0: [(6.0, 6.5)], 1: [(5.0, 5.5)], 2: [(6.0, 6.5)], 3: [(5.0, 5.5)]}
    for r in range(4):  # the pipeline part is GPipe's, in each replica
        mine = [(s.label, s.start) for s in tl.rank_spans(r) if s.kind == "compute"]
        want = ([("0F0", 0.0), ("0F1", 1.0), ("0B0", 4.0), ("0B1", 5.0)] if r % 2 == 0 else
                [("1F0", 1.0), ("1F1", 2.0), ("1B0", 3.0), ("1B1", 4.0)])
        assert mine[:4] == want
        assert mine[4][0] == "update"


def test_hybrid_tp_collectives_follow_their_actions_with_the_plans_wire_bytes():
    """pp=2 × tp=2, megatron, layers [0, 1] and [2, 3]: stage 0's F ends with the all-reduce
    of its pair's partial output (8 rows × 6 × 8 B = 384 B; at tp=2 an all-reduce puts as
    much on the wire), stage 1's F with its own (8 × 4 × 8 = 256 B) and its B with the
    all-reduce of its first layer's input gradient (8 × 6 × 8 = 384 B). With β = 1 B/s and
    no α a collective takes its wire bytes in seconds."""
    from partition.plans.mesh import hybrid_calls, resolve_mesh
    from partition.plans.schedule import load_schedule
    from partition.plans.stages import plan_stages
    from partition.simulate import Links, step_ops

    cfg = _hybrid(**{"strategy.pp": 2, "strategy.tp": 2, "strategy.balance": [2, 2]})
    ops = step_ops(cfg, _units(cfg), Links(0.0, INF, 0.0, 1.0))
    tp = {r: [(o.label, o.duration) for o in ops if o.rank == r and o.sync
              and o.sync.startswith("tp")] for r in range(4)}
    ar = "all_reduce partial_output"
    assert tp[0] == tp[1] == [(ar, 384.0)] * 2
    assert tp[2] == tp[3] == [(ar, 256.0), (ar, 256.0), ("all_reduce input_grad", 384.0),
                              ("all_reduce input_grad", 384.0)]
    # each right after its action, in the rank's order
    order = [o.label for o in ops if o.rank == 2 and o.args.get("role") != "metric"
             and o.kind in ("compute", "comm")]  # not the messages' transfers on their links
    assert order == ["1F0", ar, "1F1", ar, "1B0", "all_reduce input_grad", "1B1",
                     "all_reduce input_grad", "update"]
    # the one source: the mesh plan's tp calls of each rank, wire bytes and count
    mesh = resolve_mesh(world=4, dp="auto", pp=2, tp=2)
    sched = load_schedule("gpipe", world=2, micro=2)
    plan = plan_stages(cfg.spec, 2, [2, 2])
    for r in range(4):
        calls = hybrid_calls(cfg.spec, mesh, sched, plan, layout="megatron", rank=r, batch=16,
                             micro=2, itemsize=8)["tp"]
        assert sorted(d for _, d in tp[r]) == sorted(float(c.wire) for c in calls)
    # tp partners meet in each collective
    tl = simulate(ops, 4)
    for a, b in ((0, 1), (2, 3)):
        sa = [s.start for s in tl.rank_spans(a) if s.args.get("role") in ("partial_output",
                                                                        "input_grad")]
        sb = [s.start for s in tl.rank_spans(b) if s.args.get("role") in ("partial_output",
                                                                        "input_grad")]
        assert sa == sb


def _sharded(**kw):
    return _hybrid(**{"strategy.dp": 2, "strategy.pp": 2, "strategy.dp_shard": True,
                      "strategy.balance": [2, 2], **kw})


GATHER, SCATTER = "all_gather weight_gather", "reduce_scatter weight_grad"


@pytest.mark.parametrize(("keep", "step", "rank0"), [
    # resharded: 2 gathers before every F and every B, 2 reduce-scatters after every B.
    # Rank 1 (stage 1): F0 waits for 0F0 (ends 2): gathers [2, 3], compute [3, 4]; F1
    # [4, 6]; B0 gathers [6, 7], compute [7, 8], reduce-scatters [8, 9] — only then is dx
    # handed down; B1 [9, 12]. Rank 0: B0 from 9 to 12, B1 from 12 to 15; J [15, 15.5].
    (True, 15.5, [(GATHER, 0.0), (GATHER, 0.5), ("0F0", 1.0), (GATHER, 2.0), (GATHER, 2.5),
                  ("0F1", 3.0), (GATHER, 9.0), (GATHER, 9.5), ("0B0", 10.0), (SCATTER, 11.0),
                  (SCATTER, 11.5), (GATHER, 12.0), (GATHER, 12.5), ("0B1", 13.0),
                  (SCATTER, 14.0), (SCATTER, 14.5), ("update", 15.0)]),
    # reshard_after_forward=false: B gathers nothing. Rank 1: B0 [6, 8], B1 [8, 10];
    # rank 0: B0 [8, 10], B1 [10, 12]; J [12, 12.5].
    (False, 12.5, [(GATHER, 0.0), (GATHER, 0.5), ("0F0", 1.0), (GATHER, 2.0), (GATHER, 2.5),
                   ("0F1", 3.0), ("0B0", 8.0), (SCATTER, 9.0), (SCATTER, 9.5), ("0B1", 10.0),
                   (SCATTER, 11.0), (SCATTER, 11.5), ("update", 12.0)]),
])
def test_dp_shard_gathers_before_each_action_and_reduce_scatters_after(keep, step, rank0):
    """dp=2 (shard) × pp=2, GPipe at M=2, two layers (two dp-sharded shards) per stage, unit
    F and B, every collective 0.5 (α only), free transfers: each layer's gathers before
    the action, its reduce-scatters after the backward, in step across the dp pair, and no
    dp all-reduce before the update."""
    from partition.simulate import Links, step_ops

    cfg = _sharded(**{"strategy.reshard_after_forward": keep})
    tl = simulate(step_ops(cfg, _units(cfg, "FB"), Links(0.0, INF, 0.5, INF)), 4)
    assert tl.step_time == step
    assert [(s.label, s.start) for s in tl.rank_spans(0)][:-1] == rank0
    assert tl.idle_fraction(0) == pytest.approx(1 - 4 / step)
    assert not [s for s in tl.spans if s.label == "all_reduce weight_grad"]
    for a, b in ((0, 2), (1, 3)):  # the dp pairs (same stage) meet in every collective
        assert [(s.label, s.start) for s in tl.rank_spans(a)] == [
            (s.label, s.start) for s in tl.rank_spans(b)]


def test_dp_shard_wire_bytes_are_the_mesh_plans_and_w_reduce_scatters():
    """dp=2 (shard) × pp=2 on zb1p: an F or I starts with its gathers, a W ends with its
    reduce-scatters; with β = 1 B/s every dp op takes its wire bytes, and a rank's dp ops
    are exactly the mesh plan's dp calls (hybrid_calls, the one source), wire for wire."""
    from partition.plans.mesh import hybrid_calls, resolve_mesh
    from partition.plans.schedule import load_schedule
    from partition.plans.stages import plan_stages
    from partition.simulate import Links, step_ops

    cfg = _sharded(**{"strategy.schedule": "zb1p"})
    ops = step_ops(cfg, _units(cfg), Links(0.0, INF, 0.0, 1.0))
    mesh = resolve_mesh(world=4, dp=2, pp=2, tp=1)
    sched = load_schedule("zb1p", world=2, micro=2)
    plan = plan_stages(cfg.spec, 2, [2, 2])
    for r in range(4):
        mine = [o for o in ops if o.rank == r]
        calls = hybrid_calls(cfg.spec, mesh, sched, plan, layout="megatron", rank=r,
                             batch=16, micro=2, itemsize=8, dp_shard=True)["dp"]
        dp = [o for o in mine if o.sync and o.sync.startswith("dp")]
        assert sorted((o.label, o.duration) for o in dp) == sorted(
            (f"{c.op} {c.role}", float(c.wire)) for c in calls)
        for i, o in enumerate(mine):  # what sits around each action
            if o.kind != "compute" or o.label == "update":
                continue
            kind, nxt = o.args["kind"], [x.label for x in mine[i + 1:i + 3]]
            prev = [x.label for x in mine[max(0, i - 2):i]]
            assert (prev == [GATHER] * 2) == (kind in "FI"), (r, o.label, prev)
            assert (nxt == [SCATTER] * 2) == (kind == "W"), (r, o.label, nxt)
    simulate(ops, 4)  # and it plays to the end


def test_dp_shard_is_simulated_through_the_timeline_block():
    from partition.costs import CostParams
    from partition.timeline import simulated_block, simulation

    cfg = _sharded(**{"strategy.tp": 1})
    times = _units(cfg)
    params = CostParams.from_config(cfg)
    assert simulation(cfg, times, params)[1] is None
    assert simulated_block(cfg, times, params)["step_time_s"] > 0


@pytest.mark.parametrize(("zero", "want"), [
    (3, ["all_gather weight_gather", "F0", "all_gather weight_gather", "F1", "loss",
         "all_gather weight_gather", "B1", "reduce_scatter weight_grad",
         "all_gather weight_gather", "B0", "reduce_scatter weight_grad", "update"]),
    (1, ["F0", "F1", "loss", "B1", "B0", "all_reduce weight_grad", "update",
         "all_gather weight_gather", "all_gather weight_gather"]),
])
def test_fsdp_layers_meet_the_plans_collectives(zero, want):
    """Each layer's gather before its F (and, resharded, its B), its reduce-scatter after
    its B; stage 1 all-reduces before the update and gathers after it: the calls of
    plans/fsdp.py in order, each taking its ring wire bytes at β = 1 B/s."""
    from conftest import make_config

    from partition.plans.fsdp import fsdp_calls, shard_plan
    from partition.simulate import Links, step_ops

    cfg = make_config(strategy="fsdp", world_size=2, **{
        "model.dims": [6, 5, 3], "train.batch_size": 8, "strategy.zero_stage": zero})
    times = [{"F0": 1.0, "F1": 1.0, "B0": 1.0, "B1": 1.0, "loss": 0.5, "update": 0.25}] * 2
    ops = step_ops(cfg, times, Links(0.0, INF, 0.0, 1.0))
    for r in range(2):
        mine = [o for o in ops if o.rank == r]
        assert [o.label for o in mine] == want + ["all_reduce metric"]
        calls = fsdp_calls(shard_plan([6, 5, 3], world=2, bias=False), zero_stage=zero,
                           reshard_after_forward=True, micro=1, itemsize=8)
        assert [o.duration for o in mine if o.kind == "comm"][:-1] == [float(c.wire)
                                                                        for c in calls]
    tl = simulate(ops, 2)
    comm = sum(float(c.wire) for c in calls) + 2 * 1 * 24 // 2  # + J's all-reduce
    assert tl.step_time == pytest.approx(4.75 + comm)


def test_reading_the_batch_comes_first_and_is_not_compute():
    """GPipe P=2 M=2 with unit actions (6 units) and stage 0's rank reading its rows for 2
    units first: stage 0 starts at 2, stage 1 (a 0.5 read of y, done meanwhile) waits for it,
    the step takes 8; the reads are idle time, not compute (rank 0: 4 of 8 computing)."""
    from conftest import make_config

    from partition.simulate import Links, step_ops

    cfg = make_config(strategy="pipeline", world_size=2, **{
        "train.microbatches": 2, "model.dims": [8, 6, 4], "train.batch_size": 4})
    sched = named_schedule("gpipe", world=2, micro=2)
    times = [{"s0:F": 1.0, "s0:B": 1.0, "update": 0.0, "inputs": 2.0},
             {"s1:F": 1.0, "s1:B": 1.0, "update": 0.0, "inputs": 0.5}]
    tl = simulate(step_ops(cfg, times, Links(0.0, INF, 0.0, INF), schedule=sched), 2)
    assert tl.step_time == 8.0
    first = [tl.rank_spans(r)[0] for r in range(2)]
    assert [(s.label, s.kind, s.start, s.end) for s in first] == [
        ("inputs", "other", 0.0, 2.0), ("inputs", "other", 0.0, 0.5)]
    assert tl.compute(0) == 4.0 and tl.idle_fraction(0) == 0.5
    # data parallel: each rank's read before its F
    cfg = make_config(strategy="data", world_size=2, **{"model.dims": [8, 6, 4],
                                                        "train.batch_size": 4})
    times = [{"F": 1.0, "B": 1.0, "update": 0.0, "inputs": 0.25}] * 2
    ops = step_ops(cfg, times, Links(0.0, INF, 0.0, INF))
    assert [o.label for o in ops if o.rank == 0][:3] == ["inputs", "F0", "B0"]


# ---------------------------------------------------------------- messages on their links


def test_a_message_moves_only_into_a_posted_receive():
    """GPipe P=2 M=2, unit actions but stage 1's F (3), transfers 0.5. Rendezvous: rank 1
    posts the receive of micro-batch 1 only after 1F0 (at 4.5), so that message moves
    [4.5, 5] although 0F1 made it at 2.5, and rank 0's eager wait for that send holds it
    until 5; the gradients likewise move once rank 0 has posted them. Step 12; without the
    rendezvous each message moves as soon as it is made: step 11."""
    s = named_schedule("gpipe", world=2, micro=2)

    def play(rendezvous: bool):
        return simulate(pipeline_ops(s, compute=lambda a: 3.0 if (a.stage, a.kind) == (1, "F")
                                     else 1.0, transfer=lambda m: 0.5, rendezvous=rendezvous), 2)

    tl = play(True)
    assert tl.step_time == 12.0
    assert [(x.label, x.start) for x in tl.rank_spans(0) if x.kind == "compute"] == [
        ("0F0", 0.0), ("0F1", 1.5), ("0B0", 9.5), ("0B1", 11.0)]
    assert [(x.label, x.start) for x in tl.rank_spans(1) if x.kind == "compute"] == [
        ("1F0", 1.5), ("1F1", 5.0), ("1B0", 8.0), ("1B1", 9.5)]
    assert [(x.label, x.start, x.end) for x in tl.spans if x.kind == "transfer"] == [
        ("activation 0>1 mb 0", 1.0, 1.5), ("activation 0>1 mb 1", 4.5, 5.0),
        ("activation_grad 1>0 mb 0", 9.0, 9.5), ("activation_grad 1>0 mb 1", 10.5, 11.0)]
    assert play(False).step_time == 11.0
    # transfers are their links', not the ranks' own time
    assert tl.compute(0) == 4.0 and not [x for x in tl.rank_spans(1) if x.kind == "transfer"]


def test_one_link_carries_one_message_at_a_time_in_send_order():
    """Two messages on one link, the second made while the first still moves: it waits."""
    s = named_schedule("gpipe", world=2, micro=2)
    tl = simulate(pipeline_ops(s, compute=lambda a: 0.5 if a.stage == 0 else 1.0,
                               transfer=lambda m: 2.0), 2)
    moves = [(x.start, x.end) for x in tl.spans if x.kind == "transfer"
             and x.label.startswith("activation ")]
    assert moves == [(0.5, 2.5), (2.5, 4.5)]  # 0F1 ends at 1.0; the link is busy until 2.5


def test_every_op_is_timed_by_the_key_of_its_args():
    """time_key reads back, from each op, the key step_ops timed it by (distinct values)."""
    from partition.simulate import Links, step_ops, time_key
    from conftest import make_config

    for strategy, kw in (("pipeline", {"strategy.schedule": "zb1p", "train.microbatches": 2}),
                         ("tensor", {}), ("data", {"train.microbatches": 2}), ("fsdp", {})):
        cfg = make_config(strategy=strategy, world_size=2, **{
            "model.dims": [8, 6, 4], "train.batch_size": 8, **kw})
        keys = (["s0:F", "s0:B", "s0:I", "s0:W", "s1:F", "s1:B", "s1:I", "s1:W"]
                + [f"{k}{l}" for k in "FB" for l in range(2)] + ["F", "B", "loss", "update",
                                                                  "inputs"])
        times = [{k: 1.0 + i / 64 + r / 8 for i, k in enumerate(keys)} for r in range(2)]
        sched = named_schedule("zb1p", world=2, micro=2) if strategy == "pipeline" else None
        ops = step_ops(cfg, times, Links(0.0, INF, 0.0, INF), schedule=sched)
        timed = [o for o in ops if o.kind in ("compute", "other")]
        assert timed and all(o.duration == times[o.rank][time_key(o.args)] for o in timed)


def test_a_replay_takes_what_the_step_measured():
    """as_measured: a collective lasts its measured "coll:" seconds, a transfer its own
    "xfer:<from>><to>#<seq>" where measured (the gradient's, 0.25, not its role's 9), else
    its role's, the runtime's "after:" time (the occurrence's own where measured, "@mb")
    comes after the action's message calls, just before the rank's next op; a late rank
    begins with its "late:start"; deps follow the ops."""
    from partition.simulate import as_measured

    s = named_schedule("gpipe", world=2, micro=1)
    ops = pipeline_ops(s, compute=lambda a: 1.0, transfer=lambda m: 0.5, metric=9.0,
                       rendezvous=True)
    t0 = {"after:s0:F": 0.25, "after:s0:B@0": 0.5, "after:s0:B": 7.0, "coll:all_reduce metric": 0.125,
          "xfer:activation": 0.75, "xfer:activation_grad": 9.0, "xfer:1>0#0": 0.25}
    t1 = {**t0, "late:start": 2.0, "s1:F@0": 3.0}
    tl = simulate(as_measured(ops, [t0, t1]), 2)
    # rank 1 begins at 2 and posts its receive then: 0F0's activation (made at 1) moves
    # [2, 2.75]; 1F0 takes 3 as measured; 1B0 [5.75, 6.75]
    r1 = [(x.label, x.start, x.end) for x in tl.rank_spans(1) if x.kind == "compute"]
    assert r1 == [("1F0", 2.75, 5.75), ("1B0", 5.75, 6.75)]
    # rank 0: 0F0 [0, 1], its isend and the gradient's receive posted at 1; the gradient
    # moves [6.75, 7]; the runtime after 0F0 [7, 7.25] follows its wait; 0B0 [7.25, 8.25]
    # and its own runtime (0.5, not the key's 7); then J, 0.125 as measured
    r0 = [(x.kind, x.label, x.start, x.end) for x in tl.rank_spans(0)
          if x.kind in ("compute", "runtime", "comm")]
    assert r0 == [("compute", "0F0", 0.0, 1.0), ("runtime", "after 0F0", 7.0, 7.25),
                  ("compute", "0B0", 7.25, 8.25), ("runtime", "after 0B0", 8.25, 8.75),
                  ("comm", "all_reduce metric", 8.75, 8.875)]
    assert tl.step_time == 8.875


def test_a_replay_makes_each_message_call_where_the_step_made_it():
    """GPipe P=2, M=1, unit actions. Rank 1 measured: 0.5 before posting its receive, the
    irecv itself 4 (it blocked: gloo's irecv may), 0.25 before its wait. The activation
    may move from the post's start (1.5, rank 0's isend made at 1 + 0.125 after 0F0) and
    took 0.5 as measured: it arrives at 2, and rank 0's wait for the send ends then —
    though rank 1 can only look at it when its irecv returns (5.5) and its lead is done
    (5.75). With the send's completion measured ("sent:", 0.25 after it could move) the
    sender waits until that instead."""
    from partition.simulate import as_measured

    s = named_schedule("gpipe", world=2, micro=1)
    ops = pipeline_ops(s, compute=lambda a: 1.0, transfer=lambda m: 0.0, metric=0.0,
                       rendezvous=True)
    t0 = {"lead:send:1#0": 0.125, "call:send:1#0": 0.25, "xfer:0>1#0": 0.5, "xfer:1>0#0": 0.0}
    t1 = {"after:start": 1.0, "lead:post:0#0": 0.5, "call:post:0#0": 4.0, "lead:wrecv:0#0": 0.25,
          "xfer:0>1#0": 0.5, "xfer:1>0#0": 0.0}
    tl = simulate(as_measured(ops, [t0, t1]), 2)
    by = {(x.rank, x.kind, x.label): (x.start, x.end) for x in tl.spans}
    assert by[(1, "transfer", "activation 0>1 mb 0")] == (1.5, 2.0)  # on its link
    # rank 0 waits for its send from the end of its call (1.375) until the message arrived
    assert by[(0, "post", "wait send activation")] == (1.375, 2.0)
    assert by[(1, "runtime", "post recv activation")] == (1.5, 5.5)  # the irecv's own time
    assert by[(1, "compute", "1F0")] == (5.75, 6.75)
    tl = simulate(as_measured(ops, [{**t0, "sent:0>1#0": 0.25}, t1]), 2)
    by = {(x.rank, x.kind, x.label): (x.start, x.end) for x in tl.spans}
    assert by[(0, "post", "wait send activation")] == (1.375, 1.75)
    assert by[(1, "compute", "1F0")] == (5.75, 6.75)  # the receiver as before
