"""Config validation and data files: the bad inputs of issue 2, refused with the key and value."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import config_dict, make_config

from partition.config import ConfigError, parse_bytes, parse_config
from partition.data import Dataset, load_npz, synthetic
from partition.model import MLPSpec
from partition.weights import load_init


@pytest.mark.parametrize("dotted,key", [
    ({"strategy": "ring"}, "strategy"),
    ({"model.activation": "gelu"}, "model.activation"),
    ({"model.loss": "hinge"}, "model.loss"),
    ({"model.dims": [784]}, "model.dims"),
    ({"model.dims": [784, 0, 10]}, "model.dims"),
    ({"model.dims": [784, -3, 10]}, "model.dims"),
    ({"train.batch_size": 0}, "train.batch_size"),
    ({"train.batch_size": "abc"}, "train.batch_size"),
    ({"train.microbatches": 0}, "train.microbatches"),
    ({"train.microbatches": 5}, "train.microbatches"),  # does not divide 32
    ({"train.lr": 0}, "train.lr"),
    ({"train.lr": -0.1}, "train.lr"),
    ({"train.dtype": "float16"}, "train.dtype"),
    ({"world_size": 0}, "world_size"),
    ({"memory_limit": "lots"}, "memory_limit"),
    ({"strategy": "pipeline", "world_size": 3}, "world_size"),  # 3 stages, 2 layers
    ({"strategy": "pipeline", "world_size": 2, "strategy.balance": [1, 2]}, "strategy.balance"),
    ({"strategy.schedule": "zigzag"}, "strategy.schedule"),
    ({"strategy.layout": "diagonal"}, "strategy.layout"),
])
def test_bad_values_name_the_key(dotted, key):
    with pytest.raises(ConfigError) as e:
        parse_config(config_dict(**dotted))
    assert e.value.key == key
    assert str(e.value).startswith(f"{key}=") and "\n" not in str(e.value)


def test_memory_limit_units():
    assert parse_bytes("memory_limit", "64MiB") == 64 * 2**20
    assert parse_bytes("memory_limit", "1.5GB") == 1_500_000_000
    assert parse_bytes("memory_limit", 1000) == 1000
    assert parse_bytes("memory_limit", None) is None


def _npz(tmp_path, **arrays):
    p = tmp_path / "d.npz"
    np.savez(p, **arrays)
    return str(p)


SPEC = MLPSpec((4, 3, 2))


@pytest.mark.parametrize("arrays,needle", [
    ({"X": np.zeros((5, 4))}, "missing array(s) y"),
    ({"X": np.zeros((5, 3)), "y": np.zeros(5, int)}, "expected (N, 4)"),
    ({"X": np.full((5, 4), np.nan), "y": np.zeros(5, int)}, "NaN"),
    ({"X": np.full((5, 4), np.inf), "y": np.zeros(5, int)}, "infinite"),
    ({"X": np.zeros((5, 4)), "y": np.array([0, 1, 2, 0, 1])}, "outside [0, 2)"),
    ({"X": np.zeros((5, 4)), "y": np.array([0, 1, -1, 0, 1])}, "outside [0, 2)"),
    ({"X": np.zeros((5, 4)), "y": np.zeros(4, int)}, "expected (5,)"),
])
def test_bad_data_files(tmp_path, arrays, needle):
    with pytest.raises(ConfigError) as e:
        load_npz(_npz(tmp_path, **arrays), SPEC)
    assert e.value.key == "data.path" and needle in str(e.value)


def test_missing_and_pickled_files_are_refused(tmp_path):
    with pytest.raises(ConfigError, match="no such file"):
        load_npz(str(tmp_path / "nope.npz"), SPEC)
    obj = np.empty(2, dtype=object)
    p = tmp_path / "obj.npz"
    np.savez(p, X=obj, y=obj)
    with pytest.raises(ConfigError, match="not a readable"):
        load_npz(str(p), SPEC)  # object arrays would need pickle: never loaded


@pytest.mark.parametrize("arrays,needle", [
    ({"W1": np.zeros((3, 4))}, "names"),
    ({"W1": np.zeros((3, 4)), "W2": np.zeros((2, 2))}, "W2 has shape (2, 2), expected (2, 3)"),
    ({"W1": np.zeros((3, 4)), "W3": np.zeros((2, 3))}, "names"),
])
def test_bad_init_files(tmp_path, arrays, needle):
    with pytest.raises(ConfigError) as e:
        load_init(_npz(tmp_path, **arrays), SPEC)
    assert e.value.key == "model.init_path" and needle in str(e.value)


def test_rows_wrap_and_shuffle_is_a_permutation_per_epoch():
    ds = Dataset(torch.arange(10.0).view(10, 1), torch.zeros(10, dtype=torch.int64))
    assert ds.rows(0, 4, shuffle=False, seed=0).tolist() == [0, 1, 2, 3]
    assert ds.rows(2, 4, shuffle=False, seed=0).tolist() == [8, 9, 0, 1]
    epoch = torch.cat([ds.rows(t, 5, shuffle=True, seed=3) for t in range(2)])
    assert sorted(epoch.tolist()) == list(range(10))
    assert epoch.tolist() != list(range(10))
    assert torch.equal(ds.rows(1, 5, shuffle=True, seed=3), ds.rows(1, 5, shuffle=True, seed=3))


def test_synthetic_labels_come_from_a_teacher():
    cfg = make_config(**{"model.dims": [6, 5, 3]})
    ds = synthetic(cfg.spec, num_examples=300, teacher_hidden=8, seed=1)
    assert ds.X.shape == (300, 6) and ds.y.shape == (300,)
    counts = torch.bincount(ds.y, minlength=3)
    assert (counts > 0).all()  # every class occurs: the task is not trivial
    again = synthetic(cfg.spec, num_examples=300, teacher_hidden=8, seed=1)
    assert torch.equal(ds.X, again.X) and torch.equal(ds.y, again.y)
