"""strategy=hybrid: the mesh plan, its config checks, and dp × pp × tp runs at world size 4.

The spawned cases run once per module (one spawn of 4 gloo ranks for all of them): the
float64 weights against single-device SGD, the bytes of every (dimension, role) against
the plan (plans/mesh.py `hybrid_calls`), every c10d op recorded, memory against the dry run.
"""

from __future__ import annotations

import pytest
import torch
from conftest import make_config, spawn, traced_replay_s
from strategy_runs import C10D, max_rel_err

from partition.comm import Comm, Ledger, Observer, Transport
from partition.config import ConfigError
from partition.plans.mesh import Mesh, by_dim_role, hybrid_calls, resolve_mesh
from partition.plans.schedule import load_schedule
from partition.plans.stages import plan_stages
from partition.topology import Topology

# ---------------------------------------------------------------- the mesh (no processes)


def test_layout_is_torchtitans_tp_innermost_then_pp_then_dp():
    m = Mesh(dp=2, pp=2, tp=2)
    assert [(c.dp, c.pp, c.tp) for c in map(m.coords, range(8))] == [
        (0, 0, 0), (0, 0, 1), (0, 1, 0), (0, 1, 1), (1, 0, 0), (1, 0, 1), (1, 1, 0), (1, 1, 1)]
    assert m.group(5, "tp") == (4, 5)
    assert m.group(5, "pp") == (5, 7)
    assert m.group(5, "dp") == (1, 5)
    assert m.groups("pp") == [(0, 2), (1, 3), (4, 6), (5, 7)]
    assert m.groups("dp") == [(0, 4), (1, 5), (2, 6), (3, 7)]
    for r in range(8):
        c = m.coords(r)
        assert m.rank_of(dp=c.dp, pp=c.pp, tp=c.tp) == r


def test_dp_auto_and_the_1024_rank_mesh():
    assert resolve_mesh(world=1024, dp="auto", pp=8, tp=16) == Mesh(dp=8, pp=8, tp=16)
    assert resolve_mesh(world=4, dp=2, pp=1, tp=2) == Mesh(2, 1, 2)


@pytest.mark.parametrize(("world", "dp", "pp", "tp", "msg"), [
    (4, "auto", 3, 1, "strategy.dp=auto: world_size=4 is not divisible by strategy.pp=3 × "
                      "strategy.tp=1 = 3"),
    (4, 2, 2, 2, "strategy.dp=2 × strategy.pp=2 × strategy.tp=2 = 8 ranks, but world_size=4"),
    (4, 0, 2, 2, "strategy.dp=0: must be an integer >= 1 or auto"),
])
def test_mesh_refused_with_the_numbers(world, dp, pp, tp, msg):
    with pytest.raises(ValueError) as e:
        resolve_mesh(world=world, dp=dp, pp=pp, tp=tp)
    assert str(e.value) == msg


@pytest.mark.parametrize(("layout", "dims", "tp", "dp"), [
    ("megatron", [12, 8, 6, 8, 4], 2, 2), ("megatron", [5, 7, 3], 2, 3),
    ("rowwise", [12, 8, 6, 8, 4], 2, 3), ("megatron", [9, 6, 7, 5, 3], 1, 4)])
def test_dp_shard_pieces_cover_every_weight_once(layout, dims, tp, dp):
    """dp_shard: every (tp, dp) rank's pieces of its tensor shards, as rectangles of the full
    W and ranges of b, tile each stage's layers exactly once (a megatron replica: once per
    tp rank, its primary one counted); a dp group's ranks cut the same shard."""
    import numpy as np

    from partition.plans.mesh import dp_flat_shards, stage_shards

    class Net:
        pass

    spec = Net()
    spec.dims, spec.bias = tuple(dims), True
    for start, end in ((0, len(dims) - 1), (1, len(dims) - 1)):
        W = {l: np.zeros((dims[l + 1], dims[l]), int) for l in range(start, end)}
        b = {l: np.zeros(dims[l + 1], int) for l in range(start, end)}
        for t in range(tp):
            shards = stage_shards(layout, dims, start, end, tp=tp, rank=t)
            for f, sh in zip(dp_flat_shards(spec, shards, dp=dp), shards, strict=True):
                if not sh.primary:
                    continue
                for r in range(dp):
                    for p in f.pieces(r):
                        if p.tensor == "W":
                            W[f.index][slice(*p.rows), slice(*p.cols)] += 1
                        else:
                            b[f.index][slice(*p.rows)] += 1
        assert all((w == 1).all() for w in W.values()) and all((v == 1).all() for v in b.values())


def test_dp_shard_calls_are_fsdps_over_the_shards_by_hand():
    """The docs' example, dp=2 (shard) × pp=2 × tp=2, dims [784, 1024, 1024, 1024, 10], float32,
    B=256, M=4: stage 0's tensor shard (512·784 + 1024·512 parameters) in pieces of
    200,704 and 262,144; per micro-batch two gathers and one reduce-scatter per layer, no
    all-reduce; pp and tp as without sharding."""
    from types import SimpleNamespace

    spec = SimpleNamespace(dims=(784, 1024, 1024, 1024, 10), bias=False)
    mesh, M, b = Mesh(2, 2, 2), 4, 4
    sched = load_schedule("gpipe", world=2, micro=M)

    def calls(rank: int, shard: bool) -> dict:
        c = hybrid_calls(spec, mesh, sched, [(0, 2), (2, 4)], layout="megatron", rank=rank,
                         batch=256, micro=M, itemsize=b, dp_shard=shard)
        return {d: {k: (v.bytes, v.messages) for k, v in roles.items()}
                for d, roles in by_dim_role(c).items()}

    c = 200_704 + 262_144
    assert calls(5, True)["dp"] == {"weight_gather": (2 * M * c * b, 2 * M * 2),
                                    "weight_grad": (M * 2 * c * b, M * 2)}
    plain = calls(5, False)
    assert plain["dp"] == {"weight_grad": (2 * c * b, 1)}
    assert {d: v for d, v in calls(5, True).items() if d != "dp"} == {
        d: v for d, v in plain.items() if d != "dp"}
    keep = hybrid_calls(spec, mesh, sched, [(0, 2), (2, 4)], layout="megatron", rank=5,
                        batch=256, micro=M, itemsize=b, dp_shard=True,
                        reshard_after_forward=False)
    assert {x.phase for x in keep["dp"] if x.role == "weight_gather"} == {"forward"}


def _hybrid(**kw):
    base = {"model.dims": [12, 8, 6, 8, 4], "train.batch_size": 16, "train.microbatches": 2,
            "data.num_examples": 64, "model.bias": True, "model.weight_decay": 0.01,
            "train.steps": 3}
    base.update(kw)
    return make_config(strategy="hybrid", world_size=base.pop("world_size", 4), **base)


@pytest.mark.parametrize(("kw", "key", "words"), [
    ({"strategy.pp": 3}, "world_size", "not divisible by strategy.pp=3"),
    ({"strategy.dp": 2, "strategy.pp": 2, "strategy.tp": 2}, "strategy.dp", "= 8 ranks, but world_size=4"),
    ({"strategy.reshard_after_forward": False, "strategy.tp": 2},
     "strategy.reshard_after_forward", "only applies to strategy.dp_shard=true"),
    ({"strategy.tp": 4, "strategy.pp": 1, "model.dims": [12, 3, 4]}, "strategy.tp",
     "narrowest, 3"),
    ({"strategy.dp": 4, "train.batch_size": 12}, "train.batch_size", "a multiple of 8"),
    ({"strategy.pp": 2, "strategy.balance": "time"}, "strategy.balance", "pipeline only"),
    ({"strategy.pp": 5}, "world_size", "not divisible by strategy.pp=5"),
    ({"strategy.dp": 1, "strategy.pp": 4, "strategy.balance": [1, 1, 1, 2]}, "strategy.balance",
     "must sum to the 4 layers"),
])
def test_config_refuses_in_one_line(kw, key, words):
    with pytest.raises(ConfigError) as e:
        _hybrid(**kw)
    assert e.value.key == key and words in str(e.value) and "\n" not in str(e.value)


def test_mesh_keys_belong_to_hybrid_only():
    with pytest.raises(ConfigError) as e:
        make_config(strategy="pipeline", world_size=2, **{"strategy.pp": 2})
    assert str(e.value) == "strategy.pp=2: applies to strategy=hybrid only (strategy=pipeline)"


def test_a_sweep_combination_that_does_not_divide_stops_before_its_first_job(capsys):
    from experiments.cli import preflight

    with pytest.raises(SystemExit) as e:
        preflight(["-m", "world_size=4", "strategy=hybrid", "strategy.pp=1",
                   "strategy.tp=1,2,3"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: world_size=4: strategy.dp=auto: world_size=4 is not divisible by "
                   "strategy.pp=1 × strategy.tp=3 = 3"]


class _Recording(Transport):
    """Moves nothing; remembers the peer each call was given."""

    moves = False
    peers: list

    def send(self, t, dst):  # noqa: ANN001
        self.peers.append(("send", dst))

    def recv(self, t, src):  # noqa: ANN001
        self.peers.append(("recv", src))


def test_a_dimension_comm_addresses_global_ranks():
    """Callers name peers by their index in the group; torch.distributed's send/recv with a
    group take the global rank, and the ledger records the global rank and the dimension."""
    ledger = Ledger()
    world = Comm(rank=5, world_size=8, ledger=ledger, transport=_Recording())
    world.transport.peers = []
    pp = world.sub(dim="pp", members=Mesh(2, 2, 2).group(5, "pp"), group=None)
    pp.transport.peers = world.transport.peers
    assert (pp.rank, pp.world_size) == (0, 2)
    pp.send(torch.zeros(3, dtype=torch.float64), 1, role="activation", phase="forward")
    pp.recv((3,), torch.float64, 1, role="activation_grad", phase="backward")
    assert world.transport.peers == [("send", 7), ("recv", 7)]
    assert [(r.peer, r.dim, r.group_size) for r in ledger.records] == [(7, "pp", 2), (7, "pp", 2)]


def test_one_d_summaries_have_no_by_dim():
    from partition.comm import summarize

    ledger = Ledger()
    c = Comm(rank=0, world_size=2, ledger=ledger, transport=_Recording())
    c.transport.peers = []
    c.send(torch.zeros(2), 1, role="activation", phase="forward")
    assert "by_dim" not in summarize(ledger.records)
    assert ledger.records[0].dim is None


# ---------------------------------------------------------------- spawned runs, world size 4

SHARD = {"strategy.dp_shard": True}
CASES = {  # id -> overrides
    "dp2xpp2-gpipe": {"strategy.dp": 2, "strategy.pp": 2},
    "dp2xtp2": {"strategy.dp": 2, "strategy.tp": 2},
    "pp2xtp2-gpipe": {"strategy.pp": 2, "strategy.tp": 2, "strategy.balance": [2, 2]},
    # rowwise: the first stage's top layer is a hidden rowwise layer (it slices the whole
    # dJ/dh the next stage sends)
    "pp2xtp2-rowwise": {"strategy.pp": 2, "strategy.tp": 2, "strategy.balance": [2, 2],
                        "strategy.layout": "rowwise"},
    # fsdp stage 3 on the data dimension: each tensor shard cut again over dp (× tp "2-D")
    "dp2shardxtp2": {"strategy.dp": 2, "strategy.tp": 2, **SHARD, "train.grad_check": True},
    "dp4shard": {"strategy.dp": 4, **SHARD, "train.momentum": 0.9, "train.grad_check": True},
    "dp2xpp2-1f1b": {"strategy.dp": 2, "strategy.pp": 2, "strategy.schedule": "1f1b"},
    "pp2xtp2-1f1b": {"strategy.pp": 2, "strategy.tp": 2, "strategy.balance": [2, 2],
                     "strategy.schedule": "1f1b"},
    # a stage's layers gathered per micro-batch action: kept from F to B, Adam's state on
    # the pieces; and the I/W split, whose W reduce-scatters
    "dp2shardxpp2-1f1b-keep-adamw": {"strategy.dp": 2, "strategy.pp": 2, **SHARD,
                                     "strategy.schedule": "1f1b", "train.optimizer": "adamw",
                                     "strategy.reshard_after_forward": False},
    "dp2shardxpp2-zb1p": {"strategy.dp": 2, "strategy.pp": 2, **SHARD,
                          "strategy.schedule": "zb1p"},
    "dp2shardxtp2-rowwise-keep": {"strategy.dp": 2, "strategy.tp": 2, **SHARD,
                                  "strategy.layout": "rowwise",
                                  "strategy.reshard_after_forward": False},
}
SLOW = {"dp2xpp2-1f1b", "pp2xtp2-1f1b", "dp2shardxpp2-1f1b-keep-adamw", "dp2shardxpp2-zb1p",
        "dp2shardxtp2-rowwise-keep"}
PARAMS = [pytest.param(k, marks=pytest.mark.slow) if k in SLOW else k for k in CASES]


def _rank_fn(rank: int, world: int, cfgs: list) -> list[dict]:
    from partition.train import run_rank

    out = []
    for cfg in cfgs:
        topo = Topology(rank, world, rank, torch.device("cpu"), "gloo")
        ledger = Ledger()
        comm = Comm(rank=rank, world_size=world, ledger=ledger)
        with Observer() as obs:
            rec = run_rank(cfg, topo, comm, ledger)
        out.append({"shards": rec.shards, "records": list(ledger.records),
                    "observed": [(o.op, o.bytes) for o in obs.ops], "memory": rec.memory,
                    "comm": rec.comm, "objective": rec.objective,
                    "grad_rel_err": rec.grad_rel_err})
    return out


_CACHE: dict[tuple[str, ...], dict[str, list[dict]]] = {}


def _results(wanted: tuple[str, ...]) -> dict[str, list[dict]]:
    """One spawn of 4 ranks for the cases this session runs (the slow ones only when asked)."""
    if wanted not in _CACHE:
        cfgs = [_hybrid(**CASES[k]) for k in wanted]
        per_rank = spawn(_rank_fn, 4, cfgs, timeout=600)
        _CACHE[wanted] = {k: [per_rank[r][i] for r in range(4)] for i, k in enumerate(wanted)}
    return _CACHE[wanted]


@pytest.fixture(scope="module")
def runs(request):
    slow = "not slow" not in (request.config.getoption("-m") or "")
    return _results(tuple(k for k in CASES if slow or k not in SLOW))


def _get(runs, case):
    if case not in runs:
        pytest.skip("slow case not in this session's spawn")
    return runs[case]


def _single_device_err(cfg, per: list[dict]) -> float:
    """Worst relative error of the assembled weights against the single-device run of the
    same config (its Adam/AdamW checked against torch.optim in test_one_device)."""
    from dataclasses import replace

    import numpy as np

    from partition.topology import single_process
    from partition.train import run_rank
    from partition.weights import assemble

    one = replace(cfg, strategy=replace(cfg.strategy, name="single", schedule="gpipe",
                                        dp="auto", pp=1, tp=1, dp_shard=False,
                                        virtual_stages=None, balance=None),
                  world_size=1)
    want = assemble(one.spec, run_rank(one, single_process("cpu"), None, Ledger()).shards,
                    np.dtype("float64"))
    got = assemble(cfg.spec, [s for r in per for s in r["shards"]], np.dtype("float64"))
    return max(float(np.linalg.norm(got[k] - want[k]) / np.linalg.norm(want[k])) for k in want)


@pytest.mark.parametrize("case", PARAMS)
def test_float64_weights_equal_single_device(runs, case):
    per = _get(runs, case)
    cfg = _hybrid(**CASES[case])
    if cfg.train.optimizer == "sgd":  # autograd + SGD, sharing nothing with the engine
        assert max_rel_err(cfg, per) <= 1e-12
    else:
        assert _single_device_err(cfg, per) <= 1e-12
    # Every rank reports the same J.
    assert len({tuple(p["objective"]) for p in per}) == 1


@pytest.mark.parametrize("case", ["dp2shardxtp2", "dp4shard"])
def test_dp_shard_gradient_pieces_are_autograds(runs, case):
    """Step 0's gradient pieces (reduce-scattered, + λW) against float64 autograd, piece by
    piece as rectangles of the full W."""
    for res in runs[case]:
        assert res["grad_rel_err"] is not None and res["grad_rel_err"] <= 1e-12


def _ledger_by_dim(records: list, step: int) -> dict[str, dict[str, tuple[int, int, int]]]:
    out: dict[str, dict[str, tuple[int, int, int]]] = {}
    for r in records:
        if r.step == step and r.op != "recv":
            b, m, w = out.setdefault(r.dim, {}).get(r.role, (0, 0, 0))
            out[r.dim][r.role] = (b + r.sent, m + 1, w + r.wire)
    return out


@pytest.mark.parametrize("case", PARAMS)
def test_bytes_per_dimension_and_role_are_the_plans(runs, case):
    cfg = _hybrid(**CASES[case])
    s = cfg.strategy
    mesh = resolve_mesh(world=4, dp=s.dp, pp=s.pp, tp=s.tp)
    sched = load_schedule(s.schedule, world=mesh.pp, micro=cfg.train.microbatches,
                          virtual=s.virtual_stages)
    stages = plan_stages(cfg.spec, sched.stages, s.balance)
    for rank, res in enumerate(_get(runs, case)):
        plan = hybrid_calls(cfg.spec, mesh, sched, stages, layout=s.layout, rank=rank,
                            batch=cfg.train.batch_size, micro=cfg.train.microbatches,
                            itemsize=8, dp_shard=s.dp_shard,
                            reshard_after_forward=s.reshard_after_forward)
        want = {dim: {role: (t.bytes, t.messages, t.wire) for role, t in roles.items()}
                for dim, roles in by_dim_role(plan).items()}
        for step in range(cfg.train.steps):
            assert _ledger_by_dim(res["records"], step) == want, (rank, step)
        got = {dim: {role: (v["bytes"], v["messages"]) for role, v in d["by_role"].items()}
               for dim, d in res["comm"]["by_dim"].items()}
        assert got == {dim: {role: v[:2] for role, v in roles.items()}
                       for dim, roles in want.items()}
        # The independent observer saw exactly the recorded crossings, with their bytes
        # (dp_shard's weight gathers are fsdp's flat all-gather into one buffer).
        recorded = [("_allgather_base_" if r.role == "weight_gather" else C10D.get(r.op, r.op),
                     r.sent) for r in res["records"] if r.op != "recv"]
        assert recorded == [(o, b) for o, b in res["observed"] if o != "recv_"]


def test_every_dimension_carries_what_its_strategy_does(runs):
    """dp: weight_grad only; pp: activations and their gradients; tp: the tensor roles."""
    for case in ("dp2xpp2-gpipe", "dp2xtp2", "pp2xtp2-gpipe"):
        for res in runs[case]:
            by_dim = res["comm"]["by_dim"]
            assert set(by_dim.get("dp", {}).get("by_role", {})) <= {"weight_grad"}
            assert set(by_dim.get("pp", {}).get("by_role", {})) <= {"activation", "activation_grad"}
            assert set(by_dim.get("tp", {}).get("by_role", {})) <= {"partial_output", "input_grad"}
            assert set(by_dim["world"]["by_role"]) == {"metric"}
    assert "dp" in runs["dp2xtp2"][0]["comm"]["by_dim"]
    assert "tp" in runs["pp2xtp2-gpipe"][2]["comm"]["by_dim"]
    # dp_shard: the dp links carry fsdp's gathers and reduce-scatters, tp's are unchanged
    for res, plain in zip(runs["dp2shardxtp2"], runs["dp2xtp2"], strict=True):
        by_dim = res["comm"]["by_dim"]
        assert set(by_dim["dp"]["by_role"]) == {"weight_gather", "weight_grad"}
        assert by_dim["tp"] == plain["comm"]["by_dim"]["tp"]


MEMORY_CASES = ["dp2xtp2", "dp2shardxtp2", pytest.param("dp2xpp2-gpipe", marks=pytest.mark.slow),
                pytest.param("pp2xtp2-gpipe", marks=pytest.mark.slow),
                pytest.param("dp2shardxpp2-1f1b-keep-adamw", marks=pytest.mark.slow)]


@pytest.mark.parametrize("case", MEMORY_CASES)
def test_memory_equals_the_dry_run(runs, case):
    from partition.dryrun import dry_run

    cfg = _hybrid(**CASES[case])
    dry = dry_run(cfg)
    for rank, res in enumerate(_get(runs, case)):
        for k in ("params_bytes", "grads_bytes", "optimizer_bytes", "gathered_bytes",
                  "activations_bytes"):
            assert res["memory"][k] == dry[rank].memory[k], (rank, k)
        # As test_fsdp and test_tensor: gloo's worker thread can let go of a collective's
        # buffer after the call returns (seen under load for the tp and dp all-reduces
        # too), so a real peak may exceed the dry run's by at most the largest buffer
        # this rank hands a collective; where the peaks agree, so does the breakdown.
        largest = max((r.collective for r in res["records"] if r.step == 1), default=0)
        for k in ("peak_bytes", "predict_peak_bytes"):
            assert 0 <= res["memory"][k] - dry[rank].memory[k] <= largest, (rank, k)
        if res["memory"]["peak_bytes"] == dry[rank].memory["peak_bytes"]:
            assert res["memory"]["breakdown"] == dry[rank].memory["breakdown"], rank
        assert {d: v["by_role"] for d, v in res["comm"]["by_dim"].items()} == \
            {d: v["by_role"] for d, v in dry[rank].comm["by_dim"].items()}


def test_a_plain_data_dimension_refuses_reshard_after_forward_in_one_line(capsys):
    from experiments.cli import preflight

    with pytest.raises(SystemExit) as e:
        preflight(["world_size=4", "strategy=hybrid", "strategy.tp=2",
                   "strategy.reshard_after_forward=false"])
    assert e.value.code == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "error: strategy.reshard_after_forward=False: only applies to strategy.dp_shard=true "
        "(a plain data dimension keeps full weights, it gathers nothing before a forward)"]


def test_the_dry_run_groups_identical_mesh_ranks():
    from partition.dryrun import signature

    cfg = _hybrid(world_size=1024, **{"strategy.pp": 2, "strategy.tp": 2,
                                       "strategy.balance": [2, 2], "train.batch_size": 512,
                                       "model.dims": [12, 8, 6, 8, 4]})
    distinct = {signature(cfg, r) for r in range(1024)}
    # per pp coordinate: tp rank 0 / 1 × dp replica 0 / others, rank 0 its own
    assert len(distinct) <= 2 * 2 * 2 + 1
    # dp_shard: and by the sizes of the pieces, which differ only where ⌈N/dp⌉ runs out
    sharded = _hybrid(world_size=1024, **{"strategy.pp": 2, "strategy.tp": 2, **SHARD,
                                          "strategy.balance": [2, 2], "train.batch_size": 512})
    assert len({signature(sharded, r) for r in range(1024)}) <= 4 * len(distinct)


@pytest.mark.slow
def test_a_fault_in_one_rank_of_one_group_is_named(tmp_path):
    from test_faults import SLACK_S, _workers

    from partition.launch import run

    before = _workers()
    cfg = _hybrid(**{"strategy.dp": 2, "strategy.tp": 2, "train.steps": 5, "fault.rank": 3,
                     "fault.step": 3, "fault.kind": "raise", "timeout_s": 30})
    result = run(cfg, str(tmp_path))
    assert _workers() - before == set(), "a rank outlived the run"
    err = result["error"]
    assert result["status"] == "failed"
    assert (err["rank"], err["type"]) == (3, "InjectedFault"), err
    assert err["message"] == "fault injected on rank 3 at step 3"
    assert {o["rank"] for o in err["ranks"]} == {0, 1, 2, 3}
    assert all(o["outcome"] != "error" for o in err["ranks"] if o["rank"] != 3)
    assert err["teardown_s"] <= cfg.timeout_s + SLACK_S, err


# ---------------------------------------------------------------- time: calibration, simulation


class _Refuses(Transport):
    """A transport that fails the test if anything would cross."""

    moves = False

    def _no(self, *a):  # noqa: ANN002
        raise AssertionError("the calibration tried to communicate")

    send = recv = isend = irecv = all_reduce = all_gather = reduce_scatter = all_gather_into = _no


def test_calibration_times_each_stage_alone_without_its_tp_collectives():
    """Every rank times the F, B, I, W of each stage it holds (keys `s<stage>:<kind>`) and
    its update, with nothing crossing: a stage's tp collectives are the simulator's."""
    from partition.calibrate import action_times
    from partition.dryrun import meta_dataset
    from partition.model import init_weights
    from partition.strategies import build_runner

    cfg = _hybrid(**{"strategy.pp": 2, "strategy.tp": 2, "strategy.balance": [2, 2]})
    full = init_weights(cfg.spec, cfg.seed)
    for r in range(4):
        ledger = Ledger()
        comm = Comm(rank=r, world_size=4, ledger=ledger, transport=_Refuses())
        runner = build_runner(cfg, Topology(r, 4, r, torch.device("cpu"), "none"), comm,
                              meta_dataset(cfg), full)
        before = [l.W.clone() for l in runner.layers]
        times = action_times(cfg, runner)
        stage = r // 2  # ranks 0, 1 hold stage 0; ranks 2, 3 stage 1
        assert set(times) == {f"s{stage}:{k}" for k in "FBIW"} | {"update", "peak_flops_per_s"}
        assert all(v >= 0 for v in times.values()) and times[f"s{stage}:F"] > 0
        assert ledger.records == []
        assert all(torch.equal(a, l.W) for a, l in zip(before, runner.layers))  # untouched
        assert all(not g.W.any() for st in runner.stages.values() for g in st.grads)


@pytest.mark.parametrize("over", [
    {"strategy.dp": 2, "strategy.tp": 2},
    {"strategy.dp": 2, "strategy.pp": 2, "strategy.schedule": "1f1b",
     "strategy.reshard_after_forward": False},
    {"strategy.dp": 4},
], ids=["dp2shardxtp2", "dp2shardxpp2-keep", "dp4shard"])
def test_calibration_times_a_dp_sharded_stage_with_its_gathers_local(over):
    """dp_shard: every rank times the F, B, I, W of each stage it holds and its update with
    nothing crossing — the dp gathers and reduce-scatters are local copies, left to the
    simulator as comm ops; the pieces are untouched, the gradient pieces zero, the step's
    buffers let go."""
    from partition.calibrate import action_times
    from partition.dryrun import meta_dataset
    from partition.model import init_weights
    from partition.strategies import build_runner

    cfg = _hybrid(**{**over, "strategy.dp_shard": True})
    full = init_weights(cfg.spec, cfg.seed)
    mesh = resolve_mesh(world=4, dp=cfg.strategy.dp, pp=cfg.strategy.pp, tp=cfg.strategy.tp)
    for r in range(4):
        ledger = Ledger()
        comm = Comm(rank=r, world_size=4, ledger=ledger, transport=_Refuses())
        runner = build_runner(cfg, Topology(r, 4, r, torch.device("cpu"), "none"), comm,
                              meta_dataset(cfg), full)
        sharded = [st.sharded for st in runner.stages.values()]
        before = [p.clone() for sh in sharded for p in sh.pieces]
        times = action_times(cfg, runner)
        stage = mesh.coords(r).pp
        assert set(times) == {f"s{stage}:{k}" for k in "FBIW"} | {"update", "peak_flops_per_s"}
        assert all(v >= 0 for v in times.values()) and times[f"s{stage}:F"] > 0
        assert ledger.records == []
        assert all(torch.equal(a, p) for a, p in zip(before, [p for sh in sharded
                                                              for p in sh.pieces]))
        assert all(not g.any() for sh in sharded for g in sh.grad_pieces)
        assert all(not st.held and not st.kept for st in runner.stages.values())
        assert runner.buffers._bufs == {}


def test_calibration_keys_follow_the_ranks_virtual_stages():
    from partition.calibrate import local_action_times

    cfg = _hybrid(**{"strategy.dp": 2, "strategy.pp": 2, "strategy.virtual_stages": 2,
                     "strategy.schedule": "interleaved_1f1b"})
    times = local_action_times(cfg)
    # pp coordinate 0 holds stages 0 and 2, coordinate 1 stages 1 and 3 (ranks 1, 3)
    for r, held in enumerate([(0, 2), (1, 3), (0, 2), (1, 3)]):
        assert set(times[r]) == ({f"s{s}:{k}" for s in held for k in "FBIW"}
                                 | {"update", "peak_flops_per_s"})


def test_a_hybrid_run_predicts_its_step_by_simulation(tmp_path):
    """A real pp=2 × tp=2 run: its result.json has the simulated step, per rank timing,
    the idle fraction simulated next to the measured one and the equal-stages formula
    (P−1)/(M+P−1) = 1/3 over its pp=2 at M=2, a replayable simulation, the closed forms
    (the training peak equal to the dry run's) and the FLOPs the dry run counted."""
    import json

    from partition.launch import run
    from partition.timeline import simulated_from_result

    cfg = _hybrid(**{"strategy.pp": 2, "strategy.tp": 2, "strategy.balance": [2, 2],
                     "train.steps": 3})
    res = run(cfg, str(tmp_path))
    assert res["status"] == "ok", res["error"]
    pred = res["predicted"]
    assert pred["step_time_s"] is not None and pred["not_simulated"] is None
    idle = res["train"]["idle_fraction"]
    assert idle["simulated"] == pred["idle_fraction"] and 0 <= idle["simulated"] <= 1
    assert idle["measured"] is not None
    assert idle["equal_stages_formula"] == pytest.approx(1 / 3)
    assert set(res["train"]["idle_causes"]) == {"schedule", "imbalance", "communication"}
    for r, (mine, p) in enumerate(zip(res["ranks"], pred["ranks"], strict=True)):
        assert p["timing"]["step_s"] == pred["step_time_s"]
        # timed at start-up; the simulated step's are those and what its steps measured
        assert set(mine["startup_action_times"]) == {f"s{r // 2}:{k}" for k in "FBIW"} | {
            "update", "peak_flops_per_s", "inputs"}
        assert set(mine["startup_action_times"]) < set(mine["action_times"])
        assert p["flops"] == p["flops_counted"] > 0
        assert pred["formula"]["ranks"][r]["peak_bytes"] == p["memory"]["peak_bytes"]
    with open(tmp_path / "result.json") as f:
        assert simulated_from_result(json.load(f)).step_time == traced_replay_s(res)
    assert (tmp_path / "timeline.png").stat().st_size > 10_000


def test_a_dp_sharded_run_predicts_its_step_by_simulation(tmp_path):
    """A real dp=2 (shard) × tp=2 run: its result.json has the simulated step (the dp
    gathers and reduce-scatters around each action), the simulated idle fraction next to
    the measured one, and a replayable simulation."""
    import json

    from partition.launch import run
    from partition.timeline import simulated_from_result

    cfg = _hybrid(**{"strategy.tp": 2, "strategy.dp_shard": True, "train.steps": 4,
                     "train.warmup_steps": 1})
    res = run(cfg, str(tmp_path))
    assert res["status"] == "ok", res["error"]
    pred = res["predicted"]
    assert pred["step_time_s"] > 0 and pred["not_simulated"] is None
    idle = res["train"]["idle_fraction"]
    assert idle["simulated"] == pred["idle_fraction"] and 0 <= idle["simulated"] <= 1
    assert idle["measured"] is not None
    for mine in res["ranks"]:
        assert set(mine["startup_action_times"]) == {"s0:F", "s0:B", "s0:I", "s0:W", "update",
                                                     "peak_flops_per_s", "inputs"}
        assert set(mine["startup_action_times"]) < set(mine["action_times"])
    with open(tmp_path / "result.json") as f:
        assert simulated_from_result(json.load(f)).step_time == traced_replay_s(res)


def test_predict_shows_bytes_per_dimension():
    from experiments.predict import render

    comm = {"sent_bytes": 384, "collective_bytes": 24,
            "by_role": {"activation": {"bytes": 384, "messages": 2},
                        "metric": {"bytes": 24, "messages": 1}},
            "by_dim": {"pp": {"bytes": 384, "messages": 2, "wire_bytes": 384, "by_role": {}},
                       "world": {"bytes": 24, "messages": 1, "wire_bytes": 36, "by_role": {}}}}
    pred = {"ranks": [{"rank": 0, "memory": {"peak_bytes": 2**20, "predict_peak_bytes": 2**20},
                       "comm": comm, "flops": 0}]}
    assert render(pred, limit=None)[1].endswith(
        "activation 384 B in 2  | by dim: pp 384 B, world 24 B")


def test_the_report_has_bytes_per_dimension(tmp_path):
    from partition.plots import bytes_by_dim_figure
    from partition.report import build_table

    def result(name, by_dim):
        return {"path": str(tmp_path / name), "status": "ok",
                "run": {"strategy": "hybrid", "world_size": 4, "batch_size": 16,
                        "microbatches": 2},
                "config": {"strategy": {"name": "hybrid", "dp": "auto", "pp": 2, "tp": 2},
                           "train": {"batch_size": 16, "microbatches": 2, "steps": 3},
                           "model": {"dims": [12, 8, 6, 8, 4]}},
                "ranks": [{"comm": {"by_role": {}, "by_dim": by_dim}}]}

    df = build_table([result("a", {"pp": {"bytes": 384}, "tp": {"bytes": 640}}),
                      result("b", {"dp": {"bytes": 960}})])
    assert list(df["variant"]) == ["dp1×pp2×tp2", "dp1×pp2×tp2"]
    assert [df[c].tolist() for c in ("dp_bytes", "pp_bytes", "tp_bytes")] == [
        [0, 960], [384, 0], [640, 0]]
    path = str(tmp_path / "bytes_by_dim.png")
    assert bytes_by_dim_figure(df, path) == path and (tmp_path / "bytes_by_dim.png").stat().st_size
    one_d = df.assign(dp_bytes=None, pp_bytes=None, tp_bytes=None)
    assert bytes_by_dim_figure(one_d, path) is None  # no mesh, no figure


def test_the_report_names_a_sharded_data_dimension(tmp_path):
    from partition.report import build_table

    res = {"path": str(tmp_path / "s"), "status": "ok",
           "run": {"strategy": "hybrid", "world_size": 4, "batch_size": 16, "microbatches": 2},
           "config": {"strategy": {"name": "hybrid", "dp": "auto", "pp": 1, "tp": 2,
                                   "dp_shard": True},
                      "train": {"batch_size": 16, "microbatches": 2, "steps": 3},
                      "model": {"dims": [12, 8, 6, 8, 4]}},
           "ranks": [{"comm": {"by_role": {}, "by_dim": {"dp": {"bytes": 4160}}}}]}
    assert list(build_table([res])["variant"]) == ["dp2(shard)×pp1×tp2"]
