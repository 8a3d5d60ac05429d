"""Nothing a user or a peer supplies is ever unpickled (issue 19, item 4).

Peers exchange JSON bytes in tensors; spawned ranks get JSON arguments and hand back
JSON files; user files are read with allow_pickle=False; Hydra's --experimental-rerun
(which unpickles its FILE) is refused (in tests/test_bad_input.py's catalogue).
"""

from __future__ import annotations

import os
import pickle
import re

import numpy as np
import pytest
from conftest import ROOT, spawn

from partition.records import record_from_json, record_to_json, shard_from_json
from partition.train import RankRecord
from partition.weights import Shard


def _no_unpickling() -> None:
    def refuse(*a, **k):  # noqa: ANN002, ANN003
        raise AssertionError("something was unpickled")

    pickle.loads = refuse
    pickle.load = refuse
    pickle.Unpickler = refuse


def _exchange(rank: int, world: int) -> tuple:
    from partition.comm import Comm, Ledger

    _no_unpickling()
    comm = Comm(rank=rank, world_size=world, ledger=Ledger())
    got = comm.broadcast_object({"run_dir": "/tmp/d é", "n": [1, 2.5]} if rank == 0 else None)
    mine = {"rank": rank, "payload": "x" * (rank * 1000 + 1), "nan": float("nan")}
    gathered = comm.gather_objects(mine)
    return got, gathered


def test_peers_exchange_json_not_pickles():
    out = spawn(_exchange, 3)
    for rank, (got, gathered) in enumerate(out):
        assert got == {"run_dir": "/tmp/d é", "n": [1, 2.5]}
        if rank:
            assert gathered is None
    gathered = out[0][1]
    assert [g["rank"] for g in gathered] == [0, 1, 2]
    assert [len(g["payload"]) for g in gathered] == [1, 1001, 2001]
    assert all(g["nan"] != g["nan"] for g in gathered)  # NaN survives as NaN


def test_rank_record_round_trip_is_bit_exact():
    w = np.random.default_rng(0).standard_normal((5, 7))
    rec = RankRecord(rank=1, device="cpu", backend="gloo", objective=[1.5, float("inf")],
                     comm={"by_role": {"activation": {"bytes": 12, "messages": 1}}},
                     shards=[Shard("W1", (0, 5), None, w),
                             Shard("b1", (0, 5), None, np.arange(5, dtype=np.float32))])
    back = record_from_json(record_to_json(rec))
    assert back.rank == 1 and back.objective == [1.5, float("inf")]
    assert back.comm == rec.comm
    assert [s.name for s in back.shards] == ["W1", "b1"]
    assert back.shards[0].rows == (0, 5) and back.shards[0].cols is None
    assert back.shards[0].values.dtype == np.float64
    assert np.array_equal(back.shards[0].values, w)  # every bit
    assert back.shards[1].values.dtype == np.float32


def test_a_record_carrying_anything_but_floats_is_refused():
    good = record_to_json(RankRecord(rank=0, device="cpu", backend="gloo",
                                     shards=[Shard("W1", None, None, np.zeros((2, 2)))]))
    bad = dict(good["shards"][0], dtype="object")
    with pytest.raises(ValueError, match="dtype 'object' is not allowed"):
        shard_from_json(bad)
    with pytest.raises(ValueError, match=r"unknown fields \['evil'\]"):
        record_from_json({**good, "evil": 1})


# What would unpickle bytes from a file or a peer, anywhere in the project's code.
_UNPICKLING = re.compile(r"pickle\.loads?\(|\bUnpickler\b|torch\.load\(|gather_object\(|"
                         r"broadcast_object_list\(|scatter_object_list\(|all_gather_object\(|"
                         r"allow_pickle=True|read_pickle\(")


def test_no_code_path_unpickles():
    hits = []
    for folder in ("partition", "experiments"):
        for root, _, files in os.walk(os.path.join(ROOT, folder)):
            for f in files:
                if f.endswith(".py"):
                    path = os.path.join(root, f)
                    with open(path) as fh:
                        for i, line in enumerate(fh, 1):
                            if _UNPICKLING.search(line):
                                hits.append(f"{os.path.relpath(path, ROOT)}:{i}: {line.strip()}")
    assert hits == []
