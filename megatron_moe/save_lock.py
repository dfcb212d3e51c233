"""One job writes a ``--save`` directory at a time: ``DIR/.writer.lock``, flock-ed by the job's rank 0.

A second job started on the same ``--save`` (a resubmission while the first still runs) would write shards
into the same iteration folders. The lock is held from start-up to the end of the process; the kernel drops
it when the process ends however it ends (SIGKILL included), so a dead job leaves nothing stuck. Processes
forked by rank 0 share its lock; they die with it (``platform.children_die_with_this_process``). On NFS,
Linux takes flock as a lock of the server (NFSv4, or NLM on v3), so jobs on different nodes see each other.
A file system without locks (Lustre mounted without ``-o flock``) gives a warning, not an error: iteration
folders are still published whole, by one rename each (checkpointing.save_checkpoint), so a checkpoint
never mixes two jobs' files.

The lock file holds a line naming its holder (host, pid, start time), which the refused job prints.
"""

from __future__ import annotations

import errno
import fcntl
import os
import socket
import sys
import time
from typing import Dict, Optional

LOCK_NAME = ".writer.lock"

_held: Dict[str, int] = {}  # real path of a --save directory -> the descriptor holding its lock here


def take(save: str) -> Optional[str]:
    """Takes ``save``'s lock for this process (kept until it ends); one line saying why not, or None.
    Taking it again in the same process is a no-op."""
    key = os.path.realpath(save)
    if key in _held:
        return None
    path = os.path.join(key, LOCK_NAME)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as error:
        holder = os.pread(fd, 4096, 0).decode(errors="replace").strip()
        os.close(fd)
        if error.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
            return (f"--save {save}: another job is writing there ({holder or 'holder unknown'}; {path}); wait for "
                    "it to end or stop it, or give this job another --save")
        print(f"warning: --save {save}: this file system does not lock files ({error.strerror}): a second job "
              "saving there would not be refused", file=sys.stderr, flush=True)
        return None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}\n"
              .encode(), 0)
    _held[key] = fd
    return None


def holds(save: str) -> bool:
    """Whether this process holds ``save``'s lock."""
    return os.path.realpath(save) in _held
