"""Training data: megatron-core's GPTDataset through BlendedMegatronDatasetBuilder, and the batch order.

``--data-path`` takes Megatron-LM's forms: one prefix, several prefixes (weighted by size), or a weighted
blend ``0.3 PREFIX_A 0.7 PREFIX_B``; ``--split`` divides every dataset into train/valid/test documents;
``--data-cache-path`` is where the sample-index caches go (default: next to the data). ``--mock-data``
gives megatron-core's synthetic MockGPTDataset. ``check_datasets`` runs at start, on every rank: a
truncated or mismatched .bin/.idx pair, or a token id beyond the vocabulary, is one line before the
first step instead of a crash inside it.

Batches are a pure function of the global sample index, so every layout reads the same global batch:
micro batch ``j`` of data-parallel rank ``d`` holds samples ``(j * dp + d) * mbs ...`` of the global batch,
as Megatron-LM's pretraining sampler lays them out. Resuming at ``consumed_samples`` therefore continues
exactly where the interrupted run stopped.
"""

from __future__ import annotations

import os
from typing import Dict, Iterator, List

import numpy
import torch

from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig, MockGPTDataset
from megatron.core.datasets.utils import get_blend_from_list

from megatron_moe.errors import ConfigError
from megatron_moe.preprocessing.dataset_stats import DatasetError, check_dataset
from megatron_moe.preprocessing.indexed_writer import read_index


def parse_blend(data_path: List[str]):
    """Megatron's blend (prefixes, weights or None) from ``--data-path``; checks every prefix exists."""
    try:
        prefixes, weights = get_blend_from_list(list(data_path))
    except Exception as error:
        raise ConfigError(f"--data-path {' '.join(data_path)}: expected 'PREFIX ...' or "
                          f"'WEIGHT PREFIX WEIGHT PREFIX ...' ({error})") from error
    for prefix in prefixes:
        missing = [ext for ext in (".bin", ".idx") if not os.path.isfile(prefix + ext)]
        if missing:
            raise ConfigError(f"--data-path: {prefix}{' and '.join(missing)} not found; give the prefix that "
                              "tools/preprocess_data.py wrote (without .bin/.idx)")
        if os.path.getsize(prefix + ".bin") == 0:
            raise ConfigError(f"--data-path: {prefix} is an empty dataset (no tokens); preprocess some text "
                              "into it or leave it out")
    return prefixes, weights


def check_datasets(args, vocab_size: int) -> None:
    """Every ``--data-path`` dataset's .bin holds what its .idx describes, and its token ids are below
    ``vocab_size``; else a ConfigError naming the file. Reads the indexes and each dataset's recorded
    largest token id (a scan of the .bin for datasets without one)."""
    if args.mock_data:
        return
    prefixes, _ = parse_blend(args.data_path)
    for prefix in prefixes:
        try:
            check_dataset(prefix, vocab_size)
        except DatasetError as error:
            raise ConfigError(f"--data-path: {error}") from None


def _dataset_sizes(args) -> List[int]:
    """Samples each split must provide for the whole run (train, every validation, test)."""
    eval_runs = (args.train_iters // args.eval_interval if args.eval_interval else 0) + 1  # and the final one
    return [
        args.train_iters * args.global_batch_size,
        eval_runs * args.eval_iters * args.global_batch_size,
        args.eval_iters * args.global_batch_size,
    ]


def _check_split_ranges(prefixes: List[str], split_matrix, sizes: List[int], split: str) -> None:
    """Every split that must give samples gets at least one sequence of every dataset: megatron-core
    loops forever counting the epochs of a split without tokens."""
    for prefix in prefixes:
        sequences = len(read_index(prefix + ".idx").sequence_lengths)
        for name, bounds, size in zip(("train", "validation", "test"), split_matrix, sizes):
            # megatron-core's rounding (BlendedMegatronDatasetBuilder._build_megatron_dataset_splits)
            if size and bounds is not None and \
                    int(round(bounds[0] * float(sequences))) == int(round(bounds[1] * float(sequences))):
                raise ConfigError(f"--split {split}: the {name} split of {prefix} gets none of its {sequences} "
                                  f"sequences, yet {size} {name} samples are needed; give that split a larger "
                                  "share or use more data")


def build_datasets(args, tokenizer):
    """(train, valid, test) datasets sized for the whole run; a missing or empty dataset is a ConfigError."""
    blend = None if args.mock_data else parse_blend(args.data_path)
    config = GPTDatasetConfig(
        random_seed=args.seed,
        sequence_length=args.seq_length,
        tokenizer=tokenizer,
        blend=blend,
        split=args.split,
        path_to_cache=args.data_cache_path,
        reset_position_ids=False,
        reset_attention_mask=False,
        eod_mask_loss=False,
        create_attention_mask=False,
        mmap_bin_files=True,
    )
    dataset_class = MockGPTDataset if args.mock_data else GPTDataset
    if blend is not None:
        _check_split_ranges(blend[0], config.split_matrix, _dataset_sizes(args), args.split)
    try:
        datasets = BlendedMegatronDatasetBuilder(dataset_class, _dataset_sizes(args), lambda: True, config).build()
    except (AssertionError, ValueError, IndexError) as error:
        raise ConfigError(f"--data-path {' '.join(args.data_path or [])}: cannot build the datasets "
                          f"({error or type(error).__name__}); is a dataset empty or --split too small?") from error
    train = datasets[0]
    if train is None or len(train) == 0:
        raise ConfigError(f"--data-path {' '.join(args.data_path or [])} gives no training samples with "
                          f"--split {args.split} and --seq-length {args.seq_length}; use more data")
    return datasets


def micro_batches(dataset, args, first_sample: int, data_parallel_rank: int) -> Iterator[Dict[str, torch.Tensor]]:
    """This rank's micro batches, from global sample ``first_sample`` on."""
    step = args.micro_batch_size * args.data_parallel_size
    start = first_sample + data_parallel_rank * args.micro_batch_size
    while True:
        samples = [dataset[i] for i in range(start, start + args.micro_batch_size)]
        yield {key: torch.from_numpy(numpy.stack([s[key] for s in samples])) for key in samples[0]}
        start += step
