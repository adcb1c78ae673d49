"""A worker started by `faceadapt serve` (embedded mode) dies with its parent: `FACEADAPT_SERVE_PID` names the
parent; the kernel sends SIGTERM when the parent dies (Linux `prctl(PR_SET_PDEATHSIG)`), and a watchdog thread
checks the parent pid each second as well (other systems, or a parent that died before the prctl). SIGTERM is
Celery's warm shutdown: the running stage stops at its next batch and is handed over; past `GRACE_S` the process
exits hard."""
from __future__ import annotations

import ctypes
import logging
import os
import signal
import threading

log = logging.getLogger("faceadapt.worker")

PARENT_ENV = "FACEADAPT_SERVE_PID"
PR_SET_PDEATHSIG = 1
GRACE_S = 120.0


def parent_pid() -> int | None:
    value = os.environ.get(PARENT_ENV, "")
    return int(value) if value.isdigit() else None


def set_parent_death_signal(sig: int = signal.SIGTERM) -> bool:
    """Ask the kernel to send `sig` to this process when its parent dies; False where prctl is unavailable."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def _watch(pid: int, stop: threading.Event) -> None:
    while not stop.wait(1.0):
        if os.getppid() != pid:
            log.warning("the parent `faceadapt serve` (pid %d) is gone: stopping this worker", pid)
            os.kill(os.getpid(), signal.SIGTERM)  # warm shutdown
            if not stop.wait(GRACE_S):
                log.error("warm shutdown took longer than %.0f s: exiting", GRACE_S)
                os._exit(1)
            return


def tie_to_parent(stop: threading.Event) -> bool:
    """When started by `faceadapt serve`: die with it (prctl + watchdog thread). False when there is no such parent."""
    pid = parent_pid()
    if pid is None:
        return False
    set_parent_death_signal()
    if os.getppid() != pid:  # the parent died before the prctl took effect
        os.kill(os.getpid(), signal.SIGTERM)
    threading.Thread(target=_watch, args=(pid, stop), name="faceadapt-parent-watch", daemon=True).start()
    return True

