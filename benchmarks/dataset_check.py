#!/usr/bin/env python3
"""What the start-up dataset check (megatron_moe.data.check_datasets) costs on a large dataset.

    python benchmarks/dataset_check.py [--gib 2] [--dir /tmp]

Writes a random uint16 dataset of --gib GiB of tokens (one .bin/.idx pair, 2048-token sequences) and
times check_dataset on it: with the largest token id recorded by our tools (PREFIX.stats.json), and
without, when the .bin is scanned, from the page cache (warm) and after asking the kernel to drop the
file's pages (cold: posix_fadvise DONTNEED, best effort; then disk speed). GB/s = 1e9 bytes of .bin.
"""

import argparse
import os
import tempfile
import time

import numpy as np

from megatron_moe.preprocessing.dataset_stats import check_dataset
from megatron_moe.preprocessing.indexed_writer import IndexedDatasetWriter
from megatron_moe.preprocessing.stats_sidecar import STATS_SUFFIX

SEQUENCE = 2048


def write_dataset(prefix: str, gib: float) -> int:
    """A random dataset written with our writer (which records its largest id); returns .bin bytes."""
    tokens = int(gib * 2**30) // 2 // SEQUENCE * SEQUENCE
    part = prefix + ".part"
    rng = np.random.default_rng(0)
    writer = IndexedDatasetWriter(prefix, np.uint16)
    block = 1 << 27  # tokens per part: 256 MiB
    for start in range(0, tokens, block):
        count = min(block, tokens - start)
        rng.integers(0, 50257, count, dtype=np.uint16).tofile(part)
        lengths = np.full(count // SEQUENCE, SEQUENCE, np.int32)
        writer.add_part(part, lengths, np.arange(1, len(lengths) + 1), max_token_id=50256)
    os.unlink(part)
    writer.finish()
    writer.commit()
    return tokens * 2


def drop_cache(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def timed(prefix: str) -> float:
    start = time.perf_counter()
    check_dataset(prefix, 50257)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--gib", type=float, default=2.0)
    parser.add_argument("--dir", default=None)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=args.dir) as directory:
        prefix = os.path.join(directory, "bench")
        size = write_dataset(prefix, args.gib)
        print(f"dataset: {size / 1e9:.2f} GB of uint16 tokens, {size // 2 // SEQUENCE} sequences")
        print(f"check with a recorded largest id: {1e3 * timed(prefix):.1f} ms")
        os.unlink(prefix + STATS_SUFFIX)
        timed(prefix)  # warms the page cache
        warm = min(timed(prefix) for _ in range(3))
        print(f"check with a scan, warm page cache: {warm:.2f} s = {size / 1e9 / warm:.1f} GB/s")
        drop_cache(prefix + ".bin")
        cold = timed(prefix)
        print(f"check with a scan after dropping the file's pages: {cold:.2f} s = {size / 1e9 / cold:.1f} GB/s")


if __name__ == "__main__":
    main()
