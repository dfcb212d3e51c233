"""Logging, validation and profiling flags: what is printed and written (stdout, TensorBoard, Weights & Biases),
how often the model is validated, and what is profiled."""

from __future__ import annotations

import argparse
import importlib.util
from typing import Any, Dict

from megatron_moe.arguments.flags import RUN, FlagGroup, NoEffect, at_least, require

_CUDA_MEMORY = NoEffect("on CUDA (torch.cuda memory statistics)", "it reports CUDA memory, and a CPU run has none",
                        lambda c, device: device == "cpu")
_TIMERS = NoEffect.never("Megatron-LM's per-phase timers are not kept; the log line and TensorBoard report the "
                         "time per iteration (--log-timers-to-tensorboard writes it)")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    g = FlagGroup(parser, "logging", RUN)
    g.add("--log-interval", type=int, default=100, valid=at_least(1))
    g.add("--log-throughput", action="store_true",
          help="accepted for Megatron-LM scripts: the log line always shows throughput (tokens/s)")
    g.add("--eval-interval", type=int, default=None, valid=at_least(1),
          help="validate every N iterations (default: never); as in Megatron-LM, the model is also validated "
               "once training ends (unless --eval-iters 0 or the run exits early)")
    g.add("--eval-iters", type=int, default=100, valid=at_least(0), help="0: no validation (as in Megatron-LM)")
    g.add("--log-params-norm", action="store_true", help="the L2 norm of all parameters in the log line")
    g.add("--log-num-zeros-in-grad", action="store_true",
          help="the number of zero gradient elements in the log line")
    g.add("--logging-level", type=int, default=None, help="level of Python's root logger (e.g. 20: INFO)")
    g.add("--timing-log-level", type=int, choices=[0, 1, 2], default=0, no_effect=_TIMERS)
    g.add("--timing-log-option", choices=["max", "minmax", "all"], default="minmax", no_effect=_TIMERS)
    g.add("--no-barrier-with-level-1-timing", dest="barrier_with_L1_time", action="store_false", no_effect=_TIMERS)
    g.add("--log-memory-interval", type=int, default=None, valid=at_least(1), no_effect=_CUDA_MEMORY,
          help="print the CUDA memory use every N iterations (a multiple of --log-interval)")
    g.add("--log-device-memory-used", action="store_true", no_effect=_CUDA_MEMORY,
          help="the device memory in use (all processes) in the log line and TensorBoard")
    g.add("--no-one-logger", dest="enable_one_logger", action="store_false",
          no_effect=NoEffect.never("one-logger (NVIDIA's) is not available here anyway"))

    g = FlagGroup(parser, "logging: TensorBoard", RUN)
    g.add("--tensorboard-dir", default=None, help="write TensorBoard scalars here (pip install tensorboard)")
    g.add("--tensorboard-log-interval", type=int, default=1, valid=at_least(1),
          help="write the training scalars every N iterations")
    g.add("--tensorboard-queue-size", type=int, default=1000, valid=at_least(1),
          help="events queued before the writer flushes to disk")
    g.add("--log-timers-to-tensorboard", action="store_true", help="the time per iteration (iteration-time)")
    g.add("--no-log-loss-scale-to-tensorboard", "--disable-log-loss-scale-to-tensorboard", dest="log_loss_scale_to_tensorboard", action="store_false",
          help="do not write the loss scale")
    g.add("--log-validation-ppl-to-tensorboard", action="store_true", help="the validation perplexity too")
    g.add("--log-memory-to-tensorboard", action="store_true", no_effect=_CUDA_MEMORY,
          help="CUDA memory statistics (allocated, reserved, peak)")
    g.add("--log-world-size-to-tensorboard", action="store_true", help="the number of processes")
    g.add("--log-expert-load", action=argparse.BooleanOptionalAction, default=True,
          help="per-layer tokens per expert in TensorBoard")
    g.add("--moe-per-layer-logging", action="store_true",
          no_effect=NoEffect.never("the MoE losses are logged as their mean over the layers; per-layer routing "
                                   "shows in TensorBoard's expert-load scalars (--log-expert-load)"))

    g = FlagGroup(parser, "logging: Weights & Biases", RUN)
    g.add("--wandb-project", default=None,
          help="log the run's scalars to this W&B project (offline unless WANDB_MODE says otherwise: "
               "`wandb sync` uploads later)")
    g.add("--wandb-exp-name", default=None, help="the W&B run's name")
    g.add("--wandb-save-dir", default=None, help="where W&B writes the run (default: --save/wandb, else ./wandb)")
    g.add("--wandb-entity", default=None, help="the W&B entity (team or user)")

    g = FlagGroup(parser, "profiling", RUN)
    g.add("--profile", action="store_true",
          help="profile iterations --profile-step-start to --profile-step-end: with --use-pytorch-profiler torch's "
               "profiler (a TensorBoard trace under --tensorboard-dir), else CUDA profiler marks for nsys")
    g.add("--profile-step-start", type=int, default=10, valid=at_least(0))
    g.add("--profile-step-end", type=int, default=12, valid=at_least(0))
    g.add("--use-pytorch-profiler", action="store_true")
    g.add("--profile-ranks", nargs="+", type=int, default=[0], help="global ranks to profile")
    g.add("--record-memory-history", action="store_true", no_effect=_CUDA_MEMORY,
          help="record the CUDA allocator's history on the last rank, dumped to --memory-snapshot-path")
    g.add("--memory-snapshot-path", default="snapshot.pickle")


def validate(c) -> Dict[str, Any]:
    if c.log_memory_interval is not None:
        require(c.log_memory_interval % c.log_interval == 0,
                f"--log-memory-interval {c.log_memory_interval} must be a multiple of --log-interval {c.log_interval}")
    for flag in ("wandb_exp_name", "wandb_save_dir", "wandb_entity"):
        require(getattr(c, flag) is None or c.wandb_project,
                f"--{flag.replace('_', '-')} needs --wandb-project (without it nothing goes to W&B)")
    if c.wandb_project:
        require(c.wandb_save_dir or c.save, "--wandb-project needs --wandb-save-dir DIR or --save DIR (the W&B run's "
                                            "files go to --save/wandb by default, as in Megatron-LM)")
        require(c.wandb_exp_name != "", "--wandb-exp-name is empty; give the run a name or leave the flag out")
        require(importlib.util.find_spec("wandb") is not None,
                "--wandb-project needs the wandb package: pip install wandb (or leave the flag out)")
    if c.profile:
        require(c.profile_step_start < c.profile_step_end,
                f"--profile-step-start {c.profile_step_start} must be below --profile-step-end {c.profile_step_end}")
    if c.use_pytorch_profiler:
        require(c.profile, "--use-pytorch-profiler needs --profile")
        require(c.tensorboard_dir, "--use-pytorch-profiler writes its trace to --tensorboard-dir: give one")
    return {}


CHECKS = (validate,)
