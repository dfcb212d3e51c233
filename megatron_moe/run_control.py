"""When a training run stops before ``--train-iters``, and how every rank comes to the same decision.

Megatron-LM's ways to end a run early, each followed by a save (with ``--save``) and exit status 0:

- ``--exit-interval N``: after an iteration divisible by N (every rank knows it without talking);
- ``--exit-duration-in-mins M``: once M minutes have passed since the job started (before a scheduler's
  time limit kills it). Clocks differ between ranks, so each rank's verdict is agreed by an all-reduce (MAX);
- ``--exit-signal-handler``: SIGTERM received on any rank (agreed the same way).

And the guard Megatron-LM lacks: with ``--skip-nan-iterations`` a run that keeps skipping its updates has
diverged; it stops (status 1, no save: the last checkpoint is the good one) after
``--max-consecutive-skipped-iterations`` skips in a row or ``--max-skipped-iterations`` in one launch.
"""

from __future__ import annotations

import signal
import time
from typing import Optional

import torch
import torch.distributed as dist


class NonFiniteError(RuntimeError):
    """A NaN/Inf loss or grad norm: the run stops (or, with --skip-nan-iterations, skips the update)."""


class RunControl:
    """Decides, after each iteration, whether the run saves and exits early."""

    def __init__(self, args, started: float):
        self.args = args
        self.deadline = None if args.exit_duration_in_mins is None else started + 60.0 * args.exit_duration_in_mins
        self.sigterm_received = False
        self.consecutive_skips = 0
        self.total_skips = 0
        if args.exit_signal_handler:
            signal.signal(signal.SIGTERM, self._on_sigterm)

    def _on_sigterm(self, signum, frame):
        self.sigterm_received = True

    def stop_reason(self, iteration: int, device: torch.device) -> Optional[str]:
        """Why the run should save and exit after ``iteration`` (the same answer on every rank), or None."""
        args = self.args
        if args.exit_interval and iteration % args.exit_interval == 0:
            return f"--exit-interval {args.exit_interval}"
        if self.deadline is None and not args.exit_signal_handler:
            return None  # nothing a rank could see alone: no collective needed
        local = torch.tensor([float(self.sigterm_received),
                              float(self.deadline is not None and time.time() >= self.deadline)], device=device)
        dist.all_reduce(local, op=dist.ReduceOp.MAX)
        sigterm, out_of_time = (bool(x) for x in local.tolist())
        if sigterm:
            return "SIGTERM"
        if out_of_time:
            return f"--exit-duration-in-mins {args.exit_duration_in_mins:g}"
        return None

    def count_update(self, iteration: int, applied: bool) -> None:
        """Counts a skipped update; raises NonFiniteError once a skip cap is reached."""
        if applied:
            self.consecutive_skips = 0
            return
        self.consecutive_skips += 1
        self.total_skips += 1
        args = self.args
        if self.consecutive_skips >= args.max_consecutive_skipped_iterations:
            raise NonFiniteError(
                f"iteration {iteration}: {self.consecutive_skips} updates in a row skipped for NaN/Inf "
                f"(--max-consecutive-skipped-iterations {args.max_consecutive_skipped_iterations}); the run has "
                "diverged: resume from the last checkpoint with a lower --lr or check the data")
        if self.total_skips >= args.max_skipped_iterations:
            raise NonFiniteError(
                f"iteration {iteration}: {self.total_skips} updates skipped for NaN/Inf in this run "
                f"(--max-skipped-iterations {args.max_skipped_iterations}); lower --lr or check the data")
