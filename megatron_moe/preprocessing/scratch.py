"""Temporary files named after the run that owns them, and the removal of a dead run's.

Outputs are written beside their final names, as PATH.tmp-HOST-PID, and token parts go to a
directory .NAME.parts-HOST-PID-XXXXXXXX. A run that ends normally (even by an error or Ctrl-C)
removes its own; one killed by SIGKILL, the OOM killer or a power loss cannot. The next run that
writes the same outputs removes those whose process is gone (same host, pid no longer running),
and names in one line those it must leave: their process still runs, or lives on another host
(a shared file system), where we cannot tell.
"""

import contextlib
import os
import re
import shutil
import socket
import sys
from typing import Iterable, List, Tuple


def owner() -> str:
    """HOST-PID of this process, the tag of its temporary files."""
    return f"{socket.gethostname()}-{os.getpid()}"


def temporary_name(path: str) -> str:
    return f"{path}.tmp-{owner()}"


def parts_dir_prefix(output_prefix: str) -> str:
    """The name start of the token-parts directory of a run writing OUTPUT_PREFIX*."""
    return f".{os.path.basename(output_prefix)}.parts-{owner()}-"


def _is_running(host: str, pid: int) -> bool:
    if host != socket.gethostname():
        return True  # another machine's process: assume it may still run
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _stale_patterns(paths: Iterable[str], output_prefix: str) -> List[Tuple[str, "re.Pattern"]]:
    """(directory, pattern with host and pid groups) for every temporary name a run may leave.
    The host part is optional: earlier versions wrote PATH.tmp-PID."""
    patterns = []
    for path in paths:
        directory, name = os.path.split(os.path.abspath(path))
        patterns.append((directory, re.compile(re.escape(name) + r"\.tmp-(?:(?P<host>.+)-)?(?P<pid>\d+)")))
    directory, name = os.path.split(os.path.abspath(output_prefix))
    patterns.append((directory, re.compile(
        re.escape(f".{name}.parts-") + r"(?P<host>.+)-(?P<pid>\d+)-[a-z0-9_]+")))
    return patterns


def remove_stale(paths: Iterable[str], output_prefix: str) -> None:
    """Remove what dead runs left of PATHS (and of OUTPUT_PREFIX's parts directory); one line each
    for what was removed and for what was left."""
    removed, left = [], []
    for directory, pattern in _stale_patterns(paths, output_prefix):
        try:
            names = os.listdir(directory)
        except FileNotFoundError:
            continue
        for name in names:
            match = pattern.fullmatch(name)
            if not match:
                continue
            path = os.path.join(directory, name)
            host = match.group("host") or socket.gethostname()
            if _is_running(host, int(match.group("pid"))):
                left.append(f"{path} (pid {match.group('pid')} on {host})")
                continue
            if os.path.isdir(path):
                shutil.rmtree(path, ignore_errors=True)
            else:
                with contextlib.suppress(FileNotFoundError):  # another run removed it first
                    os.unlink(path)
            removed.append(path)
    if removed:
        print(f"removed temporary files of a dead run: {', '.join(removed)}", file=sys.stderr)
    if left:
        print(f"left temporary files of a run that may still be running (remove them if it is not): "
              f"{', '.join(left)}", file=sys.stderr)
