"""Datasets are checked before the first step: a .bin that does not match its .idx, or a token id beyond
the vocabulary, is one line naming the file (exit 2) instead of a crash inside iteration 1. One rank per node
checks; a read-only data folder is no error."""

import json
import os

import numpy
import pytest

from megatron_moe.arguments import ConfigError
from megatron_moe.data import check_datasets
from megatron_moe.preprocessing.dataset_stats import DatasetError, check_dataset, scan_max_token_id
from megatron_moe.preprocessing.stats_sidecar import (STATS_SUFFIX, record_max_token_id, recorded_max_token_id,
                                                       stats_path)
from launcher import ON_FILES, SCRIPTS, VOCAB, assert_one_line_error, launch, torchrun, write_indexed_dataset


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

    def __init__(self, *data_path, data_cache_path=None):
        self.data_path, self.data_cache_path = list(data_path), data_cache_path


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


# --- once per node --------------------------------------------------------------------------------------

def test_four_local_ranks_scan_each_dataset_once_and_all_get_the_answer(files, broken, tmp_path):
    """Three starts of 4 local ranks. Local rank 0 alone reads the .bin of a dataset without a record, and
    records it: the next start reads none. A bad dataset found by it stops all four ranks with the same line."""
    prefix = _copy(files["a"], tmp_path / "unrecorded")
    bad, message = broken["big_id"]
    out = tmp_path / "out"
    out.mkdir()
    torchrun(4, SCRIPTS / "check_datasets_per_node.py", [str(out), str(VOCAB + 1), prefix, prefix, f"{prefix},{bad}"])
    scans = (out / "scans.txt").read_text().splitlines()
    assert scans == [f"round 0: rank 0 scanned {prefix}", f"round 2: rank 0 scanned {bad}"], scans
    errors = [json.loads((out / f"rank{rank}.json").read_text()) for rank in range(4)]
    assert [rank[:2] for rank in errors] == [[None, None]] * 4
    assert len({rank[2] for rank in errors}) == 1 and message in errors[0][2], errors
    assert recorded_max_token_id(prefix) == scan_max_token_id(prefix, numpy.uint16)


def test_read_only_data_keeps_its_record_in_the_cache_path_or_nowhere(files, read_only, tmp_path):
    """A read-only data folder is no error: the scan's result goes to --data-cache-path, else nowhere (the
    next start scans again, and the log says so)."""
    folder = tmp_path / "corpus"
    folder.mkdir()
    _copy(files["a"], folder / "a")
    prefix = str(read_only(folder) / "a")
    first = check_dataset(prefix, VOCAB + 1)
    assert first.scan_seconds is not None and first.recorded_at is None
    assert not os.path.exists(prefix + STATS_SUFFIX)

    cache = tmp_path / "cache"
    kept = check_dataset(prefix, VOCAB + 1, str(cache))
    assert kept.recorded_at == stats_path(prefix, str(cache)) and os.path.dirname(kept.recorded_at) == str(cache)
    assert check_dataset(prefix, VOCAB + 1, str(cache)).scan_seconds is None  # read from the cache
    assert check_dataset(prefix, VOCAB + 1).scan_seconds is not None  # not without it


def test_training_on_read_only_data_without_a_cache_path(files, read_only, tmp_path):
    """megatron-core's sample indices (default: beside the data) are built in memory instead, and the log says
    where nothing could be kept."""
    folder = tmp_path / "corpus"
    folder.mkdir()
    _copy(files["a"], folder / "a")
    prefix = str(read_only(folder) / "a")
    result = launch(ON_FILES + files["tokenizer"] + ["--data-path", prefix, "--split", "90,10,0", "--train-iters", "1"])
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"> {prefix}.bin scanned for its largest token id" in result.stdout
    assert ("its folder is not writable and no --data-cache-path is given: the next start scans it again"
            in result.stdout)
    assert "the sample indices are built in memory at every start" in result.stdout
    assert " iteration        1/" in result.stdout
    assert sorted(os.listdir(folder)) == ["a.bin", "a.idx"]
