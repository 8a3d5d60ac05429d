"""The Hydra entry point end to end: configs compose, files written, weights exact (issues 2, 3)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from conftest import ROOT

from experiments.cli import compose_config, groups
from partition.config import parse_config

RESULT_KEYS = {"status", "error", "run", "config", "train", "ranks", "predicted", "check"}
RANK_COMM_KEYS = {"sent_bytes", "recv_bytes", "collective_bytes", "wire_bytes", "messages",
                  "seconds", "by_role"}
RANK_MEMORY_KEYS = {"peak_bytes", "predict_peak_bytes", "params_bytes", "grads_bytes",
                    "optimizer_bytes", "activations_bytes"}


def cli(*args: str, timeout: float = 180) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": ROOT}
    return subprocess.run([sys.executable, "-m", "experiments.run", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("group,option", [(g, o) for g, opts in groups().items()
                                          if g != "experiment" for o in opts])
def test_every_group_option_composes_and_validates(group, option):
    extra = {"data": {"npz": ["data.path=x.npz"], "digits": ["model.dims=[64,32,10]"]}}
    overrides = [f"{group}={option}", *extra.get(group, {}).get(option, [])]
    from omegaconf import OmegaConf

    cfg = parse_config(OmegaConf.to_container(compose_config(overrides), resolve=True))
    name = {"model": None, "strategy": cfg.strategy.name, "data": cfg.data.name}[group]
    assert name in (None, option)


# ---------------------------------------------------------------- an independent reference


def numpy_sgd(W: list[np.ndarray], X: np.ndarray, y: np.ndarray, *, steps: int, B: int,
              lr: float, wd: float) -> list[np.ndarray]:
    """The seed's equations in plain numpy (relu, softmax cross-entropy, no bias), full batch."""
    W = [w.copy() for w in W]
    N = X.shape[0]
    for t in range(steps):
        idx = np.arange(t * B, (t + 1) * B) % N
        xs, ys = X[idx], y[idx]
        hs, zs = [xs], []
        for l, w in enumerate(W):
            z = hs[-1] @ w.T
            zs.append(z)
            if l < len(W) - 1:
                hs.append(np.maximum(z, 0))
        o = zs[-1]
        p = np.exp(o - o.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        g = p.copy()
        g[np.arange(B), ys] -= 1
        g /= B  # dJ/do
        grads = [None] * len(W)
        for l in range(len(W) - 1, -1, -1):
            grads[l] = g.T @ hs[l] + wd * W[l]  # dJ/dW = dJ/dz hᵀ + λW
            if l > 0:
                g = (g @ W[l]) * (zs[l - 1] > 0)  # dJ/dh ⊙ φ'(z)
        W = [w - lr * gr for w, gr in zip(W, grads)]
    return W


@pytest.mark.parametrize("dims,extra", [
    ([7, 5, 3], []),
    ([7, 6, 5, 4, 3], ["train.microbatches=4"]),
    ([7, 6, 5, 4, 3], ["strategy=pipeline", "world_size=2", "strategy.schedule=1f1b",
                       "train.microbatches=4"]),
])
def test_cli_weights_equal_an_independent_numpy_sgd(tmp_path, dims, extra):
    rng = np.random.default_rng(0)
    X = rng.normal(size=(40, dims[0]))
    y = rng.integers(0, dims[-1], size=40)
    W0 = [rng.normal(size=(dims[l + 1], dims[l])) / np.sqrt(dims[l]) for l in range(len(dims) - 1)]
    np.savez(tmp_path / "D.npz", X=X, y=y)
    np.savez(tmp_path / "W.npz", **{f"W{l + 1}": w for l, w in enumerate(W0)})
    out = tmp_path / "run"
    r = cli("strategy=single", "world_size=1", f"model.dims=[{','.join(map(str, dims))}]",
            "data=npz", f"data.path={tmp_path / 'D.npz'}", "model.init=file",
            f"model.init_path={tmp_path / 'W.npz'}", "data.shuffle=false", "train.dtype=float64",
            "train.steps=5", "train.batch_size=8", "train.lr=0.1", "model.weight_decay=0.01",
            *extra, f"hydra.run.dir={out}")
    assert r.returncode == 0, r.stderr
    want = numpy_sgd(W0, X, y, steps=5, B=8, lr=0.1, wd=0.01)
    with np.load(out / "weights.npz") as f:
        assert sorted(f.files) == [f"W{l + 1}" for l in range(len(W0))]
        for l, w in enumerate(want):
            got = f[f"W{l + 1}"]
            assert got.dtype == np.float64
            assert np.linalg.norm(got - w) / np.linalg.norm(w) <= 1e-10

    res = json.loads((out / "result.json").read_text())
    assert RESULT_KEYS <= set(res)
    assert res["status"] == "ok" and res["error"] is None
    assert len(res["train"]["loss"]) == 5
    assert res["check"]["grad_max_rel_err"] <= 1e-12
    for rank in res["ranks"]:
        assert RANK_COMM_KEYS <= set(rank["comm"])
        assert RANK_MEMORY_KEYS <= set(rank["memory"])
    if "world_size=2" not in extra:
        assert res["ranks"][0]["comm"]["wire_bytes"] == 0
        n = sum(w.size for w in W0) * 8
        assert res["ranks"][0]["memory"]["params_bytes"] == n
        assert res["ranks"][0]["memory"]["grads_bytes"] == n


def test_loss_falls_on_synthetic_data(tmp_path):
    r = cli("model.dims=[32,64,4]", "train.steps=40", "train.batch_size=64", "train.lr=0.5",
            "data.num_examples=1024", f"hydra.run.dir={tmp_path}")
    assert r.returncode == 0, r.stderr
    res = json.loads((tmp_path / "result.json").read_text())
    loss = res["train"]["loss"]
    assert np.mean(loss[-5:]) < 0.8 * np.mean(loss[:5])
    assert res["train"]["final_accuracy"] > res["train"]["accuracy"][0]


def test_torchrun_and_self_launched_runs_agree(tmp_path):
    common = ["strategy=pipeline", "world_size=2", "model.dims=[16,12,8,4]", "train.steps=3",
              "train.batch_size=16", "train.microbatches=2", "train.dtype=float64"]
    a, b = tmp_path / "spawned", tmp_path / "torchrun"
    r = cli(*common, f"hydra.run.dir={a}")
    assert r.returncode == 0, r.stderr
    env = {**os.environ, "PYTHONPATH": ROOT}
    t = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                        "--nproc_per_node=2", "-m", "experiments.run",
                        *common, f"hydra.run.dir={b}"], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=180)
    assert t.returncode == 0, t.stderr[-3000:]
    ra = json.loads((a / "result.json").read_text())
    rb = json.loads((b / "result.json").read_text())
    assert ra["train"]["loss"] == rb["train"]["loss"]
    for x, y in zip(ra["ranks"], rb["ranks"]):
        for k in ("sent_bytes", "recv_bytes", "collective_bytes", "wire_bytes", "by_role"):
            assert x["comm"][k] == y["comm"][k]
    with np.load(a / "weights.npz") as fa, np.load(b / "weights.npz") as fb:
        assert all(np.array_equal(fa[k], fb[k]) for k in fa.files)
    assert sorted(os.listdir(tmp_path)) == ["spawned", "torchrun"]  # one folder each, no strays


@pytest.mark.parametrize("extra,status,code", [
    (["memory_limit=1000"], "oom", 3),
    (["model.loss=squared_error", "train.lr=1e30", "train.steps=20"], "diverged", 4),
])
def test_a_run_exits_with_its_status(tmp_path, extra, status, code):
    """oom and diverged each have their own exit status (docs/reliability.md), not 0."""
    r = cli("model.dims=[6,5,3]", "train.batch_size=8", "data.num_examples=64", *extra,
            f"hydra.run.dir={tmp_path}")
    assert r.returncode == code, r.stderr
    assert json.loads((tmp_path / "result.json").read_text())["status"] == status
    assert r.stdout.startswith(f"[{status}] single P=1")


def test_exit_statuses_are_distinct():
    from partition.results import BAD_INPUT_STATUS, EXIT_STATUS, INTERRUPTED_STATUS, STATUSES

    codes = [EXIT_STATUS[s] for s in STATUSES] + [BAD_INPUT_STATUS, INTERRUPTED_STATUS]
    assert set(EXIT_STATUS) == set(STATUSES) and len(set(codes)) == len(codes)
    assert (EXIT_STATUS["ok"], EXIT_STATUS["failed"], EXIT_STATUS["oom"]) == (0, 1, 3)
