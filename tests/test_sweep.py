"""Hydra multirun sweeps: one folder per job, resuming, failing jobs, multi-node torchrun."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time

import pytest

from tests.conftest import ROOT, make_config

PY = sys.executable
TINY = ["model.dims=[12,8,4]", "data.num_examples=64", "train.steps=2", "timeout_s=30"]


def _env() -> dict[str, str]:
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    env.pop("TORCHELASTIC_RUN_ID", None)
    return env


def _run(args: list[str], *, cwd: str = ROOT, timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run(args, cwd=cwd, env=_env(), capture_output=True, text=True,
                          timeout=timeout)


def _results(folder: str) -> dict[str, dict]:
    out = {}
    for name in sorted(os.listdir(folder)):
        p = os.path.join(folder, name, "result.json")
        if os.path.exists(p):
            with open(p) as fh:
                out[name] = json.load(fh)
    return out


@pytest.mark.timeout(400)
def test_multirun_four_jobs_report_and_rerun_skips(tmp_path):
    sweep = str(tmp_path / "sweep")
    args = [PY, "-m", "experiments.run", "-m", "strategy=single,pipeline", "world_size=2",
            "train.batch_size=16,32", *TINY, f"hydra.sweep.dir={sweep}"]
    p = _run(args)
    assert p.returncode == 0, p.stderr[-3000:]
    res = _results(sweep)
    assert list(res) == ["0_single", "1_single", "2_pipeline", "3_pipeline"]
    assert [(r["run"]["strategy"], r["run"]["ranks"], r["run"]["batch_size"], r["status"])
            for r in res.values()] == [("single", 1, 16, "ok"), ("single", 1, 32, "ok"),
                                       ("pipeline", 2, 16, "ok"), ("pipeline", 2, 32, "ok")]
    # Progress: job i of 4 for every job, then one summary line per finished job.
    for i in range(1, 5):
        assert f"[sweep] job {i}/4: " in p.stdout
    assert len(re.findall(r"^\[ok\] ", p.stdout, flags=re.M)) == 4
    assert "[sweep] 4 jobs in" in p.stdout and "(4 ok)" in p.stdout
    # The pipeline moves the hidden activation forward and its gradient back: B·8·4 bytes.
    pipe = res["3_pipeline"]["ranks"]
    assert pipe[0]["comm"]["by_role"]["activation"]["bytes"] == 32 * 8 * 4
    assert pipe[1]["comm"]["by_role"]["activation_grad"]["bytes"] == 32 * 8 * 4

    # The report over the sweep folder: csv, md and png files, a row per job.
    from experiments.report import main as report_main

    assert report_main([sweep]) == 0
    for f in ("results.csv", "results.md", "summary.png", "memory_vs_batch.png", "loss.png"):
        assert os.path.getsize(os.path.join(sweep, f)) > 0, f
    import pandas as pd

    csv = pd.read_csv(os.path.join(sweep, "results.csv"))
    assert sorted(csv["strategy"]) == ["pipeline", "pipeline", "single", "single"]
    assert sorted(csv["bytes_per_step"]) == [0, 0, 16 * 8 * 4, 32 * 8 * 4]

    # Rerunning the same sweep skips all four and leaves their results untouched.
    mtimes = {n: os.path.getmtime(os.path.join(sweep, n, "result.json")) for n in res}
    time.sleep(0.05)
    p2 = _run(args)
    assert p2.returncode == 0, p2.stderr[-3000:]
    assert p2.stdout.count("[ok, skipped: already done]") == 4
    assert "(4 skipped)" in p2.stdout
    assert mtimes == {n: os.path.getmtime(os.path.join(sweep, n, "result.json")) for n in res}


@pytest.mark.timeout(200)
def test_failing_job_is_recorded_and_the_sweep_goes_on(tmp_path):
    # The failing job (a 1000-byte memory limit: oom) runs first; the sweep must still run
    # the second one, and exit 0. No hydra.sweep.dir: the default folder is derived from
    # the overrides.
    overrides = ["strategy=single", "memory_limit=1000,null", *TINY]
    p = _run([PY, "-m", "experiments.run", "-m", *overrides], cwd=str(tmp_path))
    assert p.returncode == 0, p.stderr[-3000:]
    from experiments.cli import default_sweep_dir

    sweep = tmp_path / default_sweep_dir(overrides)
    res = _results(str(sweep))
    assert [r["status"] for r in res.values()] == ["oom", "ok"]
    failed = res["0_single"]
    assert failed["error"]["type"] == "MemoryLimitExceeded"
    assert failed["error"]["rank"] == 0
    assert "(1 ok, 1 oom)" in p.stdout
    assert "[oom] single" in p.stdout

    # A rerun runs the failed job again (it fails again) and skips the finished one.
    p2 = _run([PY, "-m", "experiments.run", "-m", *overrides], cwd=str(tmp_path))
    assert p2.returncode == 0, p2.stderr[-3000:]
    assert p2.stdout.count("[ok, skipped: already done]") == 1
    assert "(1 oom, 1 skipped)" in p2.stdout


def test_a_sweep_into_another_sweeps_folder_is_refused(tmp_path):
    """hydra.sweep.dir reused for a different sweep: job 0's folder holds another config's
    result.json. Refused before anything runs or is written; the same sweep resumes."""
    sweep = tmp_path / "sweep"
    args = [PY, "-m", "experiments.run", "-m", "strategy=single", "train.lr=0.1,0.2", *TINY,
            f"hydra.sweep.dir={sweep}"]
    p = _run(args)
    assert p.returncode == 0, p.stderr[-3000:]
    before = {n: os.path.getmtime(sweep / n / "result.json") for n in ("0_single", "1_single")}
    other = [a.replace("train.lr=0.1,0.2", "train.lr=0.3,0.2") for a in args]
    p2 = _run(other)
    assert (p2.returncode, p2.stdout) == (2, "")
    assert p2.stderr.strip().splitlines() == [
        f"error: hydra.sweep.dir={sweep}/0_single: job folder 0_single holds another run's "
        f"result.json: choose another folder, or remove that one"]
    assert before == {n: os.path.getmtime(sweep / n / "result.json") for n in before}
    p3 = _run(args)
    assert p3.returncode == 0 and p3.stdout.count("[ok, skipped: already done]") == 2


def test_resume_reruns_a_job_whose_weights_are_damaged(tmp_path):
    from partition.sweep import run_or_skip

    cfg = make_config(**{"model.dims": [6, 4, 3], "train.steps": 2})
    res, skipped = run_or_skip(cfg, str(tmp_path))
    assert (res["status"], skipped) == ("ok", False)
    assert res["weights"]["file"] == "weights.npz"
    assert res["weights"]["bytes"] == os.path.getsize(tmp_path / "weights.npz")
    assert run_or_skip(cfg, str(tmp_path))[1] is True  # whole: skipped
    data = (tmp_path / "weights.npz").read_bytes()
    (tmp_path / "weights.npz").write_bytes(data[: len(data) // 2])  # a torn copy, say
    res2, skipped2 = run_or_skip(cfg, str(tmp_path))
    assert skipped2 is False and res2["status"] == "ok"
    assert (tmp_path / "weights.npz").read_bytes() == data  # the same run, the same bytes
    (tmp_path / "weights.npz").unlink()
    assert run_or_skip(cfg, str(tmp_path))[1] is False


def test_default_sweep_dir_is_stable_and_ignores_hydra_overrides():
    from experiments.cli import default_sweep_dir

    a = default_sweep_dir(["strategy=single,pipeline", "train.batch_size=256,1024"])
    assert a == default_sweep_dir(["strategy=single,pipeline", "train.batch_size=256,1024",
                                   "hydra/launcher=basic", "hydra.verbose=true"])
    assert a != default_sweep_dir(["strategy=single,pipeline", "train.batch_size=256"])
    assert a.startswith("outputs/sweeps/strategy-single+pipeline_train.batch_size-256+1024-")
    assert re.fullmatch(r"[A-Za-z0-9._+/-]+", a)  # nothing Hydra's override parser would read
    assert default_sweep_dir([]).startswith("outputs/sweeps/defaults-")


def test_run_or_skip_records_an_unexpected_error_as_failed(tmp_path, monkeypatch):
    import partition.launch as launch
    from partition.sweep import finished_result, run_or_skip

    cfg = make_config(**{"model.dims": [6, 4, 3], "train.steps": 2})

    def boom(cfg, run_dir):  # noqa: ANN001
        raise RuntimeError("rendezvous went away\nsecond line")

    monkeypatch.setattr(launch, "run", boom)
    res, skipped = run_or_skip(cfg, str(tmp_path))
    assert not skipped
    assert res["status"] == "failed"
    assert res["error"] == {"rank": None, "type": "RuntimeError",
                            "message": "rendezvous went away"}
    with open(tmp_path / "result.json") as fh:
        assert json.load(fh)["status"] == "failed"
    assert finished_result(str(tmp_path), cfg) is None  # failed: would run again

    monkeypatch.undo()
    res, skipped = run_or_skip(cfg, str(tmp_path))
    assert (res["status"], skipped) == ("ok", False)
    res2, skipped2 = run_or_skip(cfg, str(tmp_path))
    assert skipped2 and res2["train"]["loss"] == res["train"]["loss"]
    # A different config in the same folder is not "already done".
    other = make_config(**{"model.dims": [6, 4, 3], "train.steps": 2, "train.lr": 0.05})
    assert finished_result(str(tmp_path), other) is None


def test_progress_lines():
    from partition.sweep import Progress, clock

    p = Progress(total=4, started=100.0)
    assert p.start_line(1, "strategy=single", 100.0) == (
        "[sweep] job 1/4: strategy=single | elapsed 0:00, estimating")
    p.finish("ok", 10.0)
    p.finish("skipped", 0.5)  # takes no time: not in the estimate
    assert p.remaining_s() == 20.0
    assert p.start_line(3, "x", 111.0).endswith("elapsed 0:11, about 0:20 left")
    p.finish("failed", 30.0)
    assert p.remaining_s() == 20.0  # mean of 10 and 30, one job left
    assert p.end_line(150.0, "out") == "[sweep] 3 jobs in 0:50 (1 failed, 1 ok, 1 skipped) -> out"
    assert clock(3725) == "1:02:05"


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_torchrun_two_nodes_on_one_machine(tmp_path):
    """Two `torchrun --nnodes=2` agents (one process each) meet at a c10d rendezvous on
    localhost, as two machines would; the rank-0 node writes the one result."""
    from tests.conftest import free_port

    torchrun = os.path.join(os.path.dirname(PY), "torchrun")
    if not os.path.exists(torchrun):
        pytest.skip("torchrun not next to the Python executable")
    port = free_port()
    run_dir = tmp_path / "run"
    cmd = [torchrun, "--nnodes=2", "--nproc_per_node=1", "--rdzv_backend=c10d",
           f"--rdzv_endpoint=127.0.0.1:{port}", "--rdzv_id=two-nodes", "--max_restarts=0",
           "-m", "experiments.run", "strategy=pipeline", "world_size=2",
           "train.batch_size=32", *TINY,
           f"hydra.run.dir={run_dir}"]
    nodes = [subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for _ in range(2)]
    try:
        outs = [n.communicate(timeout=200)[0] for n in nodes]
    finally:
        for n in nodes:
            if n.poll() is None:
                n.kill()
    assert [n.returncode for n in nodes] == [0, 0], "\n".join(o[-2000:] for o in outs)
    assert sum(o.count("[ok] pipeline P=2") for o in outs) == 1  # printed by rank 0 only
    with open(run_dir / "result.json") as fh:
        res = json.load(fh)
    assert res["status"] == "ok" and res["run"]["ranks"] == 2
    roles = [r["comm"]["by_role"] for r in res["ranks"]]
    assert roles[0]["activation"]["bytes"] == roles[1]["activation_grad"]["bytes"] == 32 * 8 * 4


def test_a_job_that_cannot_be_configured_is_recorded(tmp_path, capsys):
    from experiments.run import record_failed_job
    from partition.config import ConfigError
    from partition.report import load_table

    assert record_failed_job(str(tmp_path), ConfigError("data.path", "x.npz", "no such file")) \
        == "failed"
    assert "[failed] ConfigError: data.path=x.npz: no such file" in capsys.readouterr().out
    df = load_table([str(tmp_path)])
    assert list(df["status"]) == ["failed"]
    assert df.loc[0, "error"] == "ConfigError: data.path=x.npz: no such file"
