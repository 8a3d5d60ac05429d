"""Choosing the root cause of a failed run from the evidence ranks leave (no processes)."""

from __future__ import annotations

import json
import os

import pytest

from partition.failures import (
    ERRORS_DIR,
    diagnose,
    is_knock_on,
    parse_stack,
    prune_empty,
    record_error,
)
from partition.train import InjectedFault

CLOSED = RuntimeError("[../gloo/transport/tcp/pair.cc:553] Connection closed by peer "
                      "[127.0.0.1]:1234. This is typically caused by a remote worker crashing.")
TIMED_OUT = RuntimeError("[../gloo/transport/tcp/unbound_buffer.cc:78] Timed out waiting "
                         "5000ms for recv operation to complete")

# faulthandler's format: the hung rank (asleep in inject_fault) and a waiting one (in gloo).
HUNG_STACK = """Current thread 0x00007f (most recent call first):
  File "/repo/partition/train.py", line 70 in inject_fault
  File "/repo/partition/train.py", line 111 in run_rank
  File "/repo/partition/launch.py", line 117 in rank_entry
  File "<string>", line 1 in <module>
"""
WAITING_STACK = """Thread 0x00007e (most recent call first):
  File "/usr/lib/python3.11/threading.py", line 320 in wait
Current thread 0x00007f (most recent call first):
  File "/venv/torch/distributed/distributed_c10d.py", line 2753 in recv
  File "/venv/torch/distributed/c10d_logger.py", line 83 in wrapper
  File "/repo/partition/comm.py", line 140 in recv
  File "/repo/partition/strategies/pipeline/runner.py", line 60 in _recv_forward
  File "/repo/partition/train.py", line 113 in run_rank
"""
FINISHED_STACK = """Current thread 0x00007f (most recent call first):
  File "/usr/lib/python3.11/multiprocessing/synchronize.py", line 349 in wait
  File "/venv/torch/distributed/elastic/multiprocessing/api.py", line 708 in _wrap
"""
WATCHDOG_STACK = "Timeout (0:00:05)!\n" + HUNG_STACK.replace("Current thread", "Thread")


def _raise(exc: BaseException) -> BaseException:
    try:
        raise exc
    except BaseException as e:  # noqa: BLE001 - a traceback for the record
        return e


def _record(run_dir, rank: int, exc: BaseException, t: float) -> None:
    record_error(str(run_dir), rank, _raise(exc))
    path = os.path.join(run_dir, ERRORS_DIR, f"rank{rank}.json")
    with open(path) as fh:
        rec = json.load(fh)
    rec["time"] = t  # fixed clock, so the order is the test's
    with open(path, "w") as fh:
        json.dump(rec, fh)


def _stack(run_dir, rank: int, text: str) -> None:
    os.makedirs(os.path.join(run_dir, ERRORS_DIR), exist_ok=True)
    with open(os.path.join(run_dir, ERRORS_DIR, f"rank{rank}.stack"), "w") as fh:
        fh.write(text)


def test_knock_on_classification():
    assert is_knock_on(CLOSED) and is_knock_on(TIMED_OUT)
    assert not is_knock_on(InjectedFault("fault injected on rank 1 at step 3"))
    assert not is_knock_on(ValueError("shapes do not match"))
    assert not is_knock_on(RuntimeError("mat1 and mat2 shapes cannot be multiplied"))


def test_record_keeps_type_message_traceback(tmp_path):
    record_error(str(tmp_path), 2, _raise(InjectedFault("fault injected on rank 2 at step 1")))
    with open(tmp_path / ERRORS_DIR / "rank2.json") as fh:
        rec = json.load(fh)
    assert rec["rank"] == 2 and rec["type"] == "InjectedFault" and rec["knock_on"] is False
    assert rec["message"] == "fault injected on rank 2 at step 1"
    assert "Traceback (most recent call last)" in rec["traceback"]
    assert "InjectedFault" in rec["traceback"]


def test_primary_error_beats_earlier_knock_on(tmp_path):
    # The peer's "connection closed" is recorded first (clock skew, scheduling): still a knock-on.
    _record(tmp_path, 0, CLOSED, t=100.0)
    _record(tmp_path, 1, InjectedFault("fault injected on rank 1 at step 3"), t=100.5)
    err = diagnose(str(tmp_path), ranks=2, timeout_s=5)
    assert (err.rank, err.type, err.cause) == (1, "InjectedFault", "error")
    assert err.message == "fault injected on rank 1 at step 3"
    assert err.time == 100.5 and err.evidence == os.path.join(ERRORS_DIR, "rank1.json")
    assert [o["outcome"] for o in err.others] == ["knock_on", "error"]


def test_earliest_primary_error_wins(tmp_path):
    _record(tmp_path, 0, ValueError("second"), t=2.0)
    _record(tmp_path, 3, ValueError("first"), t=1.0)
    err = diagnose(str(tmp_path), ranks=4, timeout_s=5)
    assert (err.rank, err.message) == (3, "first")


def test_silent_death_is_the_cause_not_its_peers_knock_on(tmp_path):
    # fault.kind=exit: rank 3 leaves nothing; rank 2 saw the connection close; 0 and 1 were
    # stopped by the launcher while waiting.
    _record(tmp_path, 2, CLOSED, t=10.0)
    _stack(tmp_path, 0, WAITING_STACK)
    _stack(tmp_path, 1, WAITING_STACK)
    _stack(tmp_path, 3, "")  # opened at start, never written: the process just vanished
    err = diagnose(str(tmp_path), ranks=4, timeout_s=5, exit_codes={3: 3})
    assert (err.rank, err.type, err.cause) == (3, "ProcessExited", "exited")
    assert err.message == "rank 3 exited with status 3 without raising an error"
    assert err.time == 10.0  # when its peer noticed
    err = diagnose(str(tmp_path), ranks=4, timeout_s=5, exit_codes={2: 1})  # agent saw rank 2
    assert err.rank == 3
    assert err.message == ("rank 3 died without raising an error "
                           "(its exit status went unreported)")


def test_killed_by_signal(tmp_path):
    err = diagnose(str(tmp_path), ranks=2, timeout_s=5, exit_codes={1: -9})
    assert (err.rank, err.type) == (1, "ProcessExited")
    assert "killed by SIGKILL" in err.message


def test_hung_rank_is_the_one_stopped_outside_communication(tmp_path):
    # fault.kind=hang on rank 3 of 4: its peers time out (rank 0 first, having waited longest),
    # and the launcher stops rank 3 asleep in inject_fault.
    _record(tmp_path, 0, TIMED_OUT, t=50.0)
    _record(tmp_path, 1, TIMED_OUT, t=50.1)
    _stack(tmp_path, 2, WAITING_STACK)
    _stack(tmp_path, 3, HUNG_STACK)
    err = diagnose(str(tmp_path), ranks=4, timeout_s=5)
    assert (err.rank, err.type, err.cause) == (3, "Hung", "hung")
    assert "inject_fault (partition/train.py:70)" in err.message
    assert err.time == pytest.approx(45.0)  # it stopped answering timeout_s before that
    assert err.evidence == os.path.join(ERRORS_DIR, "rank3.stack")
    outcomes = {o["rank"]: o["outcome"] for o in err.others}
    assert outcomes == {0: "knock_on", 1: "knock_on", 2: "waiting", 3: "hung"}


def test_watchdog_of_a_lone_rank(tmp_path):
    _stack(tmp_path, 0, WATCHDOG_STACK)
    err = diagnose(str(tmp_path), ranks=1, timeout_s=7)
    assert (err.rank, err.type) == (0, "Hung")
    assert err.message.startswith("rank 0 made no progress for timeout_s=7 s")


def test_finished_rank_is_not_taken_for_hung(tmp_path):
    _record(tmp_path, 1, TIMED_OUT, t=5.0)
    _stack(tmp_path, 0, FINISHED_STACK)
    err = diagnose(str(tmp_path), ranks=2, timeout_s=5)
    assert err.cause == "knock_on" and err.rank == 1


def test_under_torchrun_a_silent_peer_after_a_timeout_is_hung(tmp_path):
    # Rank 0 decides while rank 1 may still be alive (no teardown yet).
    _record(tmp_path, 0, TIMED_OUT, t=5.0)
    err = diagnose(str(tmp_path), ranks=2, timeout_s=5, stopped=False)
    assert (err.rank, err.type) == (1, "Hung")
    _record(tmp_path, 0, CLOSED, t=5.0)
    err = diagnose(str(tmp_path), ranks=2, timeout_s=5, stopped=False)
    assert (err.rank, err.type) == (1, "ProcessExited")


def test_unreadable_record_is_ignored(tmp_path):
    os.makedirs(tmp_path / ERRORS_DIR)
    (tmp_path / ERRORS_DIR / "rank0.json").write_text('{"rank": 0, "ti')  # torn by a kill
    _record(tmp_path, 1, ValueError("real"), t=1.0)
    assert diagnose(str(tmp_path), ranks=2, timeout_s=5).message == "real"


def test_nothing_to_go_on(tmp_path):
    assert diagnose(str(tmp_path), ranks=0, timeout_s=5) is None


def test_parse_stack_picks_the_training_thread():
    st = parse_stack(WAITING_STACK)
    assert st.training and st.waiting and not st.watchdog
    assert st.where == "recv (torch/distributed/distributed_c10d.py:2753)"
    st = parse_stack(HUNG_STACK)
    assert st.training and not st.waiting
    st = parse_stack(FINISHED_STACK)
    assert not st.training
    assert parse_stack("") is None and parse_stack("garbage\n") is None
    assert parse_stack(WATCHDOG_STACK).watchdog


def test_prune_empty(tmp_path):
    (tmp_path / "a" / "b").mkdir(parents=True)
    (tmp_path / "a" / "b" / "empty.log").write_text("")
    (tmp_path / "a" / "kept.log").write_text("x")
    prune_empty(str(tmp_path / "a"))
    assert sorted(os.listdir(tmp_path / "a")) == ["kept.log"]


COMPILING_STACK = """Current thread 0x00007f (most recent call first):
  File "<frozen importlib._bootstrap_external>", line 729 in _compile_bytecode
  File "/repo/partition/strategies/pipeline/runner.py", line 12 in <module>
  File "/repo/partition/train.py", line 140 in run_rank
  File "/repo/partition/launch.py", line 117 in rank_entry
"""


def test_a_rank_stopped_after_a_peer_exited_is_a_victim_not_hung(tmp_path):
    # Rank 0 exits at step 0; the launcher stops rank 1 while it is still importing (inside
    # run_rank, outside any communication call): stopped by the teardown, not hung.
    _stack(tmp_path, 1, COMPILING_STACK)
    err = diagnose(str(tmp_path), ranks=2, timeout_s=5, exit_codes={0: 3})
    assert (err.rank, err.cause) == (0, "exited")
    assert {o["rank"]: o["outcome"] for o in err.others} == {0: "silent", 1: "victim"}
    # With no rank that raised or died (rank 0 timed out waiting), the same stack is a hang.
    _record(tmp_path, 0, TIMED_OUT, t=9.0)
    err = diagnose(str(tmp_path), ranks=2, timeout_s=5)
    assert (err.rank, err.cause) == (1, "hung")
    assert {o["rank"]: o["outcome"] for o in err.others} == {0: "knock_on", 1: "hung"}


def test_a_primary_error_makes_every_stopped_rank_a_victim(tmp_path):
    _record(tmp_path, 0, InjectedFault("fault injected on rank 0 at step 1"), t=1.0)
    _stack(tmp_path, 1, HUNG_STACK)
    err = diagnose(str(tmp_path), ranks=2, timeout_s=5)
    assert (err.rank, err.cause) == (0, "error")
    assert [o["outcome"] for o in err.others] == ["error", "victim"]


def test_the_record_is_on_disk_before_the_traceback_is_formatted(tmp_path, monkeypatch):
    import partition.failures as failures

    seen = {}
    real = failures.traceback.format_exception

    def slow_format(*args):  # noqa: ANN002
        with open(tmp_path / ERRORS_DIR / "rank3.json") as fh:
            seen.update(json.load(fh))
        return real(*args)

    monkeypatch.setattr(failures.traceback, "format_exception", slow_format)
    record_error(str(tmp_path), 3, _raise(CLOSED))
    assert {k: seen[k] for k in ("rank", "type", "knock_on")} == {
        "rank": 3, "type": "RuntimeError", "knock_on": True}
    assert "traceback" not in seen
    with open(tmp_path / ERRORS_DIR / "rank3.json") as fh:
        assert "Traceback (most recent call last)" in json.load(fh)["traceback"]
