"""A rank's life tied to its launcher's, from the first moment it runs Python code.

Imports nothing but the standard library, so that a rank can call `hold()` before it
imports torch (seconds on a busy machine): a launcher killed in that window must not
leave the rank behind, holding its stdout and retrying a store that is gone.

The order matters: first ask the kernel for a signal when the parent dies, *then*
check that the parent is still the launcher that started us. A parent that died
before the first step is caught by the second; one that dies after it, by the first.
"""

from __future__ import annotations

import os
import signal
import sys

LAUNCHER_PID_ENV = "PARTITION_LAUNCHER_PID"
ORPHANED_STATUS = 75  # exit status of a rank that found its launcher already gone
_PR_SET_PDEATHSIG = 1


def die_with_parent() -> bool:
    """Linux: SIGKILL this process when its parent dies, however it dies. False elsewhere.

    SIGKILL, not SIGTERM: with the launcher gone nobody is left to read a rank's
    last words, and a rank blocked in C code or between handlers must still end.
    """
    if not sys.platform.startswith("linux"):
        return False
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def hold(expected_parent: int | None = None) -> None:
    """Die with the parent; exit at once if the parent is not `expected_parent` any more.

    `expected_parent` defaults to $PARTITION_LAUNCHER_PID, which `launch_local` sets
    for its ranks. Without it (under torchrun, whose agent does not publish its pid)
    only the death signal is armed: the agent is the parent, and a rank that finds
    itself adopted before this point cannot tell (its agent may be PID 1 in a container).
    """
    if expected_parent is None:
        env = os.environ.get(LAUNCHER_PID_ENV, "")
        expected_parent = int(env) if env.isdigit() else None
    die_with_parent()
    if expected_parent is not None and os.getppid() != expected_parent:
        os._exit(ORPHANED_STATUS)  # the launcher died before we could ask to die with it
