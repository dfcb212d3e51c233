"""Training data: megatron-core's GPTDataset through BlendedMegatronDatasetBuilder, and the batch order.

``--data-path`` takes Megatron-LM's forms: one prefix, several prefixes (weighted by size), or a weighted
blend ``0.3 PREFIX_A 0.7 PREFIX_B``; ``--split`` divides every dataset into train/valid/test documents;
``--data-cache-path`` is where the sample-index caches go (default: next to the data; built in memory on
every rank, at every start, when the data's folder is read-only and no cache path is given). ``--mock-data``
gives megatron-core's synthetic MockGPTDataset. ``check_datasets`` runs at start, once per node: a
truncated or mismatched .bin/.idx pair, or a token id beyond the vocabulary, is one line on every rank
before the first step instead of a crash inside it.

Batches are a pure function of the global sample index, so every layout reads the same global batch:
micro batch ``j`` of data-parallel rank ``d`` holds samples ``(j * dp + d) * mbs ...`` of the global batch,
as Megatron-LM's pretraining sampler lays them out. Resuming at ``consumed_samples`` therefore continues
exactly where the interrupted run stopped, and a global batch that grows (``--rampup-batch-size``) takes the
next micro batches of the same sequence. ``--num-workers`` loader processes read the samples ahead of the
training process (torch's DataLoader, in order), as Megatron-LM's data loader does.

The samples are megatron-core's, with Megatron-LM's options: ``--reset-position-ids``, ``--eod-mask-loss``,
``--no-mmap-bin-files``, ``--allow-ambiguous-pad-tokens``. The loader never builds attention masks: the model
masks causally by itself (``--no-create-attention-mask-in-dataloader`` is therefore always the case).
"""

from __future__ import annotations

import os
import tempfile
from typing import Dict, Iterator, List, Optional

import numpy
import torch
import torch.distributed as dist

from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig, MockGPTDataset
from megatron.core.datasets.utils import get_blend_from_list

from megatron_moe.errors import ConfigError
from megatron_moe.preprocessing.dataset_stats import DatasetCheck, DatasetError, check_dataset
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
    ``vocab_size``; else a ConfigError naming the file, on every rank. Collective (call it on every rank).

    One rank per node checks (local rank 0; every rank where the launcher sets no LOCAL_RANK): it reads the
    indexes and each dataset's recorded largest token id, scanning the .bin of a dataset without one and
    recording the result (beside the data, else in ``--data-cache-path``, else nowhere: see
    preprocessing/dataset_stats.py). The other ranks wait for the answers, gathered from every node, so a
    bad dataset stops every rank with the same line."""
    if args.mock_data:
        return
    outcome = _check_on_this_node(args, vocab_size) if _checks_for_its_node() else None
    outcomes = [outcome]
    if dist.is_initialized() and dist.get_world_size() > 1:
        outcomes = [None] * dist.get_world_size()
        dist.all_gather_object(outcomes, outcome)
    problems = [o["problem"] for o in outcomes if o is not None and o["problem"] is not None]
    if problems:
        raise ConfigError(problems[0])
    if outcome is not None and (not dist.is_initialized() or dist.get_rank() == 0):
        for note in outcome["notes"]:
            print(note, flush=True)


def _checks_for_its_node() -> bool:
    return os.environ.get("LOCAL_RANK", "0") == "0"


def _check_on_this_node(args, vocab_size: int) -> Dict[str, object]:
    """{"problem": one line or None, "notes": lines for the log}. Never raises a user error: the other
    ranks wait for this answer."""
    try:
        _check_cache_dir(args.data_cache_path)
        prefixes, _ = parse_blend(args.data_path)
        checks = []
        for prefix in prefixes:
            try:
                checks.append((prefix, check_dataset(prefix, vocab_size, args.data_cache_path)))
            except DatasetError as error:
                raise ConfigError(f"--data-path: {error}") from None
            except OSError as error:
                raise ConfigError(f"--data-path: cannot read {error.filename or prefix} ({error.strerror or error}); "
                                  "give this job read access to the dataset") from None
    except ConfigError as error:
        return {"problem": str(error), "notes": []}
    return {"problem": None, "notes": [note for prefix, check in checks
                                       if (note := _scan_note(prefix, check, args.data_cache_path)) is not None]}


def _scan_note(prefix: str, check: DatasetCheck, cache_dir: Optional[str]) -> Optional[str]:
    """A log line for a dataset whose .bin was scanned: where the result went."""
    if check.scan_seconds is None:
        return None
    scanned = f"> {prefix}.bin scanned for its largest token id ({check.largest}) in {check.scan_seconds:.1f} s"
    if check.recorded_at is not None:
        return f"{scanned}; recorded in {check.recorded_at}"
    where = "nor is --data-cache-path" if cache_dir is not None else "and no --data-cache-path is given"
    return (f"{scanned}; its folder is not writable {where}: the next start scans it again "
            "(pass a writable --data-cache-path to keep the result)")


def _check_cache_dir(cache_dir: Optional[str]) -> None:
    """``--data-cache-path`` exists (created if need be) and is writable."""
    if cache_dir is None:
        return
    try:
        os.makedirs(cache_dir, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=cache_dir, prefix=".write-probe-"):
            pass
    except OSError as error:
        raise ConfigError(f"--data-cache-path {cache_dir}: not writable ({error.strerror or error}); give a "
                          "folder this job can write, or leave it out") from error


def _writable_folder(path: str) -> bool:
    """Whether ``path`` can be created (its nearest existing ancestor is writable) or, existing, written."""
    probe = path
    while not os.path.exists(probe):
        probe = os.path.dirname(probe) or "."
    try:
        with tempfile.NamedTemporaryFile(dir=probe, prefix=".write-probe-"):
            return True
    except OSError:
        return False


def _sample_index_cache(args, prefixes: List[str]) -> Optional[str]:
    """Where megatron-core keeps the sample indices: --data-cache-path; else its default beside each dataset
    (PREFIX/cache/GPTDataset_indices: None) when that can be written; else "", which makes it build them in
    memory on every rank (rank 0 decides, every rank follows: rank 0 writes the files the others read)."""
    if args.data_cache_path is not None:
        return args.data_cache_path
    answer = [None]
    if not dist.is_initialized() or dist.get_rank() == 0:
        answer[0] = all(_writable_folder(os.path.join(prefix, "cache", "GPTDataset_indices")) for prefix in prefixes)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.broadcast_object_list(answer, src=0)
    if answer[0]:
        return None
    if not dist.is_initialized() or dist.get_rank() == 0:
        print("> the data's folder is read-only and no --data-cache-path is given: the sample indices are built "
              "in memory at every start", flush=True)
    return ""


def _dataset_sizes(args) -> List[int]:
    """Samples each split must provide for the whole run (train, every validation, test), as Megatron-LM's
    get_train_valid_test_num_samples counts them."""
    eval_runs = (args.train_iters // args.eval_interval if args.eval_interval else 0) + 1  # and the final one
    return [
        args.train_samples or args.train_iters * args.global_batch_size,
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
        path_to_cache=args.data_cache_path if blend is None else _sample_index_cache(args, blend[0]),
        reset_position_ids=args.reset_position_ids,
        reset_attention_mask=False,
        eod_mask_loss=args.eod_mask_loss,
        create_attention_mask=False,
        mmap_bin_files=args.mmap_bin_files,
        allow_ambiguous_pad_tokens=args.allow_ambiguous_pad_tokens,
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


def micro_batches(dataset, args, first_sample: int, data_parallel_rank: int,
                  num_workers: int = 0) -> Iterator[Dict[str, torch.Tensor]]:
    """This rank's micro batches, from global sample ``first_sample`` on, read by ``num_workers`` loader
    processes (0: by this one)."""
    indices = _rank_sample_indices(args, first_sample, data_parallel_rank)
    if num_workers == 0:
        for batch in indices:
            yield _collate([dataset[i] for i in batch])
        return
    yield from torch.utils.data.DataLoader(dataset, batch_sampler=indices, num_workers=num_workers,
                                           collate_fn=_collate, pin_memory=torch.cuda.is_available())


def _rank_sample_indices(args, first_sample: int, data_parallel_rank: int) -> Iterator[List[int]]:
    """The global sample indices of this rank's micro batches (Megatron-LM's MegatronPretrainingSampler)."""
    step = args.micro_batch_size * args.data_parallel_size
    start = first_sample + data_parallel_rank * args.micro_batch_size
    while True:
        yield list(range(start, start + args.micro_batch_size))
        start += step


def _collate(samples) -> Dict[str, torch.Tensor]:
    return {key: torch.from_numpy(numpy.stack([s[key] for s in samples])) for key in samples[0]}
