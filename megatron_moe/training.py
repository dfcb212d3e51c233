"""The training job: set up megatron-core's pieces from the command line, then loop.

Everything here is megatron-core's: DDP, the optimizer, the LR scheduler and the (pipeline) schedule from
``get_forward_backward_func``. This module only wires them together and prints Megatron's log lines.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from functools import partial
from typing import Dict, Iterator, List, Optional

import torch
import torch.distributed as dist

from megatron.core import parallel_state, tensor_parallel
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
from megatron.core.pipeline_parallel import get_forward_backward_func

from megatron_moe import data
from megatron_moe.arguments import padded_vocab_size, parse_args, transformer_config_from_args
from megatron_moe.model import build_model
from megatron_moe.platform import Platform, init_distributed, select_platform


@dataclass
class TrainingJob:
    args: object
    platform: Platform
    config: object
    model: DistributedDataParallel
    optimizer: object
    scheduler: OptimizerParamScheduler


def print_rank_last(message: str) -> None:
    """Megatron prints from the last rank: the one that sees the loss under pipeline parallelism."""
    if dist.get_rank() == dist.get_world_size() - 1:
        print(message, flush=True)


def print_rank_0(message: str) -> None:
    if dist.get_rank() == 0:
        print(message, flush=True)


def _set_seeds(seed: int) -> None:
    # Megatron-LM's scheme: a different stream per pipeline stage, model-parallel RNG tracker on top.
    torch.manual_seed(seed + 100 * parallel_state.get_pipeline_model_parallel_rank())
    tensor_parallel.model_parallel_cuda_manual_seed(seed)


def setup(argv: Optional[List[str]] = None) -> TrainingJob:
    """Parse, validate, join the process group, build model + DDP + optimizer + scheduler."""
    import os

    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    args = parse_args(argv, world_size=world_size)  # errors surface before any process group exists
    platform = select_platform(args.device)
    args.transformer_impl = args.transformer_impl or ("transformer_engine" if platform.is_cuda else "local")
    init_distributed(platform)
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=args.tensor_model_parallel_size,
        pipeline_model_parallel_size=args.pipeline_model_parallel_size,
        expert_model_parallel_size=args.expert_model_parallel_size,
        expert_tensor_parallel_size=args.tensor_model_parallel_size,
    )
    _set_seeds(args.seed)
    args.tokenizer = data.build_tokenizer(args)
    args.padded_vocab_size = padded_vocab_size(args.tokenizer.vocab_size, args)

    config = transformer_config_from_args(args)
    model = build_model(config, args).to(platform.device)
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=False,
        use_distributed_optimizer=args.use_distributed_optimizer,
    )
    model = DistributedDataParallel(config=config, ddp_config=ddp_config, module=model)
    # Without these, megatron-core silently skips the data-parallel gradient all-reduce.
    config.finalize_model_grads_func = finalize_model_grads
    config.no_sync_func = model.no_sync

    optimizer = get_megatron_optimizer(
        OptimizerConfig(
            optimizer="adam",
            lr=args.lr,
            min_lr=args.min_lr,
            weight_decay=args.weight_decay,
            adam_beta1=args.adam_beta1,
            adam_beta2=args.adam_beta2,
            adam_eps=args.adam_eps,
            clip_grad=args.clip_grad,
            bf16=args.bf16,
            params_dtype=config.params_dtype,
            use_distributed_optimizer=args.use_distributed_optimizer,
        ),
        [model],
    )
    # megatron-core's scheduler counts samples, as Megatron-LM's does.
    decay_samples = (args.lr_decay_iters or args.train_iters) * args.global_batch_size
    scheduler = OptimizerParamScheduler(
        optimizer,
        init_lr=0.0,
        max_lr=args.lr,
        min_lr=args.min_lr,
        lr_warmup_steps=args.lr_warmup_iters * args.global_batch_size,
        lr_decay_steps=decay_samples,
        lr_decay_style=args.lr_decay_style,
        start_wd=args.weight_decay,
        end_wd=args.weight_decay,
        wd_incr_steps=decay_samples,
        wd_incr_style="constant",
    )
    return TrainingJob(args, platform, config, model, optimizer, scheduler)


def _loss_func(loss_mask: torch.Tensor, per_token_loss: torch.Tensor):
    loss_mask = loss_mask.reshape(-1).float()
    loss = torch.sum(per_token_loss.reshape(-1).float() * loss_mask) / loss_mask.sum().clamp(min=1)
    # clone: the schedule divides the returned loss in place by the number of micro batches
    return loss, {"lm loss": loss.detach().clone()}


def _forward_step(device: torch.device, data_iterator: Iterator[Dict[str, torch.Tensor]], model):
    batch = {key: value.to(device) for key, value in next(data_iterator).items()}
    output = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"])
    return output, partial(_loss_func, batch["loss_mask"])


def _mean_over_data_parallel(values: List[torch.Tensor]) -> Optional[float]:
    """Mean of the micro-batch losses over the whole global batch (last pipeline stage only)."""
    if not values:
        return None
    total = torch.stack(values).mean()
    group = parallel_state.get_data_parallel_group()
    dist.all_reduce(total, group=group)
    return total.item() / dist.get_world_size(group)


def run_micro_batches(job: TrainingJob, micro_batch_iter, forward_only: bool) -> Optional[float]:
    args = job.args
    losses = get_forward_backward_func()(
        forward_step_func=partial(_forward_step, job.platform.device),
        data_iterator=micro_batch_iter,
        model=[job.model],
        num_microbatches=args.num_microbatches,
        seq_length=args.seq_length,
        micro_batch_size=args.micro_batch_size,
        forward_only=forward_only,
    )
    return _mean_over_data_parallel([item["lm loss"] for item in losses])


def train_step(job: TrainingJob, micro_batch_iter):
    job.model.zero_grad_buffer()
    job.optimizer.zero_grad()
    lm_loss = run_micro_batches(job, micro_batch_iter, forward_only=False)
    update_successful, grad_norm, _ = job.optimizer.step()
    if update_successful:
        job.scheduler.step(increment=job.args.global_batch_size)
    return lm_loss, grad_norm, update_successful


def evaluate(job: TrainingJob, dataset, eval_index: int) -> Optional[float]:
    args = job.args
    job.model.eval()
    first = eval_index * args.eval_iters * args.global_batch_size
    iterator = data.micro_batches(dataset, args, first, parallel_state.get_data_parallel_rank())
    with torch.no_grad():
        losses = [run_micro_batches(job, iterator, forward_only=True) for _ in range(args.eval_iters)]
    job.model.train()
    return None if losses[0] is None else sum(losses) / len(losses)


def log_line(iteration: int, args, elapsed_ms: float, lr: float, lm_loss: float, grad_norm, skipped: int) -> str:
    """Megatron-LM's training log line."""
    tokens_per_s = args.global_batch_size * args.seq_length / (elapsed_ms / 1000.0)
    grad_norm_text = f"{grad_norm:.3f}" if grad_norm is not None else "nan"
    return (
        f" iteration {iteration:8d}/{args.train_iters:8d} |"
        f" consumed samples: {iteration * args.global_batch_size:12d} |"
        f" elapsed time per iteration (ms): {elapsed_ms:.1f} |"
        f" throughput (tokens/s): {tokens_per_s:.1f} |"
        f" learning rate: {lr:.6E} |"
        f" global batch size: {args.global_batch_size:5d} |"
        f" lm loss: {lm_loss:.6E} |"
        f" grad norm: {grad_norm_text} |"
        f" number of skipped iterations: {skipped:3d} |"
    )


def pretrain(argv: Optional[List[str]] = None) -> List[float]:
    """Runs the job; returns the lm loss of every iteration on the last rank (empty elsewhere)."""
    job = setup(argv)
    args = job.args
    train_ds, valid_ds, _ = data.build_datasets(args, args.tokenizer)
    iterator = data.micro_batches(train_ds, args, 0, parallel_state.get_data_parallel_rank())
    print_rank_0(f"> training {args.train_iters} iterations on {dist.get_world_size()} processes "
                 f"({job.platform.device.type}/{job.platform.backend}): TP={args.tensor_model_parallel_size} "
                 f"PP={args.pipeline_model_parallel_size} EP={args.expert_model_parallel_size} "
                 f"DP={args.data_parallel_size}")
    losses, skipped = [], 0
    for iteration in range(1, args.train_iters + 1):
        start = time.perf_counter()
        lm_loss, grad_norm, ok = train_step(job, iterator)
        skipped += 0 if ok else 1
        elapsed_ms = (time.perf_counter() - start) * 1000.0
        if lm_loss is not None:
            losses.append(lm_loss)
            if iteration % args.log_interval == 0:
                lr = job.optimizer.param_groups[0]["lr"]
                print_rank_last(log_line(iteration, args, elapsed_ms, lr, lm_loss, grad_norm, skipped))
        if args.eval_interval and iteration % args.eval_interval == 0:
            valid_loss = evaluate(job, valid_ds, iteration // args.eval_interval - 1)
            if valid_loss is not None:
                print_rank_last(f" validation loss at iteration {iteration} | lm loss value: {valid_loss:.6E} |"
                                f" lm loss PPL: {torch.exp(torch.tensor(valid_loss)).item():.6E} |")
    return losses
