"""SAM's one-copy dispatcher vs megatron's alltoall dispatcher: bytes per token and time, on gloo (CPU).

    python benchmarks/moe_dispatch.py [--ep 2 4] [--topk 1 2 4] [--iters 5]

For each EP size and k, three MoE layers with the same shape (hidden 256, 16 experts, expert FFN 512,
SwiGLU, 2048 tokens per rank, fp32) run forward + backward on the same random tokens:

- ``sam``: --moe-router-type sam (groups = EP, k experts inside the chosen group, one copy per token);
- ``topk``: megatron's TopKRouter + alltoall dispatcher (k experts anywhere);
- ``group-limited``: the same with --moe-router-num-groups EP --moe-router-group-topk 1 (k experts on one
  rank, like SAM, but one copy per (token, expert)).

Reported per rank-0: bytes handed to the MoE all-to-alls per token (dispatch + combine forward, every
tensor, rows staying local included; backward mirrors it), the wall time of those forward all-to-all steps
(``comm_stats.timing``: the dispatcher's token_dispatch + token_combine), and the layer forward+backward time
(median over iterations after one warm-up). Ratios are against group-limited, measured in the same run.
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
    "topk": lambda ep: ["--moe-router-type", "topk"],
    "group-limited": lambda ep: ["--moe-router-type", "topk", "--moe-router-num-groups", str(ep),
                                 "--moe-router-group-topk", "1"],
}


def model_flags(ep: int, topk: int, scheme: str):
    return ["--num-layers", "1", "--hidden-size", str(HIDDEN), "--num-attention-heads", "4",
            "--seq-length", "32", "--swiglu", "--normalization", "RMSNorm", "--num-experts", str(EXPERTS),
            "--moe-ffn-hidden-size", str(FFN), "--moe-router-topk", str(topk), "--moe-aux-loss-coeff", "0",
            "--sam-group-balance-loss-coeff", "0", "--sam-expert-balance-loss-coeff", "0",
            "--sam-alignment-loss-coeff", "0", "--micro-batch-size", "1", "--train-iters", "1", "--lr", "1e-3",
            "--mock-data", "--vocab-size", "1000", "--hidden-dropout", "0", "--attention-dropout", "0",
            "--device", "cpu", "--expert-model-parallel-size", str(ep), *SCHEMES[scheme](ep)]


def worker(out: str, iters: int, argv):
    """One torchrun process: time the MoE layer of a 1-layer model."""
    import torch
    import torch.distributed as dist

    from megatron_moe.moe import comm_stats
    from megatron_moe.training import setup

    job = setup(argv)
    layer = job.model.module.decoder.layers[0].mlp
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


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ep", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--topk", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--iters", type=int, default=5)
    args = parser.parse_args()
    print(f"hidden {HIDDEN}, {EXPERTS} experts, expert FFN {FFN} (SwiGLU), {TOKENS_PER_RANK} tokens/rank, fp32, "
          f"gloo on CPU; median of {args.iters} forward+backward steps; ratios = sam / group-limited")
    header = (f"{'EP':>3} {'k':>2} {'scheme':>14} {'rows/tok':>8} {'bytes/tok':>10} {'a2a fwd ms':>11} "
              f"{'layer f+b ms':>13} {'bytes x':>8} {'a2a x':>6} {'layer x':>8}")
    print(header)
    for ep in args.ep:
        for topk in args.topk:
            results = {scheme: measure(ep, topk, scheme, args.iters) for scheme in SCHEMES}
            base = results["group-limited"]
            for scheme, r in results.items():
                print(f"{ep:>3} {topk:>2} {scheme:>14} {r['rows_per_token']:>8.2f} {r['bytes_per_token']:>10.0f} "
                      f"{r['a2a_ms']:>11.2f} {r['layer_ms']:>13.2f} {r['bytes_per_token'] / base['bytes_per_token']:>8.2f} "
                      f"{r['a2a_ms'] / base['a2a_ms']:>6.2f} {r['layer_ms'] / base['layer_ms']:>8.2f}", flush=True)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        sys.path.insert(0, str(REPO))
        worker(sys.argv[2], int(sys.argv[3]), sys.argv[4:])
    else:
        main()
