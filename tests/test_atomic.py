"""Nothing lost: a writer killed at any moment leaves the old file or the new one, whole."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import random
import signal
import time

import numpy as np
import pytest

from partition.results import write_json
from partition.weights import save_weights

SHAPE = (500, 1000)  # 4 MB of float64 per version: each write takes a while


def _weights(version: int) -> dict[str, np.ndarray]:
    return {"W1": np.full(SHAPE, version, dtype=np.float64), "W2": np.full((3, 500), version)}


def _result(version: int) -> dict:
    return {"status": "ok", "version": version, "loss": [float(version)] * 100_000}


def _write_forever(path: str, kind: str, done) -> None:  # noqa: ANN001 - a shared mp.Value
    """Rewrite `path` with version 1, 2, 3, … until killed; `done` = last version renamed."""
    version = 1
    while True:
        if kind == "npz":
            save_weights(path, _weights(version))
        else:
            write_json(path, _result(version))
        done.value = version
        version += 1


def _version_of(path: str, kind: str) -> int:
    """The one version the file holds, or a failed assertion if it is torn or mixed."""
    if kind == "npz":
        with np.load(path, allow_pickle=False) as f:
            assert sorted(f.files) == ["W1", "W2"]
            w1, w2 = f["W1"], f["W2"]
        assert w1.shape == SHAPE and w2.shape == (3, 500)
        v = int(w1.flat[0])
        assert (w1 == v).all() and (w2 == v).all()
        return v
    with open(path) as fh:
        res = json.load(fh)
    v = res["version"]
    assert res["loss"] == [float(v)] * 100_000
    return v


@pytest.mark.parametrize("kind", ["npz", "json"])
def test_killed_writer_leaves_old_or_new_file(tmp_path, kind):
    ctx = mp.get_context("fork")  # torch is already imported here: a fork starts at once
    rng = random.Random(1234)
    left_temporaries = 0
    for i in range(8):
        path = str(tmp_path / f"{i}.{kind}")
        if kind == "npz":
            save_weights(path, _weights(0))
        else:
            write_json(path, _result(0))
        done = ctx.Value("i", 0)
        p = ctx.Process(target=_write_forever, args=(path, kind, done), daemon=True)
        p.start()
        time.sleep(rng.uniform(0.0, 0.4))  # anywhere: mid-write, mid-fsync, at the rename
        os.kill(p.pid, signal.SIGKILL)
        p.join()
        assert p.exitcode == -signal.SIGKILL
        v = _version_of(path, kind)
        # The old file (what was last renamed into place) or the new one (renamed just now).
        assert done.value <= v <= done.value + 1, (v, done.value)
        left_temporaries += sum(1 for f in os.listdir(tmp_path) if f.startswith(".tmp-"))
        for f in os.listdir(tmp_path):
            if f.startswith(".tmp-"):
                os.unlink(tmp_path / f)
    # Evidence that kills landed mid-write (they left their half-written temporary files).
    assert left_temporaries > 0
