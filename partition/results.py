"""The result record (result.json, DESIGN §5), atomic writing, and loading many into one table."""

from __future__ import annotations

import json
import os
import platform
import statistics
import tempfile
from collections.abc import Callable, Iterable
from typing import IO, Any

import torch

from partition import costs
from partition.config import RunConfig

RESULT_FILE = "result.json"
WEIGHTS_FILE = "weights.npz"
STATUSES = ("ok", "failed", "oom", "diverged")


def atomic_write(path: str, write: Callable[[IO[bytes]], None]) -> None:
    """Write via a temporary file in the same folder, fsync, then rename over `path`.

    A writer killed at any moment leaves either the old file or the new one.
    """
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix="-" + os.path.basename(path), dir=folder)
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


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
        "cpu_threads_per_rank": torch.get_num_threads() if device == "cpu" and cfg.ranks == 1 else 1,
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
    ranks = []
    for r in records:
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
        })
    measured_bubble = None
    if cfg.strategy.name == "pipeline" and ranks and ranks[0]["timing"]["step_s"]:
        # Share of the step that the average stage spends not computing: idle waits for
        # its neighbours (the bubble) plus the transfers themselves.
        step_med = statistics.median(steady(step_times))
        mean_compute = statistics.mean(x["timing"]["compute_s"] for x in ranks)
        measured_bubble = max(0.0, 1.0 - mean_compute / step_med)
    predicted = predicted_block(cfg, records)
    step_med = statistics.median(steady(step_times)) if step_times else None
    errs = [r.grad_rel_err for r in records if r.grad_rel_err is not None]
    losses = r0.objective if r0 else []
    accs = r0.accuracy if r0 else []
    return {
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


def predicted_block(cfg: RunConfig, records: list[Any]) -> dict[str, Any]:
    """`predicted`: the cost model for this config, on the device the ranks ran on."""
    device = records[0].device.split(":")[0] if records and records[0].device else (
        "cuda" if cfg.device == "cuda" else "cpu")
    try:
        return costs.predict(cfg, device=device, params=cost_params(cfg, records))
    except ValueError as e:  # a strategy the model does not know yet
        return {"ranks": [], "bubble_fraction": costs.bubble_fraction(cfg),
                "flops_per_step": None, "step_time_s": None, "error": str(e)}


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
