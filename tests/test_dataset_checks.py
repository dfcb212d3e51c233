"""Datasets are checked before the first step: a .bin that does not match its .idx, or a token id beyond
the vocabulary, is one line naming the file (exit 2) instead of a crash inside iteration 1."""

import json
import os

import numpy
import pytest

from megatron_moe.arguments import ConfigError
from megatron_moe.data import check_datasets
from megatron_moe.preprocessing.dataset_stats import DatasetError, check_dataset, scan_max_token_id
from megatron_moe.preprocessing.stats_sidecar import STATS_SUFFIX, record_max_token_id, recorded_max_token_id
from test_training_job import ON_FILES, VOCAB, assert_one_line_error, files, launch, write_indexed_dataset  # noqa: F401


def _copy(prefix, to):
    for ext in (".bin", ".idx"):
        with open(prefix + ext, "rb") as src, open(f"{to}{ext}", "wb") as dst:
            dst.write(src.read())
    return str(to)


@pytest.fixture
def broken(files, tmp_path):
    """Copies of a good dataset, each broken one way, with the message fragment that names it."""
    truncated_bin = _copy(files["a"], tmp_path / "truncated_bin")
    os.truncate(truncated_bin + ".bin", os.path.getsize(truncated_bin + ".bin") // 2)
    truncated_idx = _copy(files["a"], tmp_path / "truncated_idx")
    os.truncate(truncated_idx + ".idx", os.path.getsize(truncated_idx + ".idx") // 2)
    big_id = _copy(files["a"], tmp_path / "big_id")
    tokens = numpy.memmap(big_id + ".bin", dtype=numpy.uint16, mode="r+")
    tokens[len(tokens) // 2] = VOCAB + 1  # the tokenizer's ids are 0..VOCAB (VOCAB: end of document)
    tokens.flush()
    return {
        "truncated_bin": (truncated_bin, f"{truncated_bin}.bin has {os.path.getsize(truncated_bin + '.bin')} "
                                         f"bytes but {truncated_bin}.idx describes"),
        "truncated_idx": (truncated_idx, f"{truncated_idx}.idx is truncated"),
        "big_id": (big_id, f"{big_id}.bin holds token id {VOCAB + 1} but the tokenizer's vocabulary has "
                           f"{VOCAB + 1} ids"),
    }


@pytest.mark.parametrize("case", ["truncated_bin", "truncated_idx", "big_id"])
def test_broken_dataset_is_one_line_before_the_first_step(case, broken, files):
    prefix, message = broken[case]
    result = launch(ON_FILES + files["tokenizer"] + ["--data-path", files["b"], prefix, "--train-iters", "2"])
    assert_one_line_error(result, f"--data-path: {message}", "write the dataset again" if "truncated" in case
                          else "preprocess it with the tokenizer you train with")
    assert " iteration " not in result.stdout


class _Args:
    mock_data = False

    def __init__(self, *data_path):
        self.data_path = list(data_path)


def test_check_datasets_accepts_good_data_and_names_the_bad_one(broken, files):
    check_datasets(_Args(files["a"], files["b"]), VOCAB + 1)
    with pytest.raises(ConfigError, match="--data-path: .*big_id.bin holds token id"):
        check_datasets(_Args("0.5", files["a"], "0.5", broken["big_id"][0]), VOCAB + 1)


def test_recorded_largest_id_is_used_while_it_matches_the_bin(files, tmp_path):
    prefix = _copy(files["a"], tmp_path / "recorded")
    record_max_token_id(prefix, VOCAB + 5)  # a record says more than the data holds: it is believed
    with pytest.raises(DatasetError, match=f"token id {VOCAB + 5} "):
        check_dataset(prefix, VOCAB + 1)
    stats = json.loads(open(prefix + STATS_SUFFIX).read())
    os.utime(prefix + ".bin", ns=(stats["bin_mtime_ns"] + 1, stats["bin_mtime_ns"] + 1))  # rewritten since
    check_dataset(prefix, VOCAB + 1)  # the stale record is ignored and the .bin scanned
    assert recorded_max_token_id(prefix) == scan_max_token_id(prefix, numpy.uint16) <= VOCAB  # and recorded


def test_split_without_sequences_is_one_line_instead_of_a_hang(files):
    """megatron-core counts the epochs of a split without tokens forever: 60 sequences leave the default
    test split (0.1%) empty."""
    result = launch(ON_FILES + files["tokenizer"] + ["--data-path", files["a"], "--train-iters", "1"], timeout=120)
    assert_one_line_error(result, f"the test split of {files['a']} gets none of its 60 sequences",
                          "samples are needed")
