"""SAM's one-copy dispatcher vs megatron's alltoall dispatcher: bytes per token and time, on gloo (CPU).

    python benchmarks/moe_dispatch.py [--ep 2 4] [--topk 1 2 4] [--iters 5] [--repeats 3]

For each EP size and k, three MoE layers with the same shape (hidden 256, 16 experts, expert FFN 512,
SwiGLU, 2048 tokens per rank, fp32) run forward + backward on the same random tokens:

- ``sam``: --moe-router-type sam (groups = EP, k experts inside the chosen group, one copy per token);
- ``topk``: megatron's TopKRouter + alltoall dispatcher (k experts anywhere);
- ``group-limited``: the same with --moe-router-num-groups EP --moe-router-group-topk 1 (k experts on one
  rank, like SAM, but one copy per (token, expert)).

Reported per rank-0: bytes handed to the MoE all-to-alls per token (dispatch + combine forward, every
tensor, rows staying local included; backward mirrors it), the wall time of those forward all-to-all steps
(``comm_stats.timing``: the dispatcher's token_dispatch + token_combine; the count exchange happens before,
in preprocess, for every scheme), and the layer forward+backward time. Each run is one torchrun launch
giving the median over ``--iters`` steps after one warm-up; the three schemes run back to back, ``--repeats``
times in turn. Printed: the median of the runs' medians with their min-max, and the ratio to group-limited
as the median (min-max) of the per-repeat ratios (sam and group-limited launched back to back).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
HIDDEN, EXPERTS, FFN, TOKENS_PER_RANK = 256, 16, 512, 2048
SCHEMES = {
    "sam": lambda ep: ["--moe-router-type", "sam", "--sam-num-groups", str(ep)],
    "topk": lambda ep: ["--moe-router-type", "topk", "--moe-token-dispatcher-type", "alltoall"],
    "group-limited": lambda ep: ["--moe-router-type", "topk", "--moe-token-dispatcher-type", "alltoall",
                                 "--moe-router-num-groups", str(ep), "--moe-router-group-topk", "1"],
}


def model_flags(ep: int, topk: int, scheme: str):
    return ["--num-layers", "1", "--hidden-size", str(HIDDEN), "--num-attention-heads", "4",
            "--seq-length", "32", "--swiglu", "--disable-bias-linear", "--normalization", "RMSNorm",
            "--num-experts", str(EXPERTS),
            "--moe-ffn-hidden-size", str(FFN), "--moe-router-topk", str(topk), "--moe-aux-loss-coeff", "0",
            "--sam-group-balance-loss-coeff", "0", "--sam-expert-balance-loss-coeff", "0",
            "--sam-alignment-loss-coeff", "0", "--micro-batch-size", "1", "--train-iters", "1", "--lr", "1e-3",
            "--mock-data", "--tokenizer-type", "NullTokenizer", "--vocab-size", "1000", "--hidden-dropout", "0",
            "--attention-dropout", "0",
            "--device", "cpu", "--expert-model-parallel-size", str(ep), *SCHEMES[scheme](ep)]


def worker(out: str, iters: int, argv):
    """One torchrun process: time the MoE layer of a 1-layer model."""
    import torch
    import torch.distributed as dist

    from megatron_moe.moe import comm_stats
    from megatron_moe.training import setup

    job = setup(argv)
    layer = job.model[0].module.decoder.layers[0].mlp
    generator = torch.Generator().manual_seed(100 + dist.get_rank())
    tokens = torch.randn(TOKENS_PER_RANK, 1, HIDDEN, generator=generator)
    comm_stats.timing = True
    layer_seconds, comm_seconds, bytes_per_token, rows_per_token = [], [], [], []
    for step in range(iters + 1):
        x = tokens.clone().requires_grad_(True)
        comm_stats.reset()
        dist.barrier()
        start = time.perf_counter()
        output, _ = layer(x)
        output.sum().backward()
        elapsed = time.perf_counter() - start
        counts = list(comm_stats.local_counts().values())[0]
        if step > 0:  # the first step warms up allocators and gloo buffers
            layer_seconds.append(elapsed)
            comm_seconds.append(counts["seconds"])
            bytes_per_token.append(counts["bytes"] / counts["tokens"])
            rows_per_token.append(counts["rows"] / counts["tokens"])
    if dist.get_rank() == 0:
        Path(out).write_text(json.dumps(dict(
            layer_ms=1000 * statistics.median(layer_seconds), a2a_ms=1000 * statistics.median(comm_seconds),
            bytes_per_token=statistics.mean(bytes_per_token), rows_per_token=statistics.mean(rows_per_token))))


def measure(ep: int, topk: int, scheme: str, iters: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "result.json")
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(ep),
               __file__, "--worker", out, str(iters), *model_flags(ep, topk, scheme)]
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", CUDA_VISIBLE_DEVICES="")
        result = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
        if result.returncode != 0:
            sys.exit(f"moe_dispatch.py: {scheme} EP={ep} k={topk} failed:\n{result.stderr[-3000:]}")
        return json.loads(Path(out).read_text())


def spread(values) -> str:
    """``median (min-max)``."""
    return f"{statistics.median(values):.2f} ({min(values):.2f}-{max(values):.2f})"


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ep", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--topk", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    print(f"hidden {HIDDEN}, {EXPERTS} experts, expert FFN {FFN} (SwiGLU), {TOKENS_PER_RANK} tokens/rank, fp32, "
          f"gloo on CPU; {args.repeats} runs x median of {args.iters} forward+backward steps; "
          "median (min-max) over runs; ratios x = scheme / group-limited, per run")
    print(f"{'EP':>3} {'k':>2} {'scheme':>14} {'rows/tok':>8} {'bytes/tok':>10} {'a2a fwd ms':>19} "
          f"{'layer f+b ms':>22} {'bytes x':>8} {'a2a x':>17} {'layer x':>17}")
    for ep in args.ep:
        for topk in args.topk:
            runs = {scheme: [] for scheme in SCHEMES}
            for _ in range(args.repeats):
                for scheme in SCHEMES:
                    runs[scheme].append(measure(ep, topk, scheme, args.iters))
            base = runs["group-limited"]
            for scheme, results in runs.items():
                r = results[0]
                a2a_ratio = [x["a2a_ms"] / b["a2a_ms"] for x, b in zip(results, base)]
                layer_ratio = [x["layer_ms"] / b["layer_ms"] for x, b in zip(results, base)]
                print(f"{ep:>3} {topk:>2} {scheme:>14} {r['rows_per_token']:>8.2f} {r['bytes_per_token']:>10.0f} "
                      f"{spread([x['a2a_ms'] for x in results]):>19} {spread([x['layer_ms'] for x in results]):>22} "
                      f"{r['bytes_per_token'] / base[0]['bytes_per_token']:>8.2f} {spread(a2a_ratio):>17} "
                      f"{spread(layer_ratio):>17}", flush=True)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        sys.path.insert(0, str(REPO))
        worker(sys.argv[2], int(sys.argv[3]), sys.argv[4:])
    else:
        main()
