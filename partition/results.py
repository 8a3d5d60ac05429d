"""The result record (result.json, docs/results.md), atomic writing, and loading many into one table."""

from __future__ import annotations

import hashlib
import json
import os
import platform
import statistics
import tempfile
from collections.abc import Callable, Iterable
from typing import IO, Any

import torch

from partition import costs
from partition.boundaries import boundaries
from partition.config import RunConfig
from partition.topology import intra_op_threads
from partition.timeline import (
    TRACED_TIMES,
    RunTimes,
    measured,
    run_times,
    simulation,
    stage_imbalance,
)

RESULT_FILE = "result.json"
WEIGHTS_FILE = "weights.npz"
STATUSES = ("ok", "failed", "oom", "diverged")
# The exit status of a run that ended with each status; 2 is bad input (refused before
# anything starts), 130 an interrupted run. A sweep exits 0 and lists its jobs' statuses.
EXIT_STATUS = {"ok": 0, "failed": 1, "oom": 3, "diverged": 4}
BAD_INPUT_STATUS = 2
INTERRUPTED_STATUS = 130


def exit_status(status: str) -> int:
    """What the process that reports a run exits with (1 for a status it does not know)."""
    return EXIT_STATUS.get(status, 1)


def umask() -> int:
    """This process's umask, read without changing it where the system allows (Linux)."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)  # elsewhere: set and restore at once
    os.umask(mask)
    return mask


def atomic_write(path: str, write: Callable[[IO[bytes]], None]) -> None:
    """Write via a temporary file in the same folder, fsync, then rename over `path`.

    A writer killed at any moment leaves either the old file or the new one. The file
    gets the mode any new file would (0666 less the umask): mkstemp's 0600 would make
    result.json and weights.npz private while everything around them is not.
    """
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix="-" + os.path.basename(path), dir=folder)
    try:
        with os.fdopen(fd, "wb") as fh:
            os.fchmod(fh.fileno(), 0o666 & ~umask())
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def file_digest(path: str) -> dict[str, Any]:
    """{bytes, sha256} of a file: what result.json records of weights.npz, so that a resumed
    sweep can tell a whole weights file from a truncated or replaced one."""
    h = hashlib.sha256()
    size = 0
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
            size += len(chunk)
    return {"bytes": size, "sha256": h.hexdigest()}


def weights_intact(run_dir: str, result: dict[str, Any]) -> bool:
    """Whether the run's weights.npz is the one its result.json recorded (size and digest)."""
    want = result.get("weights")
    if not isinstance(want, dict):
        return False
    path = os.path.join(run_dir, str(want.get("file", WEIGHTS_FILE)))
    try:
        if os.path.getsize(path) != want.get("bytes"):
            return False  # cheap first: a truncated file needs no hashing
        return file_digest(path) == {"bytes": want["bytes"], "sha256": want.get("sha256")}
    except OSError:
        return False


def write_json(path: str, obj: Any) -> None:
    data = (json.dumps(obj, indent=2, default=_jsonable) + "\n").encode()
    atomic_write(path, lambda fh: fh.write(data))


def _jsonable(x: Any) -> Any:
    if isinstance(x, tuple):
        return list(x)
    if hasattr(x, "item"):
        return x.item()
    raise TypeError(f"not JSON serialisable: {type(x).__name__}")


def _stats(xs: list[float]) -> dict[str, float | None]:
    if not xs:
        return {"median": None, "min": None, "max": None}
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs)}


def run_info(cfg: RunConfig, *, device: str, backend: str, seconds: float) -> dict[str, Any]:
    return {
        "strategy": cfg.strategy.name,
        "world_size": cfg.world_size,
        "ranks": cfg.ranks,
        "device": device,
        "backend": backend,
        "engine": cfg.engine,
        "schedule": cfg.strategy.schedule if cfg.strategy.name == "pipeline" else None,
        "layout": cfg.strategy.layout if cfg.strategy.name == "tensor" else None,
        "batch_size": cfg.train.batch_size,
        "microbatches": cfg.train.microbatches,
        "dims": list(cfg.model.dims),
        "dtype": cfg.train.dtype,
        "recompute": cfg.train.recompute,
        "precision": cfg.train.precision,
        "optimizer": cfg.train.optimizer,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "host": platform.node(),
        # Intra-op threads of every rank, `single` included (null: torch's default, on GPU).
        "threads_per_rank": intra_op_threads(cfg.threads_per_rank, device.split(":")[0] or "cpu"),
        "cpu_count": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
        else os.cpu_count(),  # cores this process may use: ranks beyond them share cores
        # 1, 5, 15-minute load average as the run ended: a busy machine makes times noisy.
        "load_average": [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg")
        else None,
        "seconds": seconds,
    }


def build_result(cfg: RunConfig, records: list[Any], *, seconds: float,
                 status: str = "ok", error: dict[str, Any] | None = None) -> dict[str, Any]:
    """result.json from the rank records (`train.RankRecord`), rank 0 first."""
    records = sorted(records, key=lambda r: r.rank)
    warm = cfg.train.warmup_steps
    r0 = records[0] if records else None
    statuses = {r.status for r in records}
    if status == "ok" and "diverged" in statuses:
        status = "diverged"

    def steady(xs: list[float]) -> list[float]:
        return xs[warm:] if len(xs) > warm else xs

    # A step ends when the slowest rank ends it: per step, the max over ranks.
    step_times = [max(ts) for ts in zip(*(r.step_s for r in records))] if records else []
    # The simulator's durations: each action as the run's own steps took it, else as timed
    # at start-up (timeline.step_times); both are kept per rank.
    # Idle fraction per rank = 1 − compute inside the step / step time, from the traced
    # step's spans (whose replay timeline.png draws under them).
    meas = measured(records)
    times = run_times(cfg, records, cost_params(cfg, records),
                      traced_step=meas[0]["step"] if meas else None) if records else None
    ranks = []
    for i, r in enumerate(records):
        st = steady(r.step_s)
        comp = steady(r.compute_s)
        cm = steady(r.comm_s)
        med = statistics.median(st) if st else None
        med_c = statistics.median(comp) if comp else None
        med_m = statistics.median(cm) if cm else None
        ranks.append({
            "rank": r.rank,
            "device": r.device,
            "comm": r.comm,
            "comm_steps_equal": r.comm_steps_equal,
            "memory": r.memory,
            "timing": {
                "step_s": med, "compute_s": med_c, "comm_s": med_m,
                # Whatever is neither local arithmetic nor inside a comm call (Python, the loop).
                "other_s": None if med is None else max(0.0, med - med_c - med_m),
            },
            "in_flight_max": r.in_flight_max,
            "memory_steps_equal": getattr(r, "memory_steps_equal", True),
            "calibration": getattr(r, "calibration", None),
            # seconds of each compute action at this run's shapes, the simulator's input
            # (`cost.profile=<this result.json>` reuses them): as the run's steps took them
            # where they timed it, else as timed at start-up (`startup_action_times`)
            "action_times": times.times[i] if times else getattr(r, "action_times", None),
            "startup_action_times": getattr(r, "action_times", None),
            # the traced step's, which timeline.png replays under its measured spans
            TRACED_TIMES: times.traced[i] if times and times.traced else None,
        })
    predicted = predicted_block(cfg, records, times=times)
    # MFU = the rank's FLOP/s in its compute ÷ its calibrated matmul rate.
    # Without a prediction (one the cost model cannot make) the measured keys stay; MFU goes.
    preds = predicted.get("ranks") or [{}] * len(ranks)
    for x, m, pr, r in zip(ranks, meas or [], preds, records):
        peak = (r.action_times or {}).get("peak_flops_per_s")
        flops = pr.get("flops")
        x["timing"].update(idle_fraction=m["idle_fraction"], traced_step=m["step"],
                           traced_step_s=m["step_s"],
                           traced_compute_s=m["compute_s"], traced_wait_s=m["wait_s"],
                           mfu=flops / m["compute_s"] / peak
                           if flops and peak and m["compute_s"] > 0 else None)
    measured_bubble = statistics.mean(m["idle_fraction"] for m in meas) if meas else None
    step_med = statistics.median(steady(step_times)) if step_times else None
    errs = [r.grad_rel_err for r in records if r.grad_rel_err is not None]
    losses = r0.objective if r0 else []
    accs = r0.accuracy if r0 else []
    out = {
        "status": status,
        "error": error,
        "run": run_info(cfg, device=r0.device if r0 else "", backend=r0.backend if r0 else "",
                        seconds=seconds),
        "config": cfg.to_dict(),
        "train": {
            "loss": losses,
            "data_loss": r0.data_loss if r0 else [],
            "accuracy": accs,
            "final_loss": losses[-1] if losses else None,
            "final_accuracy": accs[-1] if accs else None,
            "steps_done": len(losses),
            "examples_seen": len(losses) * cfg.train.batch_size,
            "stopped_at": r0.stopped_at if r0 else None,
            "step_time_s": _stats(steady(step_times)),
            "bubble_fraction_measured": measured_bubble,
            # measured (the traced step's spans), simulated (the plan with calibrated
            # durations), and what equal stages and free communication would give
            "idle_fraction": {"measured": measured_bubble,
                              "simulated": predicted.get("idle_fraction"),
                              "equal_stages_formula": costs.bubble_fraction(cfg)},
            "idle_causes": predicted.get("idle_causes"),
            "stage_imbalance": stage_imbalance(meas) if meas else None,
        },
        "ranks": ranks,
        "predicted": predicted,
        "prediction_error": costs.prediction_error(
            ranks, predicted, step_time_s=step_med, bubble_measured=measured_bubble)
        if predicted.get("ranks") else None,
        "check": {
            "grad_max_rel_err": max(errs) if errs else None,
            "reference": "torch.autograd, float64, step 0, full weights" if errs else None,
            **costs.precision_check(cfg, losses),
        },
    }
    if cfg.strategy.name == "pipeline" and records:
        # Bytes each way per stage boundary in one steady step (from the ranks' ledgers).
        out["boundaries"] = boundaries({r.rank: getattr(r, "sends", []) for r in records})
    return out


def cost_params(cfg: RunConfig, records: list[Any]) -> costs.CostParams:
    """The config's α, β and rate, or what `cost.calibrate` measured: the point-to-point and
    collective fits of rank 0, the median of every rank's matmul rate."""
    params = costs.CostParams.from_config(cfg)
    cals = [r.calibration for r in records if getattr(r, "calibration", None)]
    if not cals:
        return params
    c0 = cals[0]
    return costs.CostParams(
        alpha_s=c0.get("alpha_s", params.alpha_s), beta_Bps=c0.get("beta_Bps", params.beta_Bps),
        collective_alpha_s=c0.get("collective_alpha_s", params.collective_alpha_s),
        collective_beta_Bps=c0.get("collective_beta_Bps", params.collective_beta_Bps),
        flops_per_s=statistics.median(c["flops_per_s"] for c in cals), source="calibrated")


def predicted_block(cfg: RunConfig, records: list[Any], *, times: RunTimes | None = None
                    ) -> dict[str, Any]:
    """`predicted`: the cost model for this config, on the device the ranks ran on; `times`
    (`timeline.run_times`): the simulator's durations, with beside them every sampled
    step's simulated and measured step (`sampled_steps`) and the step the start-up times
    alone simulate (`startup_step_time_s`)."""
    device = records[0].device.split(":")[0] if records and records[0].device else (
        "cuda" if cfg.device == "cuda" else "cpu")
    params = cost_params(cfg, records)
    try:
        out = costs.predict(cfg, device=device, params=params,
                            times=times.times if times else None)
    except ValueError as e:  # a strategy the model does not know yet
        return {"ranks": [], "bubble_fraction": costs.bubble_fraction(cfg),
                "flops_per_step": None, "step_time_s": None, "error": str(e)}
    # the same simulator on the durations timed alone at start-up (what experiments.predict
    # has): how far that timing alone is from the run
    start = simulation(cfg, times.startup, params)[0] if times else None
    out["startup_step_time_s"] = start["step_time_s"] if start else None
    out["sampled_steps"] = times.replays if times else []
    return out


def load_results(folders: Iterable[str]) -> list[dict[str, Any]]:
    """Every result.json under the given folders (or the files themselves), with its path."""
    out = []
    for f in folders:
        if os.path.isfile(f):
            paths = [f]
        else:
            paths = sorted(os.path.join(root, RESULT_FILE) for root, _, files in os.walk(f)
                           if RESULT_FILE in files)
        for p in paths:
            with open(p) as fh:
                res = json.load(fh)
            res["path"] = os.path.dirname(os.path.abspath(p))
            out.append(res)
    return out
