"""Is a dataset whole, and what is its largest token id? Checked before training reads it.

Training needs two facts about every .bin/.idx pair before its first step: the .bin holds exactly
the tokens its .idx describes (else a read deep inside iteration 1 fails), and no token id reaches
the vocabulary (else the embedding fails: IndexError on CPU, a device-side assert on CUDA).

The size check reads only the .idx. The largest id is the one our tools record beside the dataset
(stats_sidecar.py); for any other dataset (e.g. one written by Megatron-LM's tool, or copied
without its times) the .bin is scanned in chunks of a memory map -- 6 to 25 GB/s from the page
cache, disk speed otherwise (benchmarks/dataset_check.py) -- and the result recorded, when the
directory is writable, as megatron-core writes its index caches beside the data. The whole .bin is
read: a sample could miss the one id that breaks the embedding.
"""

import os

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


def max_token_id(prefix: str, dtype, remember: bool = False) -> int:
    """The largest token id of PREFIX: recorded if a matching record exists, else scanned and, with
    `remember`, recorded where the directory allows, so that only the first start pays for the scan."""
    recorded = recorded_max_token_id(prefix)
    if recorded is not None:
        return recorded
    largest = scan_max_token_id(prefix, dtype)
    if remember:
        try:
            record_max_token_id(prefix, largest)
        except OSError:  # a read-only data directory: scan again next time
            pass
    return largest


def check_dataset(prefix: str, vocab_size: int) -> None:
    """Raise DatasetError unless PREFIX's .bin matches its .idx and every token id is below vocab_size."""
    index = check_sizes(prefix)
    largest = max_token_id(prefix, index.dtype, remember=True)
    if largest >= vocab_size:
        raise DatasetError(f"{prefix}.bin holds token id {largest} but the tokenizer's vocabulary has "
                           f"{vocab_size} ids: preprocess it with the tokenizer you train with "
                           "(--tokenizer-type, --vocab-file ...)")
