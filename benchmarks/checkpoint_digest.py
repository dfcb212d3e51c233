"""Cost of checkpoint digests: writes a synthetic checkpoint of --gb GB (8 shard files), then times
megatron_moe.checkpoint_files.write_manifest and verify_checkpoint on it (one process: the time one rank takes
for its share of the files; with N ranks each hashes 1/N). Also each hashlib algorithm on data in memory.

    python benchmarks/checkpoint_digest.py --gb 3 --dir /tmp/digest-bench
"""

import argparse
import hashlib
import shutil
import time
from pathlib import Path

import numpy

from megatron_moe.checkpoint_files import DIGEST_ALGORITHM, verify_checkpoint, write_manifest


def in_memory_rates(megabytes: int = 256) -> dict:
    data = numpy.random.default_rng(0).integers(0, 256, megabytes << 20, dtype=numpy.uint8).tobytes()
    rates = {}
    for name in ("sha1", "sha256", "blake2b", "md5"):
        start = time.perf_counter()
        hashlib.new(name, data).hexdigest()
        rates[name] = megabytes / 1024 / (time.perf_counter() - start)
    return rates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gb", type=float, default=3.0)
    parser.add_argument("--dir", default="/tmp/digest-bench")
    args = parser.parse_args()
    directory = Path(args.dir) / "iter_0000001"
    shutil.rmtree(args.dir, ignore_errors=True)
    directory.mkdir(parents=True)
    shard = numpy.random.default_rng(1).integers(0, 256, int(args.gb * 2**30 / 8), dtype=numpy.uint8).tobytes()
    for i in range(8):
        (directory / f"__{i}_0.distcp").write_bytes(shard)
    size_gb = sum(p.stat().st_size for p in directory.iterdir()) / 2**30

    start = time.perf_counter()
    write_manifest(directory)
    written = time.perf_counter() - start
    start = time.perf_counter()
    verify_checkpoint(directory)
    verified = time.perf_counter() - start
    print(f"checkpoint of {size_gb:.2f} GiB, {DIGEST_ALGORITHM} (page cache warm):")
    print(f"  write_manifest   {written:6.2f} s  {size_gb / written:5.2f} GiB/s  {written / size_gb:5.2f} s/GiB")
    print(f"  verify_checkpoint {verified:6.2f} s  {size_gb / verified:5.2f} GiB/s  {verified / size_gb:5.2f} s/GiB")
    rates = in_memory_rates()
    print("hashlib in memory (GiB/s): " + ", ".join(f"{name} {rate:.2f}" for name, rate in rates.items()))
    print(f"  {DIGEST_ALGORITHM} speed / each: " + ", ".join(f"{name} {rates[DIGEST_ALGORITHM] / rate:.2f}"
                                                         for name, rate in rates.items() if name != DIGEST_ALGORITHM))
    shutil.rmtree(args.dir)


if __name__ == "__main__":
    main()
