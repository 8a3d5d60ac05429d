"""Tensor parallel (issue 4): both layouts reproduce single-device SGD, byte for byte as planned.

One spawn per world size P runs every case of this module and of its sibling
(test_tensor.py / test_data_parallel.py) on P gloo ranks, since spawning dominates the
cost; the tests read that cached run (strategy_runs.results).
"""

from __future__ import annotations

import json
import os

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

from partition.plans.split import split_evenly
from partition.plans.tensor import tensor_traffic

BASE = {"strategy": "tensor", "train.batch_size": 10, "train.steps": 3, "train.grad_check": True}
# (id, overrides): 1–4 weight layers, widths 5 and 7 (and 6 at P = 4, 4 at P = 3) not divisible.
CASES = [
    ("meg-2L", {"model.dims": [7, 5, 4], "model.weight_decay": 0.01}),
    ("meg-3L-bias-M2", {"model.dims": [6, 7, 5, 4], "model.bias": True, "model.activation": "tanh",
                        "model.loss": "squared_error", "train.microbatches": 2}),
    ("meg-4L-bias", {"model.dims": [9, 6, 7, 5, 4], "model.bias": True,
                     "model.weight_decay": 0.01, "train.momentum": 0.9}),
    ("meg-1L-bias", {"model.dims": [7, 4], "model.bias": True}),
    ("row-2L-bias", {"model.dims": [7, 5, 4], "model.bias": True, "model.activation": "sigmoid",
                     "strategy.layout": "rowwise"}),
    ("row-3L", {"model.dims": [6, 7, 5, 4], "model.loss": "squared_error",
                "model.weight_decay": 0.01, "strategy.layout": "rowwise"}),
    ("row-4L-M2", {"model.dims": [9, 6, 7, 5, 4], "model.bias": True, "model.activation": "tanh",
                   "train.microbatches": 2, "strategy.layout": "rowwise"}),
    # the seed's own net, in both dtypes: the item size shows in every byte count
    ("seed-f64", {"model.dims": [784, 256, 10], "train.batch_size": 32}),
    ("seed-f32", {"model.dims": [784, 256, 10], "train.batch_size": 32, "train.dtype": "float32",
                  "train.grad_check": False}),
]


def case_config(over: dict, world: int):
    return make_config(**{**BASE, **over, "world_size": world})


register("tensor", lambda P: [case_config(over, P) for _, over in CASES])


@pytest.fixture(scope="module", params=[1, 2, 3, 4], ids=lambda p: f"P{p}")
def runs(request):
    P = request.param
    cfgs, res = results("tensor", P)  # res[case][rank]
    return P, cfgs, res


# ---------------------------------------------------------------- what the tests expect


def expected_roles(dims: list[int], layout: str, P: int, B: int, M: int, b: int) -> dict:
    """{role: (bytes, messages)} per rank per step, written out from docs/strategies.md."""
    out = {"metric": (24, 1)}
    if P == 1:
        return out
    L = len(dims) - 1
    if layout == "megatron":
        pairs = L // 2
        if pairs:
            out["partial_output"] = (B * sum(dims[2 * k + 2] for k in range(pairs)) * b, pairs * M)
        if pairs > 1:
            out["input_grad"] = (B * sum(dims[2 * k] for k in range(1, pairs)) * b,
                                 (pairs - 1) * M)
    else:
        out["gather"] = (B * sum(-(-n // P) for n in dims[1:]) * b, L * M)
        if L > 1:
            out["input_grad"] = (B * sum(dims[1:L]) * b, (L - 1) * M)
    return out


def expected_params(dims: list[int], layout: str, P: int, r: int, bias: bool) -> int:
    """Elements rank r holds: its rows / columns of each layer, biases where it owns them."""
    L, total = len(dims) - 1, 0
    if layout == "rowwise":
        for l in range(L):
            lo, hi = split_evenly(dims[l + 1], P)[r]
            total += (hi - lo) * (dims[l] + bias)
        return total
    for k in range(L // 2):
        lo, hi = split_evenly(dims[2 * k + 1], P)[r]
        total += (hi - lo) * (dims[2 * k] + bias)  # column-parallel: rows + their bias
        total += dims[2 * k + 2] * (hi - lo) + (dims[2 * k + 2] if bias and r == 0 else 0)
    if L % 2:
        total += dims[L] * (dims[L - 1] + bias)  # the replicated last layer
    return total


PHASE = {"partial_output": {"forward"}, "gather": {"forward"}, "input_grad": {"backward"},
         "metric": {"metric"}}


# ---------------------------------------------------------------- the tests


def test_weights_match_single_device(runs):
    P, cfgs, results = runs
    for (name, _), cfg, res in zip(CASES, cfgs, results, strict=True):
        tol = 1e-12 if cfg.train.dtype == "float64" else 1e-5
        err = max_rel_err(cfg, res)
        assert err <= tol, f"{name} P={P}: weights off by {err:.3g}"
        for r, rr in enumerate(res):
            if cfg.train.grad_check:
                assert rr["grad_rel_err"] <= tol, f"{name} P={P} rank {r}: {rr['grad_rel_err']}"
        # J is reduced once and is the same number on every rank
        assert all(rr["objective"] == res[0]["objective"] for rr in res)


def test_prediction_forward_gives_the_whole_output_on_every_rank(runs):
    P, cfgs, results = runs
    for (name, _), cfg, res in zip(CASES, cfgs, results, strict=True):
        want = single_predict(cfg)
        tol = 1e-12 if cfg.train.dtype == "float64" else 1e-5
        for rr in res:
            assert rr["predict"].shape == want.shape
            assert np.linalg.norm(rr["predict"] - want) <= tol * np.linalg.norm(want), name


def test_bytes_per_role_per_rank_per_step(runs):
    P, cfgs, results = runs
    for (name, _), cfg, res in zip(CASES, cfgs, results, strict=True):
        t, dims = cfg.train, list(cfg.model.dims)
        b = 8 if t.dtype == "float64" else 4
        want = expected_roles(dims, cfg.strategy.layout, P, t.batch_size, t.microbatches, b)
        plan = tensor_traffic(cfg.strategy.layout, dims, world=P, batch=t.batch_size,
                              micro=t.microbatches, itemsize=b)
        for r, rr in enumerate(res):
            for step in range(t.steps):
                got = role_traffic(rr["records"], step)
                assert {k: (v["bytes"], v["messages"]) for k, v in got.items()} == want, \
                    f"{name} P={P} rank {r} step {step}"
                assert {k: v["phases"] for k, v in got.items()} == {k: PHASE[k] for k in want}
                # the plan's formulas (the cost model's input) agree, wire bytes included
                assert {k: (v["bytes"], v["messages"], v["wire"]) for k, v in got.items()} == \
                    {k: (v.bytes, v.messages, v.wire) for k, v in plan.items()}


def test_observer_sees_exactly_the_recorded_ops(runs):
    P, _, results = runs
    for (name, _), res in zip(CASES, results, strict=True):
        for r, rr in enumerate(res):
            assert rr["observed"], f"{name}: the observer saw nothing (metric at least crosses)"
            assert observed_matches_ledger(rr), f"{name} P={P} rank {r}"


def test_params_bytes_are_the_shard_sizes(runs):
    P, cfgs, results = runs
    for (name, _), cfg, res in zip(CASES, cfgs, results, strict=True):
        dims, layout, bias = list(cfg.model.dims), cfg.strategy.layout, cfg.model.bias
        b = 8 if cfg.train.dtype == "float64" else 4
        per_rank = [rr["memory"]["params_bytes"] for rr in res]
        assert per_rank == [b * expected_params(dims, layout, P, r, bias) for r in range(P)], name
        assert all(rr["memory"]["grads_bytes"] == rr["memory"]["params_bytes"] for rr in res)
        full = sum(cfg.spec.layer_params(l) for l in range(cfg.spec.num_layers))
        L = len(dims) - 1
        replica = cfg.spec.layer_params(L - 1) if layout == "megatron" and L % 2 else 0
        assert sum(per_rank) == b * (full + (P - 1) * replica), name


def test_replicas_come_back_once(runs):
    P, cfgs, results = runs
    for (name, _), cfg, res in zip(CASES, cfgs, results, strict=True):
        names = [s.name for rr in res for s in rr["shards"]]
        L = cfg.spec.num_layers
        if cfg.strategy.layout == "megatron" and L % 2:
            assert names.count(f"W{L}") == 1, name
        if cfg.strategy.layout == "megatron" and cfg.model.bias and L > 1:
            assert names.count("b2") == 1, name  # the row-parallel bias lives on rank 0 only


def test_seed_megatron_moves_Bq_in_one_all_reduce_and_nothing_backward(runs):
    """The seed net [784, 256, 10], B = 32: forward B·q·b in one all-reduce; backward nothing."""
    P, _, results = runs
    names = [name for name, _ in CASES]
    for name, b in (("seed-f64", 8), ("seed-f32", 4)):
        for r, rr in enumerate(results[names.index(name)]):
            lo, hi = split_evenly(256, P)[r]
            # rank r: its rows of W1 (|R_r|·784) and the matching columns of W2 (10·|R_r|)
            assert rr["memory"]["params_bytes"] == (hi - lo) * (784 + 10) * b
            assert not any(rec.phase == "backward" for rec in rr["records"])
            for step in range(3):
                got = role_traffic(rr["records"], step)
                if P == 1:
                    assert set(got) == {"metric"}  # one device: nothing crosses but J
                    continue
                assert set(got) == {"partial_output", "metric"}
                assert got["partial_output"]["bytes"] == 32 * 10 * b
                assert got["partial_output"]["messages"] == 1
                assert got["partial_output"]["wire"] == 2 * (P - 1) * 32 * 10 * b // P
    if P == 2:  # the numbers themselves, float64: 2560 B per rank per step; 813,056 B of params
        rr = results[names.index("seed-f64")][0]
        assert role_traffic(rr["records"], 1)["partial_output"]["bytes"] == 2560
        assert rr["memory"]["params_bytes"] == 813_056


@pytest.mark.parametrize("layout", ["megatron", pytest.param("rowwise", marks=pytest.mark.slow)])
def test_plain_run_through_the_launcher(tmp_path, layout):
    """`launch.run` (the elastic launcher, as `python -m experiments.run` uses it), P = 2."""
    from partition.launch import run

    over = {"model.dims": [9, 7, 5], "model.bias": True, "train.batch_size": 12,
            "train.steps": 3, "train.grad_check": True, "strategy.layout": layout}
    cfg = make_config(strategy="tensor", world_size=2, **over)
    result = run(cfg, str(tmp_path / "tensor"))
    single = run(make_config(strategy="single", **over), str(tmp_path / "single"))
    assert result["status"] == "ok" and single["status"] == "ok"
    on_disk = json.loads((tmp_path / "tensor" / "result.json").read_text())
    assert on_disk["status"] == "ok" and on_disk["run"]["layout"] == layout
    assert result["check"]["grad_max_rel_err"] <= 1e-12
    with np.load(tmp_path / "tensor" / "weights.npz") as a, \
            np.load(tmp_path / "single" / "weights.npz") as b:
        assert sorted(a.files) == sorted(b.files) == ["W1", "W2", "b1", "b2"]
        for k in a.files:
            assert np.linalg.norm(a[k] - b[k]) <= 1e-12 * np.linalg.norm(b[k]), k
    want = tensor_traffic(layout, [9, 7, 5], world=2, batch=12, micro=1, itemsize=8)
    for rank in on_disk["ranks"]:
        assert rank["comm"]["by_role"] == {k: {"bytes": v.bytes, "messages": v.messages}
                                           for k, v in want.items()}
        assert rank["comm_steps_equal"]
    assert not os.path.exists(tmp_path / "tensor" / "errors")


SWEEP = [
    {"model.dims": dims, "model.activation": act, "model.loss": loss, "model.bias": bias,
     "strategy.layout": layout, "train.batch_size": 12, "train.microbatches": M,
     "train.momentum": 0.5, "model.weight_decay": 0.001}
    for dims in ([13, 11, 17, 9, 7], [13, 11, 17, 9, 7, 5])
    for act, loss in (("relu", "cross_entropy"), ("sigmoid", "squared_error"))
    for bias in (False, True)
    for layout in ("megatron", "rowwise")
    for M in (1, 3)
]


@pytest.mark.slow
@pytest.mark.parametrize("P", [2, 3, 4])
def test_wider_sweep_matches_single_device(P):
    cfgs = [case_config(over, P) for over in SWEEP]
    per_rank = spawn(run_cases, P, cfgs, timeout=600)
    for i, cfg in enumerate(cfgs):
        res = [per_rank[r][i] for r in range(P)]
        assert max_rel_err(cfg, res) <= 1e-12, SWEEP[i]
        t = cfg.train
        plan = tensor_traffic(cfg.strategy.layout, list(cfg.model.dims), world=P,
                              batch=t.batch_size, micro=t.microbatches, itemsize=8)
        for rr in res:
            assert observed_matches_ledger(rr)
            got = role_traffic(rr["records"], t.steps - 1)
            assert {k: (v["bytes"], v["messages"], v["wire"]) for k, v in got.items()} == \
                {k: (v.bytes, v.messages, v.wire) for k, v in plan.items()}, SWEEP[i]
