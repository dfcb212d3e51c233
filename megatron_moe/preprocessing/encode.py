"""Worker side: one chunk of JSON lines -> per json key, a token file and its index metadata.

Documents become sequences exactly as in Megatron-LM's preprocess_data.py: a document is its text
(or its sentences with --split-sentences, or its list of strings), each piece is tokenized, empty
pieces are dropped, and --append-eod adds the end-of-document token to the last piece. A document
left with no tokens is skipped and counted (Megatron-LM would store an empty document).

Workers write their own token files; only small arrays (sequence lengths, document ends) travel
back to the main process, which stitches the chunks together in input order.
"""

import bisect
import errno
import itertools
import json
import os
import signal
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

import numpy as np

from .errors import DiskFull
from .jsonl_input import Chunk
from .text_tokenizers import TokenizationError
from .worker_lifetime import die_with_parent


@dataclass
class EncodeJob:
    """Everything a worker needs; built once by the main process."""

    keys: Tuple[str, ...]
    tokenizer: object
    splitter: Optional[object]  # SentenceSplitter, or None for whole documents
    eod: Optional[int]  # appended to each document when set (--append-eod)
    dtype: np.dtype
    parts_dir: str
    skip_malformed: bool


@dataclass
class Part:
    """One json key's share of a chunk."""

    bin_path: str
    sequence_lengths: np.ndarray  # int32
    document_ends: np.ndarray  # int64, in sequences from the part's first sequence
    empty_documents: int
    max_token_id: int  # -1 for a part without tokens


@dataclass
class ChunkResult:
    index: int
    lines: int
    documents: int = 0  # JSON objects read
    blank_lines: int = 0
    malformed_lines: List[int] = field(default_factory=list)  # 0-based, within the chunk
    parts: Dict[str, Part] = field(default_factory=dict)
    error: Optional[Tuple[int, str]] = None  # (0-based line within the chunk, what is wrong)


_job: Optional[EncodeJob] = None


def init_worker(job: EncodeJob, parent_pid: int) -> None:
    """Pool initializer. Ctrl-C goes to the main process only: it stops the pool and cleans up;
    if the main process dies without cleaning up (SIGKILL), the worker dies too."""
    global _job
    die_with_parent(parent_pid)
    _job = job
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def encode_chunk(chunk: Chunk) -> ChunkResult:
    """The function the pool runs (the job lives in the worker since init_worker)."""
    return encode(chunk, _job)


def _pieces(value, splitter) -> Optional[List[str]]:
    """The texts of one document: split into sentences, or whole, or already a list."""
    if isinstance(value, str):
        return splitter.split(value) if splitter is not None else [value]
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return value
    return None


def encode(chunk: Chunk, job: EncodeJob) -> ChunkResult:
    data = chunk.read()
    lines = data.split(b"\n")
    if lines and not lines[-1]:
        lines.pop()  # the newline that ends the last line does not start another
    result = ChunkResult(chunk.index, len(lines))
    texts = {key: [] for key in job.keys}
    pieces_per_document = {key: [] for key in job.keys}
    document_lines = []
    for number, line in enumerate(lines):
        if not line.strip():
            result.blank_lines += 1
            continue
        try:
            record = json.loads(line)
        except ValueError as e:  # includes bad UTF-8
            if job.skip_malformed:
                result.malformed_lines.append(number)
                continue
            result.error = (number, f"malformed JSON ({e}); fix the line or pass "
                                    "--skip-malformed to skip and count such lines")
            return result
        if not isinstance(record, dict):
            result.error = (number, f"expected a JSON object, got a {type(record).__name__}")
            return result
        for key in job.keys:
            if key not in record:
                present = ", ".join(repr(k) for k in list(record)[:20]) or "none"
                present += ", ..." if len(record) > 20 else ""
                result.error = (number, f"no key {key!r} (keys present: {present}); choose the "
                                        "text keys with --json-keys")
                return result
            pieces = _pieces(record[key], job.splitter)
            if pieces is None:
                result.error = (number, f"key {key!r} holds a {type(record[key]).__name__}, "
                                        "expected a string or a list of strings")
                return result
            texts[key].extend(pieces)
            pieces_per_document[key].append(len(pieces))
        document_lines.append(number)
    result.documents = len(document_lines)
    for key_number, key in enumerate(job.keys):
        try:
            encoded = job.tokenizer.encode(texts[key])
        except TokenizationError as e:
            ends = list(itertools.accumulate(pieces_per_document[key]))
            result.error = (document_lines[bisect.bisect_right(ends, e.position)], str(e))
            return result
        path = os.path.join(job.parts_dir, f"{chunk.index:09d}.{key_number}.bin")
        result.parts[key] = _write_part(path, encoded, pieces_per_document[key], job, len(data))
    return result


def _write_part(path: str, encoded: List[List[int]], pieces_per_document: List[int],
                job: EncodeJob, input_bytes: int) -> Part:
    sequences, lengths, document_ends, empty = [], [], [], 0
    position = 0
    for count in pieces_per_document:
        document = [ids for ids in encoded[position:position + count] if ids]
        position += count
        if not document:
            empty += 1
            continue
        if job.eod is not None:
            document[-1] = document[-1] + [job.eod]
        sequences.extend(document)
        lengths.extend(len(ids) for ids in document)
        document_ends.append(len(lengths))
    lengths = np.array(lengths, dtype=np.int32)
    tokens = np.fromiter(itertools.chain.from_iterable(sequences), dtype=job.dtype,
                         count=int(lengths.sum(dtype=np.int64)))
    try:
        with open(path, "wb") as f:  # not tokens.tofile: its short-write error has no errno
            f.write(memoryview(tokens))
    except OSError as error:
        if error.errno == errno.ENOSPC:
            raise DiskFull(path, output_per_input=tokens.nbytes / max(input_bytes, 1)) from None
        raise
    largest = int(tokens.max()) if len(tokens) else -1
    return Part(path, lengths, np.array(document_ends, dtype=np.int64), empty, largest)
