"""Logging and validation flags: what is printed and written, and how often the model is validated."""

from __future__ import annotations

import argparse

from megatron_moe.arguments.flags import RUN, FlagGroup, at_least


def add_arguments(parser: argparse.ArgumentParser) -> None:
    g = FlagGroup(parser, "logging", RUN)
    g.add("--log-interval", type=int, default=100, valid=at_least(1))
    g.add("--log-throughput", action="store_true",
          help="accepted for Megatron-LM scripts: the log line always shows throughput (tokens/s)")
    g.add("--eval-interval", type=int, default=None, valid=at_least(1),
          help="validate every N iterations (default: never); as in Megatron-LM, the model is also validated "
               "once training ends (unless --eval-iters 0 or the run exits early)")
    g.add("--eval-iters", type=int, default=100, valid=at_least(0), help="0: no validation (as in Megatron-LM)")
    g.add("--tensorboard-dir", default=None, help="write TensorBoard scalars here (pip install tensorboard)")
    g.add("--log-expert-load", action=argparse.BooleanOptionalAction, default=True,
          help="per-layer tokens per expert in TensorBoard")


CHECKS = ()
