"""Parallelism flags: the tensor/context/pipeline/expert-parallel layout (virtual pipeline stages included)
and megatron-core's data-parallel gradient reduction and parameter gathering.

How the sizes map onto ranks is megatron-core's (``parallel_state.initialize_model_parallel``, order
``tp-cp-ep-dp-pp``): docs/parallelism.md draws it.
"""

from __future__ import annotations

import argparse
from typing import Any, Dict, Optional, Set

from megatron_moe.arguments.flags import RUN, FlagGroup, at_least, flag_name, require, warn
from megatron_moe.errors import ConfigError
from megatron_moe.arguments.moe import MOE_ONLY


def add_arguments(parser: argparse.ArgumentParser) -> None:
    g = FlagGroup(parser, "parallelism", RUN)
    g.add("--tensor-model-parallel-size", type=int, default=1, valid=at_least(1))
    g.add("--pipeline-model-parallel-size", type=int, default=1, valid=at_least(1))
    g.add("--expert-model-parallel-size", type=int, default=1, valid=at_least(1))
    g.add("--expert-tensor-parallel-size", type=int, default=None, valid=at_least(1), requires=MOE_ONLY,
          help="ranks each expert's weights are split over, independently of the attention's tensor "
               "parallelism (default: --tensor-model-parallel-size)")
    g.add("--context-parallel-size", type=int, default=1, valid=at_least(1), needs_transformer_engine=True,
          help="ranks each sequence is split over (Transformer Engine's attention exchanges keys and values "
               "between them; megatron-core's local attention has no context parallelism)")
    g.add("--sequence-parallel", action="store_true",
          help="split the sequence over the tensor-parallel ranks outside attention and MLP (off without tensor "
               "parallelism, as in Megatron-LM)")

    g = FlagGroup(parser, "uneven pipeline stages", RUN)
    g.add("--decoder-first-pipeline-num-layers", type=int, default=None, valid=at_least(1),
          help="transformer layers on the first pipeline stage (the others share the rest evenly)")
    g.add("--decoder-last-pipeline-num-layers", type=int, default=None, valid=at_least(1),
          help="transformer layers on the last pipeline stage (the others share the rest evenly)")
    g.add("--account-for-embedding-in-pipeline-split", action="store_true",
          help="count the embedding as a layer when splitting the layers over pipeline stages")
    g.add("--account-for-loss-in-pipeline-split", action="store_true",
          help="count the output layer and loss as a layer when splitting the layers over pipeline stages")

    g = FlagGroup(parser, "virtual pipeline parallelism", RUN)
    g.add("--num-layers-per-virtual-pipeline-stage", type=int, default=None, valid=at_least(1),
          help="interleaved 1F1B schedule: each pipeline rank holds several model chunks of this many layers")
    g.add("--num-virtual-stages-per-pipeline-rank", type=int, default=None, valid=at_least(1),
          help="interleaved 1F1B schedule: this many model chunks per pipeline rank")
    g.add("--no-overlap-p2p-communication", dest="overlap_p2p_comm", action="store_false",
          help="interleaved schedule: batched instead of overlapped pipeline send/receive (speed only, no "
               "effect without virtual stages; needs --pipeline-model-parallel-size > 2, as in Megatron-LM)")

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
    """The parallel layout on this many processes (megatron-core's rules); fills in the data-parallel and
    expert tensor-parallel sizes."""
    tp, pp, cp = c.tensor_model_parallel_size, c.pipeline_model_parallel_size, c.context_parallel_size
    ep, etp = c.expert_model_parallel_size, c.expert_tensor_parallel_size or tp
    require(c.world_size % (tp * cp * pp) == 0,
            f"world size {c.world_size} is not divisible by tensor x context x pipeline parallel = "
            f"{tp} x {cp} x {pp}; change the number of processes or the parallel sizes")
    require(c.world_size % (etp * ep * pp) == 0,
            f"world size {c.world_size} is not divisible by expert-tensor x expert-model x pipeline parallel = "
            f"{etp} x {ep} x {pp}; change the number of processes or --expert-model-parallel-size / "
            "--expert-tensor-parallel-size (the experts' ranks span tensor, context and data parallelism)")
    require(c.num_attention_heads % tp == 0,
            f"--num-attention-heads {c.num_attention_heads} is not divisible by --tensor-model-parallel-size {tp}")
    if c.sequence_parallel and tp == 1:
        warn("--sequence-parallel with --tensor-model-parallel-size 1 is turned off, as Megatron-LM does: there "
             "are no tensor-parallel ranks to split the sequence over")
    if c.sequence_parallel and tp > 1:
        require(c.seq_length % tp == 0,
                f"--seq-length {c.seq_length} is not divisible by --tensor-model-parallel-size {tp} "
                "(sequence parallelism splits the sequence)")
    if cp > 1:
        require(c.seq_length % (2 * cp) == 0,
                f"--seq-length {c.seq_length} must be a multiple of 2 x --context-parallel-size {cp} (each "
                "context-parallel rank holds two chunks of every sequence, as in Megatron-LM)")
    return {"data_parallel_size": c.world_size // (tp * cp * pp), "expert_tensor_parallel_size": etp,
            "sequence_parallel": c.sequence_parallel and tp > 1}


def validate_pipeline(c) -> Dict[str, Any]:
    """Layers per pipeline stage (even, uneven first/last stages, or the embedding and loss counted as layers)
    and, with virtual stages, Megatron-LM's interleaved-schedule rules; fills in the number of model chunks
    per pipeline rank (None without virtual stages)."""
    pp = c.pipeline_model_parallel_size
    per_virtual_stage, virtual_stages = c.num_layers_per_virtual_pipeline_stage, c.num_virtual_stages_per_pipeline_rank
    require(per_virtual_stage is None or virtual_stages is None,
            "give one of --num-layers-per-virtual-pipeline-stage and --num-virtual-stages-per-pipeline-rank")
    stages = _layers_per_stage(c)
    if per_virtual_stage is not None:
        require(c.decoder_first_pipeline_num_layers is None and c.decoder_last_pipeline_num_layers is None,
                "with --decoder-first/last-pipeline-num-layers give --num-virtual-stages-per-pipeline-rank, not "
                "--num-layers-per-virtual-pipeline-stage (Megatron-LM)")
        per_stage = stages["a"]
        require(per_stage % per_virtual_stage == 0,
                f"--num-layers-per-virtual-pipeline-stage {per_virtual_stage} must divide the {per_stage} layers "
                "of a pipeline stage")
        virtual_stages = per_stage // per_virtual_stage
    vpp = virtual_stages if virtual_stages is not None and virtual_stages > 1 else None
    if vpp is None:
        return {"virtual_pipeline_model_parallel_size": None}
    for stage, layers in stages.items():
        require(layers % vpp == 0, f"--num-virtual-stages-per-pipeline-rank {vpp} must divide the {layers} layers "
                                   f"of {stage} pipeline stage")
    require(pp > (1 if c.overlap_p2p_comm else 2),
            f"virtual pipeline stages need --pipeline-model-parallel-size > {1 if c.overlap_p2p_comm else 2}"
            f"{'' if c.overlap_p2p_comm else ' with --no-overlap-p2p-communication'}, got {pp} (Megatron-LM)")
    microbatches = _microbatches(c)
    require(microbatches is None or microbatches % pp == 0,
            f"the interleaved schedule runs micro batches in groups of --pipeline-model-parallel-size {pp}: "
            f"{microbatches} micro batches per step (global batch / (micro batch x data parallel)) is not a "
            "multiple; change --global-batch-size or --micro-batch-size")
    return {"virtual_pipeline_model_parallel_size": vpp}


def _layers_per_stage(c) -> Dict[str, int]:
    """Transformer layers per pipeline stage, by stage ("a": every stage; with uneven stages "the first",
    "the last" and "another", those there are), with Megatron-LM's and megatron-core's rules. The embedding
    and the loss count as a layer each when the flags say so."""
    pp, layers = c.pipeline_model_parallel_size, c.num_layers
    given = {stage: getattr(c, f"decoder_{stage}_pipeline_num_layers") for stage in ("first", "last")}
    given = {stage: n for stage, n in given.items() if n is not None}
    counted = [flag for flag in ("account_for_embedding_in_pipeline_split", "account_for_loss_in_pipeline_split")
               if getattr(c, flag)]
    for flag in [f"decoder_{stage}_pipeline_num_layers" for stage in given] + counted:
        require(pp > 1, f"{flag_name(flag)} needs --pipeline-model-parallel-size > 1")
    if given:
        if counted:
            raise ConfigError(f"--decoder-{next(iter(given))}-pipeline-num-layers and {flag_name(counted[0])} "
                              "exclude each other (megatron-core); give one way of splitting the layers")
        middle_stages, middle_layers = pp - len(given), layers - sum(given.values())
        require(middle_layers >= 0 and (middle_layers == 0) == (middle_stages == 0)
                and (middle_stages == 0 or middle_layers % middle_stages == 0),
                f"--num-layers {layers} less the first/last pipeline stage's layers leaves {middle_layers} for "
                f"{middle_stages} other stages: they must share them evenly")
        stages = {f"the {stage}": n for stage, n in given.items()}
        if middle_stages:
            stages["another"] = middle_layers // middle_stages
        return stages
    total = layers + len(counted)
    require(total % pp == 0,
            f"--num-layers {layers}{' + 1' * len(counted)} (the embedding/loss counted as layers) is not divisible "
            f"by --pipeline-model-parallel-size {pp}" if counted else
            f"--num-layers {layers} is not divisible by --pipeline-model-parallel-size {pp}")
    return {"a": total // pp}


def model_chunk_layers(c) -> Set[int]:
    """The numbers of transformer layers this layout's model chunks hold (a chunk: a pipeline stage, or with
    virtual stages a virtual one), as megatron-core builds them; needs the pipeline check's values."""
    vpp = c.virtual_pipeline_model_parallel_size or 1
    sizes = {layers // vpp for layers in _layers_per_stage(c).values()}
    if c.account_for_embedding_in_pipeline_split or c.account_for_loss_in_pipeline_split:
        # the first and last chunks hold one layer fewer for each piece counted as a layer
        (size,) = sizes
        sizes |= {size - c.account_for_embedding_in_pipeline_split, size - c.account_for_loss_in_pipeline_split}
    return sizes


def _microbatches(c) -> Optional[int]:
    """Micro batches per step, when the batch flags make it whole (the training area checks them)."""
    per_step = c.micro_batch_size * c.data_parallel_size
    batch = c.global_batch_size or per_step
    return batch // per_step if batch % per_step == 0 else None


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


CHECKS = (validate_layout, validate_pipeline, validate_data_parallel)
