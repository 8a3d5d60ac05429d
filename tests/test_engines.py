"""PyTorch's own engines (engine=torch) against the single-device explicit engine (issue 8).

In float64 every torch engine must end at the weights of single-device training to
1e-10, report the same J every step, and the dispatch-mode observer must put
exactly the strategy's payload into the ledger.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import make_config, spawn

from partition.comm import Comm, Ledger
from partition.data import load_dataset
from partition.engines.observe import SeenOp, to_records
from partition.engines.tensor import chunk_range, styles
from partition.model import forward_layers, init_weights, make_layer
from partition.strategies import build_runner
from partition.topology import Topology
from partition.train import run_rank
from partition.weights import assemble

TOL = 1e-10
F64 = 8


def _train_cases(rank: int, world: int, cases: list[dict]) -> list:
    """Each case's RankRecord on this rank (one process group for all of them), with the
    ledger of every step and a prediction at the initial weights."""
    out = []
    for over in cases:
        cfg = make_config(**over)
        topo = Topology(rank, world, rank, torch.device("cpu"), "gloo")
        ledger = Ledger()
        comm = Comm(rank=rank, world_size=world, ledger=ledger)
        rec = run_rank(cfg, topo, comm, ledger)
        rec.all_steps = [ledger.step_summary(s) for s in range(cfg.train.steps)]
        data = load_dataset(cfg.data, cfg.spec, seed=cfg.seed)
        full = init_weights(cfg.spec, cfg.seed)
        pred = build_runner(cfg, topo, comm, data, full).predict(0)
        # numpy, not a tensor: torch's queue would share a tensor's storage with a process
        # that is about to exit.
        rec.predicted = None if pred is None else pred.numpy()
        out.append(rec)
    return out


def _single(over: dict):
    single = dict(over, strategy="single", engine="explicit", world_size=1,
                  **{"train.microbatches": 1, "strategy.schedule": "gpipe"})
    cfg = make_config(**single)
    topo = Topology(0, 1, 0, torch.device("cpu"), "none")
    return run_rank(cfg, topo, None, Ledger())


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def check_same_as_single(over: dict, recs: list) -> None:
    cfg = make_config(**over)
    ref = _single(over)
    got = assemble(cfg.spec, [s for r in recs for s in r.shards], np.dtype("float64"))
    want = assemble(cfg.spec, ref.shards, np.dtype("float64"))
    assert set(got) == set(want)
    for name in want:
        assert _rel(got[name], want[name]) <= TOL, name
    for r in recs:
        assert r.status == "ok"
        assert np.allclose(r.objective, ref.objective, rtol=TOL, atol=0)
        assert np.allclose(r.data_loss, ref.data_loss, rtol=TOL, atol=0)
        assert r.accuracy == ref.accuracy


def roles(rec) -> dict[str, tuple[int, int]]:
    return {k: (v["bytes"], v["messages"]) for k, v in rec.comm["by_role"].items()}


BASE = {"world_size": 2, "engine": "torch", "model.weight_decay": 0.01, "train.momentum": 0.9,
        "train.steps": 3, "train.batch_size": 32}


# ---------------------------------------------------------------- the default suite


DEFAULT_CASES = [
    dict(BASE, strategy="pipeline", **{"train.microbatches": 2, "train.grad_check": True}),
    dict(BASE, strategy="pipeline", **{"strategy.schedule": "1f1b", "train.microbatches": 4}),
    dict(BASE, strategy="tensor", **{"model.bias": True, "train.grad_check": True}),
    dict(BASE, strategy="data", **{"train.steps": 4, "train.warmup_steps": 2,
                                   "train.grad_check": True}),
]


@pytest.fixture(scope="module")
def default_runs() -> list[list]:
    res = spawn(_train_cases, 2, DEFAULT_CASES, timeout=240)
    return [[res[r][k] for r in range(2)] for k in range(len(DEFAULT_CASES))]


@pytest.mark.timeout(300)
@pytest.mark.parametrize("k", range(len(DEFAULT_CASES)),
                         ids=["pipeline-gpipe-M2", "pipeline-1f1b-M4", "tensor-bias", "data"])
def test_torch_engine_ends_at_single_device_weights(default_runs, k):
    check_same_as_single(DEFAULT_CASES[k], default_runs[k])


@pytest.mark.timeout(300)
def test_grad_check_of_torch_engines(default_runs):
    for k, over in enumerate(DEFAULT_CASES):
        if over.get("train.grad_check"):
            for r in default_runs[k]:
                assert r.grad_rel_err is not None and r.grad_rel_err <= TOL


@pytest.mark.timeout(300)
def test_observed_bytes_are_the_strategy_payload(default_runs):
    B, (d, h, q) = 32, (784, 256, 10)
    metric = (3 * F64, 1)  # [L sum, s part, correct], once per step
    # pipeline: the boundary activation forward and its gradient back, B·h each, in M messages.
    for k, M in ((0, 2), (1, 4)):
        r0, r1 = default_runs[k]
        assert roles(r0) == {"activation": (B * h * F64, M), "metric": metric}
        assert roles(r1) == {"activation_grad": (B * h * F64, M), "metric": metric}
        assert r0.comm["sent_bytes"] == r0.comm["recv_bytes"] == B * h * F64
        # GPipe: every stage holds all M; 1F1B: stage i holds min(P − i, M) (torch's forward cache).
        assert (r0.in_flight_max, r1.in_flight_max) == ((M, M) if k == 0 else (2, 1))
    # tensor (megatron, seed net): one all-reduce of the partial outputs o, nothing backward.
    for r in default_runs[2]:
        assert roles(r) == {"partial_output": (B * q * F64, 1), "metric": metric}
        assert r.comm["wire_bytes"] == B * q * F64 + 3 * F64  # ring all-reduce, P=2: N
    # data: one all-reduce of every weight gradient (DDP's one bucket), biases included.
    params = d * h + h * q
    for r in default_runs[3]:
        assert roles(r) == {"weight_grad": (params * F64, 1), "metric": metric}
    for runs in default_runs:
        for r in runs:
            assert r.comm_steps_equal


@pytest.mark.timeout(300)
def test_prediction_forward_matches_the_explicit_one(default_runs):
    for over, runs in zip(DEFAULT_CASES, default_runs, strict=True):
        cfg = make_config(**over)
        full = init_weights(cfg.spec, cfg.seed)
        X, _ = load_dataset(cfg.data, cfg.spec, seed=cfg.seed).batch(
            0, cfg.train.batch_size, shuffle=False, seed=cfg.seed, dtype=torch.float64)
        layers = [make_layer(full, l, dtype=torch.float64) for l in range(cfg.spec.num_layers)]
        want = forward_layers(cfg.spec, layers, X, keep=False)[0].numpy()
        if cfg.strategy.name == "pipeline":  # the last stage holds the output
            assert runs[0].predicted is None
            got = runs[1].predicted
        elif cfg.strategy.name == "data":  # each rank its own rows
            got = np.concatenate([r.predicted for r in runs])
        else:  # tensor: replicated
            assert np.array_equal(runs[0].predicted, runs[1].predicted)
            got = runs[0].predicted
        assert _rel(got, want) <= TOL


def test_first_steps_show_torch_setup_traffic(default_runs):
    """Honest about torch's one-offs: pipelining's 4-byte vote, DDP's bucket-order broadcast."""
    for k in (0, 1):
        first = default_runs[k][0].all_steps[0]["by_role"]
        assert first["metadata"] == {"bytes": 4, "messages": 1}
    second = default_runs[3][0].all_steps[1]["by_role"]
    assert second["metadata"]["messages"] == 2


def test_records_from_what_the_observer_saw():
    seen = [
        SeenOp("send", "c10d::send", 100, 1, (5, 5), torch.float32, "forward", 0.25),
        SeenOp("recv", "c10d::recv_", 100, 1, (5, 5), torch.float32, "forward", 0.5),
        SeenOp("all_reduce", "_c10d_functional::all_reduce", 40, None, (10,), torch.float32,
               "forward", 1.0),
        SeenOp("wait", "_c10d_functional::wait_tensor", 0, None, None, None, "forward", 2.0),
        SeenOp("all_gather", "c10d::_allgather_base_", 12, None, (3,), torch.float32,
               "backward", 0.0),
    ]
    recs = to_records(seen, step=7, world_size=4, role_of=lambda s: ("x", s.phase))
    assert [r.op for r in recs] == ["send", "recv", "all_reduce", "all_gather"]
    assert (recs[0].sent, recs[0].wire, recs[0].peer) == (100, 100, 1)
    assert (recs[1].sent, recs[1].received) == (0, 100)
    assert (recs[2].collective, recs[2].wire, recs[2].seconds) == (40, 60, 3.0)  # wait folded in
    assert (recs[3].sent, recs[3].received, recs[3].wire) == (12, 36, 36)
    assert all(r.step == 7 and r.group_size == 4 for r in recs)


def test_what_torch_engines_cannot_do_is_refused_before_anything_runs():
    from partition.config import ConfigError

    with pytest.raises(ConfigError, match=r"width 5 \(layer 1\) divisible by world_size=2"):
        make_config(**dict(BASE, strategy="tensor", **{"model.dims": [6, 5, 3]}))
    with pytest.raises(ConfigError, match=r"microbatches=2: .*Schedule1F1B needs >= world_size=3"):
        make_config(**dict(BASE, strategy="pipeline", world_size=3,
                           **{"model.dims": [6, 5, 4, 3], "strategy.schedule": "1f1b",
                              "train.microbatches": 2}))
    # The explicit engine handles both.
    make_config(**dict(BASE, engine="explicit", strategy="tensor", **{"model.dims": [6, 5, 3]}))


def test_tensor_plan_pieces():
    assert styles(2, "megatron") == ["col", "row"]
    assert styles(3, "megatron") == ["col", "row", "col_rep"]
    assert styles(2, "rowwise") == ["col_rep", "col_rep"]
    assert [chunk_range(10, 3, i) for i in range(3)] == [(0, 4), (4, 8), (8, 10)]
    assert [chunk_range(5, 4, i) for i in range(4)] == [(0, 2), (2, 4), (4, 5), (5, 5)]


# ---------------------------------------------------------------- more cases (slow)


DEEP = {"model.dims": [13, 11, 6, 5], "model.bias": True, "model.activation": "tanh",
        "train.batch_size": 12}
SLOW_CASES = [
    dict(BASE, strategy="pipeline", **{"train.microbatches": 4}),
    dict(BASE, strategy="pipeline", **{"strategy.schedule": "1f1b", "train.microbatches": 2}),
    dict(BASE, strategy="pipeline", **DEEP, **{"strategy.schedule": "1f1b",
                                               "train.microbatches": 3}),
    dict(BASE, strategy="tensor", **{**DEEP, "model.dims": [13, 12, 6, 5]}),
    dict(BASE, strategy="tensor", **{"strategy.layout": "rowwise", "model.dims": [9, 7, 5, 3]}),
    dict(BASE, strategy="tensor", **{"model.loss": "squared_error", "model.dims": [7, 6, 3]}),
    dict(BASE, strategy="data", **{**DEEP, "train.batch_size": 13, "train.steps": 4,
                                   "train.warmup_steps": 2}),
]


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_more_torch_engine_cases_end_at_single_device_weights():
    res = spawn(_train_cases, 2, SLOW_CASES, timeout=500)
    for k, over in enumerate(SLOW_CASES):
        check_same_as_single(over, [res[r][k] for r in range(2)])


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_three_stage_torch_pipeline():
    cases = [dict(BASE, world_size=3, strategy="pipeline", **DEEP,
                  **{"strategy.schedule": s, "train.microbatches": 3}) for s in ("gpipe", "1f1b")]
    res = spawn(_train_cases, 3, cases, timeout=500)
    for k, over in enumerate(cases):
        check_same_as_single(over, [res[r][k] for r in range(3)])


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_torch_engine_run_writes_the_same_result_json(tmp_path):
    from conftest import config_dict

    from partition.config import parse_config
    from partition.launch import run

    cfg = parse_config(config_dict(**dict(BASE, strategy="pipeline",
                                          **{"train.microbatches": 2})))
    res = run(cfg, str(tmp_path))
    assert res["status"] == "ok", res["error"]
    assert res["run"]["engine"] == "torch"
    by_role = [r["comm"]["by_role"] for r in res["ranks"]]
    assert by_role[0]["activation"] == {"bytes": 32 * 256 * F64, "messages": 2}
    assert by_role[1]["activation_grad"] == {"bytes": 32 * 256 * F64, "messages": 2}
    assert (tmp_path / "weights.npz").exists()
