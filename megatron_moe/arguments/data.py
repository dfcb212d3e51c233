"""Tokenizer and data flags."""

from __future__ import annotations

import argparse
from typing import Any, Dict, Optional

from megatron_moe.arguments.flags import RUN, TOKENIZER, FlagGroup, at_least, require, warn


def add_arguments(parser: argparse.ArgumentParser) -> None:
    g = FlagGroup(parser, "tokenizer", TOKENIZER)
    g.add("--tokenizer-type", default=None, choices=["NullTokenizer", "GPT2BPETokenizer", "HuggingFaceTokenizer"],
          help="required (as in Megatron-LM)")
    g.add("--vocab-size", type=int, default=None, valid=at_least(1), help="NullTokenizer vocabulary size")
    g.add("--vocab-file", default=None)
    g.add("--merge-file", default=None)
    g.add("--tokenizer-model", default=None, help="HuggingFaceTokenizer: a local directory")

    g = FlagGroup(parser, "data", RUN)
    g.add("--mock-data", action="store_true", help="synthetic tokens (no files)")
    g.add("--data-path", nargs="*", default=None,
          help="indexed dataset prefixes, optionally weighted: 'PREFIX' or '0.3 PREFIX_A 0.7 PREFIX_B'")
    g.add("--split", default=None,
          help="train,valid,test proportions of each --data-path dataset (default, as Megatron-LM's: 969,30,1 "
               "with a warning)")
    g.add("--data-cache-path", default=None, help="where the sample index caches go")


def validate(c) -> Optional[Dict[str, Any]]:
    """Tokenizer and data; fills in the --split of a --data-path run."""
    require(c.tokenizer_type is not None,
            "give --tokenizer-type (Megatron-LM has no default): NullTokenizer with --vocab-size, GPT2BPETokenizer "
            "with --vocab-file and --merge-file, or HuggingFaceTokenizer with --tokenizer-model DIR")
    if c.tokenizer_type == "NullTokenizer":
        require(c.vocab_size is not None, "--tokenizer-type NullTokenizer needs --vocab-size")
    if not c.mock_data:
        require(c.data_path, "give --data-path PREFIX [...] or --mock-data")
    require(not (c.mock_data and c.data_path), "--mock-data and --data-path exclude each other; give one")
    if c.tokenizer_type == "GPT2BPETokenizer":
        require(c.vocab_file and c.merge_file, "--tokenizer-type GPT2BPETokenizer needs --vocab-file and --merge-file")
    if c.tokenizer_type == "HuggingFaceTokenizer":
        require(c.tokenizer_model, "--tokenizer-type HuggingFaceTokenizer needs --tokenizer-model DIR")
    if c.split is not None:
        parts = c.split.replace("/", ",").split(",")
        require(all(x.strip().replace(".", "", 1).isdigit() for x in parts) and 1 <= len(parts) <= 3,
                f"--split {c.split!r}: expected up to three numbers such as 969,30,1")
    elif c.data_path:  # (mock data: megatron-core draws every split alike)
        warn("--data-path without --split: using Megatron-LM's legacy default 969,30,1")
        return {"split": "969,30,1"}
    return None


CHECKS = (validate,)
