"""Input files -> line-aligned chunks for the workers, in input order.

A plain .jsonl is cut into byte ranges that end on a newline: the main process only seeks and
reads one line per cut, and each worker reads its own range. A .jsonl.gz cannot be seeked, so the
main process decompresses it and hands the workers blocks of whole lines.
"""

import glob
import gzip
import os
from dataclasses import dataclass
from typing import Iterator, List, Optional

from .errors import PreprocessError

CHUNK_BYTES = 1 << 20  # small enough to keep every worker busy to the end, big enough to amortise


@dataclass
class Chunk:
    """Whole lines of one input file: a byte range of a plain file, or decompressed lines."""

    index: int  # position in the whole input: results are merged in this order
    path: str
    start: int = 0
    end: int = 0
    data: Optional[bytes] = None

    def read(self) -> bytes:
        if self.data is not None:
            return self.data
        with open(self.path, "rb") as f:
            f.seek(self.start)
            return f.read(self.end - self.start)


def resolve_inputs(pattern: str) -> List[str]:
    """--input is a file, or a glob pattern (as Megatron-LM accepts with --partitions > 1)."""
    if os.path.isfile(pattern):
        return [pattern]
    paths = sorted(p for p in glob.glob(pattern) if os.path.isfile(p))
    if not paths:
        raise PreprocessError(f"--input {pattern}: no such file (a .jsonl or .jsonl.gz file, or "
                              "a glob pattern matching some)")
    return paths


def input_bytes(paths: List[str]) -> Optional[int]:
    """Total size to process when it is known in advance (not for gzip input)."""
    if any(p.endswith(".gz") for p in paths):
        return None
    return sum(os.path.getsize(p) for p in paths)


def iter_chunks(paths: List[str], chunk_bytes: int = CHUNK_BYTES) -> Iterator[Chunk]:
    index = 0
    for path in paths:
        pieces = _gzip_chunks(path, chunk_bytes) if path.endswith(".gz") else \
            _byte_range_chunks(path, chunk_bytes)
        for chunk in pieces:
            chunk.index = index
            index += 1
            yield chunk


def _byte_range_chunks(path: str, chunk_bytes: int) -> Iterator[Chunk]:
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        start = 0
        while start < size:
            end = start + chunk_bytes
            if end < size:
                f.seek(end - 1)
                f.readline()  # move the cut to the end of the line it falls in
                end = f.tell()
            end = min(end, size)
            yield Chunk(0, path, start, end)
            start = end


def _gzip_chunks(path: str, chunk_bytes: int) -> Iterator[Chunk]:
    try:
        with gzip.open(path, "rb") as f:
            while True:
                data = f.read(chunk_bytes)
                if not data:
                    return
                if not data.endswith(b"\n"):
                    data += f.readline()
                yield Chunk(0, path, data=data)
    except (OSError, EOFError) as e:  # gzip.BadGzipFile is an OSError
        raise PreprocessError(f"{path}: cannot decompress: {e}") from None
