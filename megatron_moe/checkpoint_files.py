"""The files of a ``--save`` directory, with no megatron-core: the tracker, the iteration folders, and each
checkpoint's ``manifest.json`` (the size and digest of every file it wrote).

Kept apart from :mod:`megatron_moe.checkpointing` (which saves and loads through megatron-core's
dist_checkpointing) so that what only reads files, ``tools/convert_checkpoint.py export`` above all, starts
without importing megatron-core. The functions that hash are collective when a process group exists:
every rank hashes a share of the files.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import List, Optional

import torch.distributed as dist

from megatron_moe import run_config
from megatron_moe.errors import ConfigError

TRACKER = "latest_checkpointed_iteration.txt"
RUN_CONFIG = run_config.FILE_NAME
MANIFEST = "manifest.json"  # size and digest of every other file of the checkpoint (see write_manifest)
# sha256: as fast as sha1 and twice blake2b here (~0.7 GB/s per core, SHA extensions; benchmarks/checkpoint_digest.py).
# Each manifest names its algorithm, so verification follows whatever wrote it.
DIGEST_ALGORITHM = "sha256"


def checkpoint_dir(root: str, iteration: int) -> Path:
    return Path(root) / f"iter_{iteration:07d}"


def read_tracker(root: str):
    """The iteration the tracker names, or None when ``root`` holds no finished checkpoint."""
    path = Path(root) / TRACKER
    if not path.is_file():
        return None
    try:
        raw = path.read_bytes()
    except OSError as error:
        raise ConfigError(f"--load {root}: cannot read {path} ({error.strerror}); fix its permissions") from error
    text = raw.decode("ascii", errors="backslashreplace").strip()
    if not text.isdigit():
        raise ConfigError(f"--load {root}: {path} holds {text[:40]!r}, not an iteration number; write the "
                          "iteration of a complete iter_NNNNNNN directory into it")
    return int(text)


def _file_digest(path: Path, algorithm: str = DIGEST_ALGORITHM) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, algorithm).hexdigest()


def _my_share(files: List[str]) -> List[str]:
    """The files this rank hashes: every world_size-th, so that the ranks share the reading."""
    if not dist.is_initialized():
        return files
    return files[dist.get_rank()::dist.get_world_size()]


def _gather(local: list) -> list:
    """Every rank's ``local`` list, concatenated (just ``local`` outside a process group)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return local
    gathered: list = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, local)
    return [item for part in gathered for item in part]


def write_manifest(directory: Path) -> None:
    """Records the size and digest of every file in checkpoint ``directory`` in ``manifest.json``.

    Collective when a process group exists (call it on every rank): rank 0 lists the files, each rank
    hashes its share, rank 0 writes the manifest. Called after every rank's files are on disk and before
    the tracker names the checkpoint, so a checkpoint the tracker names always has one.
    """
    names = [str(path.relative_to(directory)) for path in sorted(directory.rglob("*"))
             if path.is_file() and path.name != MANIFEST] if not dist.is_initialized() or dist.get_rank() == 0 else None
    if dist.is_initialized():
        box = [names]
        dist.broadcast_object_list(box, src=0)
        names = box[0]
    entries = _gather([(name, (directory / name).stat().st_size, _file_digest(directory / name))
                       for name in _my_share(names)])
    if not dist.is_initialized() or dist.get_rank() == 0:
        manifest = {"algorithm": DIGEST_ALGORITHM,
                    "files": {name: {"bytes": size, "digest": digest} for name, size, digest in sorted(entries)}}
        tmp = directory / (MANIFEST + ".tmp")
        tmp.write_text(json.dumps(manifest, indent=1))
        os.replace(tmp, directory / MANIFEST)


def _damage(directory: Path, name: str, entry: dict, algorithm: str) -> Optional[str]:
    """What is wrong with file ``name`` against its manifest ``entry``, or None. Never raises: the other
    ranks wait for this one's answer."""
    path = directory / name
    try:
        if not path.is_file():
            return f"{path} is missing"
        if path.stat().st_size != entry["bytes"]:
            return f"{path} holds {path.stat().st_size} bytes, {entry['bytes']} were written"
        if _file_digest(path, algorithm) != entry["digest"]:
            return f"{path} does not match its {algorithm} digest"
    except OSError as error:
        return f"{path} cannot be read ({error.strerror})"
    return None


def verify_checkpoint(iter_dir) -> None:
    """Raises ConfigError naming the first damaged file of checkpoint ``iter_dir`` (missing, another size or
    another digest than its manifest.json records), or when it has no readable manifest.

    Collective when a process group exists (call it on every rank: each hashes a share of the files and
    every rank raises the same error); one process checks everything by itself.
    """
    directory = Path(iter_dir)
    manifest_path = directory / MANIFEST
    skip = "; pass --no-verify-checkpoint to load it unverified"
    try:
        manifest = json.loads(manifest_path.read_bytes())
        files, algorithm = manifest["files"], manifest["algorithm"]
        hashlib.new(algorithm)
    except FileNotFoundError:
        raise ConfigError(f"{manifest_path} is missing: the checkpoint's files cannot be verified (written "
                          f"before checkpoints recorded digests, or damaged){skip}") from None
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise ConfigError(f"{manifest_path} is unreadable ({type(error).__name__}); the checkpoint is "
                          f"damaged{skip}") from error
    names = sorted(files)
    damaged = sorted(problem for name in _my_share(names)
                     if (problem := _damage(directory, name, files[name], algorithm)) is not None)
    damaged = sorted(_gather(damaged))
    if damaged:
        others = f" (and {len(damaged) - 1} more damaged files)" if len(damaged) > 1 else ""
        raise ConfigError(f"checkpoint {directory} is damaged: {damaged[0]}{others}; load another iteration "
                          f"(point the tracker at it) or save it again{skip}")


def check_checkpoint_files(directory: Optional[Path], verify: bool) -> None:
    """Before the model is built, on every rank: the checkpoint ``--load`` resumes from
    (``checkpointing.find_checkpoint``) is complete and, with ``verify`` (not --no-verify-checkpoint), its
    files match their digests. Collective."""
    if directory is None:
        return
    if not directory.is_dir():
        iteration = int(directory.name.split("_")[-1])
        raise ConfigError(f"--load: {directory.parent / TRACKER} names iteration {iteration}, but the folder "
                          f"{directory} is missing; point the tracker at an iteration folder that exists or save again")
    for name in (RUN_CONFIG, ".metadata"):
        if not (directory / name).is_file():
            raise ConfigError(f"--load: {directory / name} is missing; the checkpoint is incomplete: "
                              "point the tracker at another iteration or save it again")
    if verify:
        verify_checkpoint(directory)

