"""Checkpoint flags: where to save and load, what to load, and the checkpoint format."""

from __future__ import annotations

import argparse

from megatron_moe.arguments.flags import RUN, FlagGroup, at_least, require

# megatron-core's StrictHandling values, in Megatron-LM's order
DIST_CKPT_STRICTNESS = ("assume_ok_unexpected", "log_unexpected", "log_all", "raise_unexpected", "raise_all",
                        "return_unexpected", "return_all", "ignore_all")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    g = FlagGroup(parser, "checkpointing", RUN)
    g.add("--save", default=None, help="checkpoint directory to write")
    g.add("--load", default=None, help="checkpoint directory to resume from (its latest iteration)")
    g.add("--ckpt-format", choices=["torch_dist"], default="torch_dist",
          help="only torch_dist (megatron-core distributed checkpoints) is written and read")
    g.add("--auto-detect-ckpt-format", action="store_true",
          help="accepted: every --load is checked to be a torch_dist checkpoint of this project before it is "
               "read (another format is refused in one line)")
    g.add("--dist-ckpt-strictness", choices=DIST_CKPT_STRICTNESS, default="assume_ok_unexpected",
          help="what a --load does with tensors the checkpoint and the model do not share (megatron-core's "
               "StrictHandling)")
    g.add("--exit-on-missing-checkpoint", action="store_true",
          help="--load names no checkpoint (nothing saved there yet): stop instead of starting from scratch")
    g.add("--no-ckpt-fully-parallel-save", "--disable-ckpt-fully-parallel-save", dest="ckpt_fully_parallel_save",
          action="store_false", help="accepted: each rank writes its own shards (Megatron-LM's fully parallel save "
                                     "strategy is never used here)")
    g.add("--save-interval", "--persistent-save-interval", type=int, default=None, valid=at_least(1),
          help="save every N iterations (and at the end)")
    g.add("--exit-signal-handler", action="store_true", help="on SIGTERM: save, then exit")
    g.add("--finetune", action="store_true",
          help="load model weights only; iteration, data position, optimizer and RNG start fresh")
    g.add("--no-load-optim", action="store_true", help="do not load optimizer and scheduler state")
    g.add("--no-load-rng", action="store_true", help="do not load the RNG states")
    g.add("--dist-ckpt-optim-fully-reshardable", action="store_true",
          help="make optimizer distributed checkpoint fully reshardable (TP/PP/EP/DP) as opposed to plain "
               "DP reshardability (--use-distributed-optimizer; other optimizers always reshard fully)")
    g.add("--no-verify-checkpoint", dest="verify_checkpoint", action="store_false",
          help="load without checking the checkpoint's file digests (manifest.json)")
    g.add("--override-opt_param-scheduler", "--override-opt-param-scheduler", action="store_true",
          help="on --load: the LR schedule follows these flags where it differs from the checkpoint's")
    g.add("--use-checkpoint-opt_param-scheduler", "--use-checkpoint-opt-param-scheduler", action="store_true",
          help="on --load: the LR schedule follows the checkpoint where it differs from these flags")


def validate(c) -> None:
    require(c.save_interval is None or c.save, "--save-interval needs --save DIR")
    require(not c.exit_signal_handler or c.save, "--exit-signal-handler saves on SIGTERM: it needs --save DIR")
    require(not c.exit_on_missing_checkpoint or c.load, "--exit-on-missing-checkpoint needs --load DIR")
    require(not (c.override_opt_param_scheduler and c.use_checkpoint_opt_param_scheduler),
            "--override-opt_param-scheduler and --use-checkpoint-opt_param-scheduler exclude each other; give one")


CHECKS = (validate,)
