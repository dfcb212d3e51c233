"""Write megatron-core IndexedDataset files (.bin/.idx) by streaming, and commit them atomically.

The format is megatron-core's (`megatron.core.datasets.indexed_dataset`, `_IndexWriter`):

    .bin  the tokens of every sequence, back to back, in the index dtype
    .idx  b"MMIDIDX\\x00\\x00" | u64 version 1 | u8 dtype code | u64 sequence count
          | u64 document count + 1 | int32 sequence lengths | int64 sequence byte offsets
          | int64 document indices (sequence index where each document starts, then the total)
          | int8 sequence modes (multimodal datasets only)

We write it ourselves rather than with `IndexedDatasetBuilder` because the builder keeps every
sequence length in a Python list (memory grows with the corpus) and importing megatron-core costs
seconds. The tests check that our bytes equal the builder's.

Safety: everything is written under temporary names beside the outputs (scratch.py); `commit()`
renames them only once every file is complete, so a failed or interrupted run never leaves a .bin
without its matching .idx (or a new .bin beside an old .idx). It then records the largest token
id in PREFIX.stats.json (dataset_stats.py), which training checks against its vocabulary.
"""

import errno
import os
import shutil
import signal
import struct
import tempfile
from dataclasses import dataclass
from typing import Optional

import numpy as np

from .scratch import temporary_name
from .stats_sidecar import STATS_SUFFIX, record_max_token_id

INDEX_HEADER = b"MMIDIDX\x00\x00"
INDEX_VERSION = 1
# megatron.core.datasets.indexed_dataset.DType: the code stored in the .idx for each token dtype
DTYPE_CODES = {
    np.dtype(np.uint8): 1, np.dtype(np.int8): 2, np.dtype(np.int16): 3, np.dtype(np.int32): 4,
    np.dtype(np.int64): 5, np.dtype(np.float64): 6, np.dtype(np.float32): 7, np.dtype(np.uint16): 8,
}
_BLOCK = 1 << 20  # array elements handled at a time, so memory never depends on the corpus size


def optimal_dtype(vocab_size: int) -> np.dtype:
    """The token dtype megatron's tools choose for a vocabulary (`DType.optimal_dtype`)."""
    return np.dtype(np.uint16 if vocab_size < 65500 else np.int32)


@dataclass
class IndexArrays:
    """The arrays of an existing .idx file, memory-mapped (nothing is read until used)."""

    dtype: np.dtype
    sequence_lengths: np.ndarray
    document_indices: np.ndarray
    sequence_modes: Optional[np.ndarray]


def read_index(idx_path: str, multimodal: bool = False) -> IndexArrays:
    """Memory-map an .idx file written by megatron-core or by us."""
    with open(idx_path, "rb") as f:
        header = f.read(34)
    if len(header) < 34 or header[:9] != INDEX_HEADER:
        raise ValueError(f"{idx_path} is not a megatron-core index file (bad header)")
    version, code, n_sequences, n_document_indices = struct.unpack("<QBQQ", header[9:34])
    dtypes = {code: dtype for dtype, code in DTYPE_CODES.items()}
    if version != INDEX_VERSION or code not in dtypes:
        raise ValueError(f"{idx_path}: unsupported index version {version} or dtype code {code}")
    data = np.memmap(idx_path, mode="r")
    needed = 34 + n_sequences * (4 + 8 + (1 if multimodal else 0)) + n_document_indices * 8
    if len(data) < needed:
        raise ValueError(f"{idx_path} is truncated: {len(data)} bytes, its header needs {needed}")
    offset = 34

    def take(dtype, count):
        nonlocal offset
        array = np.frombuffer(data, dtype=dtype, count=count, offset=offset)
        offset += array.nbytes
        return array

    lengths = take(np.int32, n_sequences)
    take(np.int64, n_sequences)  # sequence byte offsets: recomputed from the lengths when merging
    documents = take(np.int64, n_document_indices)
    modes = take(np.int8, n_sequences) if multimodal else None
    return IndexArrays(dtypes[code], lengths, documents, modes)


# copy_file_range errors that mean "not here" (old kernel, other OS, file systems that cannot)
_NO_KERNEL_COPY = {errno.ENOSYS, errno.EXDEV, errno.EINVAL, errno.EOPNOTSUPP, errno.EBADF}


def _append_file(dst_fd: int, src_path: str) -> None:
    """Append src to dst in the kernel when it can (copy_file_range), else through a buffer.
    A full disk raises OSError(ENOSPC)."""
    with open(src_path, "rb") as src:
        remaining = os.fstat(src.fileno()).st_size
        try:
            while remaining > 0:
                copied = os.copy_file_range(src.fileno(), dst_fd, remaining)
                if copied == 0:
                    break
                remaining -= copied
        except AttributeError:  # not Linux
            pass
        except OSError as error:
            if error.errno not in _NO_KERNEL_COPY:
                raise
        while remaining > 0:
            block = src.read(min(remaining, 16 << 20))
            if not block:
                break
            _write_all(dst_fd, block)
            remaining -= len(block)
    if remaining:
        raise OSError(f"{src_path} shrank while being copied")


def _write_all(fd: int, data: bytes) -> None:
    """os.write may write less than asked (a disk filling up): write the rest, or raise ENOSPC."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def _write_blocks(stream, array: np.ndarray, dtype, add: int = 0) -> None:
    for start in range(0, len(array), _BLOCK):
        block = np.asarray(array[start:start + _BLOCK], dtype=dtype)
        stream.write((block + add if add else block).tobytes())


class IndexedDatasetWriter:
    """Builds one .bin/.idx pair from pieces appended in order, under temporary names.

    Per-sequence metadata goes to anonymous temporary files (deleted by the OS whatever happens),
    and the .idx is assembled from them block by block in `finish()`.
    """

    def __init__(self, prefix: str, dtype, multimodal: bool = False):
        self.prefix = prefix
        self.dtype = np.dtype(dtype)
        if self.dtype not in DTYPE_CODES:
            raise ValueError(f"dtype {self.dtype} cannot be stored in a megatron-core index")
        self.bin_path, self.idx_path = prefix + ".bin", prefix + ".idx"
        self._tmp_bin, self._tmp_idx = temporary_name(self.bin_path), temporary_name(self.idx_path)
        directory = os.path.dirname(os.path.abspath(prefix))
        self._lengths = tempfile.TemporaryFile(dir=directory)  # int32 per sequence
        self._document_ends = tempfile.TemporaryFile(dir=directory)  # int64 per document
        self._modes = tempfile.TemporaryFile(dir=directory) if multimodal else None  # int8
        self._bin_fd = os.open(self._tmp_bin, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        self.sequences = 0
        self.documents = 0
        self.tokens = 0
        self.max_token_id = -1  # none yet

    @staticmethod
    def paths_of(prefixes):
        """Every file a writer of these prefixes creates: .bin, .idx and the token-id record."""
        return [prefix + ext for prefix in prefixes for ext in (".bin", ".idx", STATS_SUFFIX)]

    @property
    def bytes_written(self) -> int:
        """What the finished .bin/.idx will take so far (tokens, 12 bytes a sequence, 8 a document)."""
        return self.tokens * self.dtype.itemsize + 12 * self.sequences + 8 * self.documents

    def add_part(self, bin_path: str, sequence_lengths, document_ends, max_token_id: int,
                 sequence_modes=None) -> None:
        """Append a piece: its token file (copied), its sequence lengths, where each of its
        documents ends, counted in sequences from the piece's first sequence, and its largest
        token id (-1 for none)."""
        tokens = sum(int(np.sum(sequence_lengths[start:start + _BLOCK], dtype=np.int64))
                     for start in range(0, len(sequence_lengths), _BLOCK))
        size = os.path.getsize(bin_path)
        if size != tokens * self.dtype.itemsize:
            raise ValueError(f"{bin_path} has {size} bytes but its index describes {tokens} "
                             f"{self.dtype.name} tokens")
        if self._modes is not None and sequence_modes is None:
            raise ValueError(f"{bin_path}: a multimodal dataset needs sequence modes")
        _append_file(self._bin_fd, bin_path)
        _write_blocks(self._lengths, sequence_lengths, np.int32)
        _write_blocks(self._document_ends, document_ends, np.int64, add=self.sequences)
        if self._modes is not None:
            _write_blocks(self._modes, sequence_modes, np.int8)
        self.sequences += len(sequence_lengths)
        self.documents += len(document_ends)
        self.tokens += tokens
        self.max_token_id = max(self.max_token_id, max_token_id)

    def finish(self) -> None:
        """Write the .idx (still under its temporary name) and flush both files to disk."""
        os.fsync(self._bin_fd)
        os.close(self._bin_fd)
        self._bin_fd = None
        with open(self._tmp_idx, "wb") as idx:
            idx.write(INDEX_HEADER)
            idx.write(struct.pack("<QBQQ", INDEX_VERSION, DTYPE_CODES[self.dtype],
                                  self.sequences, self.documents + 1))
            self._lengths.seek(0)
            shutil.copyfileobj(self._lengths, idx)
            self._write_pointers(idx)
            idx.write(np.zeros(1, np.int64).tobytes())  # the first document starts at sequence 0
            self._document_ends.seek(0)
            shutil.copyfileobj(self._document_ends, idx)
            if self._modes is not None:
                self._modes.seek(0)
                shutil.copyfileobj(self._modes, idx)
            idx.flush()
            os.fsync(idx.fileno())
        self._close_metadata()

    def _write_pointers(self, idx) -> None:
        """Byte offset of each sequence in the .bin: exclusive prefix sum of lengths * itemsize."""
        self._lengths.seek(0)
        start = 0
        while True:
            lengths = np.frombuffer(self._lengths.read(_BLOCK * 4), dtype=np.int32)
            if not len(lengths):
                return
            ends = start + np.cumsum(lengths, dtype=np.int64) * self.dtype.itemsize
            idx.write(np.concatenate(([start], ends[:-1])).astype(np.int64).tobytes())
            start = int(ends[-1])

    def _close_metadata(self) -> None:
        for stream in (self._lengths, self._document_ends, self._modes):
            if stream is not None:
                stream.close()

    def commit(self) -> None:
        """Replace any old outputs. The old .idx goes first, so an interruption between the renames
        leaves a .bin alone (which megatron-core treats as no dataset), never a mismatched pair."""
        if os.path.exists(self.idx_path):
            os.unlink(self.idx_path)
        os.replace(self._tmp_bin, self.bin_path)
        os.replace(self._tmp_idx, self.idx_path)
        record_max_token_id(self.prefix, self.max_token_id)

    def discard(self) -> None:
        """Drop everything written so far; safe to call more than once and after commit()."""
        if self._bin_fd is not None:
            os.close(self._bin_fd)
            self._bin_fd = None
        self._close_metadata()
        for path in (self._tmp_bin, self._tmp_idx):
            if os.path.exists(path):
                os.unlink(path)


def commit_all(writers) -> None:
    """Rename every finished pair into place with Ctrl-C/SIGTERM held back until all are done."""
    held = {signal.SIGINT, signal.SIGTERM}
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, held)
    try:
        for writer in writers:
            writer.commit()
        directories = {os.path.dirname(os.path.abspath(w.prefix)) for w in writers}
        for directory in directories:
            fd = os.open(directory, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)
