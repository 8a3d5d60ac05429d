"""Running P ranks: spawned from one process with torch's elastic launcher, or under torchrun.

Either way one process ends up with every rank's record and writes the run's
one result.json and weights.npz, atomically. When the run fails, every rank has
left its own evidence in the run folder (`partition.failures`: its error record,
or where it was when it was stopped), and result.json names the root cause from
that evidence rather than from whichever failure the elastic agent noticed first.
Spawned ranks run on this machine only: the rendezvous store and gloo listen on
the loopback interface.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
import socket
import sys
import time
import traceback
import uuid
from collections.abc import Callable, Iterator
from datetime import timedelta
from typing import Any, NoReturn

import numpy as np

from partition.comm import Comm, Ledger
from partition.config import ConfigError, RunConfig, parse_config
from partition.data import load_dataset
from partition.failures import (
    ERRORS_DIR,
    RankError,
    StackDump,
    diagnose,
    errors_dir,
    prune_empty,
    record_error,
)
from partition.lifeline import LAUNCHER_PID_ENV, hold
from partition.memory import MemoryLimitExceeded
from partition.records import record_from_json, record_to_json
from partition.results import RESULT_FILE, WEIGHTS_FILE, build_result, write_json
from partition.topology import (
    Topology,
    destroy,
    from_env,
    init_process_group,
    resolve_device,
    single_process,
)
from partition.train import RankRecord, run_rank
from partition.weights import assemble, initial_weights, save_weights

LOGS_DIR = "logs"
LOOPBACK = "127.0.0.1"
_RDZV_BACKEND = "partition-loopback"
# Error types that mean "the device is too small": the run's status is `oom`.
OOM_TYPES = ("MemoryLimitExceeded", "OutOfMemoryError")


def under_torchrun() -> bool:
    return "TORCHELASTIC_RUN_ID" in os.environ and "RANK" in os.environ


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((LOOPBACK, 0))
        return s.getsockname()[1]


def loopback_interface() -> str | None:
    """The loopback interface's name ("lo" on Linux, "lo0" on macOS), if there is one."""
    try:
        names = [name for _, name in socket.if_nameindex()]
    except OSError:
        return None
    return next((n for n in names if n in ("lo", "lo0")), None)


def first_to_report(key: str) -> bool:
    """Under torchrun, True in exactly one process: the first to ask (via the agent's store).

    Every rank checks its input, but the user should read the message once; and
    waiting for rank 0 in particular is no good, since the agent stops the others
    as soon as one exits. Without the agent's store, rank 0 speaks.
    """
    rank = int(os.environ.get("RANK", "0"))
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE", "").lower() != "true":
        return rank == 0
    try:
        import torch.distributed as dist

        store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]),
                              is_master=False, timeout=timedelta(seconds=5))
        run = os.environ.get("TORCHELASTIC_RUN_ID", "")
        restart = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        return store.add(f"partition/{run}/{restart}/{key}", 1) == 1
    except Exception:  # no store to agree through: fall back to rank 0
        return rank == 0


# ---------------------------------------------------------------- one rank

STARTUP_TIMEOUT_S = 300.0


def wait_for_peers(timeout_s: float) -> None:
    """Meet every rank of the run on the agent's store before joining the process group.

    `timeout_s` is how long a rank waits for a *silent* peer, and it is also the
    process group's timeout while it connects: a peer still importing torch on a
    busy machine would be taken for a dead one. Waiting here first, with a long
    startup timeout, lets a short `timeout_s` mean what it says. (A rank that dies
    while starting ends the wait early: the launcher stops the others.)
    """
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE", "").lower() != "true":
        return
    import torch.distributed as dist

    world = int(os.environ["WORLD_SIZE"])
    prefix = "partition/{}/{}".format(os.environ.get("TORCHELASTIC_RUN_ID", ""),
                                      os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    # Connecting is bounded by timeout_s: the store lives in the launcher (or torchrun's
    # agent), so a store that does not answer means the launcher is gone.
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]),
                          is_master=False, timeout=timedelta(seconds=timeout_s))
    store.set_timeout(timedelta(seconds=max(timeout_s, STARTUP_TIMEOUT_S)))
    if store.add(f"{prefix}/ready", 1) == world:
        store.set(f"{prefix}/go", "1")
    store.wait([f"{prefix}/go"])


def _watchdog_s(cfg: RunConfig, topo: Topology) -> float | None:
    # With peers, a hang is caught by their process-group timeout; alone, by a step watchdog.
    return cfg.timeout_s if topo.world_size == 1 else None


def rank_entry(cfg_dict: dict[str, Any], run_dir: str) -> dict[str, Any]:
    """Entry point of a spawned rank (`partition.worker`; the elastic agent sets RANK,
    WORLD_SIZE, MASTER_*): its record, as JSON for the launcher."""
    lo = loopback_interface()
    if lo is not None:  # this machine only: gloo's own sockets on loopback too
        os.environ.setdefault("GLOO_SOCKET_IFNAME", lo)
    cfg = parse_config(cfg_dict)
    topo = from_env(cfg.device)
    with StackDump(run_dir, topo.rank, watchdog_s=_watchdog_s(cfg, topo)) as dump:
        try:
            wait_for_peers(cfg.timeout_s)
            init_process_group(topo, timeout_s=cfg.timeout_s)
            ledger = Ledger()
            comm = Comm(rank=topo.rank, world_size=topo.world_size, ledger=ledger,
                        device=topo.device)
            rec = run_rank(cfg, topo, comm, ledger, on_step=dump.arm)
        except BaseException as e:
            record_error(run_dir, topo.rank, e)
            _exit_now(e)
    destroy()
    return record_to_json(rec)


def _exit_now(exc: BaseException) -> NoReturn:
    """End a failed rank at once, its record written: the agent stops the group only when a
    rank has *exited*, and an interpreter with torch loaded takes seconds to shut down on a
    busy machine (a process group in error can even hang in its destructor)."""
    traceback.print_exception(type(exc), exc, exc.__traceback__)  # into the rank's stderr log
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(1)


def first_error(run_dir: str, *, ranks: int = 0, timeout_s: float = 0.0) -> RankError | None:
    """The root cause of a failed run, from the evidence in `run_dir` (see `failures.diagnose`)."""
    return diagnose(run_dir, ranks=ranks, timeout_s=timeout_s)


# ---------------------------------------------------------------- the whole run


def _loopback_rendezvous(params: Any) -> Any:  # noqa: ANN401 - torch's handler types
    """A one-node rendezvous whose TCPStore listens on 127.0.0.1 only.

    torch's own c10d and static rendezvous create their TCPStore servers on every
    interface (there is no address option); TCPStore does accept a socket that is
    already listening, so we hand it one bound to loopback. The workers find it
    through MASTER_ADDR=127.0.0.1 (the agent's store is theirs).
    """
    from torch.distributed import TCPStore
    from torch.distributed.elastic.rendezvous.static_tcp_rendezvous import StaticTCPRendezvous

    class LoopbackRendezvous(StaticTCPRendezvous):
        def __init__(self) -> None:
            self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            self._sock.bind((LOOPBACK, 0))
            self._sock.listen()
            super().__init__(LOOPBACK, self._sock.getsockname()[1], 0, 1, params.run_id,
                             int(params.config.get("timeout", 60)))

        def get_backend(self) -> str:
            return _RDZV_BACKEND

        def next_rendezvous(self) -> Any:  # noqa: ANN401
            if not self._store:
                self._store = TCPStore(LOOPBACK, self.master_port, 1, True, self.timeout,
                                       multi_tenant=True, master_listen_fd=self._sock.fileno())
            return super().next_rendezvous()

        def shutdown(self) -> bool:
            self._sock.close()
            return True

    return LoopbackRendezvous()


@contextlib.contextmanager
def _quiet_elastic() -> Iterator[None]:
    """The elastic agent logs every worker failure with a traceback on our stderr; the
    run folder keeps each rank's own account instead, and result.json the root cause."""
    prefixes = ("torch.distributed.elastic", "torch.multiprocessing")
    # Some of its loggers carry their own level (elastic's get_logger): set each one.
    names = [n for n in logging.root.manager.loggerDict if n.startswith(prefixes)]
    logs = [logging.getLogger(n) for n in {*prefixes, *names}]
    levels = [log.level for log in logs]
    for log in logs:
        log.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        for log, level in zip(logs, levels, strict=True):
            log.setLevel(level)


def launch_local(entry: str | Callable[..., Any], args: tuple[Any, ...] | list[Any], *,
                 nprocs: int, log_dir: str, timeout_s: float,
                 redirect: bool = True) -> list[Any]:
    """Start `nprocs` processes of entry(*args) on this machine with torch's elastic launcher,
    on loopback only; their return values by rank.

    `entry` is preferably "module:function": each rank is then a fresh interpreter
    (`python -m partition.worker`) that ties its life to this process before it imports
    torch, takes `args` as JSON and hands its JSON return value back in a file — no
    pickle either way. A callable is started by multiprocessing's spawn instead (its
    arguments and return value pickled between this process and its own children); it
    dies with this process too, but only once torch is imported. Call this from a thread
    that outlives the run: the kernel's death signal follows the thread that started a rank.

    With `redirect`, each process's stdout and stderr go to `log_dir`. Raises the elastic
    launcher's ChildFailedError when any process fails (all of them are stopped by then).
    """
    from torch.distributed.elastic.multiprocessing import DefaultLogsSpecs, Std
    from torch.distributed.elastic.rendezvous import rendezvous_handler_registry
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    rendezvous_handler_registry.register(_RDZV_BACKEND, _loopback_rendezvous)
    lc = LaunchConfig(
        min_nodes=1, max_nodes=1, nproc_per_node=nprocs,
        run_id=f"partition-{uuid.uuid4().hex[:8]}",
        rdzv_backend=_RDZV_BACKEND, rdzv_endpoint="",
        rdzv_configs={"timeout": int(max(30, timeout_s))},
        max_restarts=0, monitor_interval=0.05, start_method="spawn",
        logs_specs=DefaultLogsSpecs(log_dir=log_dir, redirects=Std.ALL if redirect else Std.NONE),
        local_addr=LOOPBACK,
    )
    if callable(entry):
        with _quiet_elastic(), _own_signal_handlers(), _launcher_env():
            results = elastic_launch(lc, _held_entry)(entry, *args)
        return [results[r] for r in sorted(results)]
    returns = os.path.join(log_dir, ".returns")
    os.makedirs(returns, exist_ok=True)
    try:
        argv = ["-m", "partition.worker", entry, json.dumps(list(args)), returns]
        with _quiet_elastic(), _own_signal_handlers(), _launcher_env():
            elastic_launch(lc, sys.executable)(*argv)
        out = []
        for r in range(nprocs):
            with open(os.path.join(returns, f"rank{r}.json")) as fh:
                out.append(json.load(fh))
        return out
    finally:
        shutil.rmtree(returns, ignore_errors=True)


def _held_entry(entry: Callable[..., Any], *args: Any) -> Any:  # noqa: ANN401
    """A spawned callable rank: tie it to the launcher first (torch is loaded by now)."""
    hold()
    return entry(*args)


@contextlib.contextmanager
def _launcher_env() -> Iterator[None]:
    """What the ranks inherit: this process's pid (their lifeline checks it) and a
    PYTHONPATH that finds this `partition`, whatever the working directory."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    saved = {k: os.environ.get(k) for k in (LAUNCHER_PID_ENV, "PYTHONPATH")}
    os.environ[LAUNCHER_PID_ENV] = str(os.getpid())
    os.environ["PYTHONPATH"] = os.pathsep.join(
        p for p in (root, saved["PYTHONPATH"]) if p)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def spawn_ranks(cfg: RunConfig, run_dir: str) -> list[RankRecord]:
    """Start cfg.ranks rank processes for one run; each rank's output goes to logs/ in the run folder."""
    out = launch_local("partition.launch:rank_entry", (cfg.to_dict(), run_dir),
                       nprocs=cfg.ranks, log_dir=os.path.join(run_dir, LOGS_DIR),
                       timeout_s=cfg.timeout_s)
    return [record_from_json(d) for d in out]


@contextlib.contextmanager
def _own_signal_handlers() -> Iterator[None]:
    """The elastic launcher installs handlers for SIGTERM, SIGINT, … that raise its
    SignalException, and leaves them there; put ours back afterwards."""
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    sigs = [signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT]
    saved = {s: signal.getsignal(s) for s in sigs}
    try:
        yield
    finally:
        for s, h in saved.items():
            if h is not None:
                signal.signal(s, h)


def write_outputs(cfg: RunConfig, run_dir: str, records: list[RankRecord], *, seconds: float,
                  status: str = "ok", error: dict[str, Any] | None = None) -> dict[str, Any]:
    """weights.npz (full, unsharded) then result.json, both atomic; returns the result."""
    result = build_result(cfg, records, seconds=seconds, status=status, error=error)
    if not records:  # a failed run: say where it ran all the same
        device, backend = resolve_device(cfg.device, local_rank=0, local_world_size=cfg.ranks)
        result["run"]["device"], result["run"]["backend"] = str(device), backend
    if records and result["status"] in ("ok", "diverged"):
        shards = [s for r in records for s in r.shards]
        arrays = assemble(cfg.spec, shards, np.dtype(cfg.train.dtype))
        save_weights(os.path.join(run_dir, WEIGHTS_FILE), arrays)
    write_json(os.path.join(run_dir, RESULT_FILE), result)
    return result


def clear_errors(run_dir: str) -> None:
    """Error records of an earlier attempt in this folder would be taken for this run's."""
    shutil.rmtree(errors_dir(run_dir), ignore_errors=True)


def _tidy(run_dir: str) -> None:
    """Drop what a rank prepared but never used: empty stack dumps and log files."""
    prune_empty(errors_dir(run_dir))
    prune_empty(os.path.join(run_dir, LOGS_DIR))


def _interrupted(signal_name: str) -> dict[str, Any]:
    return {"rank": None, "type": "Interrupted", "cause": "interrupted",
            "message": f"the launcher received {signal_name}; every rank was stopped"}


def run(cfg: RunConfig, run_dir: str) -> dict[str, Any]:
    """One run from a plain process: `single` in-process, anything else in spawned ranks.

    Fault injection on `single` also spawns its one rank, since `exit` and `hang`
    must not take the launcher with them. A failed run still writes result.json
    (status `failed`, `error` = the root cause); it never raises for a rank's failure.
    """
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    os.makedirs(run_dir, exist_ok=True)
    clear_errors(run_dir)
    t0 = time.perf_counter()
    refused = precheck_memory(cfg)
    if refused is not None:
        return write_outputs(cfg, run_dir, [], seconds=time.perf_counter() - t0,
                             status="oom", error=refused)
    if cfg.ranks == 1 and cfg.strategy.name == "single" and not cfg.fault.enabled:
        topo = single_process(cfg.device)
        try:
            rec = run_rank(cfg, topo, None, Ledger())
        except ConfigError:
            raise
        except KeyboardInterrupt:
            write_outputs(cfg, run_dir, [], seconds=time.perf_counter() - t0, status="failed",
                          error=_interrupted("SIGINT"))
            raise
        except Exception as e:
            record_error(run_dir, 0, e)
            err = diagnose(run_dir, ranks=1, timeout_s=cfg.timeout_s)
            return write_outputs(cfg, run_dir, [], seconds=time.perf_counter() - t0,
                                 status=run_status(err), error=err.as_dict() if err else None)
        return write_outputs(cfg, run_dir, [rec], seconds=time.perf_counter() - t0)
    try:
        records = spawn_ranks(cfg, run_dir)
    except SignalException as e:  # Ctrl-C or a kill of this launcher: the ranks are stopped
        _tidy(run_dir)
        name = signal.Signals(e.sigval).name
        write_outputs(cfg, run_dir, [], seconds=time.perf_counter() - t0, status="failed",
                      error=_interrupted(name))
        raise KeyboardInterrupt(name) from None  # past Hydra, which would report an Exception
    except ChildFailedError as e:
        gone = time.time()  # every rank has ended: the agent stops and reaps them all first
        _tidy(run_dir)
        codes = {rank: f.exitcode for rank, f in e.failures.items()}
        times = {rank: float(f.timestamp) for rank, f in e.failures.items()}
        err = diagnose(run_dir, ranks=cfg.ranks, timeout_s=cfg.timeout_s, exit_codes=codes,
                       exit_times=times)
        error = err.as_dict() if err else None
        if error is not None and err.time is not None:
            # From the root cause to the last rank gone: at most timeout_s plus a little.
            error["teardown_s"] = gone - err.time
        return write_outputs(cfg, run_dir, [], seconds=time.perf_counter() - t0,
                             status=run_status(err), error=error)
    except Exception as e:  # the launcher itself (rendezvous, spawning): no rank to blame
        _tidy(run_dir)
        msg = str(e).strip().splitlines()
        return write_outputs(cfg, run_dir, [], seconds=time.perf_counter() - t0,
                             status="failed",
                             error={"rank": None, "type": type(e).__name__, "cause": "launcher",
                                    "message": msg[0] if msg else ""})
    _tidy(run_dir)
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
    """Before any rank starts: load the data and the initial weights once (bad files fail
    here), and make sure the device asked for exists for every local rank."""
    try:
        local = int(os.environ.get("LOCAL_WORLD_SIZE", cfg.ranks))
        resolve_device(cfg.device, local_rank=0, local_world_size=local)
    except RuntimeError as e:
        raise ConfigError("device", cfg.device, str(e)) from None
    load_dataset(cfg.data, cfg.spec, seed=cfg.seed)
    initial_weights(cfg.spec, init=cfg.model.init, init_path=cfg.model.init_path, seed=cfg.seed)


# ---------------------------------------------------------------- under torchrun


def torchrun_rank(cfg: RunConfig, choose_dir) -> tuple[Topology, dict[str, Any] | None]:  # noqa: ANN001
    """Body of every torchrun process: join, agree on one folder, train, gather to rank 0.

    `choose_dir()` is called on rank 0 only; its answer is broadcast so that every
    rank writes (error records) into the same folder. When the run fails, every rank
    records its error and re-raises it, except rank 0, which first writes result.json
    (status `failed`, the root cause from the records there so far) and returns it.
    """
    world = int(os.environ["WORLD_SIZE"])
    if world != cfg.ranks:
        hint = ("strategy=single runs one process: use --nproc_per_node=1"
                if cfg.strategy.name == "single" else f"set world_size={world}")
        raise ConfigError("world_size", cfg.world_size,
                          f"torchrun started {world} processes; {hint}")
    topo = from_env(cfg.device)
    t0 = time.perf_counter()
    wait_for_peers(cfg.timeout_s)
    init_process_group(topo, timeout_s=cfg.timeout_s)
    ledger = Ledger()
    comm = Comm(rank=topo.rank, world_size=topo.world_size, ledger=ledger, device=topo.device)
    if topo.rank == 0:
        run_dir = choose_dir()
        clear_errors(run_dir)  # before the broadcast: no rank has written there yet
    run_dir = comm.broadcast_object(run_dir if topo.rank == 0 else None)
    with StackDump(run_dir, topo.rank, watchdog_s=_watchdog_s(cfg, topo)) as dump:
        try:
            rec = run_rank(cfg, topo, comm, ledger, on_step=dump.arm)
            gathered = comm.gather_objects(record_to_json(rec))
        except BaseException as e:
            # No destroy(): a process group in error can hang in it; the process ends soon.
            record_error(run_dir, topo.rank, e)
            if topo.rank != 0:
                raise
            # Peers may still be alive: a silent one is hung only if this rank timed out.
            err = diagnose(run_dir, ranks=cfg.ranks, timeout_s=cfg.timeout_s, stopped=False)
            return topo, write_outputs(
                cfg, run_dir, [], seconds=time.perf_counter() - t0, status=run_status(err),
                error=err.as_dict() if err else None) | {"path": run_dir}
    destroy()
    if topo.rank != 0:
        return topo, None
    prune_empty(errors_dir(run_dir))
    records = [record_from_json(d) for d in gathered or []]
    return topo, write_outputs(cfg, run_dir, records, seconds=time.perf_counter() - t0) | {
        "path": run_dir}


__all__ = ["ERRORS_DIR", "LOGS_DIR", "RankError", "check_dataset", "first_error",
           "first_to_report", "run", "spawn_ranks", "torchrun_rank", "under_torchrun",
           "parse_config"]
