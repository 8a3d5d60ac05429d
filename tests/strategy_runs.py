"""Helpers for the tensor / data parallel tests: run configs on spawned ranks, check them.

`run_cases` is the rank function: it trains every config with `train.run_rank` on
this rank, under the dispatch-mode `Observer`, and hands back what the tests check.
`sgd_reference` is the independent single-device answer: plain SGD on autograd
gradients (float64), sharing nothing with the explicit engine but the data and the
initial weights.

Spawning P ranks costs seconds per rank (importing torch, the first collective), far
more than the small cases themselves, so the test modules `register` their cases at
import and the first `results(suite, P)` runs every registered suite's cases in one
spawn of P ranks; later calls, from any module, read the cache.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from partition.comm import Comm, Ledger, Observer
from partition.config import RunConfig
from partition.data import load_dataset
from partition.reference import reference_grads
from partition.strategies import build_runner
from partition.topology import Topology
from partition.train import run_rank
from partition.weights import assemble, initial_weights

# Ledger op -> the c10d op the dispatch-mode observer sees for it on gloo.
C10D = {"all_reduce": "allreduce_", "all_gather": "allgather_",
        "reduce_scatter": "reduce_scatter_"}


_SUITES: dict[str, Callable[[int], list[RunConfig]]] = {}  # suite -> configs at world size P
_RESULTS: dict[int, dict[str, tuple[list[RunConfig], list[list[dict[str, Any]]]]]] = {}


def register(suite: str, configs: Callable[[int], list[RunConfig]]) -> None:
    """Make a module's cases part of the shared spawn (call at import)."""
    _SUITES[suite] = configs


def results(suite: str, P: int) -> tuple[list[RunConfig], list[list[dict[str, Any]]]]:
    """(configs, results[case][rank]) of a registered suite on P ranks; one spawn per P."""
    from conftest import spawn

    if P not in _RESULTS:
        names = list(_SUITES)
        cfgs = {n: _SUITES[n](P) for n in names}
        flat = [c for n in names for c in cfgs[n]]
        per_rank = run_here(flat) if P == 1 else spawn(run_cases, P, flat, timeout=300)
        _RESULTS[P], at = {}, 0
        for n in names:
            k = len(cfgs[n])
            _RESULTS[P][n] = (cfgs[n], [[per_rank[r][i] for r in range(P)]
                                        for i in range(at, at + k)])
            at += k
    return _RESULTS[P][suite]


def run_cases(rank: int, world: int, cfgs: list[RunConfig]) -> list[dict[str, Any]]:
    out = []
    for cfg in cfgs:
        topo = Topology(rank, world, rank, torch.device("cpu"), "gloo")
        ledger = Ledger()
        comm = Comm(rank=rank, world_size=world, ledger=ledger)
        with Observer() as obs:
            rec = run_rank(cfg, topo, comm, ledger)
        pred = predict_at_init(cfg, topo, world)  # None on a pipeline's non-last ranks
        out.append({"shards": rec.shards, "records": list(ledger.records),
                    "observed": [(o.op, o.bytes) for o in obs.ops], "memory": rec.memory,
                    "grad_rel_err": rec.grad_rel_err, "objective": rec.objective,
                    # numpy, not a tensor: torch's queues would share the tensor's memory
                    # with a process that is about to exit
                    "predict": None if pred is None else pred.double().numpy()})
    return out


def predict_at_init(cfg: RunConfig, topo: Topology, world: int) -> torch.Tensor:
    """A fresh runner's prediction forward of step 0's batch (its own ledger: not counted)."""
    comm = Comm(rank=topo.rank, world_size=world, ledger=Ledger())
    data = load_dataset(cfg.data, cfg.spec, seed=cfg.seed)
    full = initial_weights(cfg.spec, init=cfg.model.init, init_path=cfg.model.init_path,
                           seed=cfg.seed)
    return build_runner(cfg, topo, comm, data, full).predict(0)


def single_predict(cfg: RunConfig) -> np.ndarray:
    """The single-device prediction of step 0's batch at the initial weights."""
    from dataclasses import replace

    one = replace(cfg, strategy=replace(cfg.strategy, name="single"), world_size=1)
    data = load_dataset(one.data, one.spec, seed=one.seed)
    full = initial_weights(one.spec, init=one.model.init, init_path=one.model.init_path,
                           seed=one.seed)
    return build_runner(one, Topology(0, 1, 0, torch.device("cpu"), "none"), None, data,
                        full).predict(0).double().numpy()


def run_here(cfgs: list[RunConfig]) -> list[list[dict[str, Any]]]:
    """P = 1 in this process (a one-rank gloo group on an in-memory store): no spawn to pay."""
    import torch.distributed as dist

    assert not dist.is_initialized()
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        return [run_cases(0, 1, cfgs)]
    finally:
        dist.destroy_process_group()


def sgd_reference(cfg: RunConfig) -> dict[str, np.ndarray]:
    """Full weights after cfg.train.steps of heavy-ball SGD on autograd gradients."""
    spec, t = cfg.spec, cfg.train
    data = load_dataset(cfg.data, spec, seed=cfg.seed)
    W = initial_weights(spec, init=cfg.model.init, init_path=cfg.model.init_path, seed=cfg.seed)
    W = {k: v.double().clone() for k, v in W.items()}
    buf = {k: torch.zeros_like(v) for k, v in W.items()}
    for step in range(t.steps):
        X, y = data.batch(step, t.batch_size, shuffle=cfg.data.shuffle, seed=cfg.seed,
                          dtype=torch.float64)
        _, g = reference_grads(spec, W, X, y)
        for k in W:
            buf[k] = t.momentum * buf[k] + g[k]
            W[k] = W[k] - t.lr * buf[k]
    return {k: v.numpy() for k, v in W.items()}


def max_rel_err(cfg: RunConfig, per_rank: list[dict[str, Any]]) -> float:
    """Worst norm-wise relative error of the assembled weights against the reference."""
    got = assemble(cfg.spec, [s for r in per_rank for s in r["shards"]], np.dtype("float64"))
    want = sgd_reference(cfg)
    assert set(got) == set(want)
    worst = 0.0
    for k in want:
        den = float(np.linalg.norm(want[k]))
        num = float(np.linalg.norm(got[k] - want[k]))
        worst = max(worst, num / den if den else num)
    return worst


def role_traffic(records: list, step: int) -> dict[str, dict[str, int]]:
    """{role: {bytes, messages, wire, phase...}} of one rank's step, from its ledger."""
    out: dict[str, dict[str, Any]] = defaultdict(lambda: {"bytes": 0, "messages": 0, "wire": 0,
                                                          "phases": set()})
    for r in records:
        if r.step == step and r.op != "recv":
            d = out[r.role]
            d["bytes"] += r.sent
            d["messages"] += 1
            d["wire"] += r.wire
            d["phases"].add(r.phase)
    return dict(out)


def observed_matches_ledger(result: dict[str, Any]) -> bool:
    """The observer saw exactly the recorded collectives, in order, with the same bytes."""
    recorded = [(C10D[r.op], r.sent) for r in result["records"] if r.op != "recv"]
    return recorded == result["observed"]
