"""Why a run failed: each rank's own evidence, and the root cause chosen from it.

When one rank fails its peers fail after it — "connection closed by peer" when it
died, a timeout when it hangs — and torch's elastic launcher reports whichever
failure it noticed first, which is not always the cause. So every rank leaves its
own evidence in the run folder, and the launcher reads all of it afterwards:

    errors/rank<N>.json   the exception the rank raised: time, type, message,
                          traceback, and whether it is a knock-on (a peer's fault)
    errors/rank<N>.stack  where the rank's threads were when it was stopped from
                          outside (the launcher's SIGTERM when it tears the group
                          down) or by its own step watchdog; empty if never stopped

A rank stopped inside `run_rank` but outside any communication call was not
waiting for anybody: it is the one that hung. A rank with neither a record nor
a stack died before the launcher could stop it: it exited on its own.
"""

from __future__ import annotations

import faulthandler
import glob
import json
import os
import re
import signal
import time
import traceback
from dataclasses import dataclass, field
from typing import IO, Any

from partition.results import write_json

ERRORS_DIR = "errors"

# What a rank sees when a *peer* failed: gloo/NCCL/TCPStore errors from a dead or silent peer.
_KNOCK_ON = re.compile(
    r"timed out|timeout|connection (closed|reset|refused)|closed by peer|reset by peer|"
    r"broken pipe|end of file|socket closed|recvBytes|sendBytes|abort",
    re.IGNORECASE)
_TIMEOUT = re.compile(r"timed out|timeout", re.IGNORECASE)
# Frames of code that waits for a peer (the rank is a victim, not the cause, when stopped there).
_COMM_FILES = ("torch/distributed/", "partition/comm.py")
_FRAME = re.compile(r'\s*File "(?P<file>[^"]+)", line (?P<line>\d+) in (?P<func>\S+)')


def errors_dir(run_dir: str) -> str:
    return os.path.join(run_dir, ERRORS_DIR)


def is_knock_on(exc: BaseException) -> bool:
    """A communication error caused by a peer (its death or its silence), not by this rank."""
    return isinstance(exc, (RuntimeError, ConnectionError, TimeoutError)) and bool(
        _KNOCK_ON.search(str(exc)))


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else ""


def record_error(run_dir: str, rank: int, exc: BaseException) -> None:
    """errors/rank<N>.json: this rank's own account of why it stopped (written atomically).

    Written twice: first the facts the root cause is chosen from, then with the traceback.
    Formatting a traceback reads source files (a second, on a busy machine), and a rank
    may be stopped at any moment once its peers see it fail: the evidence goes first.
    """
    path = os.path.join(errors_dir(run_dir), f"rank{rank}.json")
    rec = {"rank": rank, "time": time.time(), "type": type(exc).__name__,
           "message": _first_line(exc), "knock_on": is_knock_on(exc)}
    write_json(path, rec)
    rec["traceback"] = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    write_json(path, rec)


# ---------------------------------------------------------------- stack dumps


class StackDump:
    """Where this rank was when it was stopped: on SIGTERM or SIGINT, and by a step watchdog.

    Uses faulthandler, which writes from a C signal handler (or a C thread, for the
    watchdog), so it works while the main thread is blocked in a C call such as a
    gloo wait. After the dump SIGTERM goes on to its default action: the process
    ends at once, so tearing a group down takes no longer than with no dump.

    The watchdog is for a rank without peers: nothing else would notice its hang.
    `arm()` at the start of each step; if the step is not over `watchdog_s` later,
    the stack is dumped and the process exits with status 1.
    """

    def __init__(self, run_dir: str, rank: int, *, watchdog_s: float | None = None) -> None:
        self.path = os.path.join(errors_dir(run_dir), f"rank{rank}.stack")
        self.watchdog_s = watchdog_s
        self._file: IO[str] | None = None

    def __enter__(self) -> StackDump:
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        self._file = open(self.path, "w")  # noqa: SIM115 - must stay open for the C handler
        # Ctrl-C reaches every process of the terminal's group: a rank stops at once (its
        # stack dumped) instead of raising KeyboardInterrupt whenever it next runs Python
        # code; the launcher reports the interruption.
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        # Left registered until the process ends: a rank that finished its steps can
        # still be stopped by the launcher, and its stack then shows it had finished.
        for sig in (signal.SIGTERM, signal.SIGINT):
            faulthandler.register(sig, file=self._file, all_threads=True, chain=True)
        return self

    def arm(self, step: int) -> None:  # noqa: ARG002 - the train loop's on_step hook
        if self.watchdog_s is not None and self._file is not None:
            faulthandler.dump_traceback_later(self.watchdog_s, file=self._file, exit=True)

    def __exit__(self, *exc: object) -> None:
        if self.watchdog_s is not None:
            faulthandler.cancel_dump_traceback_later()


@dataclass(frozen=True)
class Stack:
    """A parsed faulthandler dump: the training thread's frames, innermost first."""

    watchdog: bool  # the step watchdog fired (not an outside SIGTERM)
    frames: list[tuple[str, int, str]]  # (file, line, function), innermost first

    @property
    def training(self) -> bool:
        """Stopped while still inside the step loop (not before it, not after it)."""
        return any(f == "run_rank" and file.endswith("train.py") for file, _, f in self.frames)

    @property
    def waiting(self) -> bool:
        """Stopped inside a communication call: waiting for a peer."""
        return bool(self.frames) and any(p in self.frames[0][0].replace(os.sep, "/")
                                         for p in _COMM_FILES)

    @property
    def where(self) -> str:
        if not self.frames:
            return "an unknown place"
        file, line, func = self.frames[0]
        return f"{func} ({_short(file)}:{line})"


def _short(path: str) -> str:
    parts = path.replace(os.sep, "/").split("/")
    for anchor in ("partition", "torch", "experiments"):
        if anchor in parts:
            return "/".join(parts[len(parts) - 1 - parts[::-1].index(anchor):])
    return parts[-1]


def parse_stack(text: str) -> Stack | None:
    """The training thread of a faulthandler dump (the one running run_rank, else the current)."""
    if not text.strip():
        return None
    threads: list[tuple[bool, list[tuple[str, int, str]]]] = []
    for line in text.splitlines():
        if line.startswith(("Thread ", "Current thread ")):
            threads.append((line.startswith("Current"), []))
        elif threads and (m := _FRAME.match(line)):
            threads[-1][1].append((m["file"], int(m["line"]), m["func"]))
    if not threads:
        return None
    watchdog = text.lstrip().startswith("Timeout (")
    frames = next((fr for _, fr in threads if any(f == "run_rank" for _, _, f in fr)),
                  next((fr for cur, fr in threads if cur), threads[0][1]))
    return Stack(watchdog, frames)


# ---------------------------------------------------------------- the root cause


@dataclass(frozen=True)
class RankError:
    """One rank's outcome in a failed run (`error` in result.json is the root cause's)."""

    rank: int | None
    type: str
    message: str
    cause: str  # error | exited | hung | knock_on | stopped | unknown
    time: float | None = None
    evidence: str | None = None  # file in the run folder with the traceback or stack
    others: list[dict[str, Any]] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        out = {"rank": self.rank, "type": self.type, "message": self.message,
               "cause": self.cause, "time": self.time, "evidence": self.evidence}
        if self.others:
            out["ranks"] = self.others
        return out


def _signal_name(code: int) -> str:
    try:
        return signal.Signals(-code).name
    except ValueError:
        return f"signal {-code}"


def _read_records(run_dir: str) -> dict[int, dict[str, Any]]:
    out = {}
    for p in glob.glob(os.path.join(errors_dir(run_dir), "rank*.json")):
        try:
            with open(p) as fh:
                e = json.load(fh)
            out[int(e["rank"])] = e
        except (OSError, ValueError, KeyError, TypeError):
            continue  # an unreadable record is no evidence
    return out


def _read_stacks(run_dir: str) -> dict[int, Stack]:
    out: dict[int, Stack] = {}
    for p in glob.glob(os.path.join(errors_dir(run_dir), "rank*.stack")):
        m = re.search(r"rank(\d+)\.stack$", p)
        try:
            with open(p) as fh:
                st = parse_stack(fh.read())
        except OSError:
            continue
        if m and st is not None:
            out[int(m.group(1))] = st
    return out


def diagnose(run_dir: str, *, ranks: int, timeout_s: float,
             exit_codes: dict[int, int] | None = None,
             exit_times: dict[int, float] | None = None,
             stopped: bool = True) -> RankError | None:
    """The root cause of a failed run, from the evidence every rank left in `run_dir`.

    `exit_codes`, `exit_times`: what the launcher knows of ranks' exits (torch's
    elastic agent reports one, with the whole second it noticed it). `stopped`:
    every rank has ended (the launcher, after teardown); False when a rank decides
    while its peers may still be alive (under torchrun).

    In order: the earliest error a rank raised itself; a rank that died without a
    word (exit, signal); a rank stopped while stuck outside any communication call
    (hung); then the knock-on errors and stops, earliest first.
    """
    exit_codes = exit_codes or {}
    exit_times = exit_times or {}
    records = _read_records(run_dir)
    stacks = _read_stacks(run_dir)
    stack_times = {r: os.path.getmtime(os.path.join(errors_dir(run_dir), f"rank{r}.stack"))
                   for r in stacks}
    ev = os.path.join(ERRORS_DIR, "rank{}.{}")
    timed_out = [r for r, e in records.items()
                 if e.get("knock_on") and _TIMEOUT.search(e["message"])]

    outcome: dict[int, dict[str, Any]] = {}
    for r, e in sorted(records.items()):
        outcome[r] = {"rank": r, "outcome": "knock_on" if e.get("knock_on") else "error",
                      "type": e["type"], "message": e["message"]}
    for r, st in sorted(stacks.items()):
        if r in outcome:
            continue
        kind = ("hung" if (st.watchdog or not st.waiting) and st.training
                else "waiting" if st.training else "stopped")
        outcome[r] = {"rank": r, "outcome": kind, "type": "Stopped",
                      "message": f"{'watchdog' if st.watchdog else 'stopped'} in {st.where}"}
    silent = [r for r in range(ranks) if r not in outcome]
    for r in silent:
        code = exit_codes.get(r)
        note = f", exit code {code}" if code is not None else ""
        outcome[r] = {"rank": r, "outcome": "silent", "type": "ProcessExited",
                      "message": "no error record" + note}
    others = [outcome[r] for r in sorted(outcome)]

    def make(rank: int | None, type_: str, message: str, cause: str, t: float | None,
             evidence: str | None) -> RankError:
        listed = others
        if cause in ("error", "exited"):
            # Once a rank has raised or died, the launcher stops the rest wherever they are:
            # one caught outside a communication call (importing, compiling, computing)
            # was not hung, it was stopped — a victim of the root cause.
            listed = [dict(o, outcome="victim") if o["outcome"] == "hung" and o["rank"] != rank
                      else o for o in others]
        return RankError(rank, type_, message, cause, t, evidence, listed)

    primary = [e for e in records.values() if not e.get("knock_on")]
    if primary:
        e = min(primary, key=lambda e: (e["time"], e["rank"]))
        return make(e["rank"], e["type"], e["message"], "error", e["time"],
                    ev.format(e["rank"], "json"))

    # When a death or a hang happened is seen only by the peers: the first knock-on error.
    noticed = min((e["time"] for e in records.values() if e.get("knock_on")), default=None)
    if silent and (stopped or any(r in exit_codes for r in silent) or not timed_out):
        # Gone before anyone stopped it, without raising: os._exit, a signal, the OOM killer.
        r = min(silent, key=lambda r: (r not in exit_codes, r))
        code = exit_codes.get(r)
        if r in exit_times:
            noticed = min(noticed or exit_times[r], exit_times[r])
        how = ("exited with status " + str(code) if code is not None and code >= 0
               else f"was killed by {_signal_name(code)}" if code is not None
               else "died")
        msg = f"rank {r} {how} without raising an error"
        if code is None and exit_codes:  # the agent reports one exit: a peer's came first
            msg += " (its exit status went unreported)"
        return make(r, "ProcessExited", msg, "exited", noticed, None)

    hung = [r for r, o in outcome.items() if o["outcome"] == "hung"]
    if hung or silent:
        # Not waiting for anybody, yet making no progress: its peers waited for it.
        r = min(hung or silent)
        st = stacks.get(r)
        # It stopped answering about timeout_s before its peers gave up on it (or before
        # its own watchdog wrote the stack).
        t_out = min((records[x]["time"] for x in timed_out), default=None)
        if st is not None and st.watchdog:
            t_out = stack_times.get(r)
        since = None if t_out is None else t_out - timeout_s
        if st is not None and st.watchdog:
            msg = f"rank {r} made no progress for timeout_s={timeout_s:g} s, stuck in {st.where}"
        elif st is not None:
            msg = (f"rank {r} stopped responding (stuck in {st.where}); "
                   f"its peers timed out after timeout_s={timeout_s:g} s")
        else:
            msg = (f"rank {r} did not respond within timeout_s={timeout_s:g} s "
                   f"and left no error record")
        return make(r, "Hung", msg, "hung", since, ev.format(r, "stack") if st else None)

    if records:
        e = min(records.values(), key=lambda e: (e["time"], e["rank"]))
        return make(e["rank"], e["type"], e["message"], "knock_on", e["time"],
                    ev.format(e["rank"], "json"))
    if stacks:
        r = min(stacks)
        return make(r, "Stopped", f"rank {r} was stopped in {stacks[r].where}", "stopped", None,
                    ev.format(r, "stack"))
    if exit_codes:
        r = min(exit_codes)
        return make(r, "ProcessExited", f"rank {r} exited with status {exit_codes[r]}",
                    "exited", None, None)
    return None


def prune_empty(folder: str) -> None:
    """Remove empty files and then empty folders under `folder` (stack dumps never used, logs)."""
    if not os.path.isdir(folder):
        return
    for root, _dirs, files in os.walk(folder, topdown=False):
        for f in files:
            p = os.path.join(root, f)
            try:
                if os.path.getsize(p) == 0:
                    os.unlink(p)
            except OSError:
                pass
        try:
            if not os.listdir(root):
                os.rmdir(root)
        except OSError:
            pass
