#!/usr/bin/env python3
"""Routing quality: the same small GPT-MoE trained on real text with each router, compared.

    python benchmarks/routing_quality.py [--seeds 1 2] [--routers switch base ...] [--iters 120]
        [--out benchmarks/results/routing_quality] [--smoke] [extra pretrain flags ...]
    python benchmarks/routing_quality.py --report-only [--out DIR]   # table and PNGs from DIR/runs/*.json

What the BASE and SAM papers compare, reproduced small: every router trains the same model on the King James
Bible (GPT-2 BPE, ``examples/prepare_kjv_data.sh``; the validation loss is on the held-out ``--split``
documents) for the same tokens, in the same 2-process expert-parallel layout (EP=2, so SAM has 2 groups and
every router pays for the same all-to-alls), one thread per process.

Routers (equal *active* expert parameters per token: a top-1 router activates one expert of FFN width W, a
top-2 router two experts of width W/2; the k=2 models therefore hold half the expert parameters in total):

- ``switch``: megatron top-1 with the load-balancing aux loss (Switch Transformer)
- ``gshard``: megatron top-2 with the aux loss (GShard)
- ``sinkhorn``: megatron top-1 with ``--moe-router-load-balancing-type sinkhorn`` (no aux loss)
- ``base``: ``--moe-router-type base`` (balanced assignment, no aux loss)
- ``sam``: ``--moe-router-type sam``, k=2 inside one of 2 groups (groups = EP), its default losses
- ``group_limited``: megatron top-2 with ``--moe-router-num-groups 2 --moe-router-group-topk 1`` + aux loss

Every run is one ``torchrun`` of ``pretrain_gpt_moe.py`` with ``--tensorboard-dir``; its figures are read
back from the TensorBoard scalars the training writes (nothing is timed or counted here):
validation loss per ``--eval-interval`` against tokens and wall seconds since the writer opened; tokens/s
(median of the logged iterations after the first); max/mean expert load per layer (``expert-load/*``,
averaged over the logged intervals); the dropped fraction, 1 - (token, expert) assignments in the routing
maps / (tokens x k); all-to-all rows and remote bytes per token and MoE layer (``moe-comm/*``).

Each run writes ``OUT/runs/ROUTER_seedN.json`` as soon as it ends; a run whose JSON exists with the same
configuration is skipped, so an interrupted benchmark resumes. Then ``OUT/table.md`` and the PNGs
``OUT/loss.png`` (validation loss vs training tokens, mean over seeds, shaded min-max) and
``OUT/expert_load.png`` (max/mean load per layer) are written from every JSON present; ``--report-only``
writes them from the stored JSONs without training. Neither shows tokens/s or wall time: the runs share a
loaded machine, so their speeds compare the machine's load, not the routers (the JSONs keep them;
``benchmarks/moe_dispatch.py`` compares speeds in one launch).
``--smoke``: a tiny model, a few iterations, one seed, three routers (tests use it).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / "data"

MODEL = [
    "--num-layers", "4", "--hidden-size", "128", "--num-attention-heads", "4", "--seq-length", "128",
    "--max-position-embeddings", "128", "--normalization", "RMSNorm", "--swiglu", "--ffn-hidden-size", "512",
    "--disable-bias-linear", "--moe-token-dispatcher-type", "alltoall",
    "--position-embedding-type", "rope", "--num-experts", "8", "--hidden-dropout", "0",
    "--attention-dropout", "0", "--micro-batch-size", "8", "--global-batch-size", "16",
    "--lr", "2e-3", "--min-lr", "2e-4", "--lr-warmup-iters", "10", "--lr-decay-style", "cosine",
    "--log-interval", "5", "--eval-interval", "20", "--eval-iters", "4",
]
SMOKE_MODEL = [
    "--num-layers", "2", "--hidden-size", "64", "--num-attention-heads", "4", "--seq-length", "64",
    "--max-position-embeddings", "64", "--normalization", "RMSNorm", "--swiglu", "--ffn-hidden-size", "256",
    "--disable-bias-linear", "--moe-token-dispatcher-type", "alltoall",
    "--position-embedding-type", "rope", "--num-experts", "8", "--hidden-dropout", "0",
    "--attention-dropout", "0", "--micro-batch-size", "4", "--global-batch-size", "8",
    "--lr", "3e-3", "--min-lr", "3e-4", "--lr-warmup-iters", "2", "--lr-decay-style", "cosine",
    "--log-interval", "2", "--eval-interval", "4", "--eval-iters", "2",
]
# FFN width of one expert of a top-1 router; a top-k router's experts get 1/k of it
EXPERT_WIDTH = {"full": 512, "smoke": 128}
EP = 2
LAYOUT = ["--expert-model-parallel-size", str(EP)]

# name: (top-k, flags besides the expert width)
ROUTERS: Dict[str, tuple] = {
    "switch": (1, ["--moe-router-topk", "1", "--moe-aux-loss-coeff", "0.01"]),
    "gshard": (2, ["--moe-router-topk", "2", "--moe-aux-loss-coeff", "0.01"]),
    "sinkhorn": (1, ["--moe-router-topk", "1", "--moe-router-load-balancing-type", "sinkhorn"]),
    "base": (1, ["--moe-router-type", "base", "--moe-router-topk", "1"]),
    "sam": (2, ["--moe-router-type", "sam", "--moe-router-topk", "2", "--sam-num-groups", str(EP)]),
    "group_limited": (2, ["--moe-router-topk", "2", "--moe-router-num-groups", str(EP),
                          "--moe-router-group-topk", "1", "--moe-aux-loss-coeff", "0.01"]),
}
SMOKE_ROUTERS = ["switch", "base", "sam"]


def data_flags() -> List[str]:
    prefix = DATA / "kjv_text_document"
    if not Path(f"{prefix}.idx").is_file():
        sys.exit(f"error: {prefix}.idx not found: run `bash examples/prepare_kjv_data.sh` first")
    return ["--data-path", str(prefix), "--split", "969,30,1", "--tokenizer-type", "GPT2BPETokenizer",
            "--vocab-file", str(DATA / "gpt2-vocab.json"), "--merge-file", str(DATA / "gpt2-merges.txt")]


def run_flags(preset: str, router: str, seed: int, iters: int, extra: List[str]) -> List[str]:
    """The pretrain flags of one run (without --tensorboard-dir); equal active expert width per token."""
    k, flags = ROUTERS[router]
    model = SMOKE_MODEL if preset == "smoke" else MODEL
    return [*model, *LAYOUT, *flags, "--moe-ffn-hidden-size", str(EXPERT_WIDTH[preset] // k),
            "--train-iters", str(iters), "--seed", str(seed), *data_flags(), *extra]


def flag_value(flags: List[str], name: str) -> str:
    return flags[len(flags) - 1 - flags[::-1].index(name) + 1]


def git_commit() -> str:
    def git(*args):
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True).stdout.strip()

    return git("rev-parse", "--short", "HEAD") + ("+dirty" if git("status", "--porcelain", "--untracked-files=no") else "")


# ---------------------------------------------------------------------------------------------- one run


def read_scalars(tb_dir: Path):
    """(wall time the writer opened, {tag: [(step, wall_time, value)]}) from a run's TensorBoard events."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tb_dir), size_guidance={"scalars": 0})
    events.Reload()
    scalars = {tag: [(e.step, e.wall_time, e.value) for e in events.Scalars(tag)]
               for tag in events.Tags()["scalars"]}
    return events.FirstEventTimestamp(), scalars


def summarize_run(flags: List[str], k: int, start: float, scalars: Dict[str, list]) -> dict:
    """The figures of one run from its scalars (see the module docstring)."""
    tokens_per_iter = int(flag_value(flags, "--global-batch-size")) * int(flag_value(flags, "--seq-length"))
    log_interval = int(flag_value(flags, "--log-interval"))
    interval = int(flag_value(flags, "--eval-interval"))
    periodic = {}  # the validations every --eval-interval (the final one, after the last iteration, left out)
    for step, wall, value in scalars["validation lm loss"]:
        if step % interval == 0:
            periodic.setdefault(step, (wall, value))
    validation = [{"iteration": step, "tokens": step * tokens_per_iter, "seconds": wall - start, "loss": value}
                  for step, (wall, value) in periodic.items()]
    throughput = [value for _, _, value in scalars["throughput (tokens/s)"]][1:] or \
                 [value for _, _, value in scalars["throughput (tokens/s)"]]
    layers = sorted({tag.split("/")[1] for tag in scalars if tag.startswith("expert-load/")})
    max_over_mean = {layer: statistics.fmean(v for _, _, v in scalars[f"expert-load/{layer}/max_over_mean"])
                     for layer in layers}
    assignments = sum(v for layer in layers for _, _, v in scalars[f"expert-load/{layer}/assignments"])
    logged = sum(len(scalars[f"expert-load/{layer}/assignments"]) for layer in layers)
    return {
        "validation": validation,
        "train_loss": [{"iteration": step, "loss": value} for step, _, value in scalars["lm loss"]],
        "tokens_per_s": statistics.median(throughput),
        "max_over_mean_per_layer": max_over_mean,
        "dropped_fraction": 1.0 - assignments / (logged * log_interval * tokens_per_iter * k),
        "rows_per_token": statistics.fmean(v for _, _, v in scalars["moe-comm/rows_per_token"]),
        "remote_bytes_per_token": statistics.fmean(v for _, _, v in scalars["moe-comm/remote_bytes_per_token"]),
    }


def train_one(out: Path, work: Path, preset: str, router: str, seed: int, iters: int,
              extra: List[str]) -> dict:
    """Trains one (router, seed) unless its JSON with this configuration exists; returns its record."""
    flags = run_flags(preset, router, seed, iters, extra)
    result = out / "runs" / f"{router}_seed{seed}.json"
    if result.is_file():
        record = json.loads(result.read_text())
        if record["flags"] == flags:
            print(f"[skip] {router} seed {seed}: {result} exists", flush=True)
            return record
        sys.exit(f"error: {result} was made with other flags; remove it or pass another --out")
    tb_dir = work / f"tb_{router}_seed{seed}_{int(time.time())}"
    log = work / f"{router}_seed{seed}.log"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(EP),
           str(REPO / "pretrain_gpt_moe.py"), *flags, "--tensorboard-dir", str(tb_dir)]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    print(f"[run] {router} seed {seed} ({iters} iterations) -> {log}", flush=True)
    began = time.perf_counter()
    with open(log, "w") as stream:
        code = subprocess.run(cmd, cwd=REPO, env=env, stdout=stream, stderr=subprocess.STDOUT).returncode
    wall = time.perf_counter() - began
    if code != 0:
        sys.exit(f"error: {router} seed {seed} exited {code}; see {log}")
    start, scalars = read_scalars(tb_dir)
    record = {"router": router, "seed": seed, "top_k": ROUTERS[router][0], "commit": git_commit(),
              "wall_s": wall, "flags": flags, **summarize_run(flags, ROUTERS[router][0], start, scalars)}
    result.parent.mkdir(parents=True, exist_ok=True)
    tmp = result.with_suffix(".tmp")
    tmp.write_text(json.dumps(record, indent=1))
    tmp.replace(result)
    final = record["validation"][-1]["loss"]
    print(f"[done] {router} seed {seed}: {wall:.0f} s, final validation loss {final:.4f}, "
          f"{record['tokens_per_s']:.0f} tokens/s", flush=True)
    return record


# ------------------------------------------------------------------------------------ across runs


def aggregate(records: List[dict]) -> Dict[str, dict]:
    """Per router (in ROUTERS order): its seeds, final validation loss mean and half range, mean figures."""
    table = {}
    for router in ROUTERS:
        runs = sorted((r for r in records if r["router"] == router), key=lambda r: r["seed"])
        if not runs:
            continue
        finals = [r["validation"][-1]["loss"] for r in runs]
        table[router] = {
            "seeds": [r["seed"] for r in runs],
            "top_k": runs[0]["top_k"],
            "finals": finals,
            "loss": statistics.fmean(finals),
            "spread": (max(finals) - min(finals)) / 2,
            "tokens_per_s": statistics.fmean(r["tokens_per_s"] for r in runs),
            "max_over_mean": statistics.fmean(statistics.fmean(r["max_over_mean_per_layer"].values())
                                              for r in runs),
            "dropped_fraction": statistics.fmean(r["dropped_fraction"] for r in runs),
            "rows_per_token": statistics.fmean(r["rows_per_token"] for r in runs),
            "remote_bytes_per_token": statistics.fmean(r["remote_bytes_per_token"] for r in runs),
        }
    return table


def format_table(table: Dict[str, dict]) -> str:
    best = min(row["loss"] for row in table.values())
    lines = ["| router | k | seeds | final val. loss (± half range) | vs best | per seed | max/mean load | "
             "dropped | a2a rows/token | a2a remote bytes/token |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for router, row in table.items():
        lines.append(
            f"| {router} | {row['top_k']} | {','.join(map(str, row['seeds']))} | "
            f"{row['loss']:.3f} ± {row['spread']:.3f} | {row['loss'] - best:+.3f} | "
            f"{', '.join(f'{loss:.3f}' for loss in row['finals'])} | "
            f"{row['max_over_mean']:.2f} | {row['dropped_fraction']:.3f} | {row['rows_per_token']:.2f} | "
            f"{row['remote_bytes_per_token']:.0f} |")
    return "\n".join(lines)


def footer(records: List[dict]) -> str:
    """What the table's losses are: after how many tokens, and where the per-seed curves are."""
    tokens = sorted({r["validation"][-1]["tokens"] for r in records})
    iterations = sorted({r["validation"][-1]["iteration"] for r in records})
    return (f"Final validation loss after {', '.join(f'{t:,}' for t in tokens)} training tokens "
            f"({', '.join(map(str, iterations))} iterations); ± is half the range over the seeds; "
            "each run's curves are in runs/ROUTER_seedN.json.")


def curve(runs: List[dict]):
    """Training tokens, mean/min/max validation loss over seeds at each evaluation (the points the seeds
    share)."""
    points = min(len(r["validation"]) for r in runs)
    xs = [statistics.fmean(r["validation"][i]["tokens"] for r in runs) for i in range(points)]
    losses = [[r["validation"][i]["loss"] for r in runs] for i in range(points)]
    return xs, [statistics.fmean(v) for v in losses], [min(v) for v in losses], [max(v) for v in losses]


def plot(records: List[dict], table: Dict[str, dict], out: Path) -> List[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(8, 4.8))
    low, high = math.inf, -math.inf
    for router in table:
        xs, mean, lo, hi = curve([r for r in records if r["router"] == router])
        xs = [v * 1e-3 for v in xs]
        line, = axis.plot(xs, mean, marker=".", label=f"{router} (k={table[router]['top_k']})")
        axis.fill_between(xs, lo, hi, color=line.get_color(), alpha=0.2)
        low = min(low, min(lo))
        high = max(high, mean[min(1, len(mean) - 1)])  # zoom past the first evaluation
    axis.set_xlabel("training tokens (thousands)")
    axis.set_ylabel("validation lm loss")
    axis.set_ylim(low - 0.05, high + 0.05)
    axis.grid(alpha=0.3)
    axis.legend()
    axis.set_title(f"KJV, GPT-2 BPE, EP={EP}, equal active expert parameters\nmean over seeds, shaded min-max",
                   fontsize=10)
    figure.tight_layout()
    loss_png = out / "loss.png"
    figure.savefig(loss_png, dpi=110)
    plt.close(figure)

    figure, axis = plt.subplots(figsize=(8, 4))
    width = 0.8 / len(table)
    for index, router in enumerate(table):
        runs = [r for r in records if r["router"] == router]
        layers = sorted(runs[0]["max_over_mean_per_layer"])
        values = [statistics.fmean(r["max_over_mean_per_layer"][layer] for r in runs) for layer in layers]
        axis.bar([i + index * width for i in range(len(layers))], values, width, label=router)
    axis.set_xticks([i + 0.4 - width / 2 for i in range(len(layers))], [f"layer {layer[-2:]}" for layer in layers])
    axis.axhline(1.0, color="black", linewidth=0.8)
    axis.set_ylabel("max / mean tokens per expert")
    axis.set_title("expert load in training (mean over logged intervals and seeds; 1 = balanced)")
    axis.legend(ncol=3, fontsize=8)
    figure.tight_layout()
    load_png = out / "expert_load.png"
    figure.savefig(load_png, dpi=110)
    plt.close(figure)
    return [loss_png, load_png]


def report(out: Path) -> str:
    """Writes OUT/table.md and the PNGs from every OUT/runs/*.json; returns the table's text."""
    records = [json.loads(path.read_text()) for path in sorted((out / "runs").glob("*.json"))]
    if not records:
        sys.exit(f"error: no runs in {out / 'runs'}: train some first (leave out --report-only)")
    table = aggregate(records)
    text = f"{format_table(table)}\n\n{footer(records)}\n"
    (out / "table.md").write_text(text)
    plot(records, table, out)
    return text


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--routers", nargs="+", choices=list(ROUTERS), default=None)
    parser.add_argument("--seeds", nargs="+", type=int, default=None)
    parser.add_argument("--iters", type=int, default=None, help="training iterations (default 120; smoke 8)")
    parser.add_argument("--out", type=Path, default=None,
                        help="default benchmarks/results/routing_quality (smoke: /tmp/routing_quality_smoke)")
    parser.add_argument("--work", type=Path, default=None,
                        help="logs and TensorBoard events (default: TMPDIR/routing_quality/<OUT's name>)")
    parser.add_argument("--smoke", action="store_true", help="tiny model, 8 iterations, one seed, 3 routers")
    parser.add_argument("--report-only", action="store_true",
                        help="write table.md and the PNGs from OUT/runs/*.json, training nothing")
    args, extra = parser.parse_known_args(argv)
    smoke = args.smoke
    routers = args.routers or (SMOKE_ROUTERS if smoke else list(ROUTERS))
    seeds = args.seeds or ([1] if smoke else [1, 2])
    iters = args.iters or (8 if smoke else 120)
    out = args.out or (Path("/tmp/routing_quality_smoke") if smoke else REPO / "benchmarks/results/routing_quality")
    if args.report_only:
        print(report(out), end="")
        print(f"table and PNGs in {out}")
        return
    work = args.work or Path(tempfile.gettempdir()) / "routing_quality" / out.name
    work.mkdir(parents=True, exist_ok=True)
    print(f"routing quality: routers {routers}, seeds {seeds}, {iters} iterations, out {out}", flush=True)
    began = time.perf_counter()
    for seed in seeds:  # seed-major: a partial result already compares every router
        for router in routers:
            train_one(out, work, "smoke" if smoke else "full", router, seed, iters, extra)
    print(report(out), end="")
    print(f"\nbenchmark wall time (this invocation): {(time.perf_counter() - began) / 60:.1f} min; "
          f"table and PNGs in {out}")


if __name__ == "__main__":
    main()
