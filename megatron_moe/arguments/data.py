"""Tokenizer and data flags."""

from __future__ import annotations

import argparse
import os
import re
from typing import Any, Dict

from megatron_moe.arguments.flags import RUN, TOKENIZER, FlagGroup, NoEffect, at_least, require, warn

SENTENCEPIECE_TYPES = ("SentencePieceTokenizer", "GPTSentencePieceTokenizer", "Llama2Tokenizer")
# Megatron-LM's pretrain_gpt.py passes args_defaults={'tokenizer_type': 'GPT2BPETokenizer'}
PRETRAIN_GPT_TOKENIZER = "GPT2BPETokenizer"
# an organisation/name pair, as Hugging Face model ids are written
_HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")

_TOKEN_IDS_ONLY = NoEffect.never("training reads token ids; of the tokenizer it uses only the vocabulary size, "
                                 "the end-of-document and the pad id, which this option does not change")
_TIKTOKEN_ONLY = NoEffect.never("an option of --tokenizer-type TikTokenizer, which is not offered (Megatron-LM "
                                "ignores it for the other tokenizers too)")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    g = FlagGroup(parser, "tokenizer", TOKENIZER)
    g.add("--tokenizer-type", default=None,
          choices=["NullTokenizer", "GPT2BPETokenizer", "HuggingFaceTokenizer", *SENTENCEPIECE_TYPES],
          help=f"default: {PRETRAIN_GPT_TOKENIZER} (Megatron-LM's pretrain_gpt.py default)")
    g.add("--vocab-size", type=int, default=None, valid=at_least(1), help="NullTokenizer vocabulary size")
    g.add("--vocab-file", default=None)
    g.add("--merge-file", default=None)
    g.add("--tokenizer-model", default=None,
          help="HuggingFaceTokenizer: a local directory (or tokenizer.json); the SentencePiece types: a local "
               ".model file. Nothing is downloaded")

    g = FlagGroup(parser, "tokenizer: options without effect here", RUN)
    g.add("--tokenizer-hf-use-fast", action="store_true", no_effect=_TOKEN_IDS_ONLY)
    g.add("--tokenizer-hf-include-special-tokens", action="store_true", no_effect=_TOKEN_IDS_ONLY)
    g.add("--trust-remote-code", action="store_true", no_effect=_TOKEN_IDS_ONLY)
    g.add("--tiktoken-pattern", default=None, no_effect=_TIKTOKEN_ONLY)
    g.add("--tiktoken-num-special-tokens", type=int, default=1000, no_effect=_TIKTOKEN_ONLY)
    g.add("--tiktoken-special-tokens", nargs="+", default=None, no_effect=_TIKTOKEN_ONLY)

    g = FlagGroup(parser, "data", RUN)
    g.add("--mock-data", action="store_true", help="synthetic tokens (no files)")
    g.add("--data-path", nargs="*", default=None,
          help="indexed dataset prefixes, optionally weighted: 'PREFIX' or '0.3 PREFIX_A 0.7 PREFIX_B'")
    g.add("--split", default=None,
          help="train,valid,test proportions of each --data-path dataset (default, as Megatron-LM's: 969,30,1 "
               "with a warning)")
    g.add("--data-cache-path", default=None, help="where the sample index caches go")
    g.add("--dataloader-type", choices=["single"], default=None,
          help="single (the default): the training data is read once, in order")
    g.add("--num-workers", type=int, default=2, valid=at_least(0),
          help="data loader worker processes per rank (0: the training process reads the samples itself)")
    g.add("--no-mmap-bin-files", dest="mmap_bin_files", action="store_false",
          help="read the .bin files with file reads instead of memory-mapping them")
    g.add("--no-create-attention-mask-in-dataloader", dest="create_attention_mask_in_dataloader",
          action="store_false",
          help="accepted: the data loader never builds attention masks here (the model masks causally itself, "
               "which is what a causal mask from the loader would give)")
    g.add("--reset-position-ids", action="store_true", help="position ids restart after each end-of-document token")
    g.add("--eod-mask-loss", action="store_true", help="no loss on end-of-document tokens")
    g.add("--allow-ambiguous-pad-tokens", action="store_true",
          help="mask tokens equal to the tokenizer's pad id even where it is also its eod/eos id (megatron-core "
               "otherwise masks no pad tokens then)")


def validate_tokenizer(c) -> Dict[str, Any]:
    """The tokenizer and its local files; fills in Megatron-LM's pretrain_gpt.py default tokenizer type."""
    filled = {}
    tokenizer_type = c.tokenizer_type
    if tokenizer_type is None:
        tokenizer_type = filled["tokenizer_type"] = PRETRAIN_GPT_TOKENIZER
    default = " (pretrain_gpt.py's default when --tokenizer-type is not given)" if c.tokenizer_type is None else ""
    if tokenizer_type == "NullTokenizer":
        require(c.vocab_size is not None, "--tokenizer-type NullTokenizer needs --vocab-size")
    if tokenizer_type == "GPT2BPETokenizer":
        require(c.vocab_file and c.merge_file, f"--tokenizer-type GPT2BPETokenizer{default} needs --vocab-file and "
                                               "--merge-file (or give another --tokenizer-type)")
    if tokenizer_type == "HuggingFaceTokenizer":
        require(c.tokenizer_model, "--tokenizer-type HuggingFaceTokenizer needs --tokenizer-model DIR")
        _check_local(c.tokenizer_model, "a local directory with tokenizer.json")
    if tokenizer_type in SENTENCEPIECE_TYPES:
        require(c.tokenizer_model, f"--tokenizer-type {tokenizer_type} needs --tokenizer-model FILE (a SentencePiece "
                                   ".model file)")
        _check_local(c.tokenizer_model, "a local SentencePiece .model file")
    return filled


def _check_local(path: str, wanted: str) -> None:
    """``--tokenizer-model`` names something on this machine: nothing is downloaded."""
    if os.path.exists(path):
        return
    hub = " it looks like a Hugging Face model id, and nothing is downloaded here:" if _HUB_ID.match(path) else ""
    require(False, f"--tokenizer-model {path}: no such file or directory;{hub} it must be {wanted} (download "
                   "the tokenizer beforehand, e.g. huggingface-cli download, and give its local path)")


def validate_data(c) -> Dict[str, Any]:
    """Data and split; fills in the --split of a --data-path run."""
    if not c.mock_data:
        require(c.data_path, "give --data-path PREFIX [...] or --mock-data")
    require(not (c.mock_data and c.data_path), "--mock-data and --data-path exclude each other; give one")
    if c.split is not None:
        # megatron-core's parse (parse_and_normalize_split): the numbers in the string, whatever separates them
        parts = re.findall(r"[.0-9]+", c.split)
        require(1 <= len(parts) <= 3 and all(re.fullmatch(r"\d*\.?\d+|\d+\.", p) for p in parts)
                and sum(map(float, parts)) > 0,
                f"--split {c.split!r}: expected up to three numbers such as 969,30,1")
    elif c.data_path:  # (mock data: megatron-core draws every split alike)
        warn("--data-path without --split: using Megatron-LM's legacy default 969,30,1")
        return {"split": "969,30,1"}
    return {}


CHECKS = (validate_tokenizer, validate_data)
