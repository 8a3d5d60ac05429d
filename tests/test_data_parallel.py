"""Data parallel (issue 4): the batch's rows split over P ranks, gradients all-reduced once.

One spawn per world size P runs every case of this module and of its sibling
(test_tensor.py / test_data_parallel.py) on P gloo ranks, since spawning dominates the
cost; the tests read that cached run (strategy_runs.results).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import make_config, spawn
from strategy_runs import (
    max_rel_err,
    observed_matches_ledger,
    register,
    results,
    role_traffic,
    run_cases,
    single_predict,
)

from partition.plans.data import data_traffic

BASE = {"strategy": "data", "train.batch_size": 10, "train.steps": 3, "train.grad_check": True}
# B = 10: uneven shares at P = 3 (4, 3, 3) and P = 4 (3, 3, 2, 2); 2–4 weight layers.
CASES = [
    ("2L", {"model.dims": [7, 5, 4], "model.weight_decay": 0.01}),
    ("3L-bias-M2", {"model.dims": [6, 7, 5, 4], "model.bias": True, "model.activation": "tanh",
                    "model.loss": "squared_error", "train.microbatches": 2}),
    ("4L-bias-momentum", {"model.dims": [9, 6, 7, 5, 4], "model.bias": True,
                          "model.weight_decay": 0.01, "train.momentum": 0.9}),
    ("seed-f64", {"model.dims": [784, 256, 10], "train.batch_size": 32}),
    ("seed-f32", {"model.dims": [784, 256, 10], "train.batch_size": 32, "train.dtype": "float32",
                  "train.grad_check": False}),
]


register("data", lambda P: [make_config(**{**BASE, **over, "world_size": P})
                            for _, over in CASES])


@pytest.fixture(scope="module", params=[1, 2, 3, 4], ids=lambda p: f"P{p}")
def runs(request):
    P = request.param
    cfgs, res = results("data", P)  # res[case][rank]
    return P, cfgs, res


def itemsize(cfg) -> int:
    return 8 if cfg.train.dtype == "float64" else 4


def test_weights_match_single_device(runs):
    P, cfgs, results = runs
    for (name, _), cfg, res in zip(CASES, cfgs, results, strict=True):
        tol = 1e-12 if cfg.train.dtype == "float64" else 1e-5
        err = max_rel_err(cfg, res)
        assert err <= tol, f"{name} P={P}: weights off by {err:.3g}"
        for r, rr in enumerate(res):
            if cfg.train.grad_check:  # the all-reduced gradient is the full batch's
                assert rr["grad_rel_err"] <= tol, f"{name} P={P} rank {r}"
        assert all(rr["objective"] == res[0]["objective"] for rr in res)
        # every rank holds the same weights; only rank 0 sends them back
        assert res[0]["shards"] and not any(rr["shards"] for rr in res[1:])


def test_prediction_forward_covers_the_batch_in_rank_order(runs):
    _, cfgs, results = runs
    for (name, _), cfg, res in zip(CASES, cfgs, results, strict=True):
        want = single_predict(cfg)
        got = np.concatenate([rr["predict"] for rr in res])  # each rank predicts its own rows
        tol = 1e-12 if cfg.train.dtype == "float64" else 1e-5
        assert got.shape == want.shape
        assert np.linalg.norm(got - want) <= tol * np.linalg.norm(want), name


def test_bytes_per_role_per_rank_per_step(runs):
    P, cfgs, results = runs
    for (name, _), cfg, res in zip(CASES, cfgs, results, strict=True):
        b, spec = itemsize(cfg), cfg.spec
        n_params = sum(spec.layer_params(l) for l in range(spec.num_layers))
        want = {"metric": (24, 1, {"metric"})}
        if P > 1:  # Σ params · b, bucketed into one all-reduce after the backward
            want["weight_grad"] = (n_params * b, 1, {"update"})
        plan = data_traffic(spec, world=P, itemsize=b)
        for r, rr in enumerate(res):
            for step in range(cfg.train.steps):
                got = role_traffic(rr["records"], step)
                assert {k: (v["bytes"], v["messages"], v["phases"]) for k, v in got.items()} \
                    == want, f"{name} P={P} rank {r} step {step}"
                assert {k: (v["bytes"], v["messages"], v["wire"]) for k, v in got.items()} == \
                    {k: (v.bytes, v.messages, v.wire) for k, v in plan.items()}


def test_seed_moves_all_its_parameters(runs):
    P, _, results = runs
    names = [n for n, _ in CASES]
    for name, b in (("seed-f64", 8), ("seed-f32", 4)):
        for rr in results[names.index(name)]:
            got = role_traffic(rr["records"], 1)
            assert got.get("weight_grad", {"bytes": 0})["bytes"] == \
                (0 if P == 1 else (784 * 256 + 256 * 10) * b)  # 1,626,112 B in float64
            assert rr["memory"]["params_bytes"] == (784 * 256 + 256 * 10) * b


def test_observer_sees_exactly_the_recorded_ops(runs):
    P, _, results = runs
    for (name, _), res in zip(CASES, results, strict=True):
        for r, rr in enumerate(res):
            assert rr["observed"] and observed_matches_ledger(rr), f"{name} P={P} rank {r}"


def test_every_rank_holds_the_full_weights(runs):
    _, cfgs, results = runs
    for cfg, res in zip(cfgs, results, strict=True):
        spec = cfg.spec
        full = sum(spec.layer_params(l) for l in range(spec.num_layers)) * itemsize(cfg)
        for rr in res:
            assert rr["memory"]["params_bytes"] == rr["memory"]["grads_bytes"] == full


def test_plain_run_through_the_launcher(tmp_path):
    """`launch.run` (the elastic launcher, as `python -m experiments.run` uses it), P = 2."""
    from partition.launch import run

    over = {"model.dims": [9, 7, 5], "model.bias": True, "train.batch_size": 11,
            "train.steps": 3, "train.grad_check": True}
    result = run(make_config(strategy="data", world_size=2, **over), str(tmp_path / "data"))
    single = run(make_config(strategy="single", **over), str(tmp_path / "single"))
    assert result["status"] == "ok" and single["status"] == "ok"
    on_disk = json.loads((tmp_path / "data" / "result.json").read_text())
    assert on_disk["status"] == "ok" and on_disk["run"]["strategy"] == "data"
    assert result["check"]["grad_max_rel_err"] <= 1e-12
    with np.load(tmp_path / "data" / "weights.npz") as a, \
            np.load(tmp_path / "single" / "weights.npz") as b:
        assert sorted(a.files) == sorted(b.files) == ["W1", "W2", "b1", "b2"]
        for k in a.files:
            assert np.linalg.norm(a[k] - b[k]) <= 1e-12 * np.linalg.norm(b[k]), k
    n = (7 * 9 + 7 + 5 * 7 + 5) * 8
    for rank in on_disk["ranks"]:
        assert rank["comm"]["by_role"] == {"metric": {"bytes": 24, "messages": 1},
                                           "weight_grad": {"bytes": n, "messages": 1}}
        assert rank["memory"]["params_bytes"] == n


@pytest.mark.slow
@pytest.mark.parametrize("P", [2, 3, 4])
def test_wider_sweep_matches_single_device(P):
    sweep = [{"model.dims": [13, 11, 17, 9, 7, 5], "model.activation": act, "model.loss": loss,
              "model.bias": bias, "train.batch_size": 15, "train.microbatches": M,
              "train.momentum": 0.5, "model.weight_decay": 0.001}
             for act, loss in (("relu", "cross_entropy"), ("sigmoid", "squared_error"))
             for bias in (False, True) for M in (1, 3)]
    cfgs = [make_config(**{**BASE, **over, "world_size": P}) for over in sweep]
    per_rank = spawn(run_cases, P, cfgs, timeout=600)
    for i, cfg in enumerate(cfgs):
        res = [per_rank[r][i] for r in range(P)]
        assert max_rel_err(cfg, res) <= 1e-12, sweep[i]
        assert all(observed_matches_ledger(rr) for rr in res)
