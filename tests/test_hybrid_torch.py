"""strategy=hybrid on engine=torch (engines/hybrid.py) against the explicit engine.

One spawn of 4 gloo ranks runs every case on both engines: float64 weights and J equal to
the explicit engine's (and to single-device SGD) to 1e-12; the bytes the dispatch-mode
observer saw, per (mesh dimension, role), are the plan's (plans/mesh.py `hybrid_calls`)
but for what DTensor places differently (the replicated RowwiseParallel bias, all-reduced
over dp by every tp rank); what torch cannot run is refused before any rank starts.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import make_config, spawn
from strategy_runs import max_rel_err

from partition.comm import Comm, Ledger
from partition.config import ConfigError
from partition.engines.tensor import styles
from partition.plans.mesh import by_dim_role, hybrid_calls
from partition.plans.stages import plan_stages
from partition.plans.traffic import ring_wire_bytes
from partition.strategies.hybrid import config_mesh, mesh_schedule
from partition.topology import Topology
from partition.weights import assemble

TOL = 1e-12


def _hybrid(engine: str, **kw):  # noqa: ANN202
    base = {"model.dims": [12, 8, 6, 8, 4], "train.batch_size": 16, "train.microbatches": 2,
            "data.num_examples": 64, "model.bias": True, "model.weight_decay": 0.01,
            "train.momentum": 0.9, "train.steps": 3}
    base.update(kw)
    return make_config(strategy="hybrid", engine=engine, world_size=base.pop("world_size", 4),
                       **base)


CASES = {  # id -> overrides
    "dp2xtp2": {"strategy.dp": 2, "strategy.tp": 2, "train.grad_check": True},
    "pp2xtp2-gpipe": {"strategy.pp": 2, "strategy.tp": 2, "strategy.balance": [2, 2]},
    "pp2xtp2-1f1b": {"strategy.pp": 2, "strategy.tp": 2, "strategy.balance": [2, 2],
                     "strategy.schedule": "1f1b"},
    "dp2xpp2-1f1b": {"strategy.dp": 2, "strategy.pp": 2, "strategy.schedule": "1f1b"},
}
SLOW = {"pp2xtp2-1f1b", "dp2xpp2-1f1b"}
PARAMS = [pytest.param(k, marks=pytest.mark.slow) if k in SLOW else k for k in CASES]


def _rank_fn(rank: int, world: int, cfgs: list) -> list[dict]:
    from partition.train import run_rank

    out = []
    for cfg in cfgs:
        topo = Topology(rank, world, rank, torch.device("cpu"), "gloo")
        ledger = Ledger()
        rec = run_rank(cfg, topo, Comm(rank=rank, world_size=world, ledger=ledger), ledger)
        out.append({"status": rec.status, "shards": rec.shards, "records": list(ledger.records),
                    "comm": rec.comm, "objective": rec.objective,
                    "grad_rel_err": rec.grad_rel_err})
    return out


_CACHE: dict[tuple[str, ...], dict[tuple[str, str], list[dict]]] = {}


def _results(wanted: tuple[str, ...], world: int = 4) -> dict[tuple[str, str], list[dict]]:
    """{(case, engine): per rank} from one spawn of `world` ranks for both engines."""
    if wanted not in _CACHE:
        keys = [(k, e) for k in wanted for e in ("torch", "explicit")]
        cfgs = [_hybrid(e, world_size=world, **CASES.get(k, {}) | EIGHT.get(k, {}))
                for k, e in keys]
        per_rank = spawn(_rank_fn, world, cfgs, timeout=600)
        _CACHE[wanted] = {key: [per_rank[r][i] for r in range(world)]
                          for i, key in enumerate(keys)}
    return _CACHE[wanted]


@pytest.fixture(scope="module")
def runs(request):
    slow = "not slow" not in (request.config.getoption("-m") or "")
    return _results(tuple(k for k in CASES if slow or k not in SLOW))


def _get(runs, case: str, engine: str) -> list[dict]:
    if (case, engine) not in runs:
        pytest.skip("slow case not in this session's spawn")
    return runs[(case, engine)]


def _weights(cfg, per: list[dict]) -> dict[str, np.ndarray]:  # noqa: ANN001
    return assemble(cfg.spec, [s for r in per for s in r["shards"]], np.dtype("float64"))


def check_same_as_explicit(cfg, torch_runs: list[dict], explicit: list[dict]) -> None:  # noqa: ANN001
    assert [r["status"] for r in torch_runs] == ["ok"] * len(torch_runs)
    got, want = _weights(cfg, torch_runs), _weights(cfg, explicit)
    assert set(got) == set(want)
    for name in want:
        assert np.linalg.norm(got[name] - want[name]) <= TOL * np.linalg.norm(want[name]), name
    assert max_rel_err(cfg, torch_runs) <= TOL
    for r in torch_runs:  # every rank reports the explicit engine's J, every step
        assert np.allclose(r["objective"], explicit[0]["objective"], rtol=TOL, atol=0)
        if cfg.train.grad_check:  # ∂J/∂(each shard) against autograd on the full net
            assert r["grad_rel_err"] is not None and r["grad_rel_err"] <= TOL


@pytest.mark.parametrize("case", PARAMS)
def test_float64_weights_and_J_equal_the_explicit_engines(runs, case):
    check_same_as_explicit(_hybrid("torch", **CASES[case]), _get(runs, case, "torch"),
                           _get(runs, case, "explicit"))


def _torch_plan(cfg, rank: int) -> dict[str, dict[str, tuple[int, int, int]]]:  # noqa: ANN001
    """The plan's {dim: {role: (bytes, messages, wire)}} of one step, as torch moves it:
    RowwiseParallel's bias is replicated, so every tp rank (not tp rank 0 alone) has its
    gradient in the dp all-reduce."""
    mesh, s = config_mesh(cfg), cfg.strategy
    sched = mesh_schedule(cfg, mesh)
    stages = plan_stages(cfg.spec, sched.stages, s.balance)
    plan = hybrid_calls(cfg.spec, mesh, sched, stages, layout=s.layout, rank=rank,
                        batch=cfg.train.batch_size, micro=cfg.train.microbatches, itemsize=8)
    want = {dim: {role: (t.bytes, t.messages, t.wire) for role, t in roles.items()}
            for dim, roles in by_dim_role(plan).items()}
    c = mesh.coords(rank)
    if mesh.dp > 1 and mesh.tp > 1 and c.tp > 0 and cfg.spec.bias:
        extra = 0
        for st in sched.rank_stages(c.pp):
            start, end = stages[st]
            extra += sum(cfg.spec.dims[start + l + 1] * 8
                         for l, kind in enumerate(styles(end - start, s.layout)) if kind == "row")
        n, m, _ = want["dp"]["weight_grad"]
        want["dp"]["weight_grad"] = (n + extra, m, ring_wire_bytes("all_reduce", n + extra,
                                                                   mesh.dp))
    return want


def _ledger_by_dim(records: list, step: int) -> dict[str, dict[str, tuple[int, int, int]]]:
    """What the observer recorded in one step, torch's one-off `metadata` left out."""
    out: dict[str, dict[str, tuple[int, int, int]]] = {}
    for r in records:
        if r.step == step and r.op != "recv" and r.role != "metadata":
            b, m, w = out.setdefault(r.dim, {}).get(r.role, (0, 0, 0))
            out[r.dim][r.role] = (b + r.sent, m + 1, w + r.wire)
    return out


def check_bytes_are_the_plans(cfg, per: list[dict]) -> None:  # noqa: ANN001
    for rank, res in enumerate(per):
        want = _torch_plan(cfg, rank)
        for step in range(cfg.train.steps):
            assert _ledger_by_dim(res["records"], step) == want, (rank, step)
        # Every record names its mesh dimension; torch's one-offs (pipelining's shape vote
        # on the first step, DDP's bucket order on the second) stay out of later steps.
        assert {r.dim for r in res["records"]} <= {"dp", "pp", "tp", "world"}
        assert all(r.role != "metadata" for r in res["records"] if r.step >= 2)
        # result.json's by_dim (the last step's) says the same.
        got = {dim: {role: (v["bytes"], v["messages"]) for role, v in d["by_role"].items()}
               for dim, d in res["comm"]["by_dim"].items()}
        assert got == {dim: {role: v[:2] for role, v in roles.items()}
                       for dim, roles in want.items()}


@pytest.mark.parametrize("case", PARAMS)
def test_bytes_per_dimension_and_role_are_the_plans(runs, case):
    check_bytes_are_the_plans(_hybrid("torch", **CASES[case]), _get(runs, case, "torch"))


EIGHT = {"dp2xpp2xtp2": {"strategy.dp": 2, "strategy.pp": 2, "strategy.tp": 2,
                         "strategy.balance": [2, 2]}}


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_all_three_dimensions_at_world_size_8():
    runs = _results(tuple(EIGHT), world=8)
    cfg = _hybrid("torch", world_size=8, **EIGHT["dp2xpp2xtp2"])
    check_same_as_explicit(cfg, runs[("dp2xpp2xtp2", "torch")],
                           runs[("dp2xpp2xtp2", "explicit")])
    check_bytes_are_the_plans(cfg, runs[("dp2xpp2xtp2", "torch")])


# ---------------------------------------------------------------- refused, no processes


@pytest.mark.parametrize(("kw", "key", "words"), [
    ({"strategy.dp": 2, "strategy.pp": 2, "strategy.schedule": "zb1p"}, "strategy.schedule",
     "DDP all-reduces the gradients of a full backward only"),
    ({"strategy.pp": 2, "strategy.tp": 2, "strategy.schedule": "1f1b", "train.microbatches": 1},
     "train.microbatches", "Schedule1F1B needs >= strategy.pp=2 micro-batches"),
    ({"strategy.tp": 2, "model.dims": [12, 7, 6, 8, 4]}, "model.dims",
     "width 7 (layer 1) divisible by strategy.tp=2"),
])
def test_what_torch_cannot_run_is_refused_in_one_line(kw, key, words):
    with pytest.raises(ConfigError) as e:
        _hybrid("torch", **kw)
    assert e.value.key == key and words in str(e.value) and "\n" not in str(e.value)
    _hybrid("explicit", **kw)  # the explicit engine runs each of them
