"""Runs scripts under torchrun (gloo, CPU) for the multi-process tests, and reads back what they saved."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence

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
