#!/usr/bin/env python3
"""Merge every megatron-core .bin/.idx dataset of a directory into one; as Megatron-LM's tool.

    python tools/merge_datasets.py --input data/shards --output-prefix data/corpus_text_document

The work is done by megatron_moe.preprocessing.merge.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from megatron_moe.preprocessing.errors import run_cli  # noqa: E402
from megatron_moe.preprocessing.merge import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(run_cli(main))
