"""What a newcomer tripped over on a fresh clone, one test each: a mistyped key, the files a
plain run leaves, a sweep's job lines."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.conftest import ROOT


def _refused(capsys, *overrides: str) -> str:
    from experiments.cli import compose_config

    with pytest.raises(SystemExit) as e:
        compose_config(list(overrides))
    assert e.value.code == 2
    return capsys.readouterr().err.strip()


@pytest.mark.parametrize("override, message", [
    ("train.batchsize=5", "train.batchsize=5: no such key (did you mean train.batch_size?)"),
    ("batchsize=5", "batchsize=5: no such key (did you mean train.batch_size?)"),
    ("tran.steps=3", "tran.steps=3: no such key (did you mean train.steps?)"),
    ("model.dim=[4,2]", "model.dim=[4,2]: no such key (did you mean model.dims?)"),
    ("memory_limt=3MiB", "memory_limt=3MiB: no such key (did you mean memory_limit?)"),
    # Nothing close in a section of ours: its keys, and no `+` (train would refuse it too).
    ("train.zzz=1", "train.zzz=1: no such key; train has batch_size, betas, dtype, eps, "
                    "grad_check, lr, microbatches, momentum, optimizer, precision, recompute, "
                    "steps, warmup_steps"),
    # A new top-level key a tool may add: Hydra's own hint stays.
    ("zzzq=1", "zzzq=1: no such key in the config (to add one, use +zzzq)"),
])
def test_a_mistyped_key_gets_the_close_match(capsys, override, message):
    assert _refused(capsys, override) == f"error: {message}"


def test_the_close_match_knows_the_chosen_groups(capsys):
    # strategy=pipeline brings strategy.schedule: the typo is matched against it.
    err = _refused(capsys, "strategy=pipeline", "strategy.shedule=1f1b")
    assert err == "error: strategy.shedule=1f1b: no such key (did you mean strategy.schedule?)"


def test_following_a_plus_hint_is_not_circular():
    """`+train.batchsize=5` (the old hint) is refused by the config check, which also says what
    was meant."""
    from partition.config import ConfigError, parse_config
    from tests.conftest import config_dict

    d = config_dict()
    d["train"]["batchsize"] = 5
    with pytest.raises(ConfigError) as e:
        parse_config(d)
    assert str(e.value) == "train.batchsize=5: no such key (did you mean train.batch_size?)"


def _cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=ROOT)
    return subprocess.run([sys.executable, "-m", "experiments.run", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


TINY = ["model.dims=[8,16,4]", "train.steps=2", "train.batch_size=16", "data.num_examples=32"]


def test_a_plain_run_leaves_no_empty_log(tmp_path):
    """Hydra's job log (run.log) is opened only once something is logged; .hydra/ (the
    composed config and overrides, documented in docs/results.md) stays, and the run's
    timeline (trace.json; a one-device run draws no timeline.png)."""
    r = _cli(*TINY, f"hydra.run.dir={tmp_path}")
    assert r.returncode == 0, r.stderr
    assert sorted(os.listdir(tmp_path)) == [".hydra", "result.json", "trace.json", "weights.npz"]
    assert sorted(os.listdir(tmp_path / ".hydra")) == ["config.yaml", "hydra.yaml",
                                                       "overrides.yaml"]


def test_a_sweep_prints_each_job_once(tmp_path):
    r = _cli("-m", *TINY, "train.lr=0.1,0.2", f"hydra.sweep.dir={tmp_path}")
    assert r.returncode == 0, r.stderr
    out = r.stdout + r.stderr
    assert "[HYDRA]" not in out
    assert out.count("[sweep] job 1/2:") == 1 and out.count("[sweep] job 2/2:") == 1
    assert out.count("[ok] single") == 2
