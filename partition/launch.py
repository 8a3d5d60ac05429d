"""Running P ranks: spawned from one process with torch's elastic launcher, or under torchrun.

Either way one process ends up with every rank's record and writes the run's
one result.json and weights.npz, atomically. A rank that fails writes its own
error record (time, type, message, traceback) into the run folder first, so the
launcher can name the rank that failed *first* rather than a knock-on failure.
"""

from __future__ import annotations

import glob
import json
import logging
import os
import socket
import time
import traceback
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np

from partition.comm import Comm, Ledger
from partition.config import ConfigError, RunConfig, parse_config
from partition.data import load_dataset
from partition.memory import MemoryLimitExceeded
from partition.results import RESULT_FILE, WEIGHTS_FILE, build_result, write_json
from partition.topology import Topology, destroy, from_env, init_process_group, single_process
from partition.train import RankRecord, run_rank
from partition.weights import assemble, initial_weights, save_weights

ERRORS_DIR = "errors"
# Error types that mean "the device is too small": the run's status is `oom`.
OOM_TYPES = ("MemoryLimitExceeded", "OutOfMemoryError")
OOM_EXIT_CODE = 75  # a rank that ran out of memory leaves with this, at once


@dataclass(frozen=True)
class RankError:
    """One rank's own account of why it stopped."""

    rank: int
    time: float
    type: str
    message: str

    def as_dict(self) -> dict[str, Any]:
        return {"rank": self.rank, "type": self.type, "message": self.message}


def under_torchrun() -> bool:
    return "TORCHELASTIC_RUN_ID" in os.environ and "RANK" in os.environ


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ---------------------------------------------------------------- one rank


def _record_error(run_dir: str, rank: int, exc: BaseException) -> None:
    folder = os.path.join(run_dir, ERRORS_DIR)
    os.makedirs(folder, exist_ok=True)
    payload = {"rank": rank, "time": time.time(), "type": type(exc).__name__,
               "message": str(exc).strip().splitlines()[0] if str(exc).strip() else "",
               "traceback": traceback.format_exc()}
    with open(os.path.join(folder, f"rank{rank}.json"), "w") as fh:
        json.dump(payload, fh, indent=2)


def _oom_elsewhere(run_dir: str, rank: int) -> bool:
    """Another rank has already recorded that it ran out of memory."""
    err = first_error(run_dir)
    return err is not None and err.rank != rank and err.type in OOM_TYPES


def _leave(code: int) -> None:
    """Exit this rank process now, without a traceback and without waiting on peers:
    its sockets close, so peers blocked on it fail at once instead of at the timeout."""
    import sys

    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def rank_entry(cfg_dict: dict[str, Any], run_dir: str) -> RankRecord:
    """Entry point of a spawned rank (the elastic agent sets RANK, WORLD_SIZE, MASTER_*)."""
    cfg = parse_config(cfg_dict)
    topo = from_env(cfg.device)
    try:
        init_process_group(topo, timeout_s=cfg.timeout_s)
        ledger = Ledger()
        comm = Comm(rank=topo.rank, world_size=topo.world_size, ledger=ledger,
                    device=topo.device)
        return run_rank(cfg, topo, comm, ledger)
    except MemoryLimitExceeded as e:
        _record_error(run_dir, topo.rank, e)
        _leave(OOM_EXIT_CODE)
        raise  # not reached
    except BaseException as e:
        _record_error(run_dir, topo.rank, e)
        if _oom_elsewhere(run_dir, topo.rank):  # a knock-on of a peer's oom: nothing to add
            _leave(1)
        raise
    finally:
        destroy()


def first_error(run_dir: str) -> RankError | None:
    """The root cause: the error record with the earliest time (not the knock-on ones)."""
    errs = []
    for p in glob.glob(os.path.join(run_dir, ERRORS_DIR, "rank*.json")):
        with open(p) as fh:
            e = json.load(fh)
        errs.append(RankError(e["rank"], e["time"], e["type"], e["message"]))
    return min(errs, key=lambda e: (e.time, e.rank)) if errs else None


# ---------------------------------------------------------------- the whole run


def spawn_ranks(cfg: RunConfig, run_dir: str) -> list[RankRecord]:
    """Start cfg.ranks processes on this machine with torch's elastic launcher (loopback only)."""
    from torch.distributed.elastic.multiprocessing import DefaultLogsSpecs
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    lc = LaunchConfig(
        min_nodes=1, max_nodes=1, nproc_per_node=cfg.ranks,
        run_id=f"partition-{uuid.uuid4().hex[:8]}",
        rdzv_backend="c10d", rdzv_endpoint=f"127.0.0.1:{free_port()}",
        rdzv_configs={"timeout": int(max(30, cfg.timeout_s))},
        max_restarts=0, monitor_interval=0.05, start_method="spawn",
        logs_specs=DefaultLogsSpecs(log_dir=os.path.join(run_dir, "logs")),
        local_addr="127.0.0.1",
    )
    with _quiet_launcher():
        results = elastic_launch(lc, rank_entry)(cfg.to_dict(), run_dir)
    return [results[r] for r in sorted(results)]


_LAUNCHER_LOGGERS = ("torch.distributed.elastic", "torch.multiprocessing.spawn")


@contextmanager
def _quiet_launcher() -> Iterator[None]:
    """Keep torch's launcher from printing a traceback of its own polling code per failed rank.

    What failed, and where, is in result.json (the root-cause rank) and in
    errors/rank<N>.json (each rank's own traceback); the caller prints one line.
    """
    names = [n for n in list(logging.Logger.manager.loggerDict)
             if n.startswith(_LAUNCHER_LOGGERS)] + list(_LAUNCHER_LOGGERS)
    loggers = [logging.getLogger(n) for n in dict.fromkeys(names)]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        for lg, lv in zip(loggers, levels, strict=True):
            lg.setLevel(lv)


def write_outputs(cfg: RunConfig, run_dir: str, records: list[RankRecord], *, seconds: float,
                  status: str = "ok", error: dict[str, Any] | None = None) -> dict[str, Any]:
    """weights.npz (full, unsharded) then result.json, both atomic; returns the result."""
    result = build_result(cfg, records, seconds=seconds, status=status, error=error)
    if records and result["status"] in ("ok", "diverged"):
        shards = [s for r in records for s in r.shards]
        arrays = assemble(cfg.spec, shards, np.dtype(cfg.train.dtype))
        save_weights(os.path.join(run_dir, WEIGHTS_FILE), arrays)
    write_json(os.path.join(run_dir, RESULT_FILE), result)
    return result


def run(cfg: RunConfig, run_dir: str) -> dict[str, Any]:
    """One run from a plain process: in-process for `single`, else spawn cfg.ranks ranks."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    os.makedirs(run_dir, exist_ok=True)
    t0 = time.perf_counter()
    refused = precheck_memory(cfg)
    if refused is not None:
        return write_outputs(cfg, run_dir, [], seconds=time.perf_counter() - t0,
                             status="oom", error=refused)
    if cfg.ranks == 1 and cfg.strategy.name == "single":
        topo = single_process(cfg.device)
        try:
            rec = run_rank(cfg, topo, None, Ledger())
        except ConfigError:
            raise
        except Exception as e:
            _record_error(run_dir, 0, e)
            err = first_error(run_dir)
            return write_outputs(cfg, run_dir, [], seconds=time.perf_counter() - t0,
                                 status=run_status(err), error=err.as_dict() if err else None)
        return write_outputs(cfg, run_dir, [rec], seconds=time.perf_counter() - t0)
    try:
        records = spawn_ranks(cfg, run_dir)
    except ChildFailedError as e:
        err = first_error(run_dir)
        if err is None:  # the rank died before it could say why (e.g. os._exit, a signal)
            rank, failure = min(e.failures.items(), key=lambda kv: kv[1].timestamp)
            err = RankError(rank, failure.timestamp, "ProcessExited",
                            f"exit code {failure.exitcode}")
        return write_outputs(cfg, run_dir, [], seconds=time.perf_counter() - t0,
                             status=run_status(err), error=err.as_dict())
    return write_outputs(cfg, run_dir, records, seconds=time.perf_counter() - t0)


def run_status(err: RankError | None) -> str:
    """`oom` when the root cause is a rank out of memory, else `failed`."""
    return "oom" if err is not None and err.type in OOM_TYPES else "failed"


def precheck_memory(cfg: RunConfig) -> dict[str, Any] | None:
    """With cost.precheck: the error record of a run refused up front because the cost
    model's predicted peak of some rank already exceeds memory_limit; else None."""
    if not cfg.cost.precheck or cfg.memory_limit is None:
        return None
    import torch

    from partition import costs

    cuda = cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
    try:
        over = costs.peak_over_limit(cfg, device="cuda" if cuda else "cpu")
    except ValueError:
        return None  # no model for this strategy: let the run find out
    if over is None:
        return None
    rank, peak = over
    where = "training step (predicted; refused before starting, cost.precheck=true)"
    err = MemoryLimitExceeded(rank=rank, needed=peak, limit=cfg.memory_limit, where=where,
                              device="cuda" if cuda else "cpu")
    return {"rank": rank, "type": type(err).__name__, "message": str(err)}


def check_dataset(cfg: RunConfig) -> None:
    """Load the data and the initial weights once, before any rank starts: bad files fail here."""
    load_dataset(cfg.data, cfg.spec, seed=cfg.seed)
    initial_weights(cfg.spec, init=cfg.model.init, init_path=cfg.model.init_path, seed=cfg.seed)


# ---------------------------------------------------------------- under torchrun


def torchrun_rank(cfg: RunConfig, choose_dir) -> tuple[Topology, dict[str, Any] | None]:  # noqa: ANN001
    """Body of every torchrun process: join, agree on one folder, train, gather to rank 0.

    `choose_dir()` is called on rank 0 only; its answer is broadcast so that every
    rank writes (error records) into the same folder.
    """
    world = int(os.environ["WORLD_SIZE"])
    if world != cfg.ranks:
        raise ConfigError("world_size", cfg.world_size,
                          f"torchrun started {world} processes; set world_size={world}")
    topo = from_env(cfg.device)
    t0 = time.perf_counter()
    init_process_group(topo, timeout_s=cfg.timeout_s)
    try:
        ledger = Ledger()
        comm = Comm(rank=topo.rank, world_size=topo.world_size, ledger=ledger, device=topo.device)
        run_dir = comm.broadcast_object(choose_dir() if topo.rank == 0 else None)
        try:
            rec = run_rank(cfg, topo, comm, ledger)
        except MemoryLimitExceeded as e:
            _record_error(run_dir, topo.rank, e)
            _leave(OOM_EXIT_CODE)  # peers fail fast on the closed sockets
            raise  # not reached
        except BaseException as e:
            _record_error(run_dir, topo.rank, e)
            raise
        records = comm.gather_objects(rec)
        if topo.rank != 0:
            return topo, None
        return topo, write_outputs(cfg, run_dir, records, seconds=time.perf_counter() - t0) | {
            "path": run_dir}
    finally:
        destroy()


__all__ = ["check_dataset", "run", "spawn_ranks", "torchrun_rank", "under_torchrun",
           "parse_config"]
