"""Lines on the console, each in one write: the ranks of a job share torchrun's pipe, and a line written in
two parts (the text, then its newline, as ``print`` does unbuffered) can have another rank's line between them.
No torch import at module level: the start-up path (argument parsing) prints through here too."""

from __future__ import annotations

import sys
from typing import Optional, TextIO


def print_line(message: str, stream: Optional[TextIO] = None) -> None:
    stream = stream or sys.stdout
    stream.write(f"{message}\n")
    stream.flush()


def print_rank_0(message: str) -> None:
    import torch.distributed as dist

    if dist.get_rank() == 0:
        print_line(message)


def print_rank_last(message: str) -> None:
    """Megatron prints from the last rank: the one that sees the loss under pipeline parallelism."""
    import torch.distributed as dist

    if dist.get_rank() == dist.get_world_size() - 1:
        print_line(message)
