"""What the test modules share (fixtures are in conftest.py): runs of pretrain_gpt_moe.py and of scripts under
torchrun (gloo, CPU), the checks of their error lines, and test data and checkpoints built or copied for them."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = Path(__file__).resolve().parent / "scripts"

# A tiny GPT-MoE: 4 layers so PP=2 has two per stage, 4 experts so EP=4 has one per rank. Dropout off:
# the parity tests compare against one process, and dropout masks depend on the layout.
TINY_MOE = [
    "--num-layers", "4", "--hidden-size", "64", "--num-attention-heads", "4", "--seq-length", "32",
    "--max-position-embeddings", "32", "--swiglu", "--ffn-hidden-size", "256", "--normalization", "RMSNorm",
    "--disable-bias-linear", "--num-experts", "4", "--moe-router-topk", "2", "--moe-aux-loss-coeff", "0.01",
    "--moe-token-dispatcher-type", "alltoall",
    "--micro-batch-size", "2", "--global-batch-size", "8", "--lr", "1e-3", "--lr-warmup-iters", "0",
    "--mock-data", "--tokenizer-type", "NullTokenizer", "--vocab-size", "1000",
    "--hidden-dropout", "0", "--attention-dropout", "0", "--log-interval", "1", "--eval-interval", "1000",
    "--eval-iters", "1", "--seed", "1234", "--device", "cpu",
]


def torchrun(nproc: int, script: Path, args: Sequence[str], timeout: int = 600, check: bool = True,
             env: Optional[Dict[str, str]] = None):
    """Runs ``script`` on ``nproc`` local gloo processes (``env``: added to the environment); returns the
    CompletedProcess."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
           str(script), *args]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", CUDA_VISIBLE_DEVICES="", **(env or {}))
    result = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {result.returncode}\n{result.stdout[-4000:]}\n{result.stderr[-8000:]}")
    return result


def train_losses(nproc: int, args: Sequence[str], tmp_path: Path, train_iters: int = 3) -> List[float]:
    """lm loss of every iteration of ``pretrain_gpt_moe`` (full precision), run on ``nproc`` processes."""
    out = tmp_path / f"losses_{nproc}_{abs(hash(tuple(args)))}.json"
    torchrun(nproc, SCRIPTS / "train_losses.py", [str(out), "--train-iters", str(train_iters), *args])
    return json.loads(out.read_text())


def flags_without(flags: Sequence[str], *names: str) -> List[str]:
    """``flags`` without the options ``names`` (and their values; --mock-data takes none)."""
    out, skip = [], False
    for flag in flags:
        if skip:
            skip = False
            continue
        if flag in names:
            skip = flag != "--mock-data"
            continue
        out.append(flag)
    return out


# TINY_MOE on files: the tokenizer and data flags are the test's own (conftest.py's ``files``)
ON_FILES = flags_without(TINY_MOE, "--mock-data", "--tokenizer-type", "--vocab-size")
VOCAB = 256  # byte-level GPT-2 alphabet of ``files``; <|endoftext|> is id 256


def write_indexed_dataset(prefix, documents: int, seed: int) -> str:
    """An indexed dataset (.bin/.idx) of random tokens below VOCAB written by megatron-core's builder (so no
    record of its largest token id: training scans it)."""
    import torch
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    generator = numpy.random.default_rng(seed)
    builder = IndexedDatasetBuilder(f"{prefix}.bin", dtype=numpy.uint16)
    for _ in range(documents):
        length = int(generator.integers(20, 80))
        builder.add_document(torch.from_numpy(generator.integers(0, VOCAB, length).astype(numpy.int64)), [length])
    builder.finalize(f"{prefix}.idx")
    return str(prefix)


def launch(args: Sequence[str], timeout: int = 300) -> subprocess.CompletedProcess:
    """python pretrain_gpt_moe.py ARGS, one process."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", CUDA_VISIBLE_DEVICES="")
    return subprocess.run([sys.executable, "pretrain_gpt_moe.py", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)


def assert_one_line_error(result: subprocess.CompletedProcess, *fragments: str) -> str:
    """``result`` (of pretrain_gpt_moe.py) exited 2 with one error line holding every fragment; returns it."""
    assert result.returncode == 2, result.stderr[-3000:]
    lines = [line for line in result.stderr.splitlines() if line.startswith("pretrain_gpt_moe.py: error:")]
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def checkpoint_at(root: Path, iteration: int, dest: Path) -> Path:
    """A --save directory holding only ``root``'s checkpoint of ``iteration``."""
    name = f"iter_{iteration:07d}"
    shutil.copytree(root / name, dest / name)
    (dest / "latest_checkpointed_iteration.txt").write_text(str(iteration))
    return dest


def assert_same_files(ours, expected) -> None:
    """The .bin and .idx of dataset prefix ``ours`` equal those of ``expected`` byte for byte."""
    for ext in (".bin", ".idx"):
        assert Path(f"{ours}{ext}").read_bytes() == Path(f"{expected}{ext}").read_bytes(), ext


def wandb_history(run_dir) -> List[Dict[str, float]]:
    """The history rows (step and scalars) a W&B run wrote to its ``run-*.wandb`` file under ``run_dir``.

    The file is W&B's transaction log: a 7-byte header (":W&B", magic, version), then LevelDB log blocks of
    32 KiB whose records (7-byte header: checksum, length, type FULL/FIRST/MIDDLE/LAST) hold protobuf
    ``wandb_internal.Record`` messages; wandb 0.31 ships no reader of its own.
    """
    import struct

    from wandb.proto import wandb_internal_pb2

    (path,) = Path(run_dir).glob("**/run-*.wandb")
    data = path.read_bytes()
    assert data[:4] == b":W&B", f"{path} is no W&B transaction log"
    position, pending, records = 7, b"", []
    while position + 7 <= len(data):
        room = 32768 - position % 32768
        if room < 7:  # a block's tail too short for a header is padding
            position += room
            continue
        _, length, kind = struct.unpack("<IHB", data[position:position + 7])
        if kind == 0:  # zero padding up to the block's end
            position += room
            continue
        chunk = data[position + 7:position + 7 + length]
        position += 7 + length
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):  # FULL or LAST: a record is complete
            records.append(pending)
    rows = []
    for raw in records:
        record = wandb_internal_pb2.Record()
        record.ParseFromString(raw)
        if record.WhichOneof("record_type") == "history":
            rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                         for item in record.history.item})
    return rows
