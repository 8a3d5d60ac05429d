"""The analytic cost model as pure functions (issue 5): no processes, no timing."""

from __future__ import annotations

import pytest
from conftest import make_config

from partition import costs
from partition.comm import summarize
from partition.config import ConfigError

SEED = [784, 2048, 10]  # the d, h, q


def seed_cfg(**kw):
    base = {"model.dims": SEED, "train.batch_size": 512, "train.dtype": "float32"}
    return make_config(**{**base, **kw})


def by_role(cfg, rank):
    return summarize(costs.MODELS[cfg.strategy.name](cfg, rank).messages)["by_role"]


# ---------------------------------------------------------------- state bytes (Done-when)


def test_seed_params_bytes_single_pipeline_tensor():
    d, h, q = SEED
    single = costs.rank_costs(seed_cfg())[0]
    assert single.state["params_bytes"] == (d * h + h * q) * 4
    assert single.state["grads_bytes"] == (d * h + h * q) * 4
    assert single.state["optimizer_bytes"] == 0
    pipe = costs.rank_costs(seed_cfg(strategy="pipeline", world_size=2))
    assert [c.state["params_bytes"] for c in pipe] == [d * h * 4, h * q * 4]
    # Tensor P=2 (Megatron): W1 by rows, W2 by columns — each rank holds exactly half.
    tp = [costs.state_bytes(seed_cfg(strategy="tensor", world_size=2), r) for r in range(2)]
    assert [t["params_bytes"] for t in tp] == [(d * h + h * q) * 4 // 2] * 2


def test_momentum_is_optimizer_state():
    cfg = seed_cfg(**{"train.momentum": 0.9})
    st = costs.state_bytes(cfg, 0)
    assert st["optimizer_bytes"] == st["params_bytes"]


def test_uneven_shards_first_ranks_take_the_extra_unit():
    assert costs.split_evenly(10, 4) == [(0, 3), (3, 6), (6, 8), (8, 10)]
    assert costs.split_evenly(7, 7) == [(i, i + 1) for i in range(7)]
    with pytest.raises(ValueError, match="width of 3 over 4"):
        costs.split_evenly(3, 4)
    # Megatron, h = 7 over P = 3: units 3, 2, 2; W1 rows × d, W2 columns × q.
    lay = [costs.tensor_layers((5, 7, 4), 3, r, "megatron", bias=True) for r in range(3)]
    assert [(l[0].n_out, l[1].n_in) for l in lay] == [(3, 3), (2, 2), (2, 2)]
    assert [l[1].bias for l in lay] == [True, False, False]  # the row-parallel bias: rank 0
    params = [sum(x.params for x in l) for l in lay]
    assert params == [3 * 5 + 3 + 4 * 3 + 4, 2 * 5 + 2 + 4 * 2, 2 * 5 + 2 + 4 * 2]
    # An odd last layer is replicated.
    deep = costs.tensor_layers((5, 6, 4, 3), 2, 1, "megatron", bias=False)
    assert [(l.index, l.note, l.n_in, l.n_out) for l in deep] == [
        (0, "column", 5, 3), (1, "row", 3, 4), (2, "replicated", 4, 3)]
    row = costs.tensor_layers((5, 7, 4), 3, 0, "rowwise", bias=False)
    assert [(l.n_in, l.n_out) for l in row] == [(5, 3), (7, 2)]


# ---------------------------------------------------------------- payload bytes by role


@pytest.mark.parametrize("P,M", [(2, 1), (2, 4), (3, 2), (4, 5)])
@pytest.mark.parametrize("schedule", ["gpipe", "1f1b"])
def test_pipeline_bytes(P, M, schedule):
    dims = [20, 16, 12, 8, 5]
    B, item = 20, 8
    cfg = make_config(strategy="pipeline", world_size=P, **{
        "model.dims": dims, "train.batch_size": B, "train.microbatches": M,
        "strategy.schedule": schedule})
    from partition.plans.stages import plan_stages

    plan = plan_stages(cfg.spec, P)
    for r in range(P):
        s = summarize(costs.MODELS["pipeline"](cfg, r).messages)
        fwd = B * dims[plan[r][1]] * item if r < P - 1 else 0
        bwd = B * dims[plan[r][0]] * item if r > 0 else 0
        assert s["by_role"].get("activation", {"bytes": 0})["bytes"] == fwd
        assert s["by_role"].get("activation_grad", {"bytes": 0})["bytes"] == bwd
        assert s["by_role"].get("activation", {"messages": 0})["messages"] == (M if fwd else 0)
        assert s["by_role"]["metric"] == {"bytes": 24, "messages": 1}
        assert s["sent_bytes"] == fwd + bwd
        assert s["recv_bytes"] == (B * dims[plan[r][0]] * item if r > 0 else 0) + (
            B * dims[plan[r][1]] * item if r < P - 1 else 0)
        assert s["wire_bytes"] == fwd + bwd + 2 * (P - 1) * 24 // P
        assert s["by_phase"] == {k: v for k, v in
                                 {"forward": fwd, "backward": bwd, "metric": 24}.items() if v}


def test_single_moves_nothing():
    s = summarize(costs.rank_costs(seed_cfg(**{"train.microbatches": 4}))[0].messages)
    assert s["sent_bytes"] == s["collective_bytes"] == s["messages"] == 0 and s["by_role"] == {}


@pytest.mark.parametrize("M", [1, 4])
def test_tensor_megatron_seed_bytes(M):
    """Seed, Megatron: B·q·b in one all-reduce per micro-batch, nothing backward."""
    B, q = 512, 10
    cfg = seed_cfg(strategy="tensor", world_size=2, **{"train.microbatches": M})
    for r in range(2):
        roles = by_role(cfg, r)
        assert roles["partial_output"] == {"bytes": B * q * 4, "messages": M}
        assert "input_grad" not in roles
        s = summarize(costs.MODELS["tensor"](cfg, r).messages)
        assert s["by_phase"].get("backward", 0) == 0
        assert s["wire_bytes"] == B * q * 4 + 24  # 2(P−1)/P = 1 at P = 2


def test_tensor_megatron_deep_and_rowwise_bytes():
    dims, B, P = [9, 8, 6, 7, 5], 12, 3
    cfg = make_config(strategy="tensor", world_size=P, **{"model.dims": dims,
                                                          "train.batch_size": B})
    roles = by_role(cfg, 1)
    assert roles["partial_output"] == {"bytes": B * (dims[2] + dims[4]) * 8, "messages": 2}
    assert roles["input_grad"] == {"bytes": B * dims[2] * 8, "messages": 1}
    row = make_config(strategy="tensor", world_size=P, **{
        "model.dims": [9, 8, 7], "train.batch_size": B, "strategy.layout": "rowwise"})
    # gloo's all-gather takes equal pieces: every rank hands in ⌈n/P⌉ columns (zero-padded)
    padded = -(-8 // P) + -(-7 // P)
    for r in range(P):
        mine = costs.width(costs.split_evenly(8, P)[r])  # its slice of dJ/dh (reduce-scatter)
        s = summarize(costs.MODELS["tensor"](row, r).messages)
        assert s["by_role"]["gather"] == {"bytes": B * padded * 8, "messages": 2}
        assert s["by_role"]["input_grad"] == {"bytes": B * 8 * 8, "messages": 1}
        assert s["recv_bytes"] == (P - 1) * B * padded * 8 + (P - 1) * B * mine * 8
        assert s["wire_bytes"] == (P - 1) * B * padded * 8 + (P - 1) * B * 8 * 8 // P \
            + 2 * (P - 1) * 24 // P


def test_data_parallel_bytes():
    d, h, q = SEED
    cfg = seed_cfg(strategy="data", world_size=4, **{"model.bias": True})
    n = (d * h + h + h * q + q) * 4
    for r in range(4):
        roles = by_role(cfg, r)
        assert roles["weight_grad"] == {"bytes": n, "messages": 1}
        s = summarize(costs.MODELS["data"](cfg, r).messages)
        assert s["wire_bytes"] == 2 * 3 * n // 4 + 2 * 3 * 24 // 4
        assert s["by_phase"]["update"] == n
    assert costs.data_rows(10, 4, 0) == 3 and costs.data_rows(10, 4, 3) == 2


@pytest.mark.parametrize("layout", ["megatron", "rowwise"])
@pytest.mark.parametrize("dims", [[9, 7, 5], [9, 7, 6, 5], [9, 8, 7, 6, 5]])
@pytest.mark.parametrize("P", [2, 3])
def test_tensor_messages_are_the_plans(layout, dims, P):
    """The model's records are the runner's plan (tensor_calls): per role the formulas of
    plan.py, which the tensor tests check against the ledger."""
    from partition.plans.tensor import tensor_traffic

    cfg = make_config(strategy="tensor", world_size=P, **{
        "model.dims": dims, "train.batch_size": 12, "train.microbatches": 2,
        "strategy.layout": layout})
    plan = tensor_traffic(layout, dims, world=P, batch=12, micro=2, itemsize=8)
    for r in range(P):
        recs = costs.MODELS["tensor"](cfg, r).messages
        got = {}
        for x in recs:
            b, m, w = got.get(x.role, (0, 0, 0))
            got[x.role] = (b + x.sent, m + 1, w + x.wire)
        assert got == {k: (v.bytes, v.messages, v.wire) for k, v in plan.items()}
        assert {x.op for x in recs if x.role == "gather"} <= {"all_gather"}


# ---------------------------------------------------------------- memory: closed forms vs replay


MEM_CASES = [
    dict(strategy="single", **{"model.dims": [20, 30, 5], "train.microbatches": 1}),
    dict(strategy="single", **{"model.dims": [20, 30, 12, 5], "train.microbatches": 4}),
    dict(strategy="pipeline", world_size=2, **{"model.dims": [20, 30, 12, 5],
                                               "train.microbatches": 4}),
    dict(strategy="pipeline", world_size=3, **{"model.dims": [20, 30, 12, 9, 5],
                                               "train.microbatches": 4,
                                               "strategy.schedule": "1f1b"}),
    dict(strategy="pipeline", world_size=2, **{"model.dims": [20, 30, 12, 5],
                                               "train.microbatches": 2,
                                               "strategy.schedule": "1f1b",
                                               "model.activation": "sigmoid"}),
    dict(strategy="tensor", world_size=3, **{"model.dims": [20, 31, 13, 5],
                                             "train.microbatches": 2}),
    dict(strategy="tensor", world_size=2, **{"model.dims": [20, 31, 13, 5],
                                             "strategy.layout": "rowwise"}),
    dict(strategy="data", world_size=3, **{"model.dims": [20, 30, 12, 5],
                                           "train.microbatches": 2}),
]


@pytest.mark.parametrize("kw", MEM_CASES)
def test_kept_activations_closed_form_equals_replay(kw):
    cfg = make_config(**{"train.batch_size": 16, **kw})
    for c in costs.rank_costs(cfg):
        assert c.train.category_peaks["activations"] == costs.kept_activation_bytes(cfg, c.rank)
        assert c.train.peak_bytes > c.train.breakdown["params"] + c.train.breakdown["grads"]
        assert sum(c.train.breakdown.values()) == c.train.peak_bytes
        assert c.train.breakdown["grads"] == c.state["grads_bytes"]
        assert c.predict.breakdown["grads"] == 0


def test_seed_peak_matches_the_independent_estimate():
    """params + grads + input + kept activations (z, h) + dJ/dh (h goes as dJ/dz comes): the
    replay's peak exceeds it only by y, dJ/do and the like (O(B·q), here 0.08 %)."""
    cfg = seed_cfg()
    c = costs.rank_costs(cfg)[0]
    est = costs.independent_estimate(cfg)
    d, h, q, B = 784, 2048, 10, 512
    assert est == 2 * (d * h + h * q) * 4 + B * d * 4 + 3 * B * h * 4
    assert 0 <= (c.train.peak_bytes - est) / est < 1e-3
    assert c.train.peak_bytes == est + B * 8 + B * q * 4  # + labels y + dJ/do
    assert c.predict.peak_bytes < est


def test_training_needs_more_than_prediction():
    for kw in MEM_CASES[:2]:
        c = costs.rank_costs(make_config(**{"train.batch_size": 16, **kw}))[0]
        assert c.train.peak_bytes > c.predict.peak_bytes


def test_kept_activations_scale_with_batch_and_depth():
    def kept(B, hidden):
        cfg = make_config(**{"model.dims": [20] + [30] * hidden + [5], "train.batch_size": B})
        return costs.rank_costs(cfg)[0].train.category_peaks["activations"]

    assert kept(32, 1) == 2 * kept(16, 1) and kept(64, 1) == 4 * kept(16, 1)
    assert kept(16, 2) == 2 * kept(16, 1) and kept(16, 3) == 3 * kept(16, 1)


def test_pipeline_relieves_memory_only_with_microbatches():
    """The seed's W1 is 98.7 % of the parameters, so stage 0 of a P=2 pipeline holds nearly
    all of them — and with M=1 also the whole batch's activations plus the buffers it
    sends and receives: its peak is *above* the single device's. Micro-batches fix it."""
    single = costs.rank_costs(seed_cfg())[0].train.peak_bytes
    m1 = max(c.train.peak_bytes for c in costs.rank_costs(seed_cfg(strategy="pipeline",
                                                                   world_size=2)))
    m4 = max(c.train.peak_bytes for c in costs.rank_costs(seed_cfg(
        strategy="pipeline", world_size=2, **{"train.microbatches": 4,
                                              "strategy.schedule": "1f1b"})))
    assert m1 > single > m4


def test_cuda_counts_no_host_staging():
    cpu = costs.rank_costs(seed_cfg(), device="cpu")[0]
    cuda = costs.rank_costs(seed_cfg(), device="cuda")[0]
    assert cuda.train.peak_bytes == cpu.train.peak_bytes  # the peak is in the backward
    assert cuda.predict.peak_bytes <= cpu.predict.peak_bytes


# ---------------------------------------------------------------- FLOPs, bubble, time


def test_flops_bubble_and_in_flight():
    d, h, q, B = 784, 2048, 10, 512
    one = costs.rank_costs(seed_cfg())[0]
    # forward + dJ/dW for both layers, dJ/dx only for the second (x needs no gradient)
    assert one.flops == 2 * B * d * h * 2 + 2 * B * h * q * 3
    pipe = costs.rank_costs(seed_cfg(strategy="pipeline", world_size=2))
    assert sum(c.flops for c in pipe) == one.flops
    cfg = make_config(strategy="pipeline", world_size=4, **{
        "model.dims": [8, 8, 8, 8, 8], "train.batch_size": 24, "train.microbatches": 6,
        "strategy.schedule": "1f1b"})
    assert costs.bubble_fraction(cfg) == pytest.approx(3 / 9)
    assert [costs.in_flight_bound(cfg, r) for r in range(4)] == [4, 3, 2, 1]
    gp = make_config(strategy="pipeline", world_size=4, **{
        "model.dims": [8, 8, 8, 8, 8], "train.batch_size": 24, "train.microbatches": 6})
    assert [costs.in_flight_bound(gp, r) for r in range(4)] == [6] * 4
    assert costs.bubble_fraction(seed_cfg()) == 0.0


def test_step_time_model():
    cfg = make_config(strategy="pipeline", world_size=2, **{
        "model.dims": [64, 32, 10], "train.batch_size": 64, "train.microbatches": 2,
        "cost.alpha_s": 1e-4, "cost.beta_Bps": 1e9, "cost.collective_alpha_s": 2e-4,
        "cost.collective_beta_Bps": 5e8, "cost.flops_per_s": 1e9})
    pred = costs.predict(cfg)
    bubble = 1 / 3
    r0 = pred["ranks"][0]
    n = 32 * 32 * 8  # one micro-batch of the 32-wide activation, float64
    p2p = 4 * (1e-4 + n / 1e9)  # 2 sends + 2 receives
    coll = 2e-4 + 24 / 5e8  # the metric all-reduce, 2(P−1)/P · 24 wire bytes
    assert r0["timing"]["comm_s"] == pytest.approx(p2p + coll)
    assert r0["comm"]["seconds"] == pytest.approx(p2p + coll)
    flops0 = 2 * 64 * 64 * 32 * 2
    assert r0["timing"]["compute_s"] == pytest.approx(flops0 / 1e9)
    assert r0["timing"]["step_s"] == pytest.approx(flops0 / 1e9 / (1 - bubble) + p2p + coll)
    assert pred["step_time_s"] == max(r["timing"]["step_s"] for r in pred["ranks"])
    assert pred["bubble_fraction"] == pytest.approx(bubble)
    assert pred["cost_params"]["source"] == "config"


def test_predicted_block_mirrors_measured_keys():
    pred = costs.predict(make_config(strategy="pipeline", world_size=2,
                                     **{"model.dims": [8, 6, 4]}))
    comm = pred["ranks"][0]["comm"]
    assert set(comm) == {"sent_bytes", "recv_bytes", "collective_bytes", "wire_bytes",
                         "messages", "seconds", "by_role", "by_phase"}
    assert {"peak_bytes", "predict_peak_bytes", "params_bytes", "grads_bytes",
            "optimizer_bytes", "activations_bytes"} <= set(pred["ranks"][0]["memory"])
    assert {"bubble_fraction", "flops_per_step", "step_time_s"} <= set(pred)


def test_relative_errors():
    assert costs.rel_err(110, 100) == pytest.approx(0.1)
    assert costs.rel_err(0, 0) == 0.0
    assert costs.rel_err(5, 0) is None and costs.rel_err(None, 3) is None
    pred = costs.predict(make_config(**{"model.dims": [8, 6, 4]}))
    measured = [{"rank": 0, "comm": dict(pred["ranks"][0]["comm"]),
                 "memory": {**pred["ranks"][0]["memory"],
                            "peak_bytes": pred["ranks"][0]["memory"]["peak_bytes"] * 1.02},
                 "timing": {"step_s": None}}]
    err = costs.prediction_error(measured, pred, step_time_s=None)
    assert err["ranks"][0]["memory"]["peak_bytes"] == pytest.approx(0.02)
    assert err["max_abs"]["comm"] == 0.0 and err["max_abs"]["peaks"] == pytest.approx(0.02)
    assert err["unpredicted"] == []


def test_cost_config_keys_are_validated():
    cfg = make_config(**{"cost.flops_per_s": "2e9", "cost.calibrate": True})
    assert cfg.cost.flops_per_s == 2e9 and cfg.cost.calibrate
    with pytest.raises(ConfigError, match="cost.beta_Bps=0: must be > 0"):
        make_config(**{"cost.beta_Bps": 0})
    with pytest.raises(ConfigError, match="cost.alpha_s"):
        make_config(**{"cost.alpha_s": -1})


def test_limit_precheck_names_the_rank():
    cfg = seed_cfg(strategy="pipeline", world_size=2, memory_limit="20MiB")
    rank, peak = costs.peak_over_limit(cfg)
    assert rank == 0 and peak > 20 * 2**20
    assert costs.peak_over_limit(seed_cfg(memory_limit="1GiB")) is None
