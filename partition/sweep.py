"""Sweeps: resuming one (skip the jobs that already finished), and its progress lines.

A sweep is a list of runs, each with its own folder: a Hydra multirun
(`experiments.run -m …`) or the headline comparison (`experiments.compare`). Both
resume the same way: a job whose folder already holds a result.json that says `ok`
*for the same resolved config* is not run again; anything else (failed, oom,
diverged, a different config, no result) runs and replaces it.

Nothing here imports torch or Hydra, so a Hydra callback can use it cheaply.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from partition.config import RunConfig

RESULT_FILE = "result.json"  # = partition.results.RESULT_FILE, without importing torch
ERRORS_DIR = "errors"  # = partition.launch.ERRORS_DIR


def _plain(obj: Any) -> Any:
    """The config as it reads back from JSON (tuples become lists)."""
    return json.loads(json.dumps(obj, default=list))


def same_config(result_path: str, cfg: RunConfig) -> bool:
    """Whether the result.json at `result_path` was made by exactly this config (False when
    it cannot be read)."""
    try:
        with open(result_path) as fh:
            return json.load(fh).get("config") == _plain(cfg.to_dict())
    except (OSError, ValueError, AttributeError):
        return False


def finished_result(run_dir: str, cfg: RunConfig) -> dict[str, Any] | None:
    """The result in `run_dir` if it says `ok`, was made by exactly this config, and its
    weights.npz is the file it recorded (size and sha256): result.json alone is not
    trusted, since the weights are written before it and can be damaged after."""
    path = os.path.join(run_dir, RESULT_FILE)
    try:
        with open(path) as fh:
            res = json.load(fh)
    except (OSError, ValueError):
        return None  # none yet, or unreadable: run again
    if res.get("status") != "ok" or res.get("config") != _plain(cfg.to_dict()):
        return None
    from partition.results import weights_intact  # torch: only when a job is resumed

    return res if weights_intact(run_dir, res) else None


def clear_for_rerun(run_dir: str) -> None:
    """Remove the error records of an earlier attempt in this folder.

    The launcher names the root cause as the *earliest* record under errors/; stale
    records from a previous failed attempt would be blamed for the new one.
    """
    shutil.rmtree(os.path.join(run_dir, ERRORS_DIR), ignore_errors=True)


def failed_result_error(exc: BaseException) -> dict[str, Any]:
    """The `error` block for a job that failed outside any rank (in the launching process)."""
    msg = str(exc).strip().splitlines()
    return {"rank": None, "type": type(exc).__name__, "message": msg[0] if msg else ""}


def statuses_under(folder: str) -> Counter:
    """How many result.json files under `folder` say each status."""
    out: Counter = Counter()
    for root, _, files in os.walk(folder):
        if RESULT_FILE in files:
            try:
                with open(os.path.join(root, RESULT_FILE)) as fh:
                    out[json.load(fh).get("status", "unknown")] += 1
            except (OSError, ValueError):
                out["unreadable"] += 1
    return out


def clock(seconds: float | None) -> str:
    """0:07, 1:02:03 — what a person reads in a progress line."""
    if seconds is None:
        return "?"
    s = int(round(max(0.0, seconds)))
    h, rem = divmod(s, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


@dataclass
class Progress:
    """Counts and timings of a sweep; times are passed in (monotonic seconds), never read here.

    The estimate of what is left is the mean duration of the jobs that actually ran
    (skipped ones take no time) times the jobs not yet finished.
    """

    total: int | None
    started: float
    tag: str = "sweep"  # the prefix of every line
    unit: str = "job"
    durations: list[float] = field(default_factory=list)
    statuses: Counter = field(default_factory=Counter)

    @property
    def finished(self) -> int:
        return sum(self.statuses.values())

    def remaining_s(self) -> float | None:
        if self.total is None or not self.durations:
            return None
        return statistics.mean(self.durations) * max(0, self.total - self.finished)

    def start_line(self, index: int, what: str, now: float) -> str:
        """`index` counts from 1."""
        of = f"{index}/{self.total}" if self.total else f"{index}"
        left = self.remaining_s()
        eta = "estimating" if left is None else f"about {clock(left)} left"
        return f"[{self.tag}] {self.unit} {of}: {what} | elapsed {clock(now - self.started)}, {eta}"

    def finish(self, status: str, seconds: float) -> None:
        """Record one finished job; status 'skipped' for one that did not need to run."""
        self.statuses[status] += 1
        if status != "skipped":
            self.durations.append(seconds)

    def end_line(self, now: float, where: str) -> str:
        counts = ", ".join(f"{n} {s}" for s, n in sorted(self.statuses.items())) or "none"
        took = clock(now - self.started)
        return f"[{self.tag}] {self.finished} {self.unit}s in {took} ({counts}) -> {where}"


def run_or_skip(cfg: RunConfig, run_dir: str) -> tuple[dict[str, Any], bool]:
    """(result, skipped): the finished result if this config already ran ok in `run_dir`,
    else run it now. Whatever goes wrong is recorded as a `failed` result.json, never
    raised, so the sweep goes on (Ctrl-C still stops it)."""
    import time

    from partition.launch import run, write_outputs

    done = finished_result(run_dir, cfg)
    if done is not None:
        return done, True
    clear_for_rerun(run_dir)
    t0 = time.perf_counter()
    try:
        return run(cfg, run_dir), False
    except Exception as e:  # launch.run reports rank failures itself; this is anything else
        return write_outputs(cfg, run_dir, [], seconds=time.perf_counter() - t0,
                             status="failed", error=failed_result_error(e)), False


def skip_line(summary: str) -> str:
    """A finished job's summary line, marked as not run again."""
    return summary.replace("[ok]", "[ok, skipped: already done]", 1)
