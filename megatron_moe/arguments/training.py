"""Training flags: batches and their ramp-up, how long to train (iterations or samples), the learning-rate and
weight-decay schedule, the optimizer, precision and loss scaling, seeds, garbage collection, when to stop and
what to do with a NaN. Megatron-LM's meanings and rules throughout (``megatron/training/arguments.py`` and
``get_optimizer_param_scheduler`` in ``megatron/training/training.py``)."""

from __future__ import annotations

import argparse
from typing import Any, Dict, List, Optional

from megatron_moe.arguments.flags import (RUN, FlagGroup, NoEffect, above, at_least, between, flag_name, given,
                                          require, warn)

_CPU_MEMORY = NoEffect("on CUDA (torch.cuda.empty_cache)", "the CPU has no CUDA caching allocator to empty",
                       lambda c, device: device == "cpu")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    g = FlagGroup(parser, "training", RUN)
    g.add("--micro-batch-size", type=int, required=True, valid=at_least(1))
    g.add("--global-batch-size", type=int, default=None, valid=at_least(1), help="default: micro batch x data parallel")
    g.add("--rampup-batch-size", nargs=3, type=int, default=None, metavar=("START", "INCREMENT", "SAMPLES"),
          help="START INCREMENT SAMPLES: the global batch starts at START and grows by INCREMENT in equal steps "
               "over the first SAMPLES samples up to --global-batch-size (needs --train-samples)")
    g.add("--train-iters", type=int, default=None, valid=at_least(1), help="iterations to train (or --train-samples)")
    g.add("--train-samples", type=int, default=None, valid=at_least(1),
          help="samples to train (or --train-iters): the iterations follow from the global batch size and its "
               "ramp-up; a last partial batch is dropped")
    g.add("--optimizer", choices=["adam"], default="adam", help="adam (megatron-core's AdamW) only")
    g.add("--weight-decay", type=float, default=0.01, valid=at_least(0))
    g.add("--clip-grad", type=float, default=1.0, valid=at_least(0))
    g.add("--adam-beta1", type=float, default=0.9, valid=between(0.0, 1.0, high_open=True))
    g.add("--adam-beta2", type=float, default=0.999, valid=between(0.0, 1.0, high_open=True))
    g.add("--adam-eps", type=float, default=1e-8, valid=at_least(0))
    g.add("--seed", type=int, default=1234)
    g.add("--exit-interval", type=int, default=None, valid=at_least(1),
          help="save (with --save) and exit after an iteration divisible by N")
    g.add("--exit-duration-in-mins", type=float, default=None, valid=above(0),
          help="save (with --save) and exit 0 once the job has run this long (every rank agrees)")
    g.add("--use-mcore-models", action="store_true",
          no_effect=NoEffect.never("megatron-core's models are the only ones (Megatron-LM ignores it too)"))
    g.add("--calculate-per-token-loss", action="store_true",
          help="the gradient is that of the lm loss summed over the global batch's tokens divided by their number "
               "(megatron-core's per-token normalisation); default: the mean of each micro batch's per-token mean")
    g.add("--empty-unused-memory-level", type=int, choices=[0, 1, 2], default=0, no_effect=_CPU_MEMORY,
          help="1: empty the CUDA cache after every forward-backward pass, 2: also after every optimizer step")

    g = FlagGroup(parser, "learning rate and weight decay", RUN)
    g.add("--lr", type=float, required=True, valid=at_least(0))
    g.add("--min-lr", type=float, default=0.0, valid=at_least(0))
    g.add("--lr-decay-style", choices=["constant", "linear", "cosine", "inverse-square-root", "WSD"],
          default="linear")
    g.add("--lr-decay-iters", type=int, default=None, valid=at_least(1), help="default: --train-iters")
    g.add("--lr-decay-samples", type=int, default=None, valid=at_least(1), help="default: --train-samples")
    g.add("--lr-warmup-iters", type=int, default=0, valid=at_least(0))
    g.add("--lr-warmup-samples", type=int, default=0, valid=at_least(0))
    g.add("--lr-warmup-fraction", type=float, default=None, valid=between(0.0, 1.0, high_open=True),
          help="warm up over this fraction of the decay length (instead of --lr-warmup-iters/-samples)")
    g.add("--lr-warmup-init", type=float, default=0.0, valid=at_least(0), help="the learning rate warmup starts at")
    g.add("--lr-wsd-decay-style", choices=["exponential", "linear", "cosine", "minus_sqrt"], default="exponential",
          help="WSD: how the learning rate anneals to --min-lr in the last --lr-wsd-decay-iters/-samples")
    g.add("--lr-wsd-decay-iters", type=int, default=None, valid=at_least(1),
          help="WSD with --train-iters: iterations of the annealing phase")
    g.add("--lr-wsd-decay-samples", type=int, default=None, valid=at_least(1),
          help="WSD with --train-samples: samples of the annealing phase")
    g.add("--start-weight-decay", type=float, default=None, valid=at_least(0),
          help="with --weight-decay-incr-style linear or cosine")
    g.add("--end-weight-decay", type=float, default=None, valid=at_least(0),
          help="with --weight-decay-incr-style linear or cosine")
    g.add("--weight-decay-incr-style", choices=["constant", "linear", "cosine"], default="constant",
          help="constant: --weight-decay; else from --start-weight-decay to --end-weight-decay over the run")
    g.add("--decoupled-lr", type=float, default=None, valid=at_least(0),
          help="a learning rate of its own for the embedding and output layer (same schedule)")
    g.add("--decoupled-min-lr", type=float, default=None, valid=at_least(0),
          help="--decoupled-lr's minimum (default: --min-lr)")

    g = FlagGroup(parser, "mixed precision", RUN)
    g.add("--bf16", action="store_true")
    g.add("--fp16", action="store_true", help="fp16 parameters with fp32 main weights and loss scaling")
    g.add("--loss-scale", type=float, default=None, valid=above(0),
          help="--fp16: a static loss scale (default: dynamic loss scaling)")
    g.add("--initial-loss-scale", type=float, default=2.0 ** 32, valid=above(0), help="--fp16: dynamic scaling starts at")
    g.add("--min-loss-scale", type=float, default=1.0, valid=above(0), help="--fp16: dynamic scaling stops at")
    g.add("--loss-scale-window", type=float, default=1000, valid=above(0),
          help="--fp16: iterations without overflow after which the dynamic scale doubles")
    g.add("--hysteresis", type=int, default=2, valid=at_least(1),
          help="--fp16: overflows tolerated before the dynamic scale halves")
    g.add("--attention-softmax-in-fp32", action="store_true",
          help="attention masking and softmax in fp32 (with --bf16 or --fp16)")
    g.add("--apply-query-key-layer-scaling", action="store_true",
          help="scale Q.K^T by 1/layer number (and back in an fp32 softmax): fp16 stability, same function")
    g.add("--fp16-lm-cross-entropy", action="store_true", help="--fp16: the output layer's cross entropy in fp16")

    g = FlagGroup(parser, "training: garbage collection", RUN)
    g.add("--manual-gc", action="store_true",
          help="disable Python's automatic garbage collector; collect every --manual-gc-interval iterations")
    g.add("--manual-gc-interval", type=int, default=0, valid=at_least(0),
          requires=("manual_gc", "the collector runs automatically"),
          help="--manual-gc: collect every N iterations (0: only at start and around validation)")
    g.add("--no-manual-gc-eval", "--disable-manual-gc-eval", dest="manual_gc_eval", action="store_false",
          requires=("manual_gc", "the collector runs automatically"),
          help="--manual-gc: no collection before and after each validation")

    g = FlagGroup(parser, "training: NaN and Inf", RUN)
    g.add("--no-check-for-nan-in-loss-and-grad", dest="check_for_nan_in_loss_and_grad", action="store_false",
          help="do not stop on a NaN/Inf loss or grad norm (off anyway with --fp16 dynamic loss scaling, where "
               "an overflow skips the iteration, as in Megatron-LM)")
    g.add("--skip-nan-iterations", action="store_true",
          help="on a NaN/Inf loss: skip the update and count it instead of stopping")
    g.add("--max-consecutive-skipped-iterations", type=int, default=10, valid=at_least(1),
          help="--skip-nan-iterations: stop (status 1, no save) after this many skipped updates in a row")
    g.add("--max-skipped-iterations", type=int, default=100, valid=at_least(1),
          help="--skip-nan-iterations: stop (status 1, no save) after this many skipped updates in one launch")


def validate_length(c) -> Dict[str, Any]:
    """Iteration- or sample-based training, as Megatron-LM tells them apart; fills in --train-iters of a
    sample-based run (Megatron-LM's ``update_train_iters``)."""
    require(c.train_iters is not None or c.train_samples is not None,
            "give --train-iters N or --train-samples N (how long to train)")
    require(c.train_iters is None or c.train_samples is None,
            "--train-iters and --train-samples exclude each other; give one")
    if c.lr_warmup_fraction is not None:
        for warmup in ("lr_warmup_iters", "lr_warmup_samples"):
            require(not given(c, warmup), f"--lr-warmup-fraction and {flag_name(warmup)} exclude each other; give one")
    if c.train_iters is not None:
        for flag, instead in (("train_samples", None), ("lr_decay_samples", "--lr-decay-iters"),
                              ("lr_warmup_samples", "--lr-warmup-iters"), ("lr_wsd_decay_samples", "--lr-wsd-decay-iters"),
                              ("rampup_batch_size", None)):
            require(not given(c, flag),
                    f"{flag_name(flag)} needs sample-based training (--train-samples instead of --train-iters)"
                    + (f"; with --train-iters give {instead}" if instead else ""))
        return {}
    for flag, instead in (("lr_decay_iters", "--lr-decay-samples"), ("lr_warmup_iters", "--lr-warmup-samples"),
                          ("lr_wsd_decay_iters", "--lr-wsd-decay-samples")):
        require(not given(c, flag), f"{flag_name(flag)} needs iteration-based training (--train-iters instead of "
                                    f"--train-samples); with --train-samples give {instead}")
    return {}


def validate_batch(c) -> Dict[str, Any]:
    """Micro and global batches and the ramp-up; fills in --global-batch-size, the number of micro batches of
    a full global batch and, for --train-samples, --train-iters."""
    per_step = c.micro_batch_size * c.data_parallel_size
    global_batch_size = c.global_batch_size or per_step
    require(global_batch_size % per_step == 0,
            f"--global-batch-size {global_batch_size} is not divisible by micro batch x data parallel "
            f"= {c.micro_batch_size} x {c.data_parallel_size}")
    filled = {"global_batch_size": global_batch_size, "num_microbatches": global_batch_size // per_step}
    if c.rampup_batch_size is not None:
        _check_rampup(c.rampup_batch_size, global_batch_size, per_step)
    if c.train_samples is not None:
        filled["train_iters"] = sample_based_iterations(c.train_samples, global_batch_size, c.rampup_batch_size)
        require(filled["train_iters"] >= 1, f"--train-samples {c.train_samples} is less than one global batch "
                                            f"({global_batch_size}); train on more samples")
    return filled


def _check_rampup(rampup: List[int], global_batch_size: int, per_step: int) -> None:
    """What megatron-core's ramp-up calculator asserts during training, checked before anything is built."""
    start, increment, samples = rampup
    require(start >= 1 and increment >= 1, f"--rampup-batch-size {start} {increment} {samples}: the start batch "
                                           "size and the increment must be at least 1")
    require(start < global_batch_size, f"--rampup-batch-size starts at {start}, not below --global-batch-size "
                                       f"{global_batch_size}: nothing to ramp; leave --rampup-batch-size out")
    require((global_batch_size - start) % increment == 0,
            f"--rampup-batch-size {start} {increment} {samples}: --global-batch-size {global_batch_size} minus the start "
            f"batch size is not a multiple of the increment {increment}")
    for batch in range(start, global_batch_size + 1, increment):
        require(batch % per_step == 0,
                f"--rampup-batch-size {start} {increment} {samples}: the ramp's global batch size {batch} is not "
                f"divisible by micro batch x data parallel = {per_step}; choose a start and an increment that are")


def rampup_batch_size(consumed_samples: int, global_batch_size: int, rampup: Optional[List[int]]) -> int:
    """The global batch size after ``consumed_samples`` samples: megatron-core's
    RampupBatchsizeNumMicroBatchesCalculator.update (training follows that calculator itself; this is for
    validation, which must not import megatron-core, and tests/test_sample_based_training.py holds both
    equal)."""
    if rampup is None:
        return global_batch_size
    start, increment, samples = rampup
    if consumed_samples > samples:
        return global_batch_size
    samples_per_increment = samples / ((global_batch_size - start) // increment)
    return start + int(consumed_samples / samples_per_increment) * increment


def sample_based_iterations(train_samples: int, global_batch_size: int, rampup: Optional[List[int]]) -> int:
    """Iterations of a --train-samples run, as Megatron-LM's ``update_train_iters`` counts them: the ramp-up
    phase batch by batch (while the consumed samples are within the ramp and the run), then whole global
    batches (a partial last one is dropped)."""
    if rampup is None:
        return train_samples // global_batch_size
    iterations = consumed = 0
    while consumed <= rampup[2] and consumed <= train_samples:
        consumed += rampup_batch_size(consumed, global_batch_size, rampup)
        iterations += 1
    if train_samples > consumed:
        iterations += (train_samples - consumed) // global_batch_size
    return iterations


def validate_lr_schedule(c) -> Dict[str, Any]:
    """Megatron-LM's schedule rules, checked before megatron-core's scheduler asserts them; fills in the
    weight-decay range."""
    require(c.min_lr <= c.lr, f"--min-lr {c.min_lr} exceeds --lr {c.lr}; lower --min-lr or raise --lr")
    require(c.lr_warmup_init <= c.lr, f"--lr-warmup-init {c.lr_warmup_init} exceeds --lr {c.lr}")
    unit = "iters" if c.train_samples is None else "samples"
    if c.lr_warmup_fraction is None:  # (a fraction is below 1)
        warmup, decay = (c.lr_warmup_iters, c.lr_decay_iters or c.train_iters) if unit == "iters" else \
            (c.lr_warmup_samples, c.lr_decay_samples or c.train_samples)
        require(warmup < decay, f"--lr-warmup-{unit} {warmup} must be below the decay length {decay} "
                                f"(--lr-decay-{unit}, default --train-{unit}); shorten the warmup or lengthen the decay")
    wsd = f"--lr-wsd-decay-{unit}"
    if c.lr_decay_style == "WSD":
        require(wsd_decay_steps(c) is not None, f"--lr-decay-style WSD needs {wsd} (the length of the annealing "
                                                "phase at the end of the decay)")
    else:
        for flag in ("lr_wsd_decay_iters", "lr_wsd_decay_samples", "lr_wsd_decay_style"):
            require(not given(c, flag), f"{flag_name(flag)} needs --lr-decay-style WSD")
    if c.decoupled_min_lr is not None:
        require(c.decoupled_lr is not None, "--decoupled-min-lr needs --decoupled-lr")
    if c.decoupled_lr is not None:
        require((c.decoupled_min_lr if c.decoupled_min_lr is not None else c.min_lr) <= c.decoupled_lr,
                "--decoupled-min-lr (default --min-lr) exceeds --decoupled-lr")
    if c.weight_decay_incr_style == "constant":
        for flag in ("start_weight_decay", "end_weight_decay"):
            # the value this fills in (a saved config's flags carry it) is the one value constant accepts
            require(getattr(c, flag) in (None, c.weight_decay),
                    f"{flag_name(flag)} needs --weight-decay-incr-style linear or cosine (constant uses --weight-decay)")
        return {"start_weight_decay": c.weight_decay, "end_weight_decay": c.weight_decay}
    require(c.start_weight_decay is not None and c.end_weight_decay is not None,
            f"--weight-decay-incr-style {c.weight_decay_incr_style} needs --start-weight-decay and --end-weight-decay")
    require(c.start_weight_decay <= c.end_weight_decay, "--start-weight-decay exceeds --end-weight-decay (the "
                                                        "weight decay can only increase)")
    return {}


# The scheduler counts samples, as Megatron-LM's does (get_optimizer_param_scheduler); a config whose
# --train-iters is filled in.

def lr_decay_steps(c) -> int:
    if c.train_samples is None:
        return (c.lr_decay_iters or c.train_iters) * (c.global_batch_size or 0)
    return c.lr_decay_samples or c.train_samples


def lr_warmup_steps(c) -> float:
    if c.lr_warmup_fraction is not None:
        return c.lr_warmup_fraction * lr_decay_steps(c)
    if c.train_samples is None:
        return c.lr_warmup_iters * (c.global_batch_size or 0)
    return c.lr_warmup_samples


def wsd_decay_steps(c) -> Optional[int]:
    if c.train_samples is None:
        return None if c.lr_wsd_decay_iters is None else c.lr_wsd_decay_iters * c.global_batch_size
    return c.lr_wsd_decay_samples


def wd_incr_steps(c) -> int:
    return c.train_iters * c.global_batch_size if c.train_samples is None else c.train_samples


def validate_precision(c) -> Dict[str, Any]:
    """--bf16 / --fp16 and loss scaling, with Megatron-LM's rule: dynamic loss scaling turns the NaN check off
    (an overflow is the scaler's signal: the iteration is skipped and counted)."""
    require(not (c.bf16 and c.fp16), "--bf16 and --fp16 exclude each other; give one")
    if not c.fp16:
        for flag in ("loss_scale", "initial_loss_scale", "min_loss_scale", "loss_scale_window", "hysteresis",
                     "fp16_lm_cross_entropy"):
            require(not given(c, flag), f"{flag_name(flag)} needs --fp16")
        return {}
    require(c.loss_scale is not None or not c.skip_nan_iterations,
            "--skip-nan-iterations with --fp16 dynamic loss scaling: an overflow already skips the iteration (and "
            "lowers the loss scale); leave --skip-nan-iterations out or give a static --loss-scale")
    if c.loss_scale is None and c.check_for_nan_in_loss_and_grad:
        warn("--fp16 with dynamic loss scaling: the NaN/Inf check is off (as in Megatron-LM): an overflow skips "
             "the iteration and lowers the loss scale")
        return {"check_for_nan_in_loss_and_grad": False}
    return {}


CHECKS = (validate_length, validate_batch, validate_lr_schedule, validate_precision)
