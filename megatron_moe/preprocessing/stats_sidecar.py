"""PREFIX.stats.json: the largest token id of a dataset, recorded by the tool that wrote it.

A sidecar, so the .bin/.idx stay byte-identical to Megatron-LM's. Training compares the id with its
vocabulary without reading the .bin (dataset_stats.py). The record names the size and modification
time of the .bin it describes, and is ignored once the .bin has another: a dataset rewritten by
another tool, or copied without its times, is scanned instead.
"""

import json
import os
from typing import Optional

from .scratch import temporary_name

STATS_SUFFIX = ".stats.json"


def _bin_stamp(bin_path: str) -> dict:
    stat = os.stat(bin_path)
    return {"bin_bytes": stat.st_size, "bin_mtime_ns": stat.st_mtime_ns}


def record_max_token_id(prefix: str, max_token_id: int) -> None:
    """Write PREFIX.stats.json for the .bin as it is now (atomically: a reader sees all or nothing)."""
    path = prefix + STATS_SUFFIX
    temporary = temporary_name(path)
    with open(temporary, "w", encoding="utf-8") as f:
        json.dump({"max_token_id": int(max_token_id), **_bin_stamp(prefix + ".bin")}, f)
        f.write("\n")
    os.replace(temporary, path)


def recorded_max_token_id(prefix: str) -> Optional[int]:
    """The largest token id recorded for PREFIX, or None if no record matches its .bin."""
    try:
        with open(prefix + STATS_SUFFIX, encoding="utf-8") as f:
            stats = json.load(f)
        stamp = _bin_stamp(prefix + ".bin")
    except (OSError, ValueError):
        return None
    if not isinstance(stats, dict) or any(stats.get(key) != value for key, value in stamp.items()):
        return None
    value = stats.get("max_token_id")
    return value if isinstance(value, int) else None
