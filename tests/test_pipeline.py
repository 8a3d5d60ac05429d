"""Pipeline partition: plans, schedules, exact weights, exact bytes, the observer (issue 3)."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import config_dict, make_config, spawn

from partition.comm import Comm, Ledger, Observer
from partition.config import parse_config
from partition.model import MLPSpec
from partition.plans.schedule import Action, gpipe_actions, max_in_flight, one_f_one_b_actions
from partition.plans.stages import plan_stages
from partition.topology import from_env, single_process
from partition.train import run_rank
from partition.weights import assemble

# ---------------------------------------------------------------- pure plans


def test_stage_plan_balances_parameters():
    spec = MLPSpec((784, 256, 10))
    assert plan_stages(spec, 2) == [(0, 1), (1, 2)]
    deep = MLPSpec((10, 100, 100, 10, 10))  # params 1000, 10000, 1000, 100
    assert plan_stages(deep, 2) == [(0, 2), (2, 4)]
    assert plan_stages(deep, 3) == [(0, 1), (1, 2), (2, 4)]
    assert plan_stages(deep, 2, (1, 3)) == [(0, 1), (1, 4)]


def test_stage_plan_refuses_impossible_splits():
    spec = MLPSpec((8, 4, 2))
    with pytest.raises(ValueError, match="3 stages for 2 layers"):
        plan_stages(spec, 3)
    with pytest.raises(ValueError, match="summing to 2"):
        plan_stages(spec, 2, (1, 2))


@pytest.mark.parametrize("P", [1, 2, 3, 4])
@pytest.mark.parametrize("M", [1, 2, 4, 5])
def test_schedules_hold_at_most_their_bound(P, M):
    for i in range(P):
        g, f = gpipe_actions(i, P, M), one_f_one_b_actions(i, P, M)
        for acts in (g, f):
            want = [Action(i, k, m) for k in "FB" for m in range(M)]
            assert sorted(acts) == sorted(want)
            # backwards in the forwards' order, each after its forward.
            assert [a.mb for a in acts if a.kind == "B"] == list(range(M))
            assert all(acts.index(Action(i, "F", m)) < acts.index(Action(i, "B", m))
                       for m in range(M))
        assert max_in_flight(g) == M
        assert max_in_flight(f) == min(P - i, M)


# ---------------------------------------------------------------- spawned ranks


def _pipeline_rank(rank: int, world: int, cfg_dict: dict):
    cfg = parse_config(cfg_dict)
    topo = from_env("cpu")
    ledger = Ledger()
    comm = Comm(rank=rank, world_size=world, ledger=ledger)
    obs = Observer()
    with obs:
        rec = run_rank(cfg, topo, comm, ledger)
    in_steps = [r for r in ledger.records if r.step is not None]
    return rec, in_steps, obs.ops


def single_weights(**dotted) -> dict[str, np.ndarray]:
    cfg = make_config(**{**dotted, "strategy": "single", "world_size": 1})
    rec = run_rank(cfg, single_process("cpu"), None, Ledger())
    return assemble(cfg.spec, rec.shards, np.dtype("float64"))


def max_rel(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> float:
    assert a.keys() == b.keys()
    return max(np.linalg.norm(a[k] - b[k]) / np.linalg.norm(b[k]) for k in a)


CASES = [
    # (dims, P, M, schedule, bias)
    ([784, 64, 10], 2, 1, "gpipe", False),
    ([784, 64, 10], 2, 4, "1f1b", False),
    ([20, 16, 12, 8, 5], 3, 2, "gpipe", True),
    ([20, 16, 12, 8, 5], 3, 5, "1f1b", True),
    ([20, 16, 12, 8, 5], 4, 2, "1f1b", False),
    ([20, 16, 12, 8, 5], 4, 5, "gpipe", False),
]


@pytest.mark.parametrize("dims,P,M,schedule,bias", CASES)
def test_pipeline_reproduces_single_device_and_counts_bytes(dims, P, M, schedule, bias):
    B, steps = 20, 3
    common = {"model.dims": dims, "model.bias": bias, "model.weight_decay": 0.01,
              "model.activation": "tanh", "train.batch_size": B, "train.microbatches": M,
              "train.steps": steps, "data.num_examples": 50}
    cfg_d = config_dict(**common, strategy="pipeline", world_size=P,
                        **{"strategy.schedule": schedule})
    out = spawn(_pipeline_rank, P, cfg_d)
    records = [o[0] for o in out]
    cfg = parse_config(cfg_d)
    got = assemble(cfg.spec, [s for r in records for s in r.shards], np.dtype("float64"))
    assert max_rel(got, single_weights(**common)) <= 1e-12

    plan = plan_stages(cfg.spec, P)
    item = 8
    for rank, (rec, in_steps, observed) in enumerate(out):
        # Exact bytes: B · boundary width · item size each way per boundary, in M messages.
        fwd_out = B * dims[plan[rank][1]] * item if rank < P - 1 else 0
        bwd_out = B * dims[plan[rank][0]] * item if rank > 0 else 0
        by_role = rec.comm["by_role"]
        assert by_role.get("activation", {"bytes": 0})["bytes"] == fwd_out
        assert by_role.get("activation_grad", {"bytes": 0})["bytes"] == bwd_out
        assert by_role.get("activation", {"messages": 0})["messages"] == (M if fwd_out else 0)
        assert by_role["metric"] == {"bytes": 3 * 8, "messages": 1}
        assert rec.comm["sent_bytes"] == fwd_out + bwd_out
        recv_in = B * dims[plan[rank][0]] * item if rank > 0 else 0
        recv_grad = B * dims[plan[rank][1]] * item if rank < P - 1 else 0
        assert rec.comm["recv_bytes"] == recv_in + recv_grad
        assert rec.comm_steps_equal
        # 1F1B keeps at most min(P−i, M) micro-batches of activations; GPipe all M.
        assert rec.in_flight_max == (M if schedule == "gpipe" else min(P - rank, M))
        # The independent observer saw exactly the recorded ops, with the same bytes.
        recorded = sorted((r.op, r.sent + r.received) for r in in_steps)
        name = {"send": "send", "recv_": "recv", "allreduce_": "all_reduce"}
        seen = sorted((name[o.op], o.bytes) for o in observed)
        assert seen == recorded


def test_pipeline_grad_check_and_metric_agree():
    common = {"model.dims": [12, 10, 8, 3], "train.batch_size": 8, "train.microbatches": 2,
              "train.steps": 2, "train.grad_check": True, "model.weight_decay": 0.1}
    out = spawn(_pipeline_rank, 3, config_dict(**common, strategy="pipeline", world_size=3))
    single = run_rank(make_config(**common), single_process("cpu"), None, Ledger())
    for rec, _, _ in out:
        assert rec.grad_rel_err is not None and rec.grad_rel_err <= 1e-12
        # J is reduced over the stages: every rank reports the single-device value.
        np.testing.assert_allclose(rec.objective, single.objective, rtol=1e-13)
