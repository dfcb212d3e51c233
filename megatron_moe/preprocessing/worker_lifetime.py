"""Workers die with the process that started them, however it ends (SIGKILL included).

A pool worker whose parent is gone would otherwise wait forever for work that never comes: its
queue's write end is held open by its sibling workers. On Linux the kernel kills it at once
(prctl PR_SET_PDEATHSIG); elsewhere, and as a second line of defence, a thread notices within a
second that it has been handed to another parent.
"""

import ctypes
import os
import signal
import sys
import threading
import time

_PR_SET_PDEATHSIG = 1  # linux/prctl.h
WATCH_SECONDS = 1.0
# libc's prctl, resolved once here: a forked child then needs no library lookup (which may run ldconfig)
_prctl = ctypes.CDLL(None, use_errno=True).prctl if sys.platform.startswith("linux") else None


def die_with_parent(parent_pid: int, kernel: bool = True) -> None:
    """Call first thing in a worker started by parent_pid. ``kernel=False`` leaves it to the watch thread:
    for a child forked by another thread than the parent's main one, as the kernel's signal comes when the
    forking thread ends, which may be long before the parent does."""
    if kernel and _prctl is not None:
        _prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent_pid:  # the parent died before the line above
        os._exit(1)
    threading.Thread(target=_watch, args=(parent_pid,), name="watch-parent", daemon=True).start()


def _watch(parent_pid: int) -> None:
    while os.getppid() == parent_pid:
        time.sleep(WATCH_SECONDS)
    os.kill(os.getpid(), signal.SIGKILL)
