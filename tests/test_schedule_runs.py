"""Interleaved, looped, zero-bubble and V-shaped schedules on spawned ranks (issue 15).

Every schedule, on both engines, in float64: the weights of single-device training (the
explicit engine bit for bit where each stage adds its micro-batches' gradients in the
order single-device accumulation does), J every step, and on the explicit engine the
bytes, messages and memory of the dry run (costs.predict) to the byte, the in-flight
count of the action list, and nothing crossing that the ledger did not record. The
torch engine (a PipelineStage per stage, torch's own schedule classes, a CSV through
torch's `_PipelineScheduleRuntime`) moves exactly the explicit engine's bytes.
"""

from __future__ import annotations

import contextlib
from dataclasses import replace

import numpy as np
import pytest
import torch
from conftest import make_config, spawn
from test_memory import COMM_KEYS, check_memory

from partition import costs
from partition.comm import Comm, Ledger, Observer
from partition.data import load_dataset
from partition.model import forward_layers, init_weights, make_layer
from partition.plans.schedule import held_at_once, named_schedule
from partition.strategies import build_runner
from partition.topology import Topology, single_process
from partition.train import run_rank
from partition.weights import assemble

NEW = ("interleaved_1f1b", "looped_bfs", "zb1p", "zbv", "dualpipev")
TOL = 1e-12
C10D = {"send": "send", "recv_": "recv", "allreduce_": "all_reduce"}


def _cases(P: int, M: int, engine: str, csvs: list[str]) -> list[dict]:
    dims = [14, 12, 11, 10, 9, 8, 7, 6, 5][: 2 * P + 1]  # 2P layers: P·2 stages at most
    base = {"strategy": "pipeline", "world_size": P, "engine": engine, "model.dims": dims,
            "model.bias": True, "model.weight_decay": 0.01, "train.momentum": 0.9,
            "train.batch_size": 4 * M, "train.microbatches": M, "train.steps": 3,
            "data.num_examples": 64}
    out = [dict(base, **{"strategy.schedule": n}) for n in NEW]
    out.append(dict(base, **{"strategy.schedule": "interleaved_1f1b",
                             "strategy.virtual_stages": 1, "model.activation": "tanh"}))
    out += [dict(base, **{"strategy.schedule": csv}) for csv in csvs]
    return out


def _rank(rank: int, world: int, cases: list[dict]) -> list[dict]:
    out = []
    for over in cases:
        cfg = make_config(**over)
        topo = Topology(rank, world, rank, torch.device("cpu"), "gloo")
        ledger = Ledger()
        comm = Comm(rank=rank, world_size=world, ledger=ledger)
        obs = Observer()  # the explicit engine's independent check (torch's has its own)
        with obs if cfg.engine == "explicit" else contextlib.nullcontext():
            rec = run_rank(cfg, topo, comm, ledger)
        in_steps = sorted((r.op, r.sent + r.received) for r in ledger.records
                          if r.step is not None)
        observed = sorted((C10D.get(o.op, o.op), o.bytes) for o in obs.ops)
        pred = build_runner(cfg, topo, Comm(rank=rank, world_size=world, ledger=Ledger()),
                            load_dataset(cfg.data, cfg.spec, seed=cfg.seed),
                            init_weights(cfg.spec, cfg.seed)).predict(0)
        out.append({"rec": rec, "in_steps": in_steps, "observed": observed,
                    "outside": [r for r in ledger.records if r.step is None],
                    "predict": None if pred is None else pred.numpy()})
    return out


def _single(cfg):
    one = replace(cfg, strategy=replace(cfg.strategy, name="single", schedule="gpipe",
                                        virtual_stages=None), world_size=1, engine="explicit")
    return run_rank(one, single_process("cpu"), None, Ledger())


def _weights(cfg, shards):
    return assemble(cfg.spec, shards, np.dtype("float64"))


def _in_mb_order(cfg) -> bool:
    """Each stage's weight gradients added in micro-batch order (B or W), as single-device
    gradient accumulation adds them: then the sums agree to the bit."""
    s = named_schedule(cfg.strategy.schedule, world=cfg.world_size,
                       micro=cfg.train.microbatches, virtual=cfg.strategy.virtual_stages) \
        if not cfg.strategy.schedule.endswith(".csv") else None
    if s is None:
        return False
    for acts in s.ranks:
        for st in {a.stage for a in acts}:
            mbs = [a.mb for a in acts if a.stage == st and a.kind in "BW"]
            if mbs != sorted(mbs):
                return False
    return True


def check(cases: list[dict], out: list[list[dict]], P: int) -> None:
    for k, over in enumerate(cases):
        cfg = make_config(**over)
        runs = [out[r][k] for r in range(P)]
        ref = _single(cfg)
        got = _weights(cfg, [s for r in runs for s in r["rec"].shards])
        want = _weights(cfg, ref.shards)
        name = cfg.strategy.schedule
        for w in want:
            rel = np.linalg.norm(got[w] - want[w]) / np.linalg.norm(want[w])
            assert rel <= TOL, (name, w, rel)
            if cfg.engine == "explicit" and _in_mb_order(cfg):
                assert np.array_equal(got[w], want[w]), (name, w)
        for r in runs:
            assert r["rec"].status == "ok"
            assert np.allclose(r["rec"].objective, ref.objective, rtol=TOL, atol=0)
        # the dry run of the explicit engine: what each rank moves and holds, exactly
        dry = replace(cfg, engine="explicit")
        pred = costs.predict(dry)
        sched = named_schedule(name, world=P, micro=cfg.train.microbatches,
                               virtual=cfg.strategy.virtual_stages) if not name.endswith(".csv") \
            else None
        for rank, r in enumerate(runs):
            rec, pr = r["rec"], pred["ranks"][rank]
            for key in ("sent_bytes", "recv_bytes", "messages", "by_role"):
                assert rec.comm[key] == pr["comm"][key], (name, cfg.engine, rank, key)
            assert rec.comm_steps_equal
            assert rec.in_flight_max == pr["in_flight_max"], (name, cfg.engine, rank)
            if sched is not None:
                assert rec.in_flight_max == held_at_once(sched.ranks[rank])
            if cfg.engine == "explicit":
                for key in COMM_KEYS:
                    assert rec.comm[key] == pr["comm"][key], (name, rank, key)
                check_memory(rec.memory, pr["memory"])
                assert r["outside"] == [] and r["observed"] == r["in_steps"]
        # the prediction forward, from the rank holding the last stage
        full = init_weights(cfg.spec, cfg.seed)
        X, _ = load_dataset(cfg.data, cfg.spec, seed=cfg.seed).batch(
            0, cfg.train.batch_size, shuffle=False, seed=cfg.seed, dtype=torch.float64)
        layers = [make_layer(full, l, dtype=torch.float64) for l in range(cfg.spec.num_layers)]
        y = forward_layers(cfg.spec, layers, X, keep=False)[0].numpy()
        preds = [r["predict"] for r in runs if r["predict"] is not None]
        assert len(preds) == 1
        assert np.linalg.norm(preds[0] - y) / np.linalg.norm(y) <= TOL


def _csvs(tmp_path_factory, P: int, M: int) -> list[str]:
    """ZB-V (two stages per rank) and ZB-H1 (one, split backward) written as CSVs."""
    out = []
    for name in ("zbv", "zb1p"):
        path = tmp_path_factory.mktemp("csv") / f"{name}-P{P}.csv"
        path.write_text(named_schedule(name, world=P, micro=M).to_csv())
        out.append(str(path))
    return out


@pytest.mark.timeout(600)
@pytest.mark.parametrize("engine", ["explicit", "torch"])
def test_every_schedule_is_single_device_training_on_two_ranks(engine, tmp_path_factory):
    cases = _cases(2, 4, engine, _csvs(tmp_path_factory, 2, 4) if engine == "torch" else [])
    check(cases, spawn(_rank, 2, cases, timeout=500), 2)


@pytest.mark.slow
@pytest.mark.timeout(1200)
@pytest.mark.parametrize("engine", ["explicit", "torch"])
def test_every_schedule_is_single_device_training_on_four_ranks(engine, tmp_path_factory):
    cases = _cases(4, 8, engine, _csvs(tmp_path_factory, 4, 8))
    check(cases, spawn(_rank, 4, cases, timeout=1100), 4)
