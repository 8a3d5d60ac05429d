"""The bad-input catalogue: every entry is refused before any rank starts.

The contract (README "When things go wrong"): exit status 2, exactly one line on
stderr naming the key and the value, no traceback, nothing written — the folder
the command ran in stays empty (no outputs/ run or sweep folder).

Every case runs through `experiments.run.main()` in this process (the whole
command-line path but the interpreter start, so the catalogue stays fast); four of
the issue's done-when cases and the torchrun world-size mismatch also run as real
subprocesses, and with `-m slow` every case does.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FILES = "{files}"  # replaced by the folder holding the bad files
# A small model, so that cases which get as far as loading data stay quick.
BASE = {"model.dims": "[6,5,3]", "train.batch_size": "8", "train.steps": "2", "device": "cpu"}


@dataclass(frozen=True)
class Case:
    id: str
    args: tuple[str, ...]
    says: tuple[str, ...]  # what the one line must contain: the key and the value, at least
    done_when: bool = False  # listed in the done-when: also run as a subprocess

    def argv(self, files: str) -> list[str]:
        args = [a.replace(FILES, files) for a in self.args]
        keys = {a.lstrip("+~").partition("=")[0] for a in args}
        base = [f"{k}={v}" for k, v in BASE.items() if k not in keys]
        return base + args

    def expected(self, files: str) -> list[str]:
        return [s.replace(FILES, files) for s in self.says]


def C(id: str, args: list[str], *says: str, done_when: bool = False) -> Case:  # noqa: N802
    return Case(id, tuple(args), tuple(says), done_when)


CATALOGUE = [
    # sizes and counts
    C("batch-zero", ["train.batch_size=0"], "train.batch_size=0", ">= 1", done_when=True),
    C("batch-negative", ["train.batch_size=-4"], "train.batch_size=-4"),
    C("dims-one-entry", ["model.dims=[784]"], "model.dims=[784]", "at least 2",
      done_when=True),
    C("dims-empty", ["model.dims=[]"], "model.dims=[]"),
    C("dims-zero-width", ["model.dims=[784,0,10]"], "model.dims=[784,0,10]", ">= 1"),
    C("dims-not-a-list", ["model.dims=abc"], "model.dims=abc", "list"),
    C("world-zero", ["world_size=0"], "world_size=0", ">= 1", done_when=True),
    C("world-negative", ["world_size=-1"], "world_size=-1"),
    C("world-fraction", ["world_size=2.5"], "world_size=2.5", "integer"),
    C("stages-more-than-layers", ["strategy=pipeline", "world_size=5"], "world_size=5",
      "2 layers", done_when=True),
    C("balance-wrong-sum", ["strategy=pipeline", "world_size=2", "strategy.balance=[1,2]"],
      "strategy.balance=[1,2]", "sum to the 2 layers"),
    C("balance-wrong-length", ["strategy=pipeline", "world_size=2", "strategy.balance=[2]"],
      "strategy.balance=[2]", "one entry per stage"),
    C("microbatches-not-dividing", ["train.batch_size=10", "train.microbatches=3"],
      "train.microbatches=3", "train.batch_size=10"),
    C("microbatches-zero", ["train.microbatches=0"], "train.microbatches=0"),
    C("steps-zero", ["train.steps=0"], "train.steps=0"),
    C("timeout-zero", ["timeout_s=0"], "timeout_s=0", "> 0"),
    # choices
    C("strategy-unknown", ["strategy=bogus"], "strategy=bogus", "pipeline", done_when=True),
    C("activation-unknown", ["model.activation=swish"], "model.activation=swish", "relu",
      done_when=True),
    C("loss-unknown", ["model.loss=hinge"], "model.loss=hinge", "cross_entropy"),
    C("schedule-unknown", ["strategy=pipeline", "strategy.schedule=zigzag"],
      "strategy.schedule=zigzag", "1f1b"),
    C("layout-unknown", ["strategy=tensor", "strategy.layout=diagonal"],
      "strategy.layout=diagonal", "megatron"),
    C("zero-stage-unknown", ["strategy=fsdp", "strategy.zero_stage=4"],
      "strategy.zero_stage=4", "1, 2, 3"),
    C("zero-stage-keep-weights-stage-2", ["strategy=fsdp", "strategy.zero_stage=2",
                                          "strategy.reshard_after_forward=false"],
      "strategy.reshard_after_forward=False", "zero_stage=3"),
    C("zero-stage-1-on-torch", ["strategy=fsdp", "strategy.zero_stage=1", "engine=torch",
                                "world_size=2"], "strategy.zero_stage=1", "FSDP2"),
    C("dtype-unknown", ["train.dtype=float16"], "train.dtype=float16", "float32"),
    C("device-unknown", ["device=tpu"], "device=tpu", "cuda"),
    C("data-group-unknown", ["data=mnist"], "data=mnist", "synthetic"),
    C("model-group-unknown", ["model=huge"], "model=huge", "seed"),
    C("fault-kind-unknown", ["fault.kind=explode"], "fault.kind=explode", "hang"),
    C("bias-not-a-bool", ["model.bias=maybe"], "model.bias=maybe", "true or false"),
    # numbers
    C("lr-negative", ["train.lr=-0.1"], "train.lr=-0.1", "> 0", done_when=True),
    C("lr-zero", ["train.lr=0"], "train.lr=0"),
    C("lr-non-numeric", ["train.lr=abc"], "train.lr=abc", "number"),
    C("lr-nan", ["train.lr=nan"], "train.lr=nan", "finite"),
    C("lr-bool", ["train.lr=true"], "train.lr=True", "number"),
    C("steps-non-numeric", ["train.steps=ten"], "train.steps=ten", "integer"),
    C("momentum-too-big", ["train.momentum=1.5"], "train.momentum=1.5", "< 1"),
    C("decay-negative", ["model.weight_decay=-1"], "model.weight_decay=-1", ">= 0"),
    C("seed-negative", ["seed=-1"], "seed=-1"),
    C("memory-lots", ["memory_limit=lots"], "memory_limit=lots", "byte count", done_when=True),
    C("memory-negative", ["memory_limit=-5"], "memory_limit=-5", "positive"),
    C("memory-bad-unit", ["memory_limit=12XB"], "memory_limit=12XB"),
    # faults
    C("fault-rank-out-of-range", ["fault.rank=5", "fault.step=1", "fault.kind=raise"],
      "fault.rank=5", "1 ranks"),
    C("fault-incomplete", ["fault.kind=raise"], "fault.kind=raise", "fault.rank"),
    C("fault-step-past-end", ["fault.rank=0", "fault.step=100", "fault.kind=raise"],
      "fault.step=100", "train.steps=2"),
    # the command line itself
    C("override-malformed-list", ["train.lr=[1,"], "train.lr=[1,", "malformed"),
    C("override-no-key", ["=5"], "=5", "no key"),
    C("override-double-dot", ["train..lr=1"], "train..lr=1", "malformed"),
    C("override-no-equals", ["train.lr"], "train.lr", "malformed"),
    C("key-unknown", ["train.bogus=1"], "train.bogus=1", "no such key"),
    C("key-unknown-top-level", ["foo=1"], "foo=1", "no such key"),
    C("key-appended-typo", ["+train.lrr=0.1"], "train.lrr=0.1", "no such key"),
    C("section-not-a-group", ["train=5"], "train=5", "group of keys"),
    C("interpolation-missing", ["train.lr=${train.nope}"], "train.lr=${train.nope}",
      "train.nope"),
    C("sweep-with-one-bad-job", ["-m", "train.batch_size=8,0"], "train.batch_size=0"),
    # data files
    C("data-missing-file", ["data=npz", "data.path={files}/missing.npz"],
      "data.path={files}/missing.npz", "no such file", done_when=True),
    C("data-no-path", ["data=npz"], "data.path", "data=npz"),
    C("data-nan", ["data=npz", "data.path={files}/nan.npz"], "data.path={files}/nan.npz",
      "NaN"),
    C("data-label-too-big", ["data=npz", "data.path={files}/labels.npz"],
      "data.path={files}/labels.npz", "outside [0, 3)"),
    C("data-label-negative", ["data=npz", "data.path={files}/neglabels.npz"],
      "data.path={files}/neglabels.npz", "outside [0, 3)"),
    C("data-float-labels", ["data=npz", "data.path={files}/floatlabels.npz"],
      "data.path={files}/floatlabels.npz", "class indices"),
    C("data-wrong-width", ["data=npz", "data.path={files}/width.npz"],
      "data.path={files}/width.npz", "expected (N, 6)"),
    C("data-no-y", ["data=npz", "data.path={files}/noy.npz"], "data.path={files}/noy.npz",
      "missing array(s) y"),
    C("data-not-npz", ["data=npz", "data.path={files}/garbage.npz"],
      "data.path={files}/garbage.npz", "not an .npz"),
    C("data-pickled", ["data=npz", "data.path={files}/pickled.npz"],
      "data.path={files}/pickled.npz", "allow_pickle=False"),
    C("data-is-a-folder", ["data=npz", "data.path={files}"], "data.path={files}"),
    # initial-weight files
    C("init-wrong-shape", ["model.init=file", "model.init_path={files}/init_shape.npz"],
      "model.init_path={files}/init_shape.npz", "W1 has shape (4, 6), expected (5, 6)"),
    C("init-missing-array", ["model.init=file", "model.init_path={files}/init_missing.npz"],
      "model.init_path={files}/init_missing.npz", "W2"),
    C("init-nan", ["model.init=file", "model.init_path={files}/init_nan.npz"],
      "model.init_path={files}/init_nan.npz", "NaN"),
    C("init-pickled", ["model.init=file", "model.init_path={files}/init_pickled.npz"],
      "model.init_path={files}/init_pickled.npz", "allow_pickle=False"),
    C("init-no-path", ["model.init=file"], "model.init_path", "model.init=file"),
    C("init-missing-file", ["model.init=file", "model.init_path={files}/nope.npz"],
      "model.init_path={files}/nope.npz", "no such file"),
]
if not torch.cuda.is_available():
    CATALOGUE.append(C("device-cuda-absent", ["device=cuda"], "device=cuda", "cuda"))

assert len(CATALOGUE) >= 30 and len({c.id for c in CATALOGUE}) == len(CATALOGUE)


def _make_files(d: str) -> None:
    rng = np.random.default_rng(0)
    X, y = rng.standard_normal((64, 6)), rng.integers(0, 3, 64)
    Xn = X.copy()
    Xn[3, 2] = np.nan
    np.savez(f"{d}/nan.npz", X=Xn, y=y)
    np.savez(f"{d}/labels.npz", X=X, y=np.where(np.arange(64) == 5, 7, y))
    np.savez(f"{d}/neglabels.npz", X=X, y=np.where(np.arange(64) == 5, -1, y))
    np.savez(f"{d}/floatlabels.npz", X=X, y=y.astype(np.float64))
    np.savez(f"{d}/width.npz", X=X[:, :5], y=y)
    np.savez(f"{d}/noy.npz", X=X)
    np.savez(f"{d}/pickled.npz", X=np.array([{"evil": 1}] * 64, dtype=object), y=y)
    with open(f"{d}/garbage.npz", "wb") as fh:
        fh.write(b"this is not a zip file")
    np.savez(f"{d}/init_shape.npz", W1=np.zeros((4, 6)), W2=np.zeros((3, 5)))
    np.savez(f"{d}/init_missing.npz", W1=np.zeros((5, 6)))
    np.savez(f"{d}/init_nan.npz", W1=np.full((5, 6), np.nan), W2=np.zeros((3, 5)))
    np.savez(f"{d}/init_pickled.npz", W1=np.array([None] * 30, dtype=object).reshape(5, 6),
             W2=np.zeros((3, 5)))


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> str:
    d = str(tmp_path_factory.mktemp("bad-files"))
    _make_files(d)
    return d


def check_refusal(case: Case, files: str, code: int | None, stderr: str, stdout: str,
                  left: list[str]) -> None:
    lines = stderr.strip().splitlines()
    assert code == 2, f"exit status {code}; stderr: {stderr!r}"
    assert len(lines) == 1, f"want one line, got: {stderr!r}"
    line = lines[0]
    assert line.startswith("error: ") and "Traceback" not in stderr
    for part in case.expected(files):
        assert part in line, f"{part!r} not in {line!r}"
    assert stdout.strip() == "", stdout
    assert left == [], f"left behind: {left}"


# ---------------------------------------------------------------- in this process


@pytest.mark.parametrize("case", CATALOGUE, ids=[c.id for c in CATALOGUE])
def test_refused(case, files, tmp_path, monkeypatch, capsys):
    from experiments.run import main

    monkeypatch.chdir(tmp_path)  # outputs/ would appear here
    monkeypatch.setattr(sys, "argv", ["experiments.run", *case.argv(files)])
    with pytest.raises(SystemExit) as exc:
        main()
    out = capsys.readouterr()
    check_refusal(case, files, exc.value.code, out.err, out.out, os.listdir(tmp_path))


# ---------------------------------------------------------------- the real command line


def _cli(argv: list[str], *, torchrun: bool = False) -> tuple[int, str, str, list[str]]:
    """Run the command in a fresh empty folder; (status, stdout, stderr, what it left there)."""
    import tempfile

    cwd = tempfile.mkdtemp(prefix="bad-input-")
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    cmd = ([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2"] if torchrun
           else [sys.executable]) + ["-m", "experiments.run", *argv]
    try:
        p = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
        return p.returncode, p.stdout, p.stderr, os.listdir(cwd)
    finally:
        shutil.rmtree(cwd, ignore_errors=True)


def _cli_all(cases: list[Case], files: str) -> dict[str, tuple[int, str, str, list[str]]]:
    # Each start costs seconds (torch, Hydra): several at once.
    with ThreadPoolExecutor(max_workers=3) as pool:
        return dict(zip([c.id for c in cases],
                        pool.map(lambda c: _cli(c.argv(files)), cases), strict=True))


DONE_WHEN = [c for c in CATALOGUE if c.done_when]
# A start costs seconds: the default suite starts one per kind of refusal (a value, a
# choice, a file, a unit); `-m slow` starts every case, the rest of the done-when included.
FIRST = {"batch-zero", "strategy-unknown", "data-missing-file", "memory-lots"}
DONE_WHEN_FIRST = [c for c in DONE_WHEN if c.id in FIRST]


@pytest.fixture(scope="module")
def done_when_runs(files):
    return _cli_all(DONE_WHEN_FIRST, files)


@pytest.mark.parametrize("case", DONE_WHEN_FIRST, ids=[c.id for c in DONE_WHEN_FIRST])
def test_refused_by_the_command_line(case, files, done_when_runs):
    code, out, err, left = done_when_runs[case.id]
    check_refusal(case, files, code, err, out, left)


@pytest.fixture(scope="module")
def all_runs(files):
    return _cli_all(CATALOGUE, files)


@pytest.mark.slow
@pytest.mark.parametrize("case", CATALOGUE, ids=[c.id for c in CATALOGUE])
def test_refused_by_the_command_line_every_case(case, files, all_runs):
    code, out, err, left = all_runs[case.id]
    check_refusal(case, files, code, err, out, left)


def test_torchrun_world_size_disagrees():
    """torchrun starts 2 processes for world_size=3: one line from the ranks, no rank traceback.

    torchrun itself then prints its own ChildFailedError report (the agent's, not a rank's).
    """
    code, out, err, left = _cli(["world_size=3", "strategy=pipeline", "model.dims=[6,5,4,3]",
                                 "device=cpu"], torchrun=True)
    assert code != 0
    ours = [line for line in (out + err).splitlines() if line.startswith("error: ")]
    assert ours == ["error: world_size=3: torchrun started 2 processes; set world_size=2"], err
    # The only traceback is the torchrun agent's own report; none comes from a rank's code.
    assert "experiments/" not in err and "partition/" not in err, err
    assert left == []
