"""experiments.predict: no rank started, every strategy up to 1024 ranks, checked by hand."""

from __future__ import annotations

import json

import pytest

from experiments.predict import main


def _predict(tmp_path, *overrides: str) -> dict:
    assert main([*overrides, f"hydra.run.dir={tmp_path}"]) == 0
    with open(tmp_path / "prediction.json") as f:
        return json.load(f)


def test_data_parallel_at_1024_ranks_is_the_ring_formula(tmp_path, capsys):
    """Seed [784, 256, 10] float32: N = (784·256 + 256·10)·4 = 813,056 bytes of gradient in one
    all-reduce, 2(P−1)/P·N on the wire; plus the metric's 24 B, 2(P−1)/P·24 → 46 at P=1024."""
    P, N = 1024, (784 * 256 + 256 * 10) * 4
    pred = _predict(tmp_path, "strategy=data", f"world_size={P}", "train.batch_size=4096",
                    "train.dtype=float32")
    assert pred["world_size"] == P and len(pred["ranks"]) == P
    for r in (0, 1, 513, 1023):
        comm = pred["ranks"][r]["comm"]
        assert comm["by_role"]["weight_grad"] == {"bytes": N, "messages": 1}
        assert comm["wire_bytes"] == 2 * (P - 1) * N // P + 2 * (P - 1) * 24 // P
        assert pred["ranks"][r]["memory"]["params_bytes"] == N
    out = capsys.readouterr().out
    assert "1-1023 (x1023)" in out and "no rank started" in out


@pytest.mark.parametrize("overrides,params", [
    # Megatron, h = 65536 over 1024 ranks: 64 hidden units each, W¹ rows and W² columns
    (("strategy=tensor", "world_size=1024", "model.dims=[784,65536,10]",
      "train.dtype=float32"), [(784 * 64 + 64 * 10) * 4] * 1024),
    # 65 layers on 64 stages (float32): the first stage two layers, the others one
    (("strategy=pipeline", "world_size=64", f"model.dims=[64,{','.join(['32'] * 64)},10]",
      "train.microbatches=4", "strategy.schedule=1f1b", "train.dtype=float32"), None),
])
def test_large_meshes_are_predicted(tmp_path, overrides, params):
    pred = _predict(tmp_path, *overrides)
    got = [r["memory"]["params_bytes"] for r in pred["ranks"]]
    if params is None:  # the stage plan's split, by parameter count
        from partition.plans.stages import layer_params

        dims = [64] + [32] * 64 + [10]
        from partition.plans.stages import plan_stages
        from types import SimpleNamespace

        plan = plan_stages(SimpleNamespace(dims=tuple(dims), bias=False), 64)
        params = [sum(layer_params(dims, l, bias=False) for l in range(a, b)) * 4
                  for a, b in plan]
    assert got == params and pred["source"] == "dry run"


def test_a_refused_plan_is_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["strategy=pipeline", "world_size=3", f"hydra.run.dir={tmp_path}"])
    assert e.value.code == 2
    err = [l for l in capsys.readouterr().err.splitlines() if l.strip()]
    assert len(err) == 1 and err[0].startswith("error: world_size=3")
    assert not (tmp_path / "prediction.json").exists()


def test_a_hybrid_mesh_is_predicted_with_its_flops_and_simulated_step(tmp_path, capsys):
    pred = _predict(tmp_path, "strategy=hybrid", "world_size=4", "strategy.pp=2",
                    "strategy.tp=2", "model.dims=[16,12,12,4]", "train.batch_size=8")
    assert pred["step_time_s"] > 0 and pred["not_simulated"] is None
    # pp coordinate 0 holds layer 0 (one layer: not split), coordinate 1 layers 1, 2 (a pair)
    assert [r["flops"] for r in pred["ranks"]] == [r["flops_counted"] for r in pred["ranks"]]
    assert pred["ranks"][0]["flops"] == 2 * 2 * 8 * 16 * 12  # F and W of W¹, whole
    out = capsys.readouterr().out
    assert "simulated step " in out and "idle fraction" in out


def test_predict_says_why_a_step_is_not_simulated(tmp_path, capsys):
    """Action times that lack a stage's actions (a profile of another split): the simulator's
    reason, not the one for weights too large to time."""
    profile = tmp_path / "old.json"
    profile.write_text(json.dumps({"ranks": [{"rank": r, "action_times": {"update": 0.0}}
                                             for r in range(2)]}))
    pred = _predict(tmp_path, "strategy=pipeline", "world_size=2", "model.dims=[8,6,4]",
                    f"cost.profile={profile}")
    assert pred["step_time_s"] is None and pred["not_simulated"] == "the action times have no 's0:F'"
    out = capsys.readouterr().out
    assert "simulated step: not predicted (the action times have no 's0:F')" in out
    assert "too large" not in out


def test_a_sharded_1024_rank_mesh_is_predicted(tmp_path):
    """dp=8 (dp_shard) × pp=8 × tp=16, dims [64, 32 × 15, 10] float32, B=256, M=4: two layers
    per stage (strategy.balance), megatron over tp. Rank 0 holds rows 0–1 of W¹ (2·64 = 128 parameters) and
    columns 0–1 of W² (32·2 = 64), cut over dp=8 in pieces of c = 16 and 8: it gathers
    2·M·(16 + 8)·4 = 768 B in 2·M·2 calls and reduce-scatters M·8·(16 + 8)·4 = 3,072 B in
    M·2. The last stage's second layer (10·2 = 20 parameters) has pieces of 3: dp rank 7's
    holds none of them, only padding."""
    dims = [64] + [32] * 15 + [10]
    pred = _predict(tmp_path, "strategy=hybrid", "world_size=1024", "strategy.pp=8",
                    "strategy.tp=16", "strategy.dp_shard=true", "strategy.balance=[2,2,2,2,2,2,2,2]",
                    f"model.dims=[{','.join(map(str, dims))}]", "train.batch_size=256",
                    "train.microbatches=4", "train.dtype=float32")
    assert len(pred["ranks"]) == 1024
    r0 = pred["ranks"][0]
    assert r0["comm"]["by_dim"]["dp"]["by_role"] == {
        "weight_gather": {"bytes": 768, "messages": 16},
        "weight_grad": {"bytes": 3072, "messages": 8}}
    assert r0["memory"]["params_bytes"] == r0["memory"]["grads_bytes"] == (16 + 8) * 4
    last = pred["ranks"][1023]  # dp 7, pp 7, tp 15: pieces 8 (of 64) and 3 (of 20, none real)
    assert last["memory"]["params_bytes"] == (8 + 3) * 4
    assert {"dp", "pp", "tp", "world"} == set(last["comm"]["by_dim"])
    assert pred["step_time_s"] > 0 and pred["not_simulated"] is None  # simulated, dp_shard too


def test_a_sharded_data_dimension_prints_a_simulated_step(tmp_path, capsys):
    pred = _predict(tmp_path, "strategy=hybrid", "world_size=4", "strategy.tp=2",
                    "strategy.dp_shard=true", "model.dims=[16,12,12,4]", "train.batch_size=8")
    assert pred["step_time_s"] > 0 and pred["not_simulated"] is None
    out = capsys.readouterr().out
    assert "simulated step " in out and "idle fraction" in out
