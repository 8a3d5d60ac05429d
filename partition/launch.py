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
import re
import shutil
import signal
import socket
import sys
import threading
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
    is_knock_on,
    prune_empty,
    record_error,
)
from partition.lifeline import LAUNCHER_PID_ENV, hold
from partition.memory import MemoryLimitExceeded
from partition.records import record_from_json, record_to_json
from partition.results import (
    RESULT_FILE,
    WEIGHTS_FILE,
    build_result,
    exit_status,
    file_digest,
    write_json,
)
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
            rec = run_rank(cfg, topo, comm, ledger, on_step=dump.arm, run_dir=run_dir)
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
        path = os.path.join(run_dir, WEIGHTS_FILE)
        save_weights(path, arrays)
        result["weights"] = {"file": WEIGHTS_FILE, **file_digest(path)}
    if records:
        # the traced step's durations (timeline.run_times, already replayed once in
        # build_result): the drawn step is replayed under its own measured spans
        from partition.timeline import drawn_key

        ranks = result.get("ranks") or []
        write_timeline(cfg, run_dir, records, times=[r.get(drawn_key(ranks)) for r in ranks])
    write_json(os.path.join(run_dir, RESULT_FILE), result)
    return result


def write_timeline(cfg: RunConfig, run_dir: str, records: list[RankRecord], *,
                   times: list[dict[str, float] | None]) -> None:
    """trace.json for every run with spans; timeline.png (measured above simulated, from
    each rank's `times`) for multi-rank runs."""
    from partition import timeline
    from partition.results import cost_params

    timeline.write_trace(run_dir, records)
    meas = timeline.measured(records)
    if cfg.ranks < 2 or meas is None:
        return
    step = meas[0]["step"]
    spans = [(r.rank, [s for s in r.spans if s["step"] == step])
             for r in sorted(records, key=lambda r: r.rank)]
    ok = len(times) == cfg.ranks and all(times)
    sim = timeline.simulated_block(cfg, times, cost_params(cfg, records)) if ok else None
    what = cfg.strategy.name + (f" {cfg.strategy.schedule}" if cfg.strategy.name == "pipeline" else "")
    title = (f"{what}, P={cfg.ranks}, B={cfg.train.batch_size}, M={cfg.train.microbatches}: "
             + timeline.step_text(step, meas[0]["step_s"], sim["step_time_s"] if sim else None))
    try:
        timeline.draw(os.path.join(run_dir, timeline.TIMELINE_FILE), spans,
                      sim["timeline"] if sim else None, title=title)
    except Exception as e:  # a figure must never cost the run its result
        print(f"warning: timeline.png not drawn ({type(e).__name__}: {e})", file=sys.stderr)


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
    from partition.calibrate import resolve_balance

    cfg = resolve_balance(cfg)  # strategy.balance=time: measured here, once, for every rank
    refused = precheck_memory(cfg)
    if refused is not None:
        return write_outputs(cfg, run_dir, [], seconds=time.perf_counter() - t0,
                             status="oom", error=refused)
    if cfg.ranks == 1 and cfg.strategy.name == "single" and not cfg.fault.enabled:
        topo = single_process(cfg.device)
        try:
            rec = run_rank(cfg, topo, None, Ledger(), run_dir=run_dir)
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


# torch's CPU allocator raises a plain RuntimeError when malloc fails.
_CPU_OOM = re.compile(r"can't allocate memory|not enough memory", re.IGNORECASE)


def run_status(err: RankError | None) -> str:
    """`oom` when the root cause is a rank out of memory, else `failed`."""
    if err is not None and (err.type in OOM_TYPES or (
            err.type == "RuntimeError" and _CPU_OOM.search(err.message))):
        return "oom"
    return "failed"


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
    """Before any rank starts: make sure the device asked for exists for every local rank
    and the run can fit this machine at all, then load the data and the initial weights
    once (bad files fail here)."""
    try:
        local = int(os.environ.get("LOCAL_WORLD_SIZE", cfg.ranks))
        device, _ = resolve_device(cfg.device, local_rank=0, local_world_size=local)
    except RuntimeError as e:
        raise ConfigError("device", cfg.device, str(e)) from None
    check_fits_machine(cfg, local_ranks=local, device=device.type)
    load_dataset(cfg.data, cfg.spec, seed=cfg.seed)
    initial_weights(cfg.spec, init=cfg.model.init, init_path=cfg.model.init_path, seed=cfg.seed)


# ---------------------------------------------------------------- does it fit at all


def machine_memory() -> int:
    """Bytes of memory this machine offers a run: physical memory, or a container's
    cgroup limit when that is lower."""
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            with open(path) as fh:
                value = fh.read().strip()
        except OSError:
            continue
        if value.isdigit():
            total = min(total, int(value))
    return total


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if abs(n) < 1024 or unit == "PiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def memory_floor(cfg: RunConfig, *, local_ranks: int, device: str = "cpu"
                 ) -> dict[str, tuple[int, str]]:
    """What this machine's memory must hold at the least, by the setting that asks for it:
    {key: (bytes, what)}. Closed forms of what every rank builds before its first step,
    plus the cost model's training peak per rank where its tensors live in this memory
    (CPU). A lower bound: a run it refuses could never have started.
    """
    spec, f64 = cfg.spec, 8
    d, q = spec.dims[0], spec.dims[-1]
    params = sum(spec.layer_params(l) for l in range(spec.num_layers))
    floor = {"model.dims": [local_ranks * params * f64,
                            "the full float64 weights, which every rank builds, then slices"]}
    if cfg.data.name == "synthetic":
        N, t = cfg.data.num_examples, cfg.data.teacher_hidden
        # X (N, d) and the targets, on every rank; the teacher's weights and (N, t) hidden layer.
        floor["data.num_examples"] = [local_ranks * N * (d + q) * f64,
                                      "the synthetic dataset, which every rank builds"]
        floor["data.teacher_hidden"] = [local_ranks * t * (N + d + q) * f64,
                                        "the synthetic dataset's teacher net, on every rank"]
    # One step's rows: their indices and their float64 inputs, gathered before the cast.
    floor["train.batch_size"] = [cfg.train.batch_size * (d + 1) * f64,
                                 "one batch's rows of the dataset"]
    if device == "cpu":
        from partition import costs

        try:
            peaks = [c.train for c in costs.rank_costs(cfg, device=device)]
        except (ValueError, KeyError):  # no cost model for this strategy yet
            peaks = []
        if peaks:
            # Every rank here, or (several nodes) as many ranks as this node runs, the lightest.
            mine = peaks if local_ranks == len(peaks) else [
                min(peaks, key=lambda p: p.peak_bytes)] * local_ranks
            for p in mine:
                state = sum(p.breakdown.get(k, 0) for k in ("params", "grads", "optimizer"))
                floor["model.dims"][0] += state
                floor["train.batch_size"][0] += p.peak_bytes - state
            floor["train.batch_size"][1] = "the activations of a training step (cost model)"
    return {k: (int(v[0]), v[1]) for k, v in floor.items()}


def check_fits_machine(cfg: RunConfig, *, local_ranks: int, device: str = "cpu",
                       available: int | None = None) -> None:
    """Refuse (ConfigError on the setting asking for most) a run that cannot fit this
    machine's memory: better one line now than an allocation error in every rank."""
    available = machine_memory() if available is None else available

    def total(c: RunConfig) -> int:
        return sum(n for n, _ in memory_floor(c, local_ranks=local_ranks, device=device).values())

    need = total(cfg)
    if need <= available:
        return
    # The setting to blame is the one whose default would save the most: the dataset's
    # N·d bytes are the input width's fault when d is huge, the row count's when N is.
    best, blamed = need, "model.dims"
    for key in _SIZE_KEYS:
        try:
            without = total(_with_default(cfg, key))
        except (ValueError, KeyError, IndexError, ZeroDivisionError):
            continue  # the default does not fit the rest of this config: not a candidate
        if without < best:
            best, blamed = without, key
    floor = memory_floor(cfg, local_ranks=local_ranks, device=device)
    n, what = max(floor.values())
    raise ConfigError(blamed, _SIZE_KEYS[blamed](cfg),
                      f"needs at least {need:,} bytes ({human_bytes(need)}) of memory, "
                      f"{n:,} of them for {what}; this machine has {available:,} bytes "
                      f"({human_bytes(available)})")


# The settings that make a run big, each read from a config.
_SIZE_KEYS: dict[str, Callable[[RunConfig], Any]] = {
    "model.dims": lambda c: list(c.model.dims),
    "data.num_examples": lambda c: c.data.num_examples,
    "data.teacher_hidden": lambda c: c.data.teacher_hidden,
    "train.batch_size": lambda c: c.train.batch_size,
}


def _with_default(cfg: RunConfig, key: str) -> RunConfig:
    """`cfg` with `key` at its dataclass default (no validation: a what-if for blame)."""
    import dataclasses

    section, name = key.split(".")
    node = getattr(cfg, section)
    default = next(f.default for f in dataclasses.fields(node) if f.name == name)
    return dataclasses.replace(cfg, **{section: dataclasses.replace(node, **{name: default})})


# ---------------------------------------------------------------- under torchrun


ANSWER_GRACE_S = 2.0  # how long a failing rank waits for a lower rank to say it is alive


def _agent_store(timeout_s: float) -> Any:  # noqa: ANN401 - a torch TCPStore
    """A client of torchrun's agent store (it outlives every rank), or None without one."""
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE", "").lower() != "true":
        return None
    import torch.distributed as dist

    return dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]),
                         is_master=False, timeout=timedelta(seconds=timeout_s))


def _store_prefix() -> str:
    """Keys of this run and restart: a restarted group must not read the last one's."""
    return "partition/{}/{}".format(os.environ.get("TORCHELASTIC_RUN_ID", ""),
                                    os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))


class Answer:
    """Under torchrun, the one result.json of a failed run: written by the lowest rank
    that survives to write it.

    torchrun's agent stops every rank soon after one exits, and rank 0 may be the one
    that died or hangs; but every rank knows the folder once it is agreed, and the
    agent's store outlives them all. A rank that raised an error of its own knows the
    root cause and answers at once (then exits, which is how its peers learn of it).
    A rank that only saw the failure (a knock-on error, or the agent's SIGTERM) says it
    survives, waits ANSWER_GRACE_S for a lower rank to say the same, and answers if none
    does: a dead rank never speaks, a hung one is known by its silence. A claim on the
    store makes the answer happen once. Without the agent's store, rank 0 answers, and
    any rank whose own error is the root cause.
    """

    def __init__(self, cfg: RunConfig, rank: int, t0: float) -> None:
        self.cfg, self.rank, self.t0 = cfg, rank, t0
        self.run_dir: str | None = None
        self.result: dict[str, Any] | None = None
        self._lock = threading.Lock()
        self._done = False

    def write(self, *, primary: bool,
              report: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any] | None:
        """The result.json if this rank is the one that wrote it, else None; the call that
        writes it also hands it to `report` (the summary line), before the lock is let go.
        Safe to call from the main thread and the SIGTERM watcher: the first call decides,
        and the other waits until the summary is out — the watcher ends the process as soon
        as its call returns, which would cut a report still being printed (CI saw none)."""
        with self._lock:
            if self._done or self.run_dir is None:
                return self.result
            self._done = True
            if not self._mine(primary=primary):
                return None
            # Peers may still be alive: a silent one is hung only if some rank timed out.
            err = diagnose(self.run_dir, ranks=self.cfg.ranks, timeout_s=self.cfg.timeout_s,
                           stopped=False)
            self.result = write_outputs(
                self.cfg, self.run_dir, [], seconds=time.perf_counter() - self.t0,
                status=run_status(err), error=err.as_dict() if err else None,
            ) | {"path": self.run_dir}
            if report is not None:
                report(self.result)
            return self.result

    def _mine(self, *, primary: bool) -> bool:
        try:
            store = _agent_store(5.0)
        except Exception:  # noqa: BLE001 - no store to agree through
            store = None
        if store is None:
            return primary or self.rank == 0
        prefix = _store_prefix()
        try:
            store.set(f"{prefix}/survivor/{self.rank}", "1")
            if not primary and self.rank > 0 and not store.check([f"{prefix}/answered"]):
                lower = [f"{prefix}/survivor/{q}" for q in range(self.rank)]
                deadline = time.monotonic() + ANSWER_GRACE_S
                while time.monotonic() < deadline:
                    if any(store.check([k]) for k in lower):
                        return False  # a lower rank is alive and answers
                    time.sleep(0.05)
            return store.add(f"{prefix}/answered", 1) == 1
        except Exception:  # noqa: BLE001 - the store went away with the agent
            return primary or self.rank == 0


class TermWatch:
    """Under torchrun: when the agent sends SIGTERM (a peer has exited), answer, then exit.

    A Python signal handler runs only when the main thread is back in Python, and a rank
    waiting for a dead peer sits in a C call for up to timeout_s. Python's own C-level
    handler writes the signal number to a wakeup fd at once, though: a thread waiting on
    that fd does the work while the main thread stays blocked. Enter before StackDump,
    so that faulthandler (which dumps the stack first) chains to this handler rather than
    to the default action.
    """

    def __init__(self, on_term: Callable[[], int]) -> None:
        self.on_term = on_term  # does the work; returns the exit status
        self._fds: tuple[int, int] | None = None
        self._saved: Any = None
        self._old_wakeup = -1

    def __enter__(self) -> TermWatch:
        import threading

        r, w = os.pipe()
        os.set_blocking(w, False)
        self._fds = (r, w)
        self._saved = signal.signal(signal.SIGTERM, lambda *_: None)  # the fd does the work
        self._old_wakeup = signal.set_wakeup_fd(w, warn_on_full_buffer=False)
        threading.Thread(target=self._watch, args=(r,), daemon=True,
                         name="partition-sigterm").start()
        return self

    def _watch(self, fd: int) -> None:
        while True:
            try:
                data = os.read(fd, 64)
            except OSError:
                return
            if not data:  # closed on exit
                os.close(fd)
                return
            if signal.SIGTERM in data:
                status = 1
                try:
                    status = self.on_term()
                finally:
                    sys.stdout.flush()
                    sys.stderr.flush()
                    os._exit(status)

    def __exit__(self, *exc: object) -> None:
        signal.set_wakeup_fd(self._old_wakeup)
        if self._saved is not None:
            signal.signal(signal.SIGTERM, self._saved)
        if self._fds is not None:
            os.close(self._fds[1])


def torchrun_rank(cfg: RunConfig, choose_dir: Callable[[], str], *,
                  report: Callable[[dict[str, Any]], None]) -> str:
    """Body of every torchrun process: join, agree on one folder, train, gather to rank 0;
    returns the run's status as this rank knows it ("ok" on every rank of a good run).

    `choose_dir()` is called on rank 0 only; its answer is broadcast so that every rank
    writes (error records) into the same folder. rank 0 writes result.json of a good
    run; of a failed one, the rank `Answer` picks. `report(result)` is called by the
    rank that wrote it (the summary line), whichever thread that happens in.
    """
    world = int(os.environ["WORLD_SIZE"])
    if cfg.strategy.balance == "time":
        # Each process would measure its own split; they must agree on one.
        raise ConfigError("strategy.balance", "time", "is measured by the launcher of a plain "
                          "run; under torchrun give the layers per stage (experiments.predict "
                          "strategy.balance=time prints the split it picks)")
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
    answer = Answer(cfg, topo.rank, t0)

    def failed(*, primary: bool) -> str:
        # the main thread and the SIGTERM watcher may both get here: one of them reports
        result = answer.write(primary=primary, report=report)
        return "failed" if result is None else result["status"]

    def on_term() -> int:
        return exit_status(failed(primary=False))

    with TermWatch(on_term):
        try:
            if topo.rank == 0:
                answer.run_dir = choose_dir()
                clear_errors(answer.run_dir)  # before the broadcast: no rank wrote there yet
            answer.run_dir = comm.broadcast_object(answer.run_dir)
        except Exception:  # a peer died before the folder was agreed: nowhere to answer
            if answer.run_dir is None:
                raise
            return failed(primary=False)
        run_dir = answer.run_dir
        with StackDump(run_dir, topo.rank, watchdog_s=_watchdog_s(cfg, topo)) as dump:
            try:
                rec = run_rank(cfg, topo, comm, ledger, on_step=dump.arm, run_dir=run_dir)
                gathered = comm.gather_objects(record_to_json(rec))
            except BaseException as e:
                # No destroy(): a process group in error can hang in it; the process ends soon.
                record_error(run_dir, topo.rank, e)
                return failed(primary=not is_knock_on(e))
        with answer._lock:  # a SIGTERM from now on finds the run answered
            answer._done = True
    destroy()
    if topo.rank != 0:
        return "ok"
    prune_empty(errors_dir(run_dir))
    records = [record_from_json(d) for d in gathered or []]
    result = write_outputs(cfg, run_dir, records, seconds=time.perf_counter() - t0) | {
        "path": run_dir}
    report(result)
    return result["status"]


__all__ = ["ERRORS_DIR", "LOGS_DIR", "RankError", "check_dataset", "first_error",
           "first_to_report", "run", "spawn_ranks", "torchrun_rank", "under_torchrun",
           "parse_config"]
