"""Training data: megatron-core's GPTDataset through BlendedMegatronDatasetBuilder, and the batch order.

Batches are a pure function of the global sample index, so every layout reads the same global batch:
micro batch ``j`` of data-parallel rank ``d`` holds samples ``(j * dp + d) * mbs ...`` of the global batch,
as Megatron-LM's pretraining sampler lays them out.
"""

from __future__ import annotations

from typing import Dict, Iterator

import numpy
import torch

from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
from megatron.core.datasets.gpt_dataset import GPTDatasetConfig, MockGPTDataset


def build_tokenizer(args):
    from megatron.core.tokenizers.text.libraries.null_tokenizer import NullTokenizer

    return NullTokenizer(args.vocab_size)


def build_datasets(args, tokenizer):
    """(train, valid, test) datasets sized for the whole run."""
    config = GPTDatasetConfig(
        random_seed=args.seed,
        sequence_length=args.seq_length,
        tokenizer=tokenizer,
        reset_position_ids=False,
        reset_attention_mask=False,
        eod_mask_loss=False,
        create_attention_mask=False,
        split="969,30,1",
    )
    eval_runs = args.train_iters // args.eval_interval + 1
    sizes = [
        args.train_iters * args.global_batch_size,
        eval_runs * args.eval_iters * args.global_batch_size,
        args.eval_iters * args.global_batch_size,
    ]
    return BlendedMegatronDatasetBuilder(MockGPTDataset, sizes, lambda: True, config).build()


def micro_batches(dataset, args, first_sample: int, data_parallel_rank: int) -> Iterator[Dict[str, torch.Tensor]]:
    """This rank's micro batches, from global sample ``first_sample`` on."""
    step = args.micro_batch_size * args.data_parallel_size
    start = first_sample + data_parallel_rank * args.micro_batch_size
    while True:
        samples = [dataset[i] for i in range(start, start + args.micro_batch_size)]
        yield {key: torch.from_numpy(numpy.stack([s[key] for s in samples])) for key in samples[0]}
        start += step
