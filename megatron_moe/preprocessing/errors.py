"""User-facing failures: one line naming the problem and the fix, never a traceback."""

import errno
import os
import shutil
import sys
from typing import Optional


class PreprocessError(Exception):
    """A problem with the input data, the flags or the environment that the user can fix."""


class DiskFull(PreprocessError):
    """No space left writing `path`. `output_per_input`, when known, is how many output bytes one
    input byte gave so far: enough to tell how much space the whole run needs."""

    def __init__(self, path: str, output_per_input: Optional[float] = None):
        super().__init__(path, output_per_input)  # the arguments travel back from worker processes
        self.path, self.output_per_input = path, output_per_input


def is_disk_full(error: BaseException) -> bool:
    return isinstance(error, DiskFull) or getattr(error, "errno", None) == errno.ENOSPC


def disk_full_error(path: str, needed: str) -> PreprocessError:
    """The one line for a full disk: what was being written, the space needed and the space free."""
    directory = path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path))
    free = shutil.disk_usage(directory).free
    return PreprocessError(f"disk full writing {path}: needed {needed} bytes, {free} free; free some "
                           "space or write elsewhere; no output was written")


def run_cli(main, argv=None) -> int:
    """Run a command's main(argv), turning user errors and Ctrl-C into one line and an exit code.

    Cleanup of temporary outputs is the command's own job (its `finally`); this only reports.
    """
    try:
        return main(argv)
    except PreprocessError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted: no output was written", file=sys.stderr)
        return 130
