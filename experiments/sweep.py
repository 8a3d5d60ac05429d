"""Hydra callback for multirun sweeps: a progress line per job, a closing line per sweep.

Configured in conf/config.yaml under `hydra.callbacks.progress`. In a plain run it
says nothing. The task function (experiments/run.py) prints each job's summary
line and returns its status ('ok', 'failed', 'oom', 'diverged' or 'skipped'),
which this callback counts.
"""

from __future__ import annotations

import time
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from partition.sweep import Progress, statuses_under


def sweep_size(config: DictConfig) -> int | None:
    """How many jobs Hydra's basic sweeper will launch (the product of the sweeps); None
    for another sweeper, whose plan is its own."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    sweeper = OmegaConf.select(config, "hydra.sweeper._target_") or ""
    if not sweeper.endswith("BasicSweeper"):
        return None
    params = OmegaConf.select(config, "hydra.sweeper.params") or {}
    args = [f"{k}={v}" for k, v in params.items()] + list(config.hydra.overrides.task)
    try:
        parsed = OverridesParser.create().parse_overrides(args)
        batches = BasicSweeper.split_arguments(parsed, None)
    except Exception:  # an override only the real sweeper understands: no count, no harm
        return None
    return sum(len(b) for b in batches)


def swept_keys(config: DictConfig) -> set[str]:
    """The keys that vary across the sweep (`strategy=single,pipeline`: strategy)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    try:
        parsed = OverridesParser.create().parse_overrides(list(config.hydra.overrides.task))
    except Exception:
        return set()
    return {o.get_key_element() for o in parsed if o.is_sweep_override()}


def _job_overrides(config: DictConfig, keys: set[str]) -> str:
    """The job's values of the swept keys (all its overrides if none is known)."""
    task = [o for o in config.hydra.overrides.task if not o.lstrip("+~").startswith("hydra")]
    shown = [o for o in task if o.split("=", 1)[0] in keys] or task
    return " ".join(shown) or "(defaults)"


class SweepProgress(Callback):
    """Job i of n, elapsed, estimated time left; then how the sweep ended."""

    def __init__(self) -> None:
        self.progress: Progress | None = None
        self.keys: set[str] = set()
        self.job_started = 0.0

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        self.progress = Progress(total=sweep_size(config), started=time.monotonic())
        self.keys = swept_keys(config)

    def on_job_start(self, config: DictConfig, **kwargs: Any) -> None:
        if self.progress is None:  # a plain run, or a remote launcher's worker
            return
        self.job_started = time.monotonic()
        num = OmegaConf.select(config, "hydra.job.num")
        index = (num if isinstance(num, int) else self.progress.finished) + 1
        print(self.progress.start_line(index, _job_overrides(config, self.keys), self.job_started),
              flush=True)

    def on_job_end(self, config: DictConfig, job_return: Any, **kwargs: Any) -> None:
        if self.progress is None:
            return
        # Reading job_return.return_value of a failed job re-raises its exception.
        value = getattr(job_return, "_return_value", None)
        status = value if isinstance(value, str) else "failed"
        self.progress.finish(status, time.monotonic() - self.job_started)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        if self.progress is None:
            return
        where = str(OmegaConf.select(config, "hydra.sweep.dir"))
        if not self.progress.finished:
            # A remote launcher (Slurm) ran the jobs elsewhere: count what they wrote.
            self.progress.statuses.update(statuses_under(where))
        print(self.progress.end_line(time.monotonic(), where), flush=True)
        print(f"[sweep] table and plots: python -m experiments.report {where}", flush=True)
