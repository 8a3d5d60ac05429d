"""Measured memory against the cost model, the seed's claims, and the memory limit (issues 5, 12).

Each real run (one process, or P spawned gloo ranks) is held against `costs.predict`,
whose per-rank comm and memory come from the dry run (partition/dryrun.py: the same
runners on the meta device): exact, but for the collective buffers gloo lets go of late
on tensor parallel (check_memory_collectives). The closed forms (costs.formula) are held
to the measurement too: state and kept activations exact, the training peak ±5 %.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, config_dict, make_config, spawn
from strategy_runs import register, results

from partition import costs
from partition.comm import Comm, Ledger, Observer, summarize
from partition.config import parse_config
from partition.launch import run
from partition.memory import MemoryLimitExceeded, StorageTracker
from partition.results import build_result
from partition.topology import from_env, single_process
from partition.train import run_rank

# The stated tolerance of a measured peak against its prediction. On CPU the dry run is
# exact to the byte (asserted too, as a regression check on the engine's lifetimes);
# on CUDA the allocator rounds every block to 512 bytes and cuBLAS keeps a workspace.
# The closed-form peak is held to the same ±5 % (issue 12).
PEAK_TOL = 0.05
EXACT = ("params_bytes", "grads_bytes", "optimizer_bytes", "activations_bytes")
COMM_KEYS = ("sent_bytes", "recv_bytes", "collective_bytes", "wire_bytes", "messages",
             "by_role", "by_phase")


def check_memory(measured: dict, predicted: dict) -> None:
    for k in EXACT:
        assert measured[k] == predicted[k], k
    for k in ("peak_bytes", "predict_peak_bytes"):
        assert abs(measured[k] - predicted[k]) <= PEAK_TOL * predicted[k], k
        assert measured[k] == predicted[k], k  # CPU: exact
    assert measured["breakdown"] == predicted["breakdown"]


def check_formula(cfg, rank: int, measured: dict, *, late: int = 0) -> None:
    """The closed forms against a measured rank: state and kept activations exact, the
    training peak within PEAK_TOL (and `late`, see check_memory_collectives)."""
    st = costs.state_bytes(cfg, rank)
    for k, v in st.items():
        assert measured[k] == v, (rank, k)
    assert measured["activations_bytes"] == costs.kept_activation_bytes(cfg, rank), rank
    peak = costs.formula_peak(cfg, rank)
    assert abs(peak - measured["peak_bytes"]) <= PEAK_TOL * measured["peak_bytes"] + late, (
        rank, peak, measured["peak_bytes"])


def late_collective_bytes(cfg, rank: int) -> int:
    """The buffers of this rank's largest collective call: an all-gather's (padded) piece
    and its P receive buffers, a reduce-scatter's P chunks and its output, an all-reduce's
    tensor — what gloo may still hold when the next peak comes."""
    out = 0
    for m in costs.messages(cfg, rank):
        if m.op == "all_gather":
            out = max(out, m.sent + m.received + m.sent)
        elif m.op == "reduce_scatter":
            out = max(out, m.sent + m.received // max(m.group_size - 1, 1))
        elif m.op == "all_reduce":
            out = max(out, m.sent)
    return out


def check_memory_collectives(measured: dict, predicted: dict, *, late: int) -> None:
    """Tensor parallel: gloo runs a collective on a worker thread, which lets go of the
    collective's tensors a moment after this rank resumes (freeing a storage there takes
    the GIL); on a loaded machine a buffer the runner has dropped (a gathered piece, the
    all-reduced o, a reduce-scatter's output) can still be alive at the next peak. So the
    training peak is at least the dry run's and over it by at most PEAK_TOL or one
    collective's buffers (`late`), whichever is more; seen: exact, or one collective's
    buffers over (3.6 % on a 30-wide net; 6.2 %, 3,128 bytes of a 3,584-byte all-gather,
    on row-2L-bias-M3 at P=3 on a loaded 2-core machine). Everything else is exact: the
    prediction forward (exchange=False) makes no collective at all."""
    for k in EXACT + ("predict_peak_bytes", "predict_breakdown"):
        assert measured[k] == predicted[k], k
    peak, want = measured["peak_bytes"], predicted["peak_bytes"]
    assert want <= peak <= want + max(PEAK_TOL * want, late), (peak, want, late)
    assert sum(measured["breakdown"].values()) == peak


# ---------------------------------------------------------------- the tracker itself


def test_tracker_counts_storages_by_hand():
    w = torch.zeros(10, 10, dtype=torch.float64)  # 800 bytes of "params"
    wv = w.view(100)
    tr = StorageTracker(torch.device("cpu"))
    with tr:
        tr.seed("params", [w, wv])  # one storage, counted once
        assert tr.live_bytes == 800
        a = torch.ones(50, dtype=torch.float64)  # +400
        a.add_(1)  # in place: nothing new
        v = a[10:]  # a view: nothing new
        b = a * 2  # +400 -> 1600, the peak
        tr.tag("activations", [v])  # a's storage, through its view
        del b  # -400
        c = torch.ones(25, dtype=torch.float64)  # +200 -> 1400
        del a, v  # a's storage goes only with its last view
        assert tr.live_bytes == 1000
        del c
    assert tr.peak == 1600
    assert tr.breakdown() == {"params": 800, "grads": 0, "optimizer": 0, "input": 0,
                              "activations": 400, "gathered": 0, "comm": 0, "temporaries": 400}
    assert tr.category_peaks["activations"] == 400 and tr.live_bytes == 800


def test_tracker_raises_past_the_limit():
    tr = StorageTracker(torch.device("cpu"), rank=3, limit=1000)
    with pytest.raises(MemoryLimitExceeded) as info, tr:
        keep = [torch.ones(50, dtype=torch.float64) for _ in range(3)]  # 1200 > 1000
        del keep
    e = info.value
    assert (e.rank, e.needed, e.limit) == (3, 1200, 1000)
    assert "rank 3" in str(e) and "1,200 bytes" in str(e) and "memory_limit=1,000" in str(e)


def test_probe_off_measures_nothing():
    cfg = make_config(memory_probe=False)
    rec = run_rank(cfg, single_process("cpu"), None, Ledger())
    assert rec.memory["peak_bytes"] is None and rec.memory["predict_peak_bytes"] is None
    assert rec.memory["params_bytes"] == costs.state_bytes(cfg, 0)["params_bytes"]


# ---------------------------------------------------------------- single device


SINGLE_CASES = [
    {"model.dims": [784, 256, 10]},
    {"model.dims": [30, 50, 20, 6], "train.microbatches": 4, "model.activation": "tanh"},
    {"model.dims": [30, 50, 6], "model.bias": True, "model.loss": "squared_error",
     "train.dtype": "float32", "train.momentum": 0.9, "model.activation": "sigmoid"},
    {"model.dims": [30, 64, 6], "data.shuffle": True, "train.batch_size": 48,
     "train.microbatches": 3},
]


@pytest.mark.parametrize("kw", SINGLE_CASES)
def test_single_measured_equals_predicted(kw):
    cfg = make_config(**kw)
    rec = run_rank(cfg, single_process("cpu"), None, Ledger())
    pred = costs.predict(cfg)["ranks"][0]
    check_memory(rec.memory, pred["memory"])
    check_formula(cfg, 0, rec.memory)
    assert rec.memory_steps_equal
    assert rec.comm["messages"] == 0 and pred["comm"]["messages"] == 0


def test_seed_claims_measured():
    """Training needs more than prediction; kept activations ∝ batch size and ∝ depth."""
    def mem(B, hidden):
        cfg = make_config(**{"model.dims": [20] + [32] * hidden + [5], "train.batch_size": B,
                             "train.steps": 2})
        return run_rank(cfg, single_process("cpu"), None, Ledger()).memory

    base = mem(16, 1)
    assert base["peak_bytes"] > base["predict_peak_bytes"]
    assert mem(32, 1)["activations_bytes"] == 2 * base["activations_bytes"]
    assert mem(64, 1)["activations_bytes"] == 4 * base["activations_bytes"]
    assert mem(16, 2)["activations_bytes"] == 2 * base["activations_bytes"]
    assert mem(16, 3)["activations_bytes"] == 3 * base["activations_bytes"]
    # The seed's network, h = 32, B = 16, float64: z and h kept, 2·B·h·8 bytes.
    assert base["activations_bytes"] == 2 * 16 * 32 * 8


SEED = {"model.dims": [784, 2048, 10], "train.batch_size": 512, "train.dtype": "float32",
        "train.steps": 2}


def test_done_when_single_device(tmp_path):
    d, h, q = 784, 2048, 10
    cfg = make_config(**SEED)
    rec = run_rank(cfg, single_process("cpu"), None, Ledger())
    m = rec.memory
    assert m["params_bytes"] == (d * h + h * q) * 4
    est = costs.independent_estimate(cfg)  # params + grads + input + (z, h) + dh
    assert abs(m["peak_bytes"] - est) / est < 1e-3
    check_formula(cfg, 0, m)
    assert m["predict_peak_bytes"] < est
    # Half that peak: the run ends cleanly with status oom, naming the bytes and the limit.
    limit = m["peak_bytes"] // 2
    res = run(make_config(**SEED, memory_limit=limit), str(tmp_path))
    assert res["status"] == "oom"
    err = res["error"]
    assert err["rank"] == 0 and err["type"] == "MemoryLimitExceeded"
    assert f"memory_limit={limit:,} bytes" in err["message"]
    assert f"{m['peak_bytes']:,} bytes" in err["message"]  # what the whole step needs
    assert res["predicted"]["ranks"][0]["memory"]["peak_bytes"] == m["peak_bytes"]
    assert json.load(open(tmp_path / "result.json"))["status"] == "oom"


def test_cli_oom_is_one_line(tmp_path):
    env = {**os.environ, "PYTHONPATH": ROOT}
    out = subprocess.run(
        [sys.executable, "-m", "experiments.run", "model.dims=[64,512,10]",
         "train.batch_size=256", "train.steps=2", "memory_limit=1MiB",
         f"hydra.run.dir={tmp_path}"], cwd=ROOT, env=env, capture_output=True, text=True,
        timeout=120)
    text = out.stdout + out.stderr
    assert "Traceback" not in text
    assert "[oom] single" in out.stdout and "memory_limit=1,048,576 bytes" in out.stdout
    assert json.load(open(tmp_path / "result.json"))["status"] == "oom"


def test_precheck_refuses_up_front(tmp_path):
    cfg = make_config(**SEED, memory_limit="16MiB", **{"cost.precheck": True})
    res = run(cfg, str(tmp_path))
    assert res["status"] == "oom" and res["error"]["rank"] == 0
    assert "refused before starting" in res["error"]["message"]
    assert not (tmp_path / "errors").exists()  # nothing ran


def test_calibration_single_is_recorded():
    cfg = make_config(**{"cost.calibrate": True, "train.steps": 2})
    rec = run_rank(cfg, single_process("cpu"), None, Ledger())
    assert rec.calibration["flops_per_s"] > 0
    res = build_result(cfg, [rec], seconds=1.0)
    assert res["predicted"]["cost_params"]["source"] == "calibrated"
    assert res["predicted"]["cost_params"]["flops_per_s"] == rec.calibration["flops_per_s"]
    assert res["ranks"][0]["calibration"] == rec.calibration
    assert res["prediction_error"]["max_abs"]["comm"] == 0.0
    assert res["prediction_error"]["max_abs"]["peaks"] == 0.0


# ---------------------------------------------------------------- pipeline (spawned ranks)


def _ranks_run(rank: int, world: int, cfg_dicts: list[dict]):
    """run_rank for each config in turn; the c10d observer watches all of it."""
    out = []
    for cd in cfg_dicts:
        cfg = parse_config(cd)
        ledger = Ledger()
        comm = Comm(rank=rank, world_size=world, ledger=ledger)
        obs = Observer()
        with obs:
            rec = run_rank(cfg, from_env("cpu"), comm, ledger)
        outside = [r for r in ledger.records if r.step is None]
        in_steps = sorted((r.op, r.sent + r.received) for r in ledger.records
                          if r.step is not None)
        out.append((rec, outside, in_steps, obs.ops))
    return out


def _pipe(P: int, dims: list[int], M: int, schedule: str, **kw) -> dict:
    return config_dict(strategy="pipeline", world_size=P, **{
        "model.dims": dims, "train.batch_size": 24, "train.microbatches": M,
        "strategy.schedule": schedule, "train.steps": 3, "data.num_examples": 64, **kw})


PIPE_CASES = {
    2: [_pipe(2, [30, 40, 6], 1, "gpipe"),
        _pipe(2, [30, 40, 6], 4, "1f1b", **{"model.activation": "tanh"}),
        _pipe(2, [30, 40, 20, 6], 3, "gpipe", **{"model.bias": True,
                                                  "train.momentum": 0.9}),
        _pipe(2, [30, 40, 20, 6], 6, "1f1b", **{"train.dtype": "float32",
                                                 "model.loss": "squared_error"})],
    3: [_pipe(3, [30, 40, 20, 12, 6], 2, "gpipe"),
        _pipe(3, [30, 40, 20, 12, 6], 4, "1f1b", **{"model.activation": "sigmoid"}),
        _pipe(3, [30, 40, 20, 6], 1, "1f1b", **{"strategy.balance": [1, 1, 1]})],
}


@pytest.mark.parametrize("P", [2, 3])
def test_pipeline_measured_equals_predicted(P):
    cases = PIPE_CASES[P]
    out = spawn(_ranks_run, P, cases, timeout=240)
    name = {"send": "send", "recv_": "recv", "allreduce_": "all_reduce"}
    for i, cd in enumerate(cases):
        cfg = parse_config(cd)
        pred = costs.predict(cfg)
        for rank in range(P):
            rec, outside, in_steps, observed = out[rank][i]
            pr = pred["ranks"][rank]
            for k in COMM_KEYS:  # payload, wire and messages, by role and phase: exact
                assert rec.comm[k] == pr["comm"][k], (i, rank, k)
            check_memory(rec.memory, pr["memory"])
            check_formula(cfg, rank, rec.memory)
            assert rec.in_flight_max == pr["in_flight_max"]
            assert rec.in_flight_max == max(costs.in_flight_per_stage(cfg, rank).values())
            assert rec.memory_steps_equal
            # The measured prediction forward crossed nothing: no traffic outside steps.
            assert outside == []
            assert sorted((name[o.op], o.bytes) for o in observed) == in_steps


def test_done_when_pipeline_stage_params():
    d, h, q = 784, 2048, 10
    cd = config_dict(strategy="pipeline", world_size=2,
                     **{**SEED, "train.steps": 1, "train.warmup_steps": 0})
    out = spawn(_ranks_run, 2, [cd], timeout=240)
    assert [o[0][0].memory["params_bytes"] for o in out] == [d * h * 4, h * q * 4]


def test_calibration_with_peers():
    cd = config_dict(strategy="pipeline", world_size=2, **{
        "model.dims": [16, 12, 4], "train.steps": 2, "cost.calibrate": True})
    out = spawn(_ranks_run, 2, [cd], timeout=240)
    recs = [o[0][0] for o in out]
    for rec, outside in ((o[0][0], o[0][1]) for o in out):
        cal = rec.calibration
        assert cal["alpha_s"] >= 0 and cal["beta_Bps"] > 0 and cal["collective_beta_Bps"] > 0
        assert outside and {r.role for r in outside} == {"calibration"}
        assert {r.phase for r in outside} == {"setup"}
    res = build_result(parse_config(cd), recs, seconds=1.0)
    assert res["predicted"]["cost_params"]["alpha_s"] == recs[0].calibration["alpha_s"]
    # The micro-benchmark's traffic stayed out of every step's ledger.
    assert res["prediction_error"]["max_abs"]["comm"] == 0.0


# ---------------------------------------------------------------- tensor and data (shared spawn)


def _wire(strategy: str, dims: list[int], **kw) -> dict:
    return {"strategy": strategy, "model.dims": dims, "train.batch_size": 24, "train.steps": 3,
            "data.num_examples": 64, **kw}


# Widths 41, 13, 7 split unevenly at P = 2 and 3 (40 at P = 3); B = 25 and 23 likewise.
WIRE_CASES = [
    ("meg-2L", _wire("tensor", [96, 41, 6])),
    ("meg-3L-bias-M2", _wire("tensor", [96, 41, 13, 6], **{
        "model.bias": True, "model.activation": "tanh", "train.microbatches": 2})),
    ("row-2L-bias-M3", _wire("tensor", [96, 41, 7], **{
        "strategy.layout": "rowwise", "model.bias": True, "model.activation": "sigmoid",
        "train.microbatches": 3})),
    ("row-3L-f32", _wire("tensor", [96, 40, 13, 7], **{
        "strategy.layout": "rowwise", "train.dtype": "float32",
        "model.loss": "squared_error"})),
    ("data-3L-bias", _wire("data", [96, 41, 13, 6], **{
        "model.bias": True, "train.batch_size": 25})),
    ("data-f32-momentum", _wire("data", [96, 41, 6], **{
        "train.batch_size": 23, "train.dtype": "float32", "train.momentum": 0.9})),
]

# Part of the one spawn per P that test_tensor.py / test_data_parallel.py share.
register("memory", lambda P: [make_config(**over, world_size=P) for _, over in WIRE_CASES]
         if P in (2, 3) else [])


@pytest.mark.parametrize("P", [2, 3])
def test_tensor_and_data_measured_equal_predicted(P):
    cfgs, res = results("memory", P)  # res[case][rank]
    for (name, _), cfg, per_rank in zip(WIRE_CASES, cfgs, res, strict=True):
        pred = costs.predict(cfg)
        for r, rr in enumerate(per_rank):
            pr = pred["ranks"][r]
            # the steady step's ledger, as run_rank summarizes it into ranks[].comm
            comm = summarize([x for x in rr["records"] if x.step == cfg.train.steps - 1])
            for k in COMM_KEYS:  # every role, bytes, messages, collective and wire: exact
                assert comm[k] == pr["comm"][k], (name, r, k)
            if cfg.strategy.name == "data":
                check_memory(rr["memory"], pr["memory"])  # in place on seeded grads: exact
                check_formula(cfg, r, rr["memory"])
            else:
                late = late_collective_bytes(cfg, r)
                check_memory_collectives(rr["memory"], pr["memory"], late=late)
                check_formula(cfg, r, rr["memory"], late=late)


# ---------------------------------------------------------------- device too small


# A net where a P=2 pipeline with micro-batches, and a P=2 tensor split, need less than
# one device: the limit sits between their peaks and the single device's.
SMALL_DEVICE = {"model.dims": [64, 512, 512, 10], "train.batch_size": 256,
                "train.microbatches": 4, "train.steps": 2, "train.dtype": "float32"}


def _limit_between() -> tuple[int, int, int]:
    single = costs.rank_costs(make_config(**SMALL_DEVICE))[0].train.peak_bytes
    pipe = max(c.train.peak_bytes for c in costs.rank_costs(make_config(
        strategy="pipeline", world_size=2, **SMALL_DEVICE, **{"strategy.schedule": "1f1b"})))
    tensor = max(c.train.peak_bytes for c in costs.rank_costs(make_config(
        strategy="tensor", world_size=2, **SMALL_DEVICE)))
    assert max(pipe, tensor) < single
    return pipe, (max(pipe, tensor) + single) // 2, single


def test_limit_between_pipeline_and_single(tmp_path):
    pipe, limit, single = _limit_between()
    res = run(make_config(**SMALL_DEVICE, memory_limit=limit), str(tmp_path / "single"))
    assert res["status"] == "oom" and res["error"]["rank"] == 0
    assert f"{single:,} bytes" in res["error"]["message"]
    res = run(make_config(strategy="pipeline", world_size=2, **SMALL_DEVICE,
                          memory_limit=limit, **{"strategy.schedule": "1f1b"}),
              str(tmp_path / "pipe"))
    assert res["status"] == "ok"
    assert max(r["memory"]["peak_bytes"] for r in res["ranks"]) == pipe <= limit
    # result.json: the prediction next to the measurement, and their agreement.
    assert res["predicted"]["bubble_fraction"] == pytest.approx(1 / 5)
    assert res["predicted"]["flops_per_step"] > 0 and res["predicted"]["step_time_s"] > 0
    assert res["prediction_error"]["max_abs"] == {"comm": 0.0, "state": 0.0, "peaks": 0.0}
    fe = res["prediction_error"]["formula_max_abs"]  # the closed forms against the run
    assert fe["comm"] == 0.0 and fe["state"] == 0.0 and fe["peak"] <= PEAK_TOL
    # Tensor (megatron) at P = 2 fits too: W¹ and W² halved, the last layer replicated.
    tcfg = make_config(strategy="tensor", world_size=2, **SMALL_DEVICE, memory_limit=limit)
    res = run(tcfg, str(tmp_path / "tensor"))
    assert res["status"] == "ok"
    err = res["prediction_error"]["max_abs"]
    assert err["comm"] == 0.0 and err["state"] == 0.0
    for r in res["ranks"]:  # the peak: the dry run's, or over it by gloo's late buffers
        check_memory_collectives(r["memory"], res["predicted"]["ranks"][r["rank"]]["memory"],
                                 late=late_collective_bytes(tcfg, r["rank"]))
        check_formula(tcfg, r["rank"], r["memory"], late=late_collective_bytes(tcfg, r["rank"]))
    fe = res["prediction_error"]["formula_max_abs"]
    assert fe["comm"] == 0.0 and fe["state"] == 0.0
    assert max(r["memory"]["peak_bytes"] for r in res["ranks"]) <= limit


@pytest.mark.slow
def test_pipeline_oom_ends_cleanly_without_hanging(tmp_path):
    """The big stage runs out; its peer, blocked on it, fails at once; status oom."""
    import time

    pipe, _, _ = _limit_between()
    cfg = make_config(strategy="pipeline", world_size=2, **SMALL_DEVICE,
                      memory_limit=pipe - 1, timeout_s=120, **{"strategy.schedule": "1f1b"})
    peaks = [c.train.peak_bytes for c in costs.rank_costs(cfg)]
    big = peaks.index(pipe)
    assert peaks[1 - big] < pipe - 1  # only the big stage is over the limit
    t0 = time.perf_counter()
    res = run(cfg, str(tmp_path))
    assert time.perf_counter() - t0 < 100  # far less than the peers' 120 s timeout
    assert res["status"] == "oom"
    assert res["error"]["rank"] == big and res["error"]["type"] == "MemoryLimitExceeded"
    assert f"memory_limit={pipe - 1:,} bytes" in res["error"]["message"]
    assert sorted(os.listdir(tmp_path / "errors")) == ["rank0.json", "rank1.json"]
