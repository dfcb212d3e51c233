"""Is a dataset whole, and what is its largest token id? Checked before training reads it.

Training needs two facts about every .bin/.idx pair before its first step: the .bin holds exactly
the tokens its .idx describes (else a read deep inside iteration 1 fails), and no token id reaches
the vocabulary (else the embedding fails: IndexError on CPU, a device-side assert on CUDA).

The size check reads only the .idx. The largest id is the one our tools record beside the dataset
(stats_sidecar.py); for any other dataset (e.g. one written by Megatron-LM's tool, or copied
without its times) the .bin is scanned in chunks of a memory map -- 6 to 25 GB/s from the page
cache, disk speed otherwise (benchmarks/dataset_check.py) -- and the result recorded beside the data
when its folder is writable (as megatron-core writes its index caches), else in the cache folder
training is given (``--data-cache-path``), else nowhere: the next start scans again. The whole .bin
is read: a sample could miss the one id that breaks the embedding. Training runs this once per node
(megatron_moe/data.py).
"""

import os
import time
from typing import NamedTuple, Optional

import numpy as np

from .indexed_writer import IndexArrays, read_index
from .stats_sidecar import record_max_token_id, recorded_max_token_id

_SCAN_ELEMENTS = 1 << 24  # tokens per chunk of the scan: memory stays small whatever the corpus
NO_TOKENS = -1  # the largest token id of a dataset without tokens


class DatasetError(ValueError):
    """A dataset file that training cannot use; the message is one line naming the file."""


def check_sizes(prefix: str) -> IndexArrays:
    """The index of PREFIX.idx, once its .bin is known to hold exactly the tokens it describes."""
    idx_path, bin_path = prefix + ".idx", prefix + ".bin"
    try:
        index = read_index(idx_path)
    except ValueError as error:
        raise DatasetError(f"{error}; write the dataset again (tools/preprocess_data.py)") from None
    sequences = len(index.sequence_lengths)
    documents = index.document_indices
    if len(documents) == 0 or documents[0] != 0 or documents[-1] != sequences:
        raise DatasetError(f"{idx_path} is damaged: its document index does not span its {sequences} "
                           "sequences; write the dataset again (tools/preprocess_data.py)")
    tokens = int(index.sequence_lengths.sum(dtype=np.int64))
    expected, size = tokens * index.dtype.itemsize, os.path.getsize(bin_path)
    if size != expected:
        raise DatasetError(f"{bin_path} has {size} bytes but {idx_path} describes {expected} ({tokens} "
                           f"{index.dtype.name} tokens): the pair is truncated or from different runs; "
                           "write the dataset again (tools/preprocess_data.py)")
    return index


def scan_max_token_id(prefix: str, dtype) -> int:
    """The largest token id in PREFIX.bin, read chunk by chunk."""
    dtype = np.dtype(dtype)
    count = os.path.getsize(prefix + ".bin") // dtype.itemsize  # whole tokens, even if truncated
    if count == 0:
        return NO_TOKENS
    tokens = np.memmap(prefix + ".bin", dtype=dtype, mode="r", shape=(count,))
    return max(int(tokens[start:start + _SCAN_ELEMENTS].max())
               for start in range(0, len(tokens), _SCAN_ELEMENTS))


def max_token_id(prefix: str, dtype) -> int:
    """The largest token id of PREFIX: recorded if a matching record exists beside it, else scanned."""
    recorded = recorded_max_token_id(prefix)
    return recorded if recorded is not None else scan_max_token_id(prefix, dtype)


class DatasetCheck(NamedTuple):
    """What checking a dataset found and did."""

    largest: int  # its largest token id
    scan_seconds: Optional[float]  # None: a record gave the id; else the .bin was read, taking this long
    recorded_at: Optional[str]  # where the scan's result was kept (None: nowhere writable, or not scanned)


def _remember(prefix: str, largest: int, cache_dir: Optional[str]) -> Optional[str]:
    """Records a scan's result beside the data, else in ``cache_dir``; where it went, or None."""
    for directory in (None, cache_dir) if cache_dir is not None else (None,):
        try:
            return record_max_token_id(prefix, largest, directory)
        except OSError:  # a read-only folder: try the next, or keep it in memory
            continue
    return None


def check_dataset(prefix: str, vocab_size: int, cache_dir: Optional[str] = None) -> DatasetCheck:
    """Raise DatasetError unless PREFIX's .bin matches its .idx and every token id is below vocab_size.
    The largest id comes from a record (beside the data, else in ``cache_dir``) or a scan, whose result is
    then recorded where a folder allows."""
    index = check_sizes(prefix)
    largest, scan_seconds, recorded_at = recorded_max_token_id(prefix, cache_dir), None, None
    if largest is None:
        started = time.perf_counter()
        largest = scan_max_token_id(prefix, index.dtype)
        scan_seconds = time.perf_counter() - started
        recorded_at = _remember(prefix, largest, cache_dir)
    if largest >= vocab_size:
        raise DatasetError(f"{prefix}.bin holds token id {largest} but the tokenizer's vocabulary has "
                           f"{vocab_size} ids: preprocess it with the tokenizer you train with "
                           "(--tokenizer-type, --vocab-file ...)")
    return DatasetCheck(largest, scan_seconds, recorded_at)
