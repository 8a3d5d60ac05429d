"""Determinism: the same config run twice on CPU gives the same weights.npz, byte for byte,
and the same bytes crossing every boundary."""

from __future__ import annotations

import pytest
from conftest import make_config

from partition.launch import run


def _comm_bytes(result: dict) -> list[dict]:
    # Everything the ledger counted, without the times.
    return [{k: v for k, v in r["comm"].items() if k != "seconds"} for r in result["ranks"]]


CASES = [("single", 1, 2), ("pipeline", 2, 2),
         pytest.param("tensor", 2, 2, marks=pytest.mark.slow),
         pytest.param("data", 2, 2, marks=pytest.mark.slow)]


@pytest.mark.parametrize(("strategy", "world", "micro"), CASES,
                         ids=["single", "pipeline-P2", "tensor-P2", "data-P2"])
def test_same_config_same_bits(tmp_path, strategy, world, micro):
    cfg = make_config(strategy=strategy, world_size=world, **{
        "model.dims": [20, 16, 4], "model.bias": True, "model.weight_decay": 1e-3,
        "train.dtype": "float32", "train.batch_size": 32, "train.microbatches": micro,
        "train.steps": 4, "train.momentum": 0.9, "data.shuffle": True})
    a = run(cfg, str(tmp_path / "a"))
    b = run(cfg, str(tmp_path / "b"))
    assert a["status"] == b["status"] == "ok"
    wa = (tmp_path / "a" / "weights.npz").read_bytes()
    wb = (tmp_path / "b" / "weights.npz").read_bytes()
    assert wa == wb
    assert a["train"]["loss"] == b["train"]["loss"]
    assert _comm_bytes(a) == _comm_bytes(b)
    if strategy == "pipeline":  # and something did cross: activations forward, gradients back
        assert a["ranks"][0]["comm"]["by_role"]["activation"]["bytes"] == 32 * 16 * 4
