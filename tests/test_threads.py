"""A device is one rank with the same intra-op threads in every case, `single` included."""

from __future__ import annotations

import pytest
import torch

from partition.config import ConfigError
from partition.topology import intra_op_threads, rank_threads
from tests.conftest import config_dict, make_config


def test_default_is_one_thread_on_cpu_and_torchs_own_on_gpu():
    assert intra_op_threads(None, "cpu") == 1
    assert intra_op_threads(None, torch.device("cpu")) == 1
    assert intra_op_threads(3, "cpu") == 3
    assert intra_op_threads(None, "cuda:0") is None
    assert intra_op_threads(2, "cuda:0") == 2


def test_threads_are_set_inside_and_put_back_after():
    before = torch.get_num_threads()
    with rank_threads(None, "cpu") as n:
        assert n == 1 and torch.get_num_threads() == 1
    assert torch.get_num_threads() == before
    with rank_threads(2, "cpu") as n:
        assert n == 2 and torch.get_num_threads() == 2
    assert torch.get_num_threads() == before


def test_config_key():
    assert make_config().threads_per_rank is None
    assert make_config(threads_per_rank=2).threads_per_rank == 2
    with pytest.raises(ConfigError, match=r"threads_per_rank=0: must be >= 1"):
        from partition.config import parse_config

        parse_config(config_dict(threads_per_rank=0))


def test_single_trains_with_one_thread_and_says_so(tmp_path, monkeypatch):
    """The single-device baseline trains in the launching process: with one thread, as each
    rank of a partitioned run does, recorded in result.json, the process's own count kept."""
    import partition.train as train
    from partition.launch import run

    seen = []
    real = train._run_rank

    def spy(*a, **k):
        seen.append(torch.get_num_threads())
        return real(*a, **k)

    monkeypatch.setattr(train, "_run_rank", spy)
    before = torch.get_num_threads()
    small = {"model.dims": [8, 16, 4], "train.batch_size": 16, "data.num_examples": 32}
    res = run(make_config(**small), str(tmp_path / "a"))
    assert res["status"] == "ok" and res["run"]["threads_per_rank"] == 1
    res2 = run(make_config(threads_per_rank=2, **small), str(tmp_path / "b"))
    assert res2["run"]["threads_per_rank"] == 2
    assert seen == [1, 2]
    assert torch.get_num_threads() == before
