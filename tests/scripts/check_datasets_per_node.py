"""torchrun tests/scripts/check_datasets_per_node.py OUT_DIR VOCAB_SIZE ROUND...: data.check_datasets on every rank,
once per ROUND (comma-separated dataset prefixes), counting the .bin scans. Each rank writes
OUT_DIR/rank<R>.json (per round: the ConfigError it raised, or None) and appends one line per scan it made to
OUT_DIR/scans.txt ("round N: rank R scanned PREFIX")."""

import json
import os
import sys
from types import SimpleNamespace

import torch.distributed as dist

from megatron_moe import data, platform
from megatron_moe.errors import ConfigError
from megatron_moe.preprocessing import dataset_stats

if __name__ == "__main__":
    out, vocab_size, rounds = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
    scan = dataset_stats.scan_max_token_id
    current = {"round": 0}

    def counted_scan(prefix, dtype):
        with open(os.path.join(out, "scans.txt"), "a") as f:
            f.write(f"round {current['round']}: rank {os.environ['RANK']} scanned {prefix}\n")
        return scan(prefix, dtype)

    dataset_stats.scan_max_token_id = counted_scan
    platform.init_distributed(platform.select_platform("cpu"))
    errors = []
    for number, prefixes in enumerate(rounds):
        current["round"] = number
        try:
            data.check_datasets(SimpleNamespace(mock_data=False, data_path=prefixes.split(","), data_cache_path=None),
                                vocab_size)
            errors.append(None)
        except ConfigError as raised:
            errors.append(str(raised))
    with open(os.path.join(out, f"rank{dist.get_rank()}.json"), "w") as f:
        json.dump(errors, f)
