#!/usr/bin/env python3
"""Training throughput and peak memory of a small GPT-MoE on 1, 2 and 4 processes for each parallel axis.

    python benchmarks/train_step.py [--router-type topk|base|sam] [--iters 10] [--warmup 3]
        [--configs dp2 tp2 ...] [--nproc-max 4] [--device auto|cpu|cuda] [extra pretrain flags ...]

Each configuration is one torchrun launch of ``benchmarks/_train_step_worker.py``, which builds the job with
``megatron_moe.training.setup`` and times ``train_step`` on mock data: --warmup steps, then --iters timed
steps. A step's time is the slowest rank's (ranks start each step at a barrier); the table shows the median.

    tokens/s = global batch x sequence length / median step time

``x 1 proc`` is tokens/s over the 1-process baseline measured in the same run (always run first), so rows
from one invocation compare the parallel layouts of the same model (``initialize_weights`` makes it the same
model whatever the layout) on the same machine. Peak memory is the largest over ranks: max RSS on CPU
(the Python + torch runtime included, a few hundred MiB), ``torch.cuda.max_memory_allocated`` on GPU.

Configurations: DP, TP (with sequence parallelism, which megatron-core requires for MoE), PP, EP (experts
sharded across the data-parallel ranks) at 2 and 4 processes, plus TP2xEP2 and PP2xEP2. On CPU the processes
use gloo with one thread each (OMP_NUM_THREADS=1, the baseline too); when there are fewer cores than
processes they share cores, and the ratio shows it. Flags this script does not know are passed to every
run after the model's (e.g. ``--transformer-impl local`` on a GPU without Transformer Engine, ``--bf16``).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional

REPO = Path(__file__).resolve().parents[1]
WORKER = Path(__file__).resolve().parent / "_train_step_worker.py"

# Small enough for a 2-core CPU, big enough that the steps are compute, not Python overhead: 4 layers so
# PP=4 has one per stage, 8 experts so EP=4 has two per rank, 8 micro batches so PP has a pipeline to fill.
MODEL = [
    "--num-layers", "4", "--hidden-size", "128", "--num-attention-heads", "4", "--seq-length", "128",
    "--max-position-embeddings", "128", "--swiglu", "--ffn-hidden-size", "512", "--disable-bias-linear",
    "--normalization", "RMSNorm", "--num-experts", "8",
    "--micro-batch-size", "2", "--global-batch-size", "16", "--lr", "1e-4", "--lr-warmup-iters", "0",
    "--mock-data", "--tokenizer-type", "NullTokenizer", "--vocab-size", "1000",
    "--hidden-dropout", "0", "--attention-dropout", "0", "--eval-interval", "1000000", "--eval-iters", "1",
    "--seed", "1234",
]
# Per routing scheme: BASE routes to one expert with no auxiliary loss; SAM's 4 groups of 2 experts are a
# multiple of every EP size here, so all rows train the same SAM model.
ROUTERS = {
    "topk": ["--moe-router-type", "topk", "--moe-router-topk", "2", "--moe-aux-loss-coeff", "0.01",
             "--moe-token-dispatcher-type", "alltoall"],
    "base": ["--moe-router-type", "base", "--moe-router-topk", "1", "--moe-aux-loss-coeff", "0"],
    "sam": ["--moe-router-type", "sam", "--moe-router-topk", "2", "--sam-num-groups", "4"],
}


@dataclass(frozen=True)
class Layout:
    name: str
    nproc: int
    tp: int = 1
    pp: int = 1
    ep: int = 1

    @property
    def dp(self) -> int:
        return self.nproc // (self.tp * self.pp)

    def flags(self) -> List[str]:
        sequence_parallel = ["--sequence-parallel"] if self.tp > 1 else []
        return ["--tensor-model-parallel-size", str(self.tp), "--pipeline-model-parallel-size", str(self.pp),
                "--expert-model-parallel-size", str(self.ep), *sequence_parallel]


BASELINE = Layout("1proc", 1)
LAYOUTS = [
    Layout("dp2", 2), Layout("dp4", 4),
    Layout("tp2", 2, tp=2), Layout("tp4", 4, tp=4),
    Layout("pp2", 2, pp=2), Layout("pp4", 4, pp=4),
    Layout("ep2", 2, ep=2), Layout("ep4", 4, ep=4),
    Layout("tp2xep2", 4, tp=2, ep=2), Layout("pp2xep2", 4, pp=2, ep=2),
]


@dataclass
class Result:
    step_ms: float
    tokens_per_s: float
    peak_mib: float
    model: dict  # the shape the job resolved (rank 0's), for the table's heading


class RunFailed(RuntimeError):
    """A configuration did not finish; the message is its most telling output line."""


def _torchrun(layout: Layout, device: str, flags: List[str], warmup: int, iters: int) -> List[dict]:
    """Runs the worker on ``layout.nproc`` processes; returns every rank's JSON."""
    with tempfile.TemporaryDirectory() as out_dir:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(layout.nproc),
               str(WORKER), out_dir, str(warmup), str(iters), *flags, *layout.flags(), "--device", device]
        env = dict(os.environ, PYTHONWARNINGS="ignore", PYTHONPATH=os.pathsep.join(
            filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
        if device == "cpu":
            env.update(OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
        result = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
        ranks = sorted(Path(out_dir).glob("rank*.json"))
        if result.returncode != 0 or len(ranks) != layout.nproc:
            raise RunFailed(_error_line(result.stderr + result.stdout, result.returncode))
        return [json.loads(path.read_text()) for path in ranks]


def _error_line(output: str, returncode: int) -> str:
    """The most telling line of a failed run: a ConfigError / exception line if there is one."""
    lines = [re.sub(r"^\[rank\d+\]:\s*", "", line.strip()) for line in output.splitlines() if line.strip()]
    for line in reversed(lines):
        if "Error" in line and "ChildFailedError" not in line and not line.startswith("File "):
            return line
    return f"torchrun exited {returncode}: {lines[-1] if lines else 'no output'}"


def measure(layout: Layout, device: str, flags: List[str], warmup: int, iters: int) -> Result:
    ranks = _torchrun(layout, device, flags, warmup, iters)
    model = ranks[0]["model"]
    slowest_per_step = [max(steps) for steps in zip(*(rank["step_seconds"] for rank in ranks))]
    step_seconds = statistics.median(slowest_per_step)
    tokens_per_step = model["global_batch_size"] * model["seq_length"]
    return Result(step_ms=1000 * step_seconds, tokens_per_s=tokens_per_step / step_seconds,
                  peak_mib=max(rank["peak_memory_bytes"] for rank in ranks) / 2**20, model=model)


def describe(model: dict, device: str, warmup: int, iters: int) -> str:
    threads = "1 thread/process, " if device == "cpu" else ""
    return (f"GPT-MoE: {model['num_layers']} layers, hidden {model['hidden_size']}, "
            f"{model['num_attention_heads']} heads, {model['num_experts']} experts "
            f"(FFN {model['moe_ffn_hidden_size']}, SwiGLU), {model['moe_router_type']} routing "
            f"top-{model['moe_router_topk']}, seq len {model['seq_length']}, global batch "
            f"{model['global_batch_size']} (micro batch {model['micro_batch_size']}), vocab "
            f"{model['padded_vocab_size']} (padded), {model['dtype']}\n"
            f"{device} ({'gloo' if device == 'cpu' else 'nccl'}), {threads}{os.cpu_count()} cores; "
            f"{warmup} warm-up steps, median of {iters} timed steps")


def _pick_device(requested: str) -> str:
    if requested != "auto":
        return requested
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _default_nproc_max(device: str) -> int:
    if device == "cpu":
        return 4
    import torch

    return min(4, torch.cuda.device_count())


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], allow_abbrev=False,
                                     epilog="Unknown flags are passed to every training run.")
    parser.add_argument("--router-type", choices=sorted(ROUTERS), default="topk")
    parser.add_argument("--iters", type=int, default=10, help="timed steps per configuration")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    parser.add_argument("--configs", nargs="+", choices=[layout.name for layout in LAYOUTS],
                        default=[layout.name for layout in LAYOUTS],
                        help="which layouts besides the 1-process baseline (always run)")
    parser.add_argument("--nproc-max", type=int, default=None,
                        help="skip layouts with more processes (default: 4 on CPU, min(4, GPUs) on CUDA)")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    args, extra = parser.parse_known_args(argv)
    if args.iters < 1 or args.warmup < 0:
        parser.error(f"--iters must be >= 1 and --warmup >= 0 (got {args.iters} and {args.warmup})")
    device = _pick_device(args.device)
    nproc_max = args.nproc_max if args.nproc_max is not None else _default_nproc_max(device)
    if nproc_max < 1:
        parser.error(f"--nproc-max must be >= 1 (got {nproc_max}; on CUDA it defaults to the number of GPUs)")

    flags = [*MODEL, *ROUTERS[args.router_type], *extra]
    chosen = [layout for layout in LAYOUTS if layout.name in args.configs]
    try:
        baseline = measure(BASELINE, device, flags, args.warmup, args.iters)
    except RunFailed as error:
        print(f"train_step.py: error: the 1-process baseline failed: {error}", file=sys.stderr)
        return 1

    print(describe(baseline.model, device, args.warmup, args.iters))
    print(f"{'config':>8} {'procs':>5} {'TP':>3} {'PP':>3} {'EP':>3} {'DP':>3} {'ms/iter':>9} {'tokens/s':>10} "
          f"{'x 1 proc':>8} {'peak MiB/rank':>13}")

    def row(layout: Layout, text: str) -> None:
        print(f"{layout.name:>8} {layout.nproc:>5} {layout.tp:>3} {layout.pp:>3} {layout.ep:>3} {layout.dp:>3} {text}",
              flush=True)

    def figures(result: Result) -> str:
        return (f"{result.step_ms:>9.1f} {result.tokens_per_s:>10.0f} "
                f"{result.tokens_per_s / baseline.tokens_per_s:>8.2f} {result.peak_mib:>13.0f}")

    row(BASELINE, figures(baseline))
    failed = 0
    for layout in chosen:
        if layout.nproc > nproc_max:
            row(layout, f"skipped: {layout.nproc} processes > --nproc-max {nproc_max}")
            continue
        try:
            row(layout, figures(measure(layout, device, flags, args.warmup, args.iters)))
        except RunFailed as error:
            failed += 1
            row(layout, f"FAILED: {error}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
