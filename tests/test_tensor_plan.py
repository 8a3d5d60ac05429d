"""Pure tensor-parallel planning (issue 4): shard ranges, layer plans, byte formulas, config."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import make_config

from partition.config import ConfigError
from partition.plans.split import split_evenly
from partition.plans.tensor import (
    megatron_plan,
    plan_layers,
    rowwise_plan,
    shard_params,
    split_widths,
    tensor_traffic,
)


@pytest.mark.parametrize("n,parts,want", [
    (8, 2, [(0, 4), (4, 8)]),
    (7, 2, [(0, 4), (4, 7)]),
    (10, 4, [(0, 3), (3, 6), (6, 8), (8, 10)]),  # the first n mod P ranks take one more
    (5, 5, [(0, 1), (1, 2), (2, 3), (3, 4), (4, 5)]),
    (3, 1, [(0, 3)]),
])
def test_split_evenly(n, parts, want):
    assert split_evenly(n, parts) == want


@pytest.mark.parametrize("n", range(1, 30))
@pytest.mark.parametrize("parts", [1, 2, 3, 4, 7])
def test_split_evenly_covers_once_and_differs_by_at_most_one(n, parts):
    if n < parts:
        with pytest.raises(ValueError, match=f"width of {n} over {parts} ranks"):
            split_evenly(n, parts)
        return
    r = split_evenly(n, parts)
    assert r[0][0] == 0 and r[-1][1] == n
    assert all(a[1] == b[0] for a, b in zip(r, r[1:], strict=False))
    sizes = [hi - lo for lo, hi in r]
    assert max(sizes) - min(sizes) <= 1 and sizes == sorted(sizes, reverse=True)


def test_split_evenly_refuses_no_parts():
    with pytest.raises(ValueError, match="0 parts"):
        split_evenly(4, 0)


def coverage(dims, layout, P):
    """How many ranks hold each element of each W, and how many count it as primary."""
    held = [np.zeros((dims[l + 1], dims[l]), int) for l in range(len(dims) - 1)]
    primary = [np.zeros_like(h) for h in held]
    for r in range(P):
        for s in plan_layers(layout, dims, P, r):
            rows = slice(*s.rows) if s.rows else slice(None)
            cols = slice(*s.cols) if s.cols else slice(None)
            held[s.layer][rows, cols] += 1
            primary[s.layer][rows, cols] += s.primary
    return held, primary


@pytest.mark.parametrize("dims", [[7, 5, 4], [6, 7, 5, 4], [9, 6, 7, 5, 4], [7, 4],
                                  [10, 9, 8, 7, 6, 5]])
@pytest.mark.parametrize("P", [1, 2, 3, 4])
@pytest.mark.parametrize("layout", ["megatron", "rowwise"])
def test_every_weight_is_held_and_counted_once(dims, P, layout):
    held, primary = coverage(dims, layout, P)
    L = len(dims) - 1
    for l in range(L):
        replicated = layout == "megatron" and L % 2 == 1 and l == L - 1
        assert (held[l] == (P if replicated else 1)).all()
        assert (primary[l] == 1).all()  # s and weights.npz see each element exactly once


def test_megatron_pairs_columns_then_rows_and_replicates_an_odd_last_layer():
    plan = megatron_plan([9, 6, 7, 5, 4, 3], 2, 1)
    assert [(s.layer, s.kind) for s in plan] == [(0, "column"), (1, "row"), (2, "column"),
                                                 (3, "row"), (4, "replicated")]
    # rank 1's units of each paired hidden width: rows of the column layer = cols of the row layer
    assert plan[0].rows == plan[1].cols == (3, 6) and plan[0].cols is None and plan[1].rows is None
    assert plan[2].rows == plan[3].cols == (3, 5)
    assert [s.bias_owner for s in plan] == [True, False, True, False, True]  # row bias: rank 0
    assert [s.primary for s in plan] == [True, True, True, True, False]  # replica: rank 0's
    assert megatron_plan([9, 6, 7, 5, 4, 3], 2, 0)[1].bias_owner


def test_rowwise_splits_every_layer_by_output_rows():
    plan = rowwise_plan([9, 6, 7, 5], 3, 2)
    assert [(s.kind, s.rows, s.cols) for s in plan] == [
        ("rowwise", (4, 6), None), ("rowwise", (5, 7), None), ("rowwise", (4, 5), None)]


def test_split_widths_and_world_checks():
    assert split_widths("megatron", [9, 6, 7, 5, 4]) == [6, 5]
    assert split_widths("megatron", [9, 6, 7, 5]) == [6]
    assert split_widths("megatron", [9, 4]) == []
    assert split_widths("rowwise", [9, 6, 7, 5]) == [6, 7, 5]
    with pytest.raises(ValueError, match="4 ranks exceed the narrowest, 3"):
        megatron_plan([8, 3, 10], 4, 0)
    with pytest.raises(ValueError, match="exceed the narrowest, 2"):
        rowwise_plan([8, 9, 2], 3, 0)
    with pytest.raises(ValueError, match="rank 2 outside"):
        megatron_plan([8, 4, 4], 2, 2)
    with pytest.raises(ValueError, match="unknown tensor layout"):
        plan_layers("diagonal", [8, 4, 4], 2, 0)


def test_shard_params_seed():
    # seed [784, 256, 10] at P = 2: 128 hidden units per rank, their W1 rows and W2 columns
    assert shard_params([784, 256, 10], megatron_plan([784, 256, 10], 2, 0), bias=False) \
        == 128 * 784 + 10 * 128
    # with biases: b1 is split with the rows; b2 sits on rank 0 only
    assert shard_params([784, 256, 10], megatron_plan([784, 256, 10], 2, 0), bias=True) \
        == 128 * 785 + 10 * 128 + 10
    assert shard_params([784, 256, 10], megatron_plan([784, 256, 10], 2, 1), bias=True) \
        == 128 * 785 + 10 * 128


def test_traffic_formulas_seed_and_deeper():
    # seed, B = 256, float32, P = 2: megatron B·q·b forward, nothing backward
    meg = tensor_traffic("megatron", [784, 256, 10], world=2, batch=256, micro=1, itemsize=4)
    assert {k: (v.bytes, v.messages, v.wire) for k, v in meg.items()} == {
        "partial_output": (10_240, 1, 10_240), "metric": (24, 1, 24)}
    # rowwise: gather B·(h/2 + q/2)·b, reduce-scatter of the whole B·h·b partial gradient
    row = tensor_traffic("rowwise", [784, 256, 10], world=2, batch=256, micro=1, itemsize=4)
    assert {k: (v.bytes, v.messages, v.wire) for k, v in row.items()} == {
        "gather": (256 * (128 + 5) * 4, 2, 256 * (128 + 5) * 4),
        "input_grad": (262_144, 1, 131_072), "metric": (24, 1, 24)}
    # P = 4, four layers, M = 2: two pair outputs forward, one pair input backward, per micro-batch
    deep = tensor_traffic("megatron", [784, 512, 512, 256, 10], world=4, batch=64, micro=2,
                          itemsize=8)
    assert deep["partial_output"].bytes == 64 * (512 + 10) * 8
    assert deep["partial_output"].messages == 4
    assert deep["input_grad"].bytes == 64 * 512 * 8 and deep["input_grad"].messages == 2
    assert deep["input_grad"].wire == 2 * (2 * 3 * 32 * 512 * 8 // 4)
    # one device: nothing crosses but J
    assert set(tensor_traffic("rowwise", [7, 5, 4], world=1, batch=8, micro=1, itemsize=8)) \
        == {"metric"}


@pytest.mark.parametrize("over,key,fragment", [
    ({"strategy": "tensor", "world_size": 6, "model.dims": [7, 5, 9]}, "world_size",
     "narrowest, 5"),
    ({"strategy": "tensor", "world_size": 3, "model.dims": [7, 5, 2],
      "strategy.layout": "rowwise"}, "world_size", "narrowest, 2"),
    ({"strategy": "data", "world_size": 4, "train.batch_size": 10, "train.microbatches": 5},
     "train.microbatches", "is 2 rows"),
])
def test_config_refuses_what_cannot_be_split(over, key, fragment):
    with pytest.raises(ConfigError) as e:
        make_config(**over)
    assert e.value.key == key and fragment in str(e.value)


def test_config_accepts_uneven_splits():
    assert make_config(strategy="tensor", world_size=3, **{"model.dims": [7, 5, 4]}).world_size == 3
    assert make_config(strategy="tensor", world_size=4, **{"model.dims": [7, 4]}).world_size == 4
    # 10 rows over 4 ranks (3, 3, 2, 2), each share in two micro-batches
    assert make_config(strategy="data", world_size=4, **{"train.batch_size": 10,
                                                         "train.microbatches": 2}).world_size == 4
