"""The training job: set up megatron-core's pieces from the command line, then loop.

Everything here is megatron-core's: DDP, the optimizer, the LR scheduler and the (pipeline) schedule from
``get_forward_backward_func``. This module only wires them together and prints Megatron's log lines.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional

import torch
import torch.distributed as dist

from megatron.core import parallel_state, tensor_parallel
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler, get_canonical_lr_for_logging
from megatron.core.pipeline_parallel import get_forward_backward_func

from megatron_moe import checkpoint_files, checkpointing, context_parallel, data, metrics, run_config, step_guard
from megatron_moe.arguments import RunConfig, padded_vocab_size, parse_args
from megatron_moe.arguments import training as schedule
from megatron_moe.batches import GlobalBatches
from megatron_moe.console import print_line, print_rank_0, print_rank_last
from megatron_moe.errors import ConfigError
from megatron_moe.model import GPTMoEConfig, build_model_chunks, transformer_config_from_args
from megatron_moe.moe import comm_stats
from megatron_moe.platform import (Platform, check_start, children_die_with_this_process, init_distributed,
                                   select_platform)
from megatron_moe.run_control import NonFiniteError, RunControl
from megatron_moe.step_extras import StepExtras
from megatron_moe.tokenizer import build_tokenizer


@dataclass
class TrainingJob:
    args: RunConfig  # the run's whole config, vocabulary included
    platform: Platform
    config: GPTMoEConfig
    model: List[DistributedDataParallel]  # this rank's model chunks, one per virtual pipeline stage (Megatron-LM's)
    optimizer: object
    scheduler: OptimizerParamScheduler
    tokenizer: object
    started: float  # time.time() when setup began: --exit-duration-in-mins counts from here, as Megatron-LM's
    checkpoint: Optional[Path] = None  # the iteration directory --load resumes from
    saved_config: Optional[RunConfig] = None  # the run config it was written with
    non_finite_guard: Optional[step_guard.NonFiniteGuard] = None  # installed by the first train_step
    num_zeros_in_grad: Optional[float] = None  # of the last step, with --log-num-zeros-in-grad


def _set_seeds(seed: int) -> None:
    # Megatron-LM's scheme: a different stream per pipeline stage, model-parallel RNG tracker on top.
    torch.manual_seed(seed + 100 * parallel_state.get_pipeline_model_parallel_rank())
    tensor_parallel.model_parallel_cuda_manual_seed(seed)


def ddp_config_from_args(args) -> DistributedDataParallelConfig:
    """megatron-core's data-parallel gradient reduction and parameter gathering, as the flags describe."""
    return DistributedDataParallelConfig(
        grad_reduce_in_fp32=args.accumulate_allreduce_grads_in_fp32,
        overlap_grad_reduce=args.overlap_grad_reduce,
        overlap_param_gather=args.overlap_param_gather,
        bucket_size=args.ddp_bucket_size,
        use_distributed_optimizer=args.use_distributed_optimizer,
        # the interleaved schedule starts each chunk's parameter all-gather itself (Megatron-LM's aligned gather)
        align_param_gather=args.overlap_param_gather and args.virtual_pipeline_model_parallel_size is not None,
    )


def optimizer_config_from_args(args, config: GPTMoEConfig) -> OptimizerConfig:
    """megatron-core's Adam with Megatron-LM's settings: mixed precision and loss scaling, the decoupled
    learning rate of the embedding and output layer."""
    return OptimizerConfig(
        optimizer="adam",
        lr=args.lr,
        min_lr=args.min_lr,
        decoupled_lr=args.decoupled_lr,
        decoupled_min_lr=args.decoupled_min_lr,
        weight_decay=args.weight_decay,
        adam_beta1=args.adam_beta1,
        adam_beta2=args.adam_beta2,
        adam_eps=args.adam_eps,
        clip_grad=args.clip_grad,
        bf16=args.bf16,
        fp16=args.fp16,
        loss_scale=args.loss_scale,
        initial_loss_scale=args.initial_loss_scale,
        min_loss_scale=args.min_loss_scale,
        loss_scale_window=args.loss_scale_window,
        hysteresis=args.hysteresis,
        params_dtype=config.params_dtype,
        use_distributed_optimizer=args.use_distributed_optimizer,
        overlap_param_gather=args.overlap_param_gather,
        log_num_zeros_in_grad=args.log_num_zeros_in_grad,
    )


def scheduler_from_args(args, optimizer) -> OptimizerParamScheduler:
    """megatron-core's scheduler as Megatron-LM's get_optimizer_param_scheduler sets it up: it counts samples
    (iterations x global batch size, or --train-samples)."""
    return OptimizerParamScheduler(
        optimizer,
        init_lr=args.lr_warmup_init,
        max_lr=args.lr,
        min_lr=args.min_lr,
        lr_warmup_steps=schedule.lr_warmup_steps(args),
        lr_decay_steps=schedule.lr_decay_steps(args),
        lr_decay_style=args.lr_decay_style,
        start_wd=args.start_weight_decay,
        end_wd=args.end_weight_decay,
        wd_incr_steps=schedule.wd_incr_steps(args),
        wd_incr_style=args.weight_decay_incr_style,
        # on resume, where the saved schedule differs (checkpointing.check_scheduler refuses it without these)
        use_checkpoint_opt_param_scheduler=args.use_checkpoint_opt_param_scheduler,
        override_opt_param_scheduler=args.override_opt_param_scheduler,
        wsd_decay_steps=schedule.wsd_decay_steps(args),
        lr_wsd_decay_style=args.lr_wsd_decay_style,
    )


def wrap_model_chunks(config: GPTMoEConfig, args, chunks) -> List[DistributedDataParallel]:
    """Each model chunk in megatron-core's DDP, and the schedule's hooks into them, as Megatron-LM sets them
    (a list with one entry per chunk under virtual pipeline stages)."""
    ddp_config = ddp_config_from_args(args)
    # Megatron-LM: one bucket per chunk after the first, whose reductions overlap computation anyway
    model = [DistributedDataParallel(config=config, ddp_config=ddp_config, module=chunk, disable_bucketing=i > 0)
             for i, chunk in enumerate(chunks)]

    def per_chunk(hooks):
        return hooks if len(hooks) > 1 else hooks[0]

    # Without these, megatron-core silently skips the data-parallel gradient all-reduce.
    config.finalize_model_grads_func = finalize_model_grads
    config.no_sync_func = per_chunk([chunk.no_sync for chunk in model])
    if args.overlap_grad_reduce:
        # Megatron-LM's default (aligned grad reduce): later pipeline stages launch their reduction when
        # their last backward ends instead of bucket by bucket.
        config.grad_sync_func = per_chunk([chunk.start_grad_sync for chunk in model])
    if ddp_config.align_param_gather:
        config.param_sync_func = per_chunk([chunk.start_param_sync for chunk in model])
    return model


def setup(argv: Optional[List[str]] = None, args: Optional[RunConfig] = None) -> TrainingJob:
    """Parse and validate (unless ``args`` is given), join the process group, check the checkpoint --load
    names against the flags, build model + DDP + optimizer + scheduler."""
    started = time.time()
    if args is None:  # errors surface before any process group exists
        args = parse_args(argv, world_size=int(os.environ.get("WORLD_SIZE", "1")))
    check_start(args)  # device, NCCL, Transformer Engine, FP8: one line each, before any process group
    children_die_with_this_process()  # megatron-core's checkpoint writer forks; a killed rank takes them along
    platform = select_platform(args.device)
    init_distributed(platform, timeout_minutes=args.distributed_timeout_minutes)  # refuses restarts that cannot meet
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=args.tensor_model_parallel_size,
        pipeline_model_parallel_size=args.pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=args.virtual_pipeline_model_parallel_size,
        context_parallel_size=args.context_parallel_size,
        expert_model_parallel_size=args.expert_model_parallel_size,
        expert_tensor_parallel_size=args.expert_tensor_parallel_size,
        distributed_timeout_minutes=args.distributed_timeout_minutes,  # megatron's default is 30 minutes
    )
    checkpointing.check_save_dir(args)  # file errors before the minutes a large model takes to build
    checkpoint = checkpointing.find_checkpoint(args)
    checkpoint_files.check_checkpoint_files(checkpoint, args.verify_checkpoint)
    _set_seeds(args.seed)
    tokenizer = build_tokenizer(args)
    data.check_datasets(args, tokenizer.model_vocab_size)
    saved = run_config.load(checkpoint) if checkpoint is not None else None
    args = args.replace(tokenizer_vocab_size=tokenizer.model_vocab_size,
                        padded_vocab_size=_vocabulary_rows(args, tokenizer.model_vocab_size, saved, checkpoint))
    if saved is not None:
        checkpointing.check_compatible(saved, args, checkpoint)
    print_rank_0(format_arguments(args))
    metrics.register_scalar_source(comm_stats.snapshot_and_reset)

    config = transformer_config_from_args(args)
    model = wrap_model_chunks(config, args, [chunk.to(platform.device) for chunk in build_model_chunks(config, args)])

    optimizer = get_megatron_optimizer(optimizer_config_from_args(args, config), model)
    config.grad_scale_func = optimizer.scale_loss  # as Megatron-LM: fp16's loss scaling (1 otherwise)
    scheduler = scheduler_from_args(args, optimizer)
    job = TrainingJob(args, platform, config, model, optimizer, scheduler, tokenizer, started, checkpoint, saved)
    if args.save:
        needed = checkpointing.checkpoint_bytes(job)
        print_rank_0(f"> a checkpoint takes about {needed / 2**20:.1f} MiB")
        checkpointing.check_save_space(args.save, needed)
    return job


def _vocabulary_rows(args: RunConfig, vocab_size: int, saved: Optional[RunConfig], checkpoint) -> int:
    """Rows of the embedding and output layer: the checkpoint's on --load (its padded rows are masked, so
    their number does not change the model, and the saved tensors keep their shape in every layout), else
    Megatron-LM's padding rule."""
    if saved is None or saved.padded_vocab_size is None:
        return padded_vocab_size(vocab_size, args)
    rows, tp = saved.padded_vocab_size, args.tensor_model_parallel_size
    if rows % tp != 0:
        raise ConfigError(f"--load {checkpoint}: its vocabulary has {rows} rows, which --tensor-model-parallel-size "
                          f"{tp} does not divide; use a tensor-parallel size that divides {rows}")
    return rows


def model_modules(job: TrainingJob) -> List[torch.nn.Module]:
    """This rank's model chunks without their DDP wrappers (the GPTModels)."""
    return [chunk.module for chunk in job.model]


def micro_batch_iterators(job: TrainingJob, dataset, first_sample: int):
    """This rank's micro batches from global sample ``first_sample`` on; under virtual pipeline stages one
    iterator per model chunk, as the interleaved schedule wants them (each chunk reads every micro batch
    once, in its own order)."""
    def iterator():
        return data.micro_batches(dataset, job.args, first_sample, parallel_state.get_data_parallel_rank(),
                                  job.args.num_workers)

    return iterator() if len(job.model) == 1 else [iterator() for _ in job.model]


def _loss_func(loss_mask: torch.Tensor, guard_non_finite: bool, per_token: bool, per_token_loss: torch.Tensor):
    """What megatron-core's schedule takes: (loss, report), or with ``per_token`` (--calculate-per-token-loss)
    (loss sum, number of tokens, report)."""
    if per_token:
        loss, num_tokens, reported = context_parallel.lm_loss_sum(loss_mask, per_token_loss)
    else:
        loss, reported = context_parallel.lm_loss(loss_mask, per_token_loss)
    if guard_non_finite:  # a NaN/Inf loss reaches the grad norm, the step's one NaN/Inf check
        loss = step_guard.poison_if_non_finite(loss)
    return (loss, num_tokens, {"lm loss": reported}) if per_token else (loss, {"lm loss": reported})


def _to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """The host batch on ``device`` without the host waiting: a copy from pinned memory is queued on the
    stream like a kernel (from pageable memory the host would wait for the device to drain first)."""
    if device.type == "cuda":
        tensor = tensor.pin_memory()
    return tensor.to(device, non_blocking=True)


def _forward_step(device: torch.device, guard_non_finite: bool, per_token: bool,
                  data_iterator: Iterator[Dict[str, torch.Tensor]], model):
    batch = {key: _to_device(value, device) for key, value in next(data_iterator).items()}
    batch = context_parallel.batch_on_this_rank(batch)
    output = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"])
    return output, partial(_loss_func, batch["loss_mask"], guard_non_finite, per_token)


def _mean_over_data_parallel(values: List[torch.Tensor]) -> Optional[torch.Tensor]:
    """Mean of the micro-batch losses over the whole global batch (last pipeline stage only), on the device:
    a collective but no host read."""
    if not values:
        return None
    total = torch.stack(values).mean()
    group = parallel_state.get_data_parallel_group()
    dist.all_reduce(total, group=group)
    return total / dist.get_world_size(group)


def _checks_non_finite(args) -> bool:
    return args.check_for_nan_in_loss_and_grad or args.skip_nan_iterations


def _micro_batch_losses(job: TrainingJob, micro_batch_iter, forward_only: bool,
                        num_microbatches: Optional[int] = None) -> List[torch.Tensor]:
    """This rank's lm loss of every micro batch (device tensors; empty off the last pipeline stage) of one
    global batch of ``num_microbatches`` micro batches (default: a full --global-batch-size)."""
    args = job.args
    losses = get_forward_backward_func()(
        forward_step_func=partial(_forward_step, job.platform.device, _checks_non_finite(args) and not forward_only,
                                  args.calculate_per_token_loss),
        data_iterator=micro_batch_iter,
        model=job.model,
        num_microbatches=num_microbatches or args.num_microbatches,
        seq_length=args.seq_length,
        micro_batch_size=args.micro_batch_size,
        forward_only=forward_only,
    )
    return [item["lm loss"] for item in losses]


def run_micro_batches(job: TrainingJob, micro_batch_iter, forward_only: bool) -> Optional[float]:
    """The lm loss of one global batch, read on the host (evaluation; the training step keeps it on the
    device)."""
    loss = _mean_over_data_parallel(_micro_batch_losses(job, micro_batch_iter, forward_only))
    return None if loss is None else loss.item()


@dataclass
class StepResult:
    loss: Optional[torch.Tensor]  # lm loss over the global batch, on the device (last pipeline stage only)
    grad_norm: Optional[float]  # megatron-core's, as its step returns it
    applied: bool  # the optimizer updated the parameters
    non_finite: bool  # skipped for a NaN/Inf loss or gradient (--skip-nan-iterations)


def train_step(job: TrainingJob, micro_batch_iter, iteration: int = 0,
               batches: Optional[GlobalBatches] = None) -> StepResult:
    """One optimizer step on the global batch ``batches`` sets (default: --global-batch-size), without a host
    read of its own: the loss stays on the device.

    A NaN/Inf loss or gradient on any rank is found before the update, on the grad norm megatron-core's
    step reads anyway (:mod:`megatron_moe.step_guard`): the run stops naming the iteration and rank, or
    with --skip-nan-iterations the update is skipped (and counted by the caller).
    """
    args = job.args
    for chunk in job.model:
        chunk.zero_grad_buffer()
    job.optimizer.zero_grad()
    local_losses = _micro_batch_losses(job, micro_batch_iter, forward_only=False,
                                       num_microbatches=batches.num_microbatches if batches else None)
    loss = _mean_over_data_parallel(local_losses)
    guard = None
    if _checks_non_finite(args):
        if job.non_finite_guard is None:
            job.non_finite_guard = step_guard.NonFiniteGuard(job.optimizer)
        guard = job.non_finite_guard
        guard.before_step()
    applied, grad_norm, job.num_zeros_in_grad = job.optimizer.step()
    if guard is not None and guard.non_finite:
        what = step_guard.locate_non_finite(local_losses, job.model, guard.grad_norm)
        if not args.skip_nan_iterations:
            raise NonFiniteError(f"iteration {iteration}: {what}; lower --lr, check the data, or pass "
                                 "--skip-nan-iterations to skip such steps")
        return StepResult(loss, None, False, True)
    if applied:  # the schedule counts samples (an overflow skipped by fp16 loss scaling: none)
        job.scheduler.step(increment=batches.global_batch_size if batches else args.global_batch_size)
    return StepResult(loss, grad_norm, applied, False)


class LossHistory:
    """This run's lm losses. Each step queues its loss as a device value; :meth:`read` copies the queue to
    the host in one go (log iterations, a caller's hook, the end), so a step never waits for its loss."""

    def __init__(self):
        self.values: List[float] = []
        self._queued: List[torch.Tensor] = []

    def add(self, loss: Optional[torch.Tensor]) -> None:
        if loss is not None:
            self._queued.append(loss.reshape(1))

    def read(self) -> List[float]:
        if self._queued:
            self.values.extend(torch.cat(self._queued).tolist())
            self._queued.clear()
        return self.values


@dataclass
class LogInterval:
    """The iterations since the last log line, which Megatron-LM's line sums up: the lm loss averaged over
    the iterations that updated the model, the MoE losses over every micro batch, and the skipped and NaN
    iterations counted anew each interval."""

    seconds: float = 0.0  # training time
    iterations: int = 0
    microbatches: int = 0
    skipped: int = 0
    nan: int = 0
    applied: List[bool] = field(default_factory=list)

    def add(self, step: StepResult, num_microbatches: int) -> None:
        self.iterations += 1
        self.microbatches += num_microbatches
        self.skipped += not step.applied
        self.nan += step.non_finite
        self.applied.append(step.applied)

    def mean_loss(self, losses: List[float]) -> Optional[float]:
        """Mean of this interval's losses (the last ``iterations`` of ``losses``) over the applied steps."""
        kept = [loss for loss, applied in zip(losses[-self.iterations:], self.applied) if applied]
        return sum(kept) / len(kept) if kept else None


# A long evaluation says how far it is (Megatron-LM's "Evaluating iter i/N") at most this often.
EVAL_PROGRESS_SECONDS = 30.0


def evaluate(job: TrainingJob, dataset, eval_index: int) -> Optional[float]:
    """The mean lm loss over the next --eval-iters global batches of ``dataset``. Every
    :data:`EVAL_PROGRESS_SECONDS` the last rank prints how many it has done; its clock follows the loss it
    reads after each batch anyway, so the progress line waits for nothing more."""
    args = job.args
    for chunk in job.model:
        chunk.eval()
    first = eval_index * args.eval_iters * args.global_batch_size
    iterator = micro_batch_iterators(job, dataset, first)
    began = last_line = time.monotonic()
    losses = []
    with torch.no_grad():
        for done in range(1, args.eval_iters + 1):
            losses.append(run_micro_batches(job, iterator, forward_only=True))
            now = time.monotonic()
            if now - last_line >= EVAL_PROGRESS_SECONDS:
                print_rank_last(f"Evaluating iter {done}/{args.eval_iters} ({now - began:.1f} s)")
                last_line = now
    for chunk in job.model:
        chunk.train()
    return None if losses[0] is None else sum(losses) / len(losses)


def layout_text(args) -> str:
    """The parallel layout in one line (VPP: model chunks per pipeline rank)."""
    return (f"TP={args.tensor_model_parallel_size} CP={args.context_parallel_size} "
            f"PP={args.pipeline_model_parallel_size} VPP={args.virtual_pipeline_model_parallel_size or 1} "
            f"EP={args.expert_model_parallel_size} ETP={args.expert_tensor_parallel_size} DP={args.data_parallel_size}")


def format_arguments(args) -> str:
    """The configuration, printed once at start as Megatron-LM does."""
    lines = ["------------------------ arguments ------------------------"]
    for name, value in sorted(args.to_dict().items()):
        lines.append(f"  {name} {'.' * (48 - len(name))} {value}")
    lines.append("-------------------- end of arguments ---------------------")
    return "\n".join(lines)


@dataclass
class StepReport:
    """What the log line of an iteration shows besides the loss (Megatron-LM's fields)."""

    global_batch_size: int  # this iteration's (it grows with --rampup-batch-size)
    consumed_samples: int  # after this iteration
    loss_scale: float = 1.0  # fp16 loss scaling (1 otherwise)
    num_zeros_in_grad: Optional[float] = None  # --log-num-zeros-in-grad
    params_norm: Optional[float] = None  # --log-params-norm


def log_line(iteration: int, args, elapsed_ms: float, lr: float, lm_loss: Optional[float], grad_norm, skipped: int,
             nan_iterations: int = 0, extra: Optional[Dict[str, float]] = None,
             report: Optional[StepReport] = None) -> str:
    """Megatron-LM's training log line; ``extra``: MoE losses and registered scalars (per-layer ones, named
    ``.../layer_NN/...``, go to TensorBoard only); ``report``: the batch, samples and optional fields (default:
    a full global batch per iteration). As in Megatron-LM, an interval whose every step was skipped has no
    lm loss, a skipped step no grad norm, and the counts are the interval's."""
    report = report or StepReport(args.global_batch_size, iteration * args.global_batch_size)
    tokens_per_s = report.global_batch_size * args.seq_length / (elapsed_ms / 1000.0)
    loss_text = f" lm loss: {lm_loss:.6E} |" if lm_loss is not None else ""
    grad_norm_text = f" grad norm: {grad_norm:.3f} |" if grad_norm is not None else ""
    extra_text = "".join(f" {name.replace('_', ' ')}: {value:.6E} |" for name, value in (extra or {}).items()
                         if "/layer_" not in name)
    optional = (f" num zeros: {report.num_zeros_in_grad} |" if report.num_zeros_in_grad is not None else "") + \
        (f" params norm: {report.params_norm:.3f} |" if report.params_norm is not None else "")
    return (
        f" iteration {iteration:8d}/{args.train_iters:8d} |"
        f" consumed samples: {report.consumed_samples:12d} |"
        f" elapsed time per iteration (ms): {elapsed_ms:.1f} |"
        f" throughput (tokens/s): {tokens_per_s:.1f} |"
        f" learning rate: {lr:.6E} |"
        f" global batch size: {report.global_batch_size:5d} |"
        f"{loss_text}"
        f"{extra_text}"
        f" loss scale: {report.loss_scale:.1f} |"
        f"{grad_norm_text}"
        f"{optional}"
        f" number of skipped iterations: {skipped:3d} |"
        f" number of nan iterations: {nan_iterations:3d} |"
    )


def _finish_param_gather(job: TrainingJob) -> None:
    """With --overlap-param-gather the optimizer step leaves the all-gather of the updated parameters to the
    next forward's hooks; whatever reads the parameters outside a forward (a checkpoint, the caller after
    training) must have it done first."""
    for chunk in job.model:
        if chunk.use_forward_hook:
            chunk.start_param_sync(force_sync=True)


def train(job: TrainingJob, after_iteration: Optional[Callable[[int, List[float]], None]] = None) -> List[float]:
    """Loads ``--load``, trains to ``--train-iters``, saves; returns this run's lm losses (last stage).

    ``after_iteration(iteration, losses)`` runs after every iteration (tests use it to crash a run).

    As in Megatron-LM, each iteration's global batch follows the consumed samples (``--rampup-batch-size``:
    :mod:`megatron_moe.batches`), and with --save a checkpoint is written when the batch size changes.
    A step queues its work and its loss on the device; the host reads the losses, the MoE losses and the
    counters only at log iterations, and at --tensorboard-log-interval iterations when a scalar writer is on
    (``docs/host_syncs.md``). The log line's time per iteration is the mean over the log interval, taken once
    the device has caught up.
    """
    args = job.args
    start_iteration, consumed_samples = checkpointing.load_checkpoint(job)
    train_ds, valid_ds, _ = data.build_datasets(args, job.tokenizer)
    iterator = micro_batch_iterators(job, train_ds, consumed_samples)
    batches = GlobalBatches(args, dist.get_rank())
    batches.update(consumed_samples)
    writer = metrics.scalar_writer(args)
    extras = StepExtras(args, job.platform.device)
    expert_load = None
    if args.num_experts is not None and args.tensorboard_dir and args.log_expert_load:  # rank-independent: collective
        expert_load = metrics.ExpertLoad(model_modules(job), args.num_layers, args.num_experts, job.platform.device)
    control = RunControl(args, job.started)
    print_rank_0(f"> training iterations {start_iteration + 1}..{args.train_iters} on {dist.get_world_size()} "
                 f"processes ({job.platform.device.type}/{job.platform.backend}): {layout_text(args)}")
    history = LossHistory()
    interval = LogInterval()
    iteration = saved_iteration = start_iteration
    while iteration < args.train_iters:
        before = batches.global_batch_size
        if batches.update(consumed_samples):
            print_rank_0(f"> ramping up batch size from {before} to {batches.global_batch_size}")
            if args.save and iteration > start_iteration and saved_iteration != iteration:
                _finish_param_gather(job)  # Megatron-LM saves when the number of micro batches changes
                checkpointing.save_checkpoint(job, iteration, consumed_samples)
                saved_iteration = iteration
        extras.before_step(iteration)
        iteration += 1
        start = time.perf_counter()
        step = train_step(job, iterator, iteration, batches)
        consumed_samples += batches.global_batch_size
        interval.add(step, batches.num_microbatches)
        control.count_update(iteration, step.applied)
        history.add(step.loss)
        extras.after_step(iteration)
        logs = iteration % args.log_interval == 0
        writes = writer is not None and iteration % args.tensorboard_log_interval == 0 and step.loss is not None
        if logs or writes:
            losses = history.read()  # waits for the device: the step's time is complete after it
        seconds = time.perf_counter() - start
        interval.seconds += seconds
        if logs or writes:
            report = _step_report(job, batches, consumed_samples, logs)
        if writes:
            _write_step_scalars(job, writer, iteration, losses[-1], step.grad_norm, report, seconds * 1000.0)
        if logs:
            elapsed_ms = interval.seconds * 1000.0 / interval.iterations
            extras.at_log()
            extra = {**metrics.moe_aux_losses(args, args.num_layers, job.platform.device, interval.microbatches),
                     **metrics.extra_scalars()}
            load = expert_load.collect() if expert_load is not None else {}
            if step.loss is not None:
                print_rank_last(log_line(iteration, args, elapsed_ms, _learning_rate(job), interval.mean_loss(losses),
                                         step.grad_norm, interval.skipped, interval.nan, extra, report))
                metrics.write_scalars(writer, iteration, {
                    "throughput (tokens/s)": report.global_batch_size * args.seq_length / (elapsed_ms / 1000.0),
                    "elapsed time per iteration (ms)": elapsed_ms, "skipped iterations": interval.skipped,
                    "nan iterations": interval.nan, **extra})
                metrics.write_expert_load(writer, iteration, load)
            _report_memory(job, iteration)
            interval = LogInterval()
        if args.eval_iters and args.eval_interval and iteration % args.eval_interval == 0:
            with extras.validation():
                _validate(job, valid_ds, iteration, writer)
        stop = control.stop_reason(iteration, job.platform.device)
        if args.save and (stop or (args.save_interval and iteration % args.save_interval == 0)):
            _finish_param_gather(job)
            checkpointing.save_checkpoint(job, iteration, consumed_samples)
            saved_iteration = iteration
        if after_iteration is not None:
            after_iteration(iteration, history.read())
        if stop:
            if not args.save:
                _finish_param_gather(job)  # the save did it otherwise
            saved = f"saved iteration {iteration} to {args.save}" if args.save else f"stopped after iteration {iteration}"
            print_rank_0(f"> {stop}: {saved}; exiting")
            break
    else:
        _finish_param_gather(job)
        if args.save and saved_iteration != iteration and iteration > start_iteration:
            checkpointing.save_checkpoint(job, iteration, consumed_samples)
        if args.eval_iters:  # Megatron-LM validates once more when training ends (not when it exits early)
            with extras.validation():
                _validate(job, valid_ds, iteration, writer, final=True)
    extras.finish()
    if writer is not None:
        writer.close()
    return history.read()


def _learning_rate(job: TrainingJob) -> float:
    """The learning rate Megatron-LM logs: the default parameter group's (not --decoupled-lr's)."""
    return get_canonical_lr_for_logging(job.optimizer.param_groups)


def _step_report(job: TrainingJob, batches: GlobalBatches, consumed_samples: int, logs: bool) -> StepReport:
    """The iteration's batch, samples and loss scale; at log iterations the optional norms (collective).
    The loss scale is read only under --fp16: it is 1 otherwise, and a read waits for the device."""
    args = job.args
    return StepReport(
        global_batch_size=batches.global_batch_size, consumed_samples=consumed_samples,
        loss_scale=job.optimizer.get_loss_scale().item() if args.fp16 else 1.0,
        num_zeros_in_grad=job.num_zeros_in_grad,
        params_norm=metrics.params_norm(model_modules(job)) if args.log_params_norm and logs else None)


def _write_step_scalars(job: TrainingJob, writer, iteration: int, lm_loss: float, grad_norm, report: StepReport,
                        elapsed_ms: float) -> None:
    """Megatron-LM's scalars of a --tensorboard-log-interval iteration (TensorBoard and W&B)."""
    args = job.args
    scalars = {"lm loss": lm_loss, "learning-rate": _learning_rate(job), "batch-size": report.global_batch_size,
               "samples vs steps": report.consumed_samples,
               "grad-norm": grad_norm, "num-zeros": report.num_zeros_in_grad, "params-norm": report.params_norm}
    if args.log_loss_scale_to_tensorboard:
        scalars["loss-scale"] = report.loss_scale
    if args.log_world_size_to_tensorboard:
        scalars["world-size"] = args.world_size
    if args.log_timers_to_tensorboard:
        scalars["iteration-time"] = elapsed_ms / 1000.0
    if job.platform.is_cuda and args.log_memory_to_tensorboard:
        scalars.update(metrics.cuda_memory_scalars())
    if job.platform.is_cuda and args.log_device_memory_used:
        scalars["mem-device-used-bytes"] = torch.cuda.device_memory_used()
    metrics.write_scalars(writer, iteration, scalars)


def _report_memory(job: TrainingJob, iteration: int) -> None:
    """--log-memory-interval: Megatron-LM's memory line (CUDA)."""
    interval = job.args.log_memory_interval
    if job.platform.is_cuda and interval and iteration % interval == 0:
        mib = 1024 * 1024
        print_line(f"[Rank {dist.get_rank()}] (after {iteration} iterations) memory (MB) | allocated: "
                   f"{torch.cuda.memory_allocated() / mib} | max allocated: {torch.cuda.max_memory_allocated() / mib} | "
                   f"reserved: {torch.cuda.memory_reserved() / mib} | max reserved: "
                   f"{torch.cuda.max_memory_reserved() / mib}")


def _validate(job: TrainingJob, valid_ds, iteration: int, writer, final: bool = False) -> None:
    """Megatron-LM's validation: the periodic ones (every --eval-interval) and the final one after the last
    iteration, each on the next --eval-iters global batches of the validation split."""
    interval = job.args.eval_interval
    periodic_before = iteration // interval if interval else 0
    valid_loss = evaluate(job, valid_ds, periodic_before if final else periodic_before - 1)
    if valid_loss is None:
        return
    ppl = math.exp(min(20.0, valid_loss))
    where = f"iteration {iteration}{' on validation set' if final else ''}"
    print_rank_last(f" validation loss at {where} | lm loss value: {valid_loss:.6E} | lm loss PPL: {ppl:.6E} |")
    scalars = {"validation lm loss": valid_loss}
    if job.args.log_validation_ppl_to_tensorboard:
        scalars["validation lm loss PPL"] = ppl
    metrics.write_scalars(writer, iteration, scalars)


def pretrain(argv: Optional[List[str]] = None, args: Optional[RunConfig] = None) -> List[float]:
    """Runs the job; returns the lm loss of every iteration on the last rank (empty elsewhere)."""
    return train(setup(argv, args))
