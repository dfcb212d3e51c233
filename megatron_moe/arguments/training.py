"""Training flags: batches, iterations, the learning-rate schedule, the optimizer, precision, seeds, when to
stop and what to do with a NaN."""

from __future__ import annotations

import argparse
from typing import Any, Dict

from megatron_moe.arguments.flags import RUN, FlagGroup, above, at_least, between, require


def add_arguments(parser: argparse.ArgumentParser) -> None:
    g = FlagGroup(parser, "training", RUN)
    g.add("--micro-batch-size", type=int, required=True, valid=at_least(1))
    g.add("--global-batch-size", type=int, default=None, valid=at_least(1), help="default: micro batch x data parallel")
    g.add("--train-iters", type=int, required=True, valid=at_least(1))
    g.add("--lr", type=float, required=True, valid=at_least(0))
    g.add("--min-lr", type=float, default=0.0, valid=at_least(0))
    g.add("--lr-warmup-iters", type=int, default=0, valid=at_least(0))
    g.add("--lr-decay-iters", type=int, default=None, valid=at_least(1))
    g.add("--lr-decay-style", choices=["constant", "linear", "cosine", "inverse-square-root", "WSD"],
          default="linear")
    g.add("--weight-decay", type=float, default=0.01, valid=at_least(0))
    g.add("--clip-grad", type=float, default=1.0, valid=at_least(0))
    g.add("--adam-beta1", type=float, default=0.9, valid=between(0.0, 1.0, high_open=True))
    g.add("--adam-beta2", type=float, default=0.999, valid=between(0.0, 1.0, high_open=True))
    g.add("--adam-eps", type=float, default=1e-8, valid=at_least(0))
    g.add("--bf16", action="store_true")
    g.add("--seed", type=int, default=1234)
    g.add("--exit-interval", type=int, default=None, valid=at_least(1),
          help="save (with --save) and exit after an iteration divisible by N")
    g.add("--exit-duration-in-mins", type=float, default=None, valid=above(0),
          help="save (with --save) and exit 0 once the job has run this long (every rank agrees)")

    g = FlagGroup(parser, "training: NaN and Inf", RUN)
    g.add("--no-check-for-nan-in-loss-and-grad", dest="check_for_nan_in_loss_and_grad", action="store_false",
          help="do not stop on a NaN/Inf loss or grad norm")
    g.add("--skip-nan-iterations", action="store_true",
          help="on a NaN/Inf loss: skip the update and count it instead of stopping")
    g.add("--max-consecutive-skipped-iterations", type=int, default=10, valid=at_least(1),
          help="--skip-nan-iterations: stop (status 1, no save) after this many skipped updates in a row")
    g.add("--max-skipped-iterations", type=int, default=100, valid=at_least(1),
          help="--skip-nan-iterations: stop (status 1, no save) after this many skipped updates in one launch")


def validate_batch(c) -> Dict[str, Any]:
    """Micro and global batches; fills in --global-batch-size and the number of micro batches."""
    per_step = c.micro_batch_size * c.data_parallel_size
    global_batch_size = c.global_batch_size or per_step
    require(global_batch_size % per_step == 0,
            f"--global-batch-size {global_batch_size} is not divisible by micro batch x data parallel "
            f"= {c.micro_batch_size} x {c.data_parallel_size}")
    return {"global_batch_size": global_batch_size, "num_microbatches": global_batch_size // per_step}


def validate_lr_schedule(c) -> None:
    require(c.min_lr <= c.lr, f"--min-lr {c.min_lr} exceeds --lr {c.lr}; lower --min-lr or raise --lr")
    decay_iters = c.lr_decay_iters or c.train_iters
    require(c.lr_warmup_iters == 0 or c.lr_warmup_iters < decay_iters,
            f"--lr-warmup-iters {c.lr_warmup_iters} must be below the decay length {decay_iters} "
            "(--lr-decay-iters, default --train-iters); shorten the warmup or lengthen the decay")


CHECKS = (validate_batch, validate_lr_schedule)
