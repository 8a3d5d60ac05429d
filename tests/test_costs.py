"""The cost model (issues 5 and 12) as pure functions: no processes, no timing.

Two kinds of prediction are checked here. The dry run (partition/dryrun.py: every rank's
real runner on the meta device) is what a run measures, to the byte (test_memory.py
holds real runs against it). The closed forms of partition/costs.py are the readable
model: equal to the dry run on state, kept activations and every byte that crosses, and
within ±5 % of it on the training peak (PEAK_TOL), which they are meant to explain.
"""

from __future__ import annotations

import pytest
from conftest import make_config

from partition import costs
from partition.comm import summarize
from partition.config import ConfigError

SEED = [784, 2048, 10]  # the d, h, q
PEAK_TOL = 0.05  # the closed-form training peak against the dry run's (issue 12)


def seed_cfg(**kw):
    base = {"model.dims": SEED, "train.batch_size": 512, "train.dtype": "float32"}
    return make_config(**{**base, **kw})


def by_role(cfg, rank):
    return summarize(costs.messages(cfg, rank))["by_role"]


def within_tol(formula: int, dry: int) -> bool:
    return abs(formula - dry) <= PEAK_TOL * dry


# ---------------------------------------------------------------- state bytes (Done-when)


def test_seed_params_bytes_single_pipeline_tensor():
    d, h, q = SEED
    single = costs.rank_costs(seed_cfg())[0]
    assert single.state["params_bytes"] == (d * h + h * q) * 4
    assert single.state["grads_bytes"] == (d * h + h * q) * 4
    assert single.state["optimizer_bytes"] == 0
    pcfg = seed_cfg(strategy="pipeline", world_size=2)
    pipe = costs.rank_costs(pcfg)
    assert [c.state["params_bytes"] for c in pipe] == [d * h * 4, h * q * 4]
    # Tensor P=2 (Megatron): W1 by rows, W2 by columns — each rank holds exactly half.
    tcfg = seed_cfg(strategy="tensor", world_size=2)
    tp = [costs.state_bytes(tcfg, r) for r in range(2)]
    assert [t["params_bytes"] for t in tp] == [(d * h + h * q) * 4 // 2] * 2
    # the closed form is what the dry run's runners hold
    assert [c.state for c in costs.rank_costs(tcfg)] == tp
    assert [c.state for c in pipe] == [costs.state_bytes(pcfg, r) for r in range(2)]


def test_momentum_is_optimizer_state():
    cfg = seed_cfg(**{"train.momentum": 0.9})
    st = costs.state_bytes(cfg, 0)
    assert st["optimizer_bytes"] == st["params_bytes"]
    assert costs.rank_costs(cfg)[0].state == st  # the dry run's momentum buffers


def test_uneven_shards_first_ranks_take_the_extra_unit():
    assert costs.split_evenly(10, 4) == [(0, 3), (3, 6), (6, 8), (8, 10)]
    assert costs.split_evenly(7, 7) == [(i, i + 1) for i in range(7)]
    with pytest.raises(ValueError, match="width of 3 over 4"):
        costs.split_evenly(3, 4)

    def layers(dims, P, rank, layout, bias):
        return costs.stage_layers(make_config(strategy="tensor", world_size=P, **{
            "model.dims": list(dims), "strategy.layout": layout, "model.bias": bias}), rank)

    # Megatron, h = 7 over P = 3: units 3, 2, 2; W1 rows × d, W2 columns × q.
    lay = [layers((5, 7, 4), 3, r, "megatron", bias=True) for r in range(3)]
    assert [(l[0].n_out, l[1].n_in) for l in lay] == [(3, 3), (2, 2), (2, 2)]
    assert [l[1].bias for l in lay] == [True, False, False]  # the row-parallel bias: rank 0
    params = [sum(x.params for x in l) for l in lay]
    assert params == [3 * 5 + 3 + 4 * 3 + 4, 2 * 5 + 2 + 4 * 2, 2 * 5 + 2 + 4 * 2]
    # An odd last layer is replicated.
    deep = layers((5, 6, 4, 3), 2, 1, "megatron", bias=False)
    assert [(l.index, l.note, l.n_in, l.n_out) for l in deep] == [
        (0, "column", 5, 3), (1, "row", 3, 4), (2, "replicated", 4, 3)]
    row = layers((5, 7, 4), 3, 0, "rowwise", bias=False)
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
        s = summarize(costs.messages(cfg, r))
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
        s = summarize(costs.messages(cfg, r))
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
        s = summarize(costs.messages(row, r))
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
        s = summarize(costs.messages(cfg, r))
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
        recs = costs.messages(cfg, r)
        got = {}
        for x in recs:
            b, m, w = got.get(x.role, (0, 0, 0))
            got[x.role] = (b + x.sent, m + 1, w + x.wire)
        assert got == {k: (v.bytes, v.messages, v.wire) for k, v in plan.items()}
        assert {x.op for x in recs if x.role == "gather"} <= {"all_gather"}


# ---------------------------------------------------------------- memory: closed forms vs dry run


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
COMM_KEYS = ("sent_bytes", "recv_bytes", "collective_bytes", "wire_bytes", "messages", "by_role")


@pytest.mark.parametrize("kw", MEM_CASES)
def test_closed_forms_equal_the_dry_run(kw):
    """State, kept activations and every crossing: exact; the training peak: ±5 %."""
    cfg = make_config(**{"train.batch_size": 16, **kw})
    for c in costs.rank_costs(cfg):
        f = costs.formula(cfg, c.rank)
        assert c.train.activations_bytes == costs.kept_activation_bytes(cfg, c.rank)
        assert c.state == costs.state_bytes(cfg, c.rank)
        assert {k: f["comm"][k] for k in COMM_KEYS} == {k: c.comm[k] for k in COMM_KEYS}
        assert within_tol(costs.formula_peak(cfg, c.rank), c.train.peak_bytes), (
            c.rank, costs.peak_terms(cfg, c.rank), c.train)
        assert c.train.peak_bytes > c.train.breakdown["params"] + c.train.breakdown["grads"]
        assert sum(c.train.breakdown.values()) == c.train.peak_bytes
        assert c.train.breakdown["grads"] == c.state["grads_bytes"]
        assert c.predict.breakdown["grads"] == 0


HYBRID_CASES = {  # id -> overrides of a 4-layer net on a hybrid mesh
    "dp2xpp2": {"strategy.dp": 2, "strategy.pp": 2},
    "dp2xtp2": {"strategy.dp": 2, "strategy.tp": 2},
    "pp2xtp2": {"strategy.pp": 2, "strategy.tp": 2, "strategy.balance": [2, 2]},
    "pp2xtp2-1f1b-momentum": {"strategy.pp": 2, "strategy.tp": 2, "strategy.balance": [1, 3],
                              "strategy.schedule": "1f1b", "train.momentum": 0.9},
    "dp2xpp2xtp2-1f1b": {"world_size": 8, "strategy.dp": 2, "strategy.pp": 2, "strategy.tp": 2,
                         "strategy.balance": [2, 2], "strategy.schedule": "1f1b",
                         "train.microbatches": 4, "train.batch_size": 32},
    "pp4": {"strategy.pp": 4},
    "pp2xtp2-rowwise": {"strategy.pp": 2, "strategy.tp": 2, "strategy.balance": [2, 2],
                        "strategy.layout": "rowwise"},
    "dp2xpp2-interleaved": {"strategy.dp": 2, "strategy.pp": 2, "strategy.virtual_stages": 2,
                            "strategy.schedule": "interleaved_1f1b",
                            "model.dims": [12, 8, 8, 8, 8, 8, 8, 8, 4]},
    "seed-dp2xtp2": {"strategy.dp": 2, "strategy.tp": 2, "model.dims": [784, 2048, 10],
                     "train.batch_size": 64, "train.dtype": "float32", "model.bias": False},
}


@pytest.mark.parametrize("case", HYBRID_CASES)
def test_hybrid_closed_forms_equal_the_dry_run_to_the_byte(case):
    """On a mesh, each rank's closed forms (its stages' tp shards at its replica's rows,
    the pipeline's moments over its pp coordinate) are the dry run's: state, kept
    activations, every crossing, the training peak — and the matrix-product FLOPs it
    counted (`flops_counted`)."""
    kw = {"model.dims": [12, 8, 6, 8, 4], "train.batch_size": 16, "train.microbatches": 2,
          "model.bias": True, "model.weight_decay": 0.01, **HYBRID_CASES[case]}
    cfg = make_config(strategy="hybrid", world_size=kw.pop("world_size", 4), **kw)
    for row in costs.formula_deviation(cfg):
        exact = {k: v for k, v in row.items() if isinstance(v, tuple)}
        assert all(dry == form for dry, form, _ in exact.values()), (row["rank"], exact)
    for c in costs.rank_costs(cfg):
        assert c.flops["total"] == c.extra["flops_counted"] > 0, c.rank
        assert c.train.activations_bytes == costs.kept_activation_bytes(cfg, c.rank)


DP_SHARD_CASES = {  # id -> overrides
    "dp2shardxtp2": {"strategy.dp": 2, "strategy.tp": 2},
    "dp4shard": {"strategy.dp": 4, "train.momentum": 0.9},
    "dp2shardxpp2-1f1b-keep": {"strategy.dp": 2, "strategy.pp": 2, "strategy.schedule": "1f1b",
                               "strategy.reshard_after_forward": False,
                               "train.optimizer": "adamw"},
}


@pytest.mark.parametrize("case", DP_SHARD_CASES)
def test_dp_shard_closed_forms_equal_the_dry_run_but_the_peak(case):
    """dp_shard: state (the pieces, their gradients, the state of their real elements), kept
    activations, every crossing (fsdp's dp calls in hybrid_calls) and the FLOPs are the dry
    run's to the byte; the training peak is an estimate (docs/cost-model.md), within 15 %."""
    kw = {"model.dims": [12, 8, 6, 8, 4], "train.batch_size": 16, "train.microbatches": 2,
          "model.bias": True, "model.weight_decay": 0.01, "strategy.dp_shard": True,
          **DP_SHARD_CASES[case]}
    cfg = make_config(strategy="hybrid", world_size=4, **kw)
    for row in costs.formula_deviation(cfg):
        assert row["moment"] == "estimate (dp_shard)"
        exact = {k: v for k, v in row.items() if isinstance(v, tuple) and k != "peak_bytes"}
        assert all(dry == form for dry, form, _ in exact.values()), (row["rank"], exact)
        assert abs(row["peak_bytes"][2]) < 0.15, (row["rank"], row["peak_bytes"])
    for c in costs.rank_costs(cfg):
        assert c.flops["total"] == c.extra["flops_counted"] > 0, c.rank
    pred = costs.predict(cfg)
    assert pred["formula"] is not None and len(pred["formula"]["ranks"]) == 4


def test_hybrid_flops_by_hand():
    """dp=2 × tp=2 on the seed [d, h, q] (megatron: W¹'s rows, W²'s columns halved), a
    replica's B/dp = 32 rows: F = W = 2·32·(d·h/2 + h/2·q), I = 2·32·(h/2)·q (x needs none)."""
    d, h, q, R = 784, 2048, 10, 32
    cfg = make_config(strategy="hybrid", world_size=4, **{
        "strategy.dp": 2, "strategy.tp": 2, "model.dims": [d, h, q], "train.batch_size": 64})
    fw = 2 * R * (d * h // 2 + h // 2 * q)
    for r in range(4):
        assert costs.rank_flops(cfg, r) == {"forward": fw, "input_grad": 2 * R * h // 2 * q,
                                            "weight_grad": fw, "recompute": 0,
                                            "total": 2 * fw + 2 * R * h // 2 * q}


@pytest.mark.parametrize("zero", [1, 3])
def test_fsdp_flops_are_the_dry_runs(zero):
    """fsdp multiplies by whole layers at its share of the rows (13 over 3: 5, 4, 4)."""
    cfg = make_config(strategy="fsdp", world_size=3, **{
        "model.dims": [10, 7, 5], "train.batch_size": 13, "strategy.zero_stage": zero,
        "model.bias": True})
    got = [(c.flops["total"], c.extra["flops_counted"]) for c in costs.rank_costs(cfg)]
    assert got == [(2 * rows * (10 * 7 * 2 + 7 * 5 * 3),) * 2 for rows in (5, 4, 4)]


# The seed at B = 512 in float32 under every strategy and schedule the tests run, and the
# deep net (conf/model/deep.yaml) for pipelines of 3 and 4 stages.
SEED_CASES = [
    {}, {"train.microbatches": 4},
    *[{"strategy": "pipeline", "world_size": 2, "strategy.schedule": s, "train.microbatches": m}
      for s in ("gpipe", "1f1b") for m in (1, 2, 4)],
    *[{"strategy": "pipeline", "world_size": p, "strategy.schedule": s, "train.microbatches": m,
       "model.dims": [784, 512, 512, 256, 10]}
      for s in ("gpipe", "1f1b") for p in (3, 4) for m in (1, 3, 4)],
    *[{"strategy": "tensor", "world_size": p, "strategy.layout": lay, "train.microbatches": m}
      for lay in ("megatron", "rowwise") for p in (2, 4) for m in (1, 2)],
    {"strategy": "data", "world_size": 2}, {"strategy": "data", "world_size": 4},
]


def _seed_case_id(kw):
    return "-".join("deep" if k == "model.dims" else f"{v}" for k, v in kw.items()) or "single"


@pytest.mark.parametrize("kw", SEED_CASES, ids=_seed_case_id)
def test_closed_form_peak_within_5pct_on_the_seed(kw):
    if kw.get("train.microbatches") == 3:
        kw = {**kw, "train.batch_size": 510}
    cfg = seed_cfg(**kw)
    for row in costs.formula_deviation(cfg):
        dry, form, _ = row["peak_bytes"]
        assert within_tol(form, dry), row
        for k in ("params_bytes", "grads_bytes", "optimizer_bytes", "activations_bytes",
                  "sent_bytes", "recv_bytes", "collective_bytes", "wire_bytes", "messages"):
            assert row[k][0] == row[k][1], (k, row)


def test_closed_form_peak_within_5pct_on_the_compare_cases():
    """Every case of conf/experiment/compare.yaml (the headline comparison) but fsdp, whose
    closed form is a floor (plans/fsdp.py: it leaves out the batch and the temporaries),
    checked to be below the dry run."""
    from experiments.compare import plan

    _, planned = plan([])
    assert len(planned) == 16
    for case, cfg in planned:
        if cfg.strategy.name == "fsdp":
            assert all(row["peak_bytes"][1] <= row["peak_bytes"][0]
                       for row in costs.formula_deviation(cfg)), case.name
            continue
        for row in costs.formula_deviation(cfg):
            dry, form, _ = row["peak_bytes"]
            assert within_tol(form, dry), (case.name, row)
            assert row["activations_bytes"][0] == row["activations_bytes"][1], case.name


def test_seed_peaks_by_hand():
    """The seed d=784, h=2048, q=10 at B=512 in float32 (b=4), the formula's terms by hand.

    single, M=1 (backward, leaving the output layer): params + grads 2(dh+hq)b =
      13,008,896; X: B·d·b = 1,605,632 and y: B·8 = 4,096; kept z, h: 2·B·h·b = 8,388,608;
      dJ/do: B·q·b = 20,480; the transient dJ/dh: B·h·b = 4,194,304 → 27,222,016.
    single, M=4 (the tail: s's W¹⊙W¹ outgrows a quarter batch's backward): state
      13,008,896 + X, y 1,609,728 (still referenced) + W¹⊙W¹ and its sum d·h·b + b =
      6,422,532 + the last micro-batch's dJ/do r·q·b = 5,120 (r = 128) → 21,046,276.
    pipeline 1F1B, P=2, M=4, r = 128 (eager sends: each sent buffer is freed once waited
      for). Stage 0 (W¹): its largest moment is the tail, params + grads 2·d·h·b =
      12,845,056 and s's W¹⊙W¹ with its sum d·h·b + b = 6,422,532 → 19,267,588 (a B's
      live set, 2 micro-batches' z, X, dJ/dh received and dJ/dz, is 5,799,936 over state).
      Stage 1 (W²) holds 1: params + grads 2·h·q·b = 163,840; y 4,096; kept x = h:
      1,048,576; dJ/do r·q·b = 5,120; the dJ/dh being sent r·h·b = 1,048,576 → 2,270,208.
    tensor megatron, P=4 (the batch arriving outgrows the backward): params + grads of a
      quarter, 2(dh+hq)b/4 = 3,252,224; the row indices B·8 = 4,096; X gathered as
      float64 B·d·8 = 3,211,264 next to its float32 copy 1,605,632 → 8,073,216.
    tensor rowwise, P=2 (backward, dJ/dh reduce-scattered): params + grads 6,504,448;
      X, y 1,609,728; kept z¹ (its half, B·h/2) and the gathered h (B·h): 6,291,456;
      dJ/do 20,480; the partial dJ/dh B·h, its two contiguous chunks B·h and this
      rank's sum B·h/2: 2.5·B·h·b = 10,485,760 → 24,911,872.
    """
    cases = [({}, [27_222_016]), ({"train.microbatches": 4}, [21_046_276]),
             ({"strategy": "pipeline", "world_size": 2, "strategy.schedule": "1f1b",
               "train.microbatches": 4}, [19_267_588, 2_270_208]),
             ({"strategy": "tensor", "world_size": 4}, [8_073_216] * 4),
             ({"strategy": "tensor", "world_size": 2, "strategy.layout": "rowwise"},
              [24_911_872] * 2)]
    for kw, want in cases:
        cfg = seed_cfg(**kw)
        assert [costs.formula_peak(cfg, r) for r in range(cfg.ranks)] == want, kw
        assert [c.train.peak_bytes for c in costs.rank_costs(cfg)] == want, kw


def test_seed_peak_matches_the_independent_estimate():
    """params + grads + input + kept activations (z, h) + dJ/dh (h goes as dJ/dz comes): the
    dry run's peak exceeds it only by y, dJ/do and the like (O(B·q), here 0.08 %)."""
    cfg = seed_cfg()
    c = costs.rank_costs(cfg)[0]
    est = costs.independent_estimate(cfg)
    d, h, q, B = 784, 2048, 10, 512
    assert est == 2 * (d * h + h * q) * 4 + B * d * 4 + 3 * B * h * 4
    assert 0 <= (c.train.peak_bytes - est) / est < 1e-3
    assert c.train.peak_bytes == est + B * 8 + B * q * 4  # + labels y + dJ/do
    assert costs.formula_peak(cfg, 0) == c.train.peak_bytes
    assert c.predict.peak_bytes < est


def test_training_needs_more_than_prediction():
    for kw in MEM_CASES[:2]:
        c = costs.rank_costs(make_config(**{"train.batch_size": 16, **kw}))[0]
        assert c.train.peak_bytes > c.predict.peak_bytes


def test_kept_activations_scale_with_batch_and_depth():
    def kept(B, hidden):
        cfg = make_config(**{"model.dims": [20] + [30] * hidden + [5], "train.batch_size": B})
        dry = costs.rank_costs(cfg)[0].train.activations_bytes
        assert dry == costs.kept_activation_bytes(cfg, 0)
        return dry

    assert kept(32, 1) == 2 * kept(16, 1) and kept(64, 1) == 4 * kept(16, 1)
    assert kept(16, 2) == 2 * kept(16, 1) and kept(16, 3) == 3 * kept(16, 1)


def test_pipeline_relieves_memory_only_with_microbatches():
    """The seed's W1 is 98.7 % of the parameters, so stage 0 of a P=2 pipeline holds nearly
    all of them — and with M=1 also the whole batch's activations and the gradient it
    receives: its peak is within 1 % of the single device's (27,033,600 against
    27,222,016 B). Micro-batches fix it."""
    single = costs.rank_costs(seed_cfg())[0].train.peak_bytes
    m1 = max(c.train.peak_bytes for c in costs.rank_costs(seed_cfg(strategy="pipeline",
                                                                   world_size=2)))
    m4 = max(c.train.peak_bytes for c in costs.rank_costs(seed_cfg(
        strategy="pipeline", world_size=2, **{"train.microbatches": 4,
                                              "strategy.schedule": "1f1b"})))
    assert abs(m1 - single) < 0.01 * single and single > m4


def test_cuda_training_peak_is_not_the_host_staging():
    """On CUDA the batch is gathered from the CPU copy of the data set before it reaches
    the device, so the closed form's `load` moment (float64 rows next to their float32
    copy) is host memory there; the dry run models the CPU path (its `device` changes
    nothing). The seed's training peak is in the backward, above the load moment, so
    the CPU prediction of the training peak holds on CUDA too."""
    t = costs.peak_terms(seed_cfg(), 0)
    assert t["moment"] == "backward" and t["moments"]["load"] < t["moments"]["backward"]
    cuda = costs.rank_costs(seed_cfg(), device="cuda")[0]
    assert cuda.train.peak_bytes == t["peak_bytes"]


def test_a_100_gb_model_dry_runs_without_memory():
    """W¹ 250000×100000 and W² 10×250000 in float32: 100,010,000,000 bytes of parameters,
    as many of gradients. The dry run builds and trains them on the meta device: it
    reports the bytes exactly and this process allocates none of them."""
    import resource

    d, h, q, B = 100_000, 250_000, 10, 8
    params = (d * h + h * q) * 4
    assert params == 100_010_000_000
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    for kw, held in (({}, [params]),
                     ({"strategy": "tensor", "world_size": 2}, [params // 2] * 2),
                     ({"strategy": "pipeline", "world_size": 2}, [d * h * 4, h * q * 4])):
        cfg = make_config(**{"model.dims": [d, h, q], "train.batch_size": B,
                             "train.dtype": "float32", "train.steps": 2, **kw})
        pred = costs.predict(cfg)
        assert [r["memory"]["params_bytes"] for r in pred["ranks"]] == held, kw
        assert [r["memory"]["grads_bytes"] for r in pred["ranks"]] == held, kw
        for r, f in zip(pred["ranks"], pred["formula"]["ranks"], strict=True):
            assert f["params_bytes"] == r["memory"]["params_bytes"]
            assert within_tol(f["peak_bytes"], r["memory"]["peak_bytes"])
    grown = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024
    assert grown < 2**30, f"the dry run grew this process by {grown:,} bytes"


def test_formula_deviation_rows():
    """One row per distinct rank: data P=4 on the seed is rank 0 (it adds s) and three
    replicas; rank 0's peak is the tail, the others' the backward."""
    rows = costs.formula_deviation(seed_cfg(strategy="data", world_size=4))
    assert [(r["rank"], r["count"], r["moment"]) for r in rows] == [(0, 1, "tail"),
                                                                    (1, 3, "backward")]
    d, h, q = SEED
    n = (d * h + h * q) * 4
    for r in rows:
        assert r["params_bytes"] == (n, n, 0.0)
        assert r["wire_bytes"] == (2 * 3 * n // 4 + 2 * 3 * 24 // 4,) * 2 + (0.0,)


# ---------------------------------------------------------------- FLOPs, bubble, time


def test_flops_bubble_and_in_flight():
    d, h, q, B = 784, 2048, 10, 512
    one = costs.rank_costs(seed_cfg())[0]
    # forward (F) and dJ/dW (W) for both layers, dJ/dx (I) only for the second (x needs none)
    fw = 2 * B * d * h + 2 * B * h * q
    assert one.flops == {"forward": fw, "input_grad": 2 * B * h * q, "weight_grad": fw,
                         "recompute": 0, "total": 2 * B * d * h * 2 + 2 * B * h * q * 3}
    pipe = costs.rank_costs(seed_cfg(strategy="pipeline", world_size=2))
    for k in one.flops:
        assert sum(c.flops[k] for c in pipe) == one.flops[k]
    cfg = make_config(strategy="pipeline", world_size=4, **{
        "model.dims": [8, 8, 8, 8, 8], "train.batch_size": 24, "train.microbatches": 6,
        "strategy.schedule": "1f1b"})
    assert costs.bubble_fraction(cfg) == pytest.approx(3 / 9)
    # counted from each rank's action list: 1F1B min(P − i, M), GPipe M
    assert [costs.in_flight_per_stage(cfg, r) for r in range(4)] == [{0: 4}, {1: 3}, {2: 2},
                                                                     {3: 1}]
    gp = make_config(strategy="pipeline", world_size=4, **{
        "model.dims": [8, 8, 8, 8, 8], "train.batch_size": 24, "train.microbatches": 6})
    assert [costs.in_flight_per_stage(gp, r) for r in range(4)] == [{r: 6} for r in range(4)]
    assert [c.in_flight_max for c in costs.rank_costs(gp)] == [6] * 4  # the dry run's runner
    assert costs.in_flight_per_stage(seed_cfg(), 0) == {0: 1}
    assert costs.bubble_fraction(seed_cfg()) == 0.0


def test_step_time_is_simulated_from_action_times():
    """GPipe, P = 2, M = 2, F = 1 ms, B = 2 ms, update 0.5 ms, by hand. GPipe waits for
    each send at once, and a message moves only into a posted receive: 0F0 [0, 1], its
    activation moves (rank 1 posted it first thing) and rank 0's wait ends at 1 + lag; 0F1
    to 2 + lag, whose activation rank 1 posts after 1F0 (also ending at 2 + lag): 1F1 from
    2 + 2·lag, 1B0 to 5 + 2·lag; its gradient (posted by rank 0 after 0F1) arrives at
    5 + 3·lag, when 1B1 and 0B0 start; 0B0 ends at 7 + 3·lag and only then posts B1's
    gradient: 0B1 from 7 + 4·lag to 9 + 4·lag; then the update and the J all-reduce."""
    cfg = make_config(strategy="pipeline", world_size=2, **{
        "model.dims": [64, 32, 10], "train.batch_size": 64, "train.microbatches": 2,
        "cost.alpha_s": 1e-4, "cost.beta_Bps": 1e9, "cost.collective_alpha_s": 2e-4,
        "cost.collective_beta_Bps": 5e8})
    times = [{"s0:F": 1e-3, "s0:B": 2e-3, "update": 0.5e-3},
             {"s1:F": 1e-3, "s1:B": 2e-3, "update": 0.5e-3}]
    pred = costs.predict(cfg, times=times)
    lag = 1e-4 + 32 * 32 * 8 / 1e9  # one micro-batch of the 32-wide activation, float64
    metric = 2e-4 + 24 / 5e8  # 2(P−1)/P · 24 wire bytes
    assert pred["step_time_s"] == pytest.approx(9.5e-3 + 4 * lag + metric)
    r0, r1 = pred["ranks"]
    assert r0["timing"]["compute_s"] == pytest.approx(6.5e-3)
    assert r0["timing"]["idle_fraction"] == pytest.approx(1 - 6.5e-3 / pred["step_time_s"])
    assert pred["bubble_fraction"] == pytest.approx(1 / 3)
    assert r0["comm"]["seconds"] == 0.0  # the dry run's ledger moves and times nothing
    assert costs.predict(cfg)["step_time_s"] is None  # no action times: no step time


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
