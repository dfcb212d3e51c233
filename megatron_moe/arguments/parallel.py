"""Parallelism flags: the tensor/pipeline/expert-parallel layout and megatron-core's data-parallel gradient
reduction and parameter gathering."""

from __future__ import annotations

import argparse
from typing import Any, Dict

from megatron_moe.arguments.flags import RUN, FlagGroup, at_least, require


def add_arguments(parser: argparse.ArgumentParser) -> None:
    g = FlagGroup(parser, "parallelism", RUN)
    g.add("--tensor-model-parallel-size", type=int, default=1, valid=at_least(1))
    g.add("--pipeline-model-parallel-size", type=int, default=1, valid=at_least(1))
    g.add("--expert-model-parallel-size", type=int, default=1, valid=at_least(1))
    g.add("--sequence-parallel", action="store_true")

    g = FlagGroup(parser, "data parallelism", RUN)
    g.add("--use-distributed-optimizer", action="store_true")
    g.add("--overlap-grad-reduce", action="store_true",
          help="data-parallel gradient reduction in buckets, launched during the backward pass")
    g.add("--overlap-param-gather", action="store_true",
          help="distributed optimizer: all-gather updated parameters bucket by bucket during the next "
               "forward pass (needs --use-distributed-optimizer and --overlap-grad-reduce)")
    g.add("--ddp-bucket-size", type=int, default=None, valid=at_least(1),
          help="parameters per gradient-reduction bucket with --overlap-grad-reduce "
               "(default: max(40M, 1M x data-parallel size))")
    g.add("--accumulate-allreduce-grads-in-fp32", action="store_true",
          help="accumulate and all-reduce gradients in fp32: the default with --bf16, as in Megatron-LM "
               "(fp32 runs do it anyway)")
    g.add("--grad-reduce-in-bf16", action="store_true",
          help="--bf16: accumulate and reduce gradients in bf16 (half the gradient memory and traffic)")


def validate_layout(c) -> Dict[str, Any]:
    """The parallel layout on this many processes; fills in the data-parallel size."""
    tp, pp, ep = c.tensor_model_parallel_size, c.pipeline_model_parallel_size, c.expert_model_parallel_size
    require(c.world_size % (tp * pp) == 0,
            f"world size {c.world_size} is not divisible by tensor x pipeline parallel = {tp} x {pp}; "
            "change the number of processes or the parallel sizes")
    data_parallel_size = c.world_size // (tp * pp)
    require(data_parallel_size % ep == 0,
            f"--expert-model-parallel-size {ep} must divide the data-parallel size {data_parallel_size} "
            "(world size / (tensor x pipeline)); experts are sharded across data-parallel ranks")
    require(c.num_layers % pp == 0,
            f"--num-layers {c.num_layers} is not divisible by --pipeline-model-parallel-size {pp}")
    require(c.num_attention_heads % tp == 0,
            f"--num-attention-heads {c.num_attention_heads} is not divisible by --tensor-model-parallel-size {tp}")
    if c.sequence_parallel and tp > 1:
        require(c.seq_length % tp == 0,
                f"--seq-length {c.seq_length} is not divisible by --tensor-model-parallel-size {tp} "
                "(sequence parallelism splits the sequence)")
    return {"data_parallel_size": data_parallel_size, "sequence_parallel": c.sequence_parallel and tp > 1}


def validate_data_parallel(c) -> Dict[str, Any]:
    """Gradient reduction and parameter gathering (megatron-core DistributedDataParallelConfig)."""
    if c.overlap_param_gather:
        require(c.use_distributed_optimizer,
                "--overlap-param-gather needs --use-distributed-optimizer (it gathers the optimizer's shards)")
        require(c.overlap_grad_reduce, "--overlap-param-gather needs --overlap-grad-reduce (as in Megatron-LM)")
    require(c.ddp_bucket_size is None or c.overlap_grad_reduce,
            "--ddp-bucket-size needs --overlap-grad-reduce (without it gradients are reduced in one bucket)")
    require(not (c.grad_reduce_in_bf16 and c.accumulate_allreduce_grads_in_fp32),
            "--grad-reduce-in-bf16 and --accumulate-allreduce-grads-in-fp32 exclude each other; give one")
    require(c.bf16 or not c.grad_reduce_in_bf16, "--grad-reduce-in-bf16 needs --bf16")
    # Megatron-LM: fp32 accumulation and reduction is the default with --bf16; fp32 gradients are fp32 anyway.
    return {"accumulate_allreduce_grads_in_fp32": not c.grad_reduce_in_bf16}


CHECKS = (validate_layout, validate_data_parallel)
