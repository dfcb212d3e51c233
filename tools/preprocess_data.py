#!/usr/bin/env python3
"""Tokenize JSONL into megatron-core .bin/.idx datasets; a drop-in for Megatron-LM's tool.

    python tools/preprocess_data.py --input corpus.jsonl --output-prefix data/corpus \
        --tokenizer-type GPT2BPETokenizer --vocab-file gpt2-vocab.json \
        --merge-file gpt2-merges.txt --append-eod --workers 8

The work is done by megatron_moe.preprocessing (see preprocess.py there).
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_moe.preprocessing.errors import run_cli  # noqa: E402
from megatron_moe.preprocessing.preprocess import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(run_cli(main))
