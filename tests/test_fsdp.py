"""Sharded data parallel (issue 16): ZeRO stages 1, 2, 3 on the explicit engine, FSDP2 on torch's.

The cases join the shared spawn of strategy_runs (one spawn of P ranks per world size for
every registered suite); the plan tests need no processes at all.
"""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from conftest import ROOT, make_config, spawn
from strategy_runs import max_rel_err, register, results, role_traffic, run_cases, single_predict

from partition import costs
from partition.comm import summarize
from partition.config import ConfigError
from partition.plans import fsdp as plan
from partition.plans.split import split_evenly
from partition.weights import assemble

BASE = {"strategy": "fsdp", "train.batch_size": 10, "train.steps": 3, "train.grad_check": True}
# B = 10: uneven row shares at P = 3 (4, 3, 3) and P = 4 (3, 3, 2, 2); layer sizes that
# no P in 2–4 divides (35, 20, 54+6, …), so every piece but the last carries padding.
NETS = {
    "2L": {"model.dims": [7, 5, 4], "model.weight_decay": 0.01},
    "3L-bias-M2": {"model.dims": [6, 7, 5, 4], "model.bias": True, "model.activation": "tanh",
                   "model.loss": "squared_error", "train.microbatches": 2},
    "4L-bias-momentum": {"model.dims": [9, 6, 7, 5, 3], "model.bias": True,
                         "model.weight_decay": 0.01, "train.momentum": 0.9},
}
CASES = [(f"z{z}-{net}", {**over, "strategy.zero_stage": z})
         for z in (1, 2, 3) for net, over in NETS.items()]
CASES += [
    ("z3-keep-3L-bias-M2", {**NETS["3L-bias-M2"], "strategy.reshard_after_forward": False}),
    ("z3-keep-4L-bias-momentum", {**NETS["4L-bias-momentum"],
                                  "strategy.reshard_after_forward": False}),
    ("z3-seed-f64", {"model.dims": [784, 256, 10], "train.batch_size": 32}),
    # FSDP2 (torch engine), zero stage 3: with and without resharding after forward
    ("torch-2L", {**NETS["2L"], "engine": "torch"}),
    ("torch-keep-4L-bias-momentum", {**NETS["4L-bias-momentum"], "engine": "torch",
                                     "strategy.reshard_after_forward": False}),
]
NAMES = [n for n, _ in CASES]
EXPLICIT = [n for n in NAMES if not n.startswith("torch-")]

register("fsdp", lambda P: [make_config(**{**BASE, **over, "world_size": P})
                            for _, over in CASES])


@pytest.fixture(scope="module", params=[1, 2, 3, 4], ids=lambda p: f"P{p}")
def runs(request):
    P = request.param
    cfgs, res = results("fsdp", P)  # res[case][rank]
    return P, dict(zip(NAMES, zip(cfgs, res, strict=True), strict=True))


def itemsize(cfg) -> int:
    return 8 if cfg.train.dtype == "float64" else 4


def shards_of(cfg) -> list[plan.FlatShard]:
    return plan.shard_plan(cfg.model.dims, world=cfg.world_size, bias=cfg.model.bias)


def plan_calls(cfg) -> list[plan.Call]:
    return plan.fsdp_calls(shards_of(cfg), zero_stage=cfg.strategy.zero_stage,
                           reshard_after_forward=cfg.strategy.reshard_after_forward,
                           micro=cfg.train.microbatches, itemsize=itemsize(cfg))


# ---------------------------------------------------------------- exactness


def test_weights_match_single_device(runs):
    P, by_name = runs
    for name, (cfg, res) in by_name.items():
        err = max_rel_err(cfg, res)
        assert err <= 1e-12, f"{name} P={P}: weights off by {err:.3g}"
        for r, rr in enumerate(res):  # each rank's gradient piece is the full batch's
            assert rr["grad_rel_err"] <= 1e-12, f"{name} P={P} rank {r}"
        assert all(rr["objective"] == res[0]["objective"] for rr in res), name


def test_torch_engine_matches_the_explicit_engine(runs):
    """FSDP2 and the explicit stage 3 end at the same weights (both also match SGD above)."""
    P, by_name = runs
    for torch_name, explicit_name in (("torch-2L", "z3-2L"),
                                      ("torch-keep-4L-bias-momentum",
                                       "z3-keep-4L-bias-momentum")):
        (tc, tres), (ec, eres) = by_name[torch_name], by_name[explicit_name]
        got = assemble(tc.spec, [s for rr in tres for s in rr["shards"]], np.dtype("float64"))
        want = assemble(ec.spec, [s for rr in eres for s in rr["shards"]], np.dtype("float64"))
        for k in want:
            assert np.linalg.norm(got[k] - want[k]) <= 1e-12 * np.linalg.norm(want[k]), \
                (torch_name, P, k)


def test_pieces_cover_every_weight_once(runs):
    """weights.npz comes from every rank's real elements: together exactly the full net."""
    P, by_name = runs
    for name in EXPLICIT:
        cfg, res = by_name[name]
        counted = {k: np.zeros(v.shape, dtype=int) for k, v in
                   assemble(cfg.spec, [s for rr in res for s in rr["shards"]],
                            np.dtype("float64")).items()}
        for rr in res:
            for s in rr["shards"]:
                r = slice(*s.rows) if s.rows else slice(None)
                c = slice(*s.cols) if s.cols else slice(None)
                if s.values.ndim == 1:
                    counted[s.name][r] += 1
                else:
                    counted[s.name][r, c] += 1
        assert all((v == 1).all() for v in counted.values()), name


def test_prediction_forward_covers_the_batch_in_rank_order(runs):
    _, by_name = runs
    for name, (cfg, res) in by_name.items():
        want = single_predict(cfg)
        got = np.concatenate([rr["predict"] for rr in res])  # each rank predicts its own rows
        assert got.shape == want.shape
        assert np.linalg.norm(got - want) <= 1e-12 * np.linalg.norm(want), name


# ---------------------------------------------------------------- bytes


def test_ledger_is_the_plan_call_by_call(runs):
    """Every training collective of every step: op, role, phase, payload, received, wire —
    exactly the plan's, in its order, then the metric."""
    P, by_name = runs
    for name in EXPLICIT:
        cfg, res = by_name[name]
        want = [(c.op, c.role, c.phase, c.payload, c.received, c.wire) for c in plan_calls(cfg)]
        want.append(("all_reduce", "metric", "metric", 24, 0, 2 * (P - 1) * 24 // P))
        for r, rr in enumerate(res):
            for step in range(cfg.train.steps):
                got = [(x.op, x.role, x.phase, x.sent, x.received, x.wire)
                       for x in rr["records"] if x.step == step]
                assert got == want, f"{name} P={P} rank {r} step {step}"


def test_bytes_per_role_by_hand(runs):
    """The byte formulas of plans/fsdp.py written out for the 2-layer net [7, 5, 4], no
    bias, float64: N = 35 and 20 elements, pieces c = ⌈N/P⌉, one micro-batch."""
    P, by_name = runs
    c0, c1 = -(-35 // P), -(-20 // P)
    piece, padded = (c0 + c1) * 8, P * (c0 + c1) * 8
    want = {
        1: {"weight_grad": (55 * 8, 1, 2 * (P - 1) * 55 * 8 // P),
            "weight_gather": (piece, 2, (P - 1) * piece)},
        2: {"weight_grad": (padded, 2, (P - 1) * c0 * 8 + (P - 1) * c1 * 8),
            "weight_gather": (piece, 2, (P - 1) * piece)},
        3: {"weight_grad": (padded, 2, (P - 1) * c0 * 8 + (P - 1) * c1 * 8),
            "weight_gather": (2 * piece, 4, 2 * (P - 1) * piece)},
    }
    for z in (1, 2, 3):
        cfg, res = by_name[f"z{z}-2L"]
        expect = {**(want[z] if P > 1 else {}), "metric": (24, 1, 2 * (P - 1) * 24 // P)}
        for rr in res:
            got = role_traffic(rr["records"], 1)
            assert {k: (v["bytes"], v["messages"], v["wire"]) for k, v in got.items()} == expect
        by_plan = plan.role_traffic(plan_calls(cfg))
        assert {k: (v["bytes"], v["messages"], v["wire"]) for k, v in by_plan.items()} == \
            (want[z] if P > 1 else {})


def test_stage3_wire_is_about_one_and_a_half_data_parallel():
    """Seed net, P = 4, float32: stage 3 puts 1.5× data parallel's wire bytes on the wire
    (to within the padding); without resharding, 1×."""
    dims, P = [784, 256, 10], 4
    shards = plan.shard_plan(dims, world=P, bias=False)
    N = sum(s.numel for s in shards) * 4
    data_wire = plan.ring_wire("all_reduce", N, P)

    def wire(reshard: bool) -> int:
        return sum(c.wire for c in plan.fsdp_calls(shards, zero_stage=3, micro=1, itemsize=4,
                                                   reshard_after_forward=reshard))

    assert wire(True) == 3 * (P - 1) * N // P == 1.5 * data_wire  # N divisible by 4: no padding
    assert wire(False) == 2 * (P - 1) * N // P == data_wire


def test_observer_sees_exactly_the_recorded_ops(runs):
    """Nothing crossed around the ledger: the dispatch-mode observer saw the same ops."""
    c10d = {"all_gather": "_allgather_base_", "reduce_scatter": "reduce_scatter_",
            "all_reduce": "allreduce_"}
    P, by_name = runs
    for name in EXPLICIT:
        for r, rr in enumerate(by_name[name][1]):
            recorded = [(c10d[x.op], x.sent) for x in rr["records"]]
            assert recorded == rr["observed"], f"{name} P={P} rank {r}"


def test_torch_engine_bytes_are_fsdp2s(runs):
    """FSDP2 shards W's rows (⌈n_out/P⌉ each, padded) and gathers a layer's W and b in one
    call: piece = ⌈n_out/P⌉·(n_in + [bias])·b; reduce-scatter P pieces; forward gathers
    each layer, backward again unless kept."""
    P, by_name = runs
    for name in ("torch-2L", "torch-keep-4L-bias-momentum"):
        cfg, res = by_name[name]
        dims, bias = cfg.model.dims, cfg.model.bias
        pieces = [-(-dims[l + 1] // P) * (dims[l] + bias) * 8 for l in range(len(dims) - 1)]
        gathers = 2 if cfg.strategy.reshard_after_forward else 1
        want = {"metric": (24, 1)}
        if P > 1:
            want["weight_gather"] = (gathers * sum(pieces), gathers * len(pieces))
            want["weight_grad"] = (P * sum(pieces), len(pieces))
        for rr in res:
            got = role_traffic(rr["records"], 1)
            assert {k: (v["bytes"], v["messages"]) for k, v in got.items()} == want, name
            if P > 1:
                assert got["weight_gather"]["phases"] == (
                    {"forward", "backward"} if gathers == 2 else {"forward"})


def test_costs_predict_the_measured_messages(runs):
    """costs.messages reads the fsdp plan: its messages are the measured ones."""
    P, by_name = runs
    keys = ("sent_bytes", "recv_bytes", "collective_bytes", "wire_bytes", "messages", "by_role")
    for name in EXPLICIT:
        cfg, res = by_name[name]
        for r, rr in enumerate(res):
            measured = summarize([x for x in rr["records"] if x.step == 1])
            predicted = summarize(costs.messages(cfg, r))
            assert {k: measured[k] for k in keys} == {k: predicted[k] for k in keys}, name


# ---------------------------------------------------------------- memory


def test_memory_is_the_closed_form(runs):
    """params, grads, optimizer state, the gathered layers alive at once and the kept
    activations: measured = plans.fsdp.memory, to the byte. The peak is at least the
    closed form's sum (which also counts the unsharded gradient being reduce-scattered);
    what it adds — the batch, dJ/dz and other temporaries — is in docs/fsdp.md."""
    P, by_name = runs
    for name in EXPLICIT:
        cfg, res = by_name[name]
        for r, rr in enumerate(res):
            lo, hi = split_evenly(cfg.train.batch_size, P)[r]
            want = plan.memory(cfg.model.dims, world=P, rank=r, rows=hi - lo,
                               micro=cfg.train.microbatches, zero_stage=cfg.strategy.zero_stage,
                               reshard_after_forward=cfg.strategy.reshard_after_forward,
                               bias=cfg.model.bias, momentum=bool(cfg.train.momentum),
                               itemsize=itemsize(cfg))
            m = rr["memory"]
            for k in ("params_bytes", "grads_bytes", "optimizer_bytes", "gathered_bytes",
                      "activations_bytes"):
                assert m[k] == want[k], (name, P, r, k, m[k], want[k])
            assert m["peak_bytes"] >= want["peak_bytes"], (name, P, r)
            f = costs.formula(cfg, r)
            assert {k: f[k] for k in want if k in f} == {k: want[k] for k in want if k in f}
            # the dry run is the real runner: measured = dry run, to the byte
            dry = costs.rank_cost(cfg, r).memory()
            for k in ("params_bytes", "grads_bytes", "optimizer_bytes", "gathered_bytes",
                      "activations_bytes"):
                assert m[k] == dry[k], (name, P, r, k, m[k], dry[k])
            # The peak: gloo's worker thread can let go of a collective's buffer after the
            # call returns (seen: 96 B on one rank of a 3-layer net), so a real run may
            # exceed the dry run by at most the largest buffer it hands a collective.
            largest = max((x.collective for x in rr["records"] if x.step == 1), default=0)
            assert 0 <= m["peak_bytes"] - dry["peak_bytes"] <= largest, (name, P, r)


def test_seed_stage3_holds_a_quarter_at_p4(runs):
    """Seed net [784, 256, 10], float64: 203,264 parameters; at P = 4 each rank holds
    50,816 of them (no padding: 200,704 and 2,560 both divide by 4) and gradients alike;
    the gathered W¹ (1,605,632 B) is the largest buffer alive at once."""
    P, by_name = runs
    if P != 4:
        pytest.skip("the figures are for P = 4")
    _, res = by_name["z3-seed-f64"]
    for rr in res:
        m = rr["memory"]
        assert m["params_bytes"] == m["grads_bytes"] == 50_816 * 8
        assert m["gathered_bytes"] == 784 * 256 * 8


# ---------------------------------------------------------------- the plan, pure


@pytest.mark.parametrize("n,P", [(35, 2), (35, 3), (35, 4), (5, 4), (3, 4), (20, 4), (1, 3)])
def test_pieces_tile_the_flat_storage(n, P):
    ranges = [plan.chunk_range(n, P, r) for r in range(P)]
    assert ranges[0][0] == 0 and ranges[-1][1] == n
    assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
    c = -(-n // P)
    assert all(hi - lo <= c for lo, hi in ranges)


@pytest.mark.parametrize("n_out,n_in,bias,P", [(5, 7, False, 3), (4, 5, True, 4), (3, 6, True, 4),
                                               (6, 9, True, 2), (1, 1, False, 3)])
def test_rectangles_cover_each_weight_once(n_out, n_in, bias, P):
    s = plan.FlatShard(0, n_out, n_in, bias, P)
    W, b = np.zeros((n_out, n_in), dtype=int), np.zeros(n_out, dtype=int)
    for r in range(P):
        at = 0
        for p in s.pieces(r):
            assert p.span[0] == at  # contiguous, in order
            at = p.span[1]
            if p.tensor == "W":
                (r0, r1), (c0, c1) = p.rows, p.cols
                assert (r1 - r0) * (c1 - c0) == p.span[1] - p.span[0]
                W[r0:r1, c0:c1] += 1
            else:
                b[p.rows[0]:p.rows[1]] += 1
        assert at == s.valid(r)
    assert (W == 1).all() and (b == (1 if bias else 0)).all()
    assert s.padded - s.numel == s.padding < P


def test_plan_calls_count_per_stage():
    shards = plan.shard_plan([6, 7, 5, 4], world=3, bias=True)  # L = 3
    count = {}
    for z, keep in ((1, True), (2, True), (3, True), (3, False)):
        calls = plan.fsdp_calls(shards, zero_stage=z, reshard_after_forward=keep, micro=2,
                                itemsize=8)
        count[z, keep] = {(c.role, c.phase): 0 for c in calls}
        for c in calls:
            count[z, keep][c.role, c.phase] += 1
    assert count[1, True] == {("weight_grad", "update"): 1, ("weight_gather", "update"): 3}
    assert count[2, True] == {("weight_grad", "backward"): 6, ("weight_gather", "update"): 3}
    assert count[3, True] == {("weight_gather", "forward"): 6, ("weight_gather", "backward"): 6,
                              ("weight_grad", "backward"): 6}
    assert count[3, False] == {("weight_gather", "forward"): 6, ("weight_grad", "backward"): 6}
    assert plan.fsdp_calls(plan.shard_plan([6, 7, 4], world=1, bias=True), zero_stage=3,
                           reshard_after_forward=True, micro=1, itemsize=8) == []


def test_plan_wire_is_comms():
    from partition.comm import ring_wire_bytes

    for op in ("all_reduce", "all_gather", "reduce_scatter"):
        for n in (0, 1, 24, 1000, 12345):
            for p in (1, 2, 3, 4, 7):
                assert plan.ring_wire(op, n, p) == ring_wire_bytes(op, n, p)


def test_plan_module_needs_no_torch():
    code = ("import sys, partition.plans.fsdp; "
            "assert 'torch' not in sys.modules, sorted(m for m in sys.modules if 'torch' in m)")
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)


def test_config_keys():
    cfg = make_config(strategy="fsdp", world_size=2)
    assert (cfg.strategy.zero_stage, cfg.strategy.reshard_after_forward) == (3, True)
    with pytest.raises(ConfigError, match=r"strategy.zero_stage=0: must be one of 1, 2, 3"):
        make_config(strategy="fsdp", **{"strategy.zero_stage": 0})
    with pytest.raises(ConfigError, match=r"strategy.reshard_after_forward=False"):
        make_config(strategy="fsdp", **{"strategy.zero_stage": 1,
                                        "strategy.reshard_after_forward": False})
    with pytest.raises(ConfigError, match=r"strategy.zero_stage=2: engine=torch runs FSDP2"):
        make_config(strategy="fsdp", engine="torch", world_size=2,
                    **{"strategy.zero_stage": 2})
    with pytest.raises(ConfigError, match=r"train.batch_size=3: fsdp parallel needs"):
        make_config(strategy="fsdp", world_size=4, **{"train.batch_size": 3})


# ---------------------------------------------------------------- a fault in a gather


def _gather_fault(rank: int, world: int, cfg, run_dir: str, bad_rank: int, bad_step: int) -> str:
    """One rank of a run whose `bad_rank` raises inside its first backward all-gather of
    step `bad_step`; every rank leaves its error record as the launcher's ranks do."""
    import torch

    from partition.comm import Comm, Ledger
    from partition.failures import record_error
    from partition.topology import Topology
    from partition.train import InjectedFault, run_rank

    class FaultyComm(Comm):
        def all_gather_into(self, out, piece, *, role, phase):  # noqa: ANN001, ANN202
            if self.ledger.step == bad_step and phase == "backward":
                raise InjectedFault(f"fault injected on rank {self.rank} in a {phase} gather "
                                    f"at step {bad_step}")
            return super().all_gather_into(out, piece, role=role, phase=phase)

    ledger = Ledger()
    kind = FaultyComm if rank == bad_rank else Comm
    comm = kind(rank=rank, world_size=world, ledger=ledger)
    try:
        run_rank(cfg, Topology(rank, world, rank, torch.device("cpu"), "gloo"), comm, ledger)
    except Exception as e:  # noqa: BLE001 - what the launcher's rank_entry records
        record_error(run_dir, rank, e)
        return type(e).__name__
    return "ok"


@pytest.mark.parametrize("P,bad", [(3, 1)])
def test_a_rank_raising_in_a_gather_is_named(tmp_path, P, bad):
    from partition.failures import diagnose

    cfg = make_config(**{**BASE, **NETS["2L"], "world_size": P, "train.steps": 3,
                         "timeout_s": 20})
    outcome = spawn(_gather_fault, P, cfg, str(tmp_path), bad, 1, timeout=120)
    assert outcome[bad] == "InjectedFault"
    assert all(o != "ok" for o in outcome), outcome  # the peers could not finish the gather
    err = diagnose(str(tmp_path), ranks=P, timeout_s=cfg.timeout_s)
    assert (err.rank, err.type, err.cause) == (bad, "InjectedFault", "error")
    assert "backward gather at step 1" in err.message
    assert {o["rank"]: o["outcome"] for o in err.others} == \
        {r: "error" if r == bad else "knock_on" for r in range(P)}


# ---------------------------------------------------------------- the whole path


def test_run_through_the_launcher(tmp_path):
    """`launch.run` as `python -m experiments.run strategy=fsdp world_size=2` uses it:
    result.json and weights.npz, the measured bytes = the predicted ones."""
    from partition.launch import run

    over = {"model.dims": [9, 7, 5], "model.bias": True, "train.batch_size": 11,
            "train.steps": 3, "train.grad_check": True}
    result = run(make_config(strategy="fsdp", world_size=2, **over), str(tmp_path / "fsdp"))
    single = run(make_config(strategy="single", **over), str(tmp_path / "single"))
    assert result["status"] == "ok" and single["status"] == "ok"
    on_disk = json.loads((tmp_path / "fsdp" / "result.json").read_text())
    assert on_disk["config"]["strategy"]["zero_stage"] == 3
    assert result["check"]["grad_max_rel_err"] <= 1e-12
    with np.load(tmp_path / "fsdp" / "weights.npz") as a, \
            np.load(tmp_path / "single" / "weights.npz") as b:
        assert sorted(a.files) == sorted(b.files) == ["W1", "W2", "b1", "b2"]
        for k in a.files:
            assert np.linalg.norm(a[k] - b[k]) <= 1e-12 * np.linalg.norm(b[k]), k
    # layer 1: 7·9 + 7 = 70 elements, 35 a piece; layer 2: 5·7 + 5 = 40, 20 a piece
    gather, rs = (35 + 20) * 8, 2 * (35 + 20) * 8
    for rank, pred in zip(on_disk["ranks"], on_disk["predicted"]["ranks"], strict=True):
        assert rank["comm"]["by_role"] == {"metric": {"bytes": 24, "messages": 1},
                                           "weight_gather": {"bytes": 2 * gather, "messages": 4},
                                           "weight_grad": {"bytes": rs, "messages": 2}}
        assert pred["comm"]["by_role"] == rank["comm"]["by_role"]
        assert rank["memory"]["params_bytes"] == (35 + 20) * 8
    assert on_disk["prediction_error"]["max_abs"]["comm"] == 0


@pytest.mark.slow
@pytest.mark.parametrize("P", [2, 3, 4])
def test_wider_sweep_matches_single_device(P):
    sweep = [{"model.dims": [13, 11, 17, 9, 7, 5], "model.activation": act, "model.loss": loss,
              "model.bias": bias, "train.batch_size": 15, "train.microbatches": M,
              "train.momentum": 0.5, "model.weight_decay": 0.001, "strategy.zero_stage": z,
              "strategy.reshard_after_forward": keep}
             for act, loss in (("relu", "cross_entropy"), ("sigmoid", "squared_error"))
             for bias in (False, True) for M in (1, 3)
             for z, keep in ((1, True), (2, True), (3, True), (3, False))]
    cfgs = [make_config(**{**BASE, **over, "world_size": P}) for over in sweep]
    per_rank = spawn(run_cases, P, cfgs, timeout=900)
    for i, cfg in enumerate(cfgs):
        res = [per_rank[r][i] for r in range(P)]
        assert max_rel_err(cfg, res) <= 1e-12, sweep[i]
        want = [(c.op, c.role, c.phase, c.payload) for c in plan_calls(cfg)]
        for rr in res:
            got = [(x.op, x.role, x.phase, x.sent) for x in rr["records"]
                   if x.step == 1 and x.role != "metric"]
            assert got == want, sweep[i]
