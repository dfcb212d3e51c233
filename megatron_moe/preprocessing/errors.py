"""User-facing failures: one line naming the problem and the fix, never a traceback."""

import sys


class PreprocessError(Exception):
    """A problem with the input data, the flags or the environment that the user can fix."""


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
