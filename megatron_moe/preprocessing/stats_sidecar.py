"""PREFIX.stats.json: the largest token id of a dataset, recorded by the tool that wrote it.

A sidecar, so the .bin/.idx stay byte-identical to Megatron-LM's. Training compares the id with its
vocabulary without reading the .bin (dataset_stats.py). The record names the size and modification
time of the .bin it describes, and is ignored once the .bin has another: a dataset rewritten by
another tool, or copied without its times, is scanned instead.

Where the dataset's folder is read-only (shared corpora often are), training keeps what it scanned in
a cache folder instead (``--data-cache-path``), under a name made of the prefix's base name and a digest
of its absolute path, so that two corpora with the same base name do not share a record.
"""

import contextlib
import hashlib
import json
import os
from typing import Optional

from .scratch import temporary_name

STATS_SUFFIX = ".stats.json"


def _bin_stamp(bin_path: str) -> dict:
    stat = os.stat(bin_path)
    return {"bin_bytes": stat.st_size, "bin_mtime_ns": stat.st_mtime_ns}


def stats_path(prefix: str, cache_dir: Optional[str] = None) -> str:
    """Where PREFIX's record lives: beside it, or (``cache_dir``) in that folder."""
    if cache_dir is None:
        return prefix + STATS_SUFFIX
    absolute = os.path.abspath(prefix)
    digest = hashlib.sha256(absolute.encode()).hexdigest()[:16]
    return os.path.join(cache_dir, f"{os.path.basename(absolute)}-{digest}{STATS_SUFFIX}")


def record_max_token_id(prefix: str, max_token_id: int, cache_dir: Optional[str] = None) -> str:
    """Write PREFIX's record for the .bin as it is now, beside it or in ``cache_dir`` (atomically: a reader
    sees all or nothing; a failed write leaves nothing behind). Returns the path written."""
    path = stats_path(prefix, cache_dir)
    if cache_dir is not None:
        os.makedirs(cache_dir, exist_ok=True)
    temporary = temporary_name(path)
    try:
        with open(temporary, "w", encoding="utf-8") as f:
            json.dump({"max_token_id": int(max_token_id), **_bin_stamp(prefix + ".bin")}, f)
            f.write("\n")
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(temporary)
        raise
    return path


def _read_record(path: str, stamp: dict) -> Optional[int]:
    try:
        with open(path, encoding="utf-8") as f:
            stats = json.load(f)
    except (OSError, ValueError):
        return None
    if not isinstance(stats, dict) or any(stats.get(key) != value for key, value in stamp.items()):
        return None
    value = stats.get("max_token_id")
    return value if isinstance(value, int) else None


def recorded_max_token_id(prefix: str, cache_dir: Optional[str] = None) -> Optional[int]:
    """The largest token id recorded for PREFIX (beside it, else in ``cache_dir``), or None if no record
    matches its .bin."""
    try:
        stamp = _bin_stamp(prefix + ".bin")
    except OSError:
        return None
    for directory in (None, cache_dir) if cache_dir is not None else (None,):
        value = _read_record(stats_path(prefix, directory), stamp)
        if value is not None:
            return value
    return None
