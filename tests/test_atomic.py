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


def _write_forever(path: str, kind: str, done, stalled) -> None:  # noqa: ANN001 - mp.Values
    """Rewrite `path` with version 1, 2, 3, … until killed; `done` = last version renamed.

    With `stalled` set up, the first write stops for good once its temporary file is
    complete and flushed, just before the rename: the most dangerous moment to die.
    """
    if stalled is not None:
        real_fsync = os.fsync

        def fsync_then_stall(fd: int) -> None:
            real_fsync(fd)
            stalled.value = 1
            time.sleep(600)

        os.fsync = fsync_then_stall  # in this forked child only
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
    for i in range(10):
        stall = i < 2  # two kills at a known moment, eight at random ones
        path = str(tmp_path / f"{i}.{kind}")
        if kind == "npz":
            save_weights(path, _weights(0))
        else:
            write_json(path, _result(0))
        done, stalled = ctx.Value("i", 0), ctx.Value("i", 0)
        p = ctx.Process(target=_write_forever,
                        args=(path, kind, done, stalled if stall else None), daemon=True)
        p.start()
        if stall:
            deadline = time.time() + 60
            while not stalled.value and time.time() < deadline:
                time.sleep(0.01)
            assert stalled.value, "the writer never got to its rename"
        else:
            time.sleep(rng.uniform(0.0, 0.4))  # anywhere: encoding, writing, fsync, rename
        os.kill(p.pid, signal.SIGKILL)
        p.join()
        assert p.exitcode == -signal.SIGKILL
        v = _version_of(path, kind)
        # The old file (what was last renamed into place) or the new one (renamed just now).
        assert done.value <= v <= done.value + 1, (v, done.value)
        temporaries = [f for f in os.listdir(tmp_path) if f.startswith(".tmp-")]
        if stall:  # the new version was complete on disk, under its temporary name only
            assert v == 0 and len(temporaries) == 1
        for f in temporaries:
            os.unlink(tmp_path / f)


@pytest.mark.parametrize("mask", [0o022, 0o077, 0o002])
def test_files_get_the_mode_the_umask_gives(tmp_path, mask):
    """result.json and weights.npz get 0666 less the umask, like every other file the run
    writes (mkstemp alone would make them 0600)."""
    old = os.umask(mask)
    try:
        write_json(str(tmp_path / "result.json"), {"status": "ok"})
        save_weights(str(tmp_path / "weights.npz"), _weights(1))
        with open(tmp_path / "plain.txt", "w") as fh:
            fh.write("x")
    finally:
        os.umask(old)
    modes = {f: os.stat(tmp_path / f).st_mode & 0o777
             for f in ("result.json", "weights.npz", "plain.txt")}
    assert modes == dict.fromkeys(modes, 0o666 & ~mask)


def test_weights_digest_tells_a_damaged_file(tmp_path):
    from partition.results import file_digest, weights_intact

    path = tmp_path / "weights.npz"
    save_weights(str(path), _weights(3))
    digest = file_digest(str(path))
    assert digest["bytes"] == os.path.getsize(path) and len(digest["sha256"]) == 64
    result = {"weights": {"file": "weights.npz", **digest}}
    assert weights_intact(str(tmp_path), result)
    data = path.read_bytes()
    path.write_bytes(data[:-10])  # truncated
    assert not weights_intact(str(tmp_path), result)
    path.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))  # same size, one bit changed
    assert not weights_intact(str(tmp_path), result)
    path.write_bytes(data)
    assert weights_intact(str(tmp_path), result)
    path.unlink()
    assert not weights_intact(str(tmp_path), result)
    assert not weights_intact(str(tmp_path), {})  # a result that recorded no digest
