#!/usr/bin/env python3
"""balanced_assignment: the prices-first solver against the auction it replaced, in the same run; the H100
estimate of the solve next to the MoE layer it serves; on a GPU, both measured.

    PYTHONPATH=. python benchmarks/balanced_assignment.py [--seeds 3] [--sizes 1024x8 ...] [--kinds ...]
        [--exact-max-tokens 4096] [--threads 1] [--no-baseline] [--fairseq-sinkhorn] [--no-estimate]
    PYTHONPATH=. python benchmarks/balanced_assignment.py --device cuda [--tokens 8192 32768] [--repeats 20]
    PYTHONPATH=. python benchmarks/balanced_assignment.py --device cpu --tiny   # the device path, CI-sized

**Table** (default, CPU, one torch thread). For every size and score kind, medians over the seeds of

* new (``megatron_moe.moe.balanced_assignment``): wall ms (best of 3), CPU ms (process time), host syncs
  and launched aten ops per solve (``megatron_moe.host_sync.HostSyncCounter``), exact balance, certified
  gap ``(U - ours) / U`` with U the dual bound ``sum_t max_e(s - p_e) + sum_e capacity_e p_e`` from the
  returned prices, and the gap to scipy's exact optimum (``linear_sum_assignment`` on the T x T matrix of
  the repeated expert columns) up to ``--exact-max-tokens`` tokens;
* old: the auction this solver replaced, frozen in ``benchmarks/baseline_balanced_assignment.py``: the same
  figures, and the CPU-time ratio old / new;
* ``--fairseq-sinkhorn``: also our port of fairseq's auction and megatron-core's sinkhorn + top-1.

Scores: ``gaussian`` = token embeddings h ~ N(0, 1/d) (d = 64) dot centroids c ~ N(0, 1); ``skewed`` =
tokens from 4 tight clusters with Zipf sizes plus a per-expert popularity bias ~ N(0, 2^2); ``clustered``
("trained-like") = tokens from 16 clusters, centroids sharing a popular direction; ``real`` = the
affinities a BASE router solved after a short BASE pretraining (``benchmarks/data/base_affinities_8192x64.pt``,
written by ``benchmarks/dump_base_affinities.py``; the first T rows, only where E = 64 and T <= 8192).

**H100 estimate** (after the table, and with ``--device``): ops and host syncs counted as above, bytes
each op reads and writes and GEMM FLOPs counted the same way (:class:`Traffic`), on clustered scores at
Mixtral-8x7B and DeepSeek-V3-like shapes, turned into time with the assumptions printed beside it
(:data:`H100`), against the forward + backward expert GEMMs of the MoE layer for the same tokens.

**Device** (``--device``, or :func:`measure_on_device` from Python): on one device, the solve of clustered
scores at each shape and token count, timed eager and (CUDA) replayed from a captured CUDA graph, with CUDA
events; and our MoE layer (``--moe-router-type base``: the BASE router and dispatcher, top-1 experts k
times as wide as the model's, i.e. the model's active FLOPs per token) forward + backward on the same
tokens, with the experts one GPU of an expert-parallel group holds (all of Mixtral's 8; 8 of DeepSeek's
256). It prints the measured ratio solve / layer beside the estimate's. ``--device cpu --tiny`` runs the
same code at toy sizes (no CUDA graph on CPU); ``tests/test_balanced_assignment.py`` runs it.
``benchmarks/gpu_first_contact.py`` may run this file as a subprocess with ``--device cuda`` or import
:func:`measure_on_device` (and :func:`format_device_rows`); both print the same lines.
"""

from __future__ import annotations

import argparse
import math
import signal
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

if __package__ in (None, ""):  # run as a script: the repository root on the path, like PYTHONPATH=.
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import baseline_balanced_assignment as baseline  # noqa: E402
from megatron_moe.host_sync import HostSyncCounter  # noqa: E402
from megatron_moe.moe.balanced_assignment import balanced_assignment, expert_capacities  # noqa: E402

FAIRSEQ_MAX_ITERATIONS = 10_000


def gaussian_scores(num_tokens, num_experts, seed, dim=64):
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randn(num_tokens, dim, generator=generator) / math.sqrt(dim)
    return tokens @ torch.randn(num_experts, dim, generator=generator).T


def skewed_scores(num_tokens, num_experts, seed, dim=64, clusters=4):
    generator = torch.Generator().manual_seed(seed)
    zipf = 1.0 / torch.arange(1, clusters + 1, dtype=torch.float)
    cluster = torch.multinomial(zipf, num_tokens, replacement=True, generator=generator)
    centres = torch.randn(clusters, dim, generator=generator)
    tokens = (centres[cluster] + 0.25 * torch.randn(num_tokens, dim, generator=generator)) / math.sqrt(dim)
    popularity = 2.0 * torch.randn(num_experts, generator=generator)
    return tokens @ torch.randn(num_experts, dim, generator=generator).T + popularity


def clustered_scores(num_tokens, num_experts, seed, dim=64, clusters=16):
    generator = torch.Generator().manual_seed(seed)
    centres = torch.randn(clusters, dim, generator=generator)
    cluster = torch.randint(0, clusters, (num_tokens,), generator=generator)
    tokens = centres[cluster] + 0.3 * torch.randn(num_tokens, dim, generator=generator)
    popular = torch.randn(dim, generator=generator)
    centroids = torch.randn(num_experts, dim, generator=generator) + 2.0 * popular
    return tokens @ centroids.T / math.sqrt(dim)


REAL_AFFINITIES = Path(__file__).resolve().parent / "data" / "base_affinities_8192x64.pt"


def real_scores(num_tokens, num_experts, seed):
    """One trained router's affinities: the same rows for every seed (None where the dump does not fit)."""
    scores = torch.load(REAL_AFFINITIES).float()
    return scores[:num_tokens] if num_experts == scores.shape[1] and num_tokens <= scores.shape[0] else None


SCORES = {"gaussian": gaussian_scores, "skewed": skewed_scores, "clustered": clustered_scores, "real": real_scores}
SOLVERS = {"new": balanced_assignment, "old": baseline.balanced_assignment}
DEFAULT_SIZES = [(1024, 8), (8192, 8), (32768, 8), (8192, 64), (32768, 128), (8192, 256), (32768, 256),
                 # 8 and 16 tokens per expert, reported as measured
                 (512, 64), (1024, 64), (2048, 256), (4096, 256)]


# ------------------------------------------------------------------------------------------ measuring


def total(scores, assignment):
    return float(scores.double().gather(1, assignment[:, None]).sum())


def dual_upper_bound(scores, prices):
    scores, prices = scores.double(), prices.double()
    capacities = expert_capacities(*scores.shape).double()
    return float((scores - prices).amax(dim=1).sum() + (capacities * prices).sum())


def cpu_timed(fn, *args):
    """(result, CPU seconds of this process): less disturbed by other processes than wall time."""
    start = time.process_time()
    result = fn(*args)
    return result, time.process_time() - start


def timed(fn, *args, repeats=1):
    """(result, best wall time over ``repeats`` runs): the best filters out other processes' noise."""
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn(*args)
        best = min(best, time.perf_counter() - start)
    return result, best


_aten = torch.ops.aten
# Ops that read only the rows or entries they return (or write only the entries they are given).
_GATHERS = {_aten.index.Tensor, _aten.gather.default, _aten.index_select.default}
_SCATTERS = {_aten.index_put_.default, _aten.index_put.default, _aten._index_put_impl_.default,
             _aten.index_add_.default, _aten.index_copy_.default, _aten.scatter_.src, _aten.scatter.src}
_GEMMS = {_aten.mm.default, _aten.addmm.default, _aten.bmm.default}


class Traffic(TorchDispatchMode):
    """Bytes read and written, and GEMM FLOPs, of the aten ops run inside: each tensor an op reads or writes
    counts once per op (an op's inputs plus its outputs); a gather reads what it returns, a scatter writes
    what it is given. Views and allocations count nothing. An estimate of device memory traffic: caches
    and fusion would lower it."""

    def __init__(self):
        super().__init__()
        self.bytes = 0
        self.gemm_flops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if any(r.alias_info is not None and not r.alias_info.is_write for r in func._schema.returns):
            return out  # a view
        inputs = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        outputs = [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
        if func.__name__.startswith("new_") or func.overloadpacket.__name__.endswith("_like"):
            moved = sum(t.nbytes for t in outputs)  # a factory: reads nothing
        elif func in _GATHERS:
            moved = sum(t.nbytes for t in inputs[1:]) + 2 * sum(t.nbytes for t in outputs)
        elif func in _SCATTERS:
            moved = 2 * sum(t.nbytes for t in inputs[1:])
        else:
            moved = sum(t.nbytes for t in inputs) + sum(t.nbytes for t in outputs)
        self.bytes += moved
        if func in _GEMMS:
            a, b = (args[1], args[2]) if func is _aten.addmm.default else (args[0], args[1])
            self.gemm_flops += 2 * a.shape[-2] * a.shape[-1] * b.shape[-1] * (a.shape[0] if a.dim() == 3 else 1)
        return out


def counted(fn, *args):
    """{syncs, ops, bytes, gemm_flops} of one call."""
    with HostSyncCounter() as counter, Traffic() as traffic:
        fn(*args)
    return dict(syncs=counter.num_syncs, ops=counter.num_ops, bytes=traffic.bytes, gemm_flops=traffic.gemm_flops)


def exact_assignment(scores):
    from scipy.optimize import linear_sum_assignment

    num_tokens, num_experts = scores.shape
    columns = torch.arange(num_experts).repeat_interleave(expert_capacities(num_tokens, num_experts))
    rows, picked = linear_sum_assignment(scores.double()[:, columns].numpy(), maximize=True)
    assignment = torch.empty(num_tokens, dtype=torch.long)
    assignment[torch.from_numpy(rows)] = columns[torch.from_numpy(picked)]
    return assignment


def fairseq_auction(scores, max_iterations=FAIRSEQ_MAX_ITERATIONS):
    """Port of fairseq's auction (``fairseq/clib/libbase/balanced_assignment.cpp``: experts bid for their top
    T/E tokens, token prices rise, fixed eps = (max S - min S) / 50, a 'keep last round's items' bid for the
    first 100 iterations), with an iteration cap it does not have (it never stops when E does not divide
    T); returns (assignment, iterations, capped). When capped, tokens nobody bid for keep their argmax."""
    worker_job = scores.T.contiguous()
    num_experts, num_tokens = worker_job.shape
    per_expert = num_tokens // num_experts
    eps = ((worker_job.max() - worker_job.min()) / 50).clamp_min(1e-4)
    value, cost, top_value = worker_job.clone(), torch.zeros(num_tokens), worker_job.max()
    tokens = torch.arange(num_tokens)
    won = None
    for iteration in range(max_iterations + 1):
        top_values, top_index = value.topk(per_expert + 1, dim=1)
        increments = top_values[:, :per_expert] - top_values[:, per_expert:] + eps
        bids = torch.zeros_like(worker_job).scatter_(1, top_index[:, :per_expert], increments)
        if 0 < iteration < 100:
            bids.view(-1)[won] = eps  # keep last round's items unless outbid
        high_bid, high_bidder = bids.max(dim=0)
        has_bid = high_bid > 0
        if bool(has_bid.all()) or iteration == max_iterations:
            break
        cost += high_bid
        value = worker_job - cost
        won = (high_bidder * num_tokens + tokens)[has_bid]
        value.view(-1)[won] = top_value if iteration < 100 else worker_job.view(-1)[won]
    capped = not bool(has_bid.all())
    assignment = scores.argmax(dim=1)
    assignment[top_index[:, :per_expert].reshape(-1)] = torch.arange(num_experts).repeat_interleave(per_expert)
    return assignment, iteration, capped


class _Timeout(Exception):
    pass


def megatron_sinkhorn_top1(scores, limit_s):
    """megatron-core's sinkhorn + top-1 (its 'sinkhorn' routing); (assignment or None on timeout,
    iterations). Iterations are counted through torch.mean, which its loop calls once per pass."""
    with warnings.catch_warnings():  # megatron-core announces its Apex / Transformer Engine fallbacks
        warnings.simplefilter("ignore")
        from megatron.core.transformer.moe.moe_utils import sinkhorn

    calls, mean = [0], torch.mean

    def counting_mean(*args, **kwargs):
        calls[0] += 1
        return mean(*args, **kwargs)

    def on_alarm(*_):
        raise _Timeout

    previous = signal.signal(signal.SIGALRM, on_alarm)
    torch.mean = counting_mean
    signal.setitimer(signal.ITIMER_REAL, limit_s)
    try:
        return sinkhorn(scores.float()).argmax(dim=1), calls[0]
    except _Timeout:
        return None, calls[0]
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        torch.mean = mean


# ------------------------------------------------------------------------------------------ the table


def measure_solver(name, scores, row):
    """The figures of one solver on one score matrix, into ``row`` under ``name``."""
    solve = lambda s: SOLVERS[name](s, return_prices=True)  # noqa: E731
    (assignment, prices), cpu = cpu_timed(solve, scores)
    row[f"{name}_cpu_s"] = cpu
    row[f"{name}_s"] = timed(solve, scores, repeats=3 if cpu < 1.0 else 1)[1]
    with HostSyncCounter() as counter:
        solve(scores)
    row[f"{name}_syncs"], row[f"{name}_ops"] = counter.num_syncs, counter.num_ops
    row[f"{name}_balanced"] = torch.equal(torch.bincount(assignment, minlength=scores.shape[1]),
                                          expert_capacities(*scores.shape))
    row[name], row[f"{name}_bound"] = total(scores, assignment), dual_upper_bound(scores, prices)


def run_case(num_tokens, num_experts, kind, args):
    rows = []
    for seed in range(args.seeds):
        scores = SCORES[kind](num_tokens, num_experts, seed)
        if scores is None:
            return rows
        row = {}
        for name in args.solvers:
            SOLVERS[name](scores[:64])  # warm-up outside the timing
            measure_solver(name, scores, row)
        if num_tokens <= args.exact_max_tokens:
            row["optimum"] = total(scores, exact_assignment(scores))
        if args.fairseq_sinkhorn:
            (fairseq, iterations, capped), row["fairseq_s"] = timed(fairseq_auction, scores)
            row["fairseq"], row["fairseq_iterations"], row["fairseq_capped"] = total(scores, fairseq), iterations, capped
            (routed, sinkhorn_iterations), row["sinkhorn_s"] = timed(megatron_sinkhorn_top1, scores, args.sinkhorn_limit)
            row["sinkhorn_iterations"] = sinkhorn_iterations
            if routed is not None:
                load = torch.bincount(routed, minlength=num_experts).double()
                row["sinkhorn"], row["sinkhorn_load"] = total(scores, routed), float(load.max() / load.mean())
        rows.append(row)
    return rows


def median(rows, key):
    values = [row[key] for row in rows if key in row]
    return statistics.median(values) if values else None


def gap(rows, key, reference):
    """Median relative shortfall of ``key`` below ``reference`` (optimum or bound), in %."""
    values = [100 * (row[reference] - row[key]) / abs(row[reference])
              for row in rows if key in row and reference in row]
    return statistics.median(values) if values else None


def worst_gap(rows, key, reference):
    values = [100 * (row[reference] - row[key]) / abs(row[reference])
              for row in rows if key in row and reference in row]
    return max(values) if values else None


def fmt(value, spec, missing="-"):
    return missing if value is None else format(value, spec)


def table_line(num_tokens, num_experts, kind, rows, args):
    cells = [str(num_tokens), str(num_experts), str(num_tokens // num_experts), kind]
    for name in args.solvers:
        cells += [fmt(1e3 * median(rows, f"{name}_s"), ".1f"), fmt(1e3 * median(rows, f"{name}_cpu_s"), ".1f"),
                  str(max(row[f"{name}_syncs"] for row in rows)), fmt(median(rows, f"{name}_ops"), ".0f"),
                  "yes" if all(row[f"{name}_balanced"] for row in rows) else "NO",
                  fmt(worst_gap(rows, name, f"{name}_bound"), ".5f")]
        if name == "new":
            cells.append(fmt(worst_gap(rows, "new", "optimum"), ".5f"))
    if len(args.solvers) == 2:
        ratios = [row["old_cpu_s"] / row["new_cpu_s"] for row in rows]
        cells.append(f"{statistics.median(ratios):.1f}x")
    if args.fairseq_sinkhorn:
        reference = "optimum" if any("optimum" in row for row in rows) else "new_bound"
        timeouts = sum("sinkhorn" not in row for row in rows)
        capped = sum(row["fairseq_capped"] for row in rows)
        cells += [fmt(1e3 * median(rows, "fairseq_s"), ".0f"), fmt(gap(rows, "fairseq", reference), ".3f"),
                  f"{median(rows, 'fairseq_iterations'):.0f}" + (f" ({capped} capped)" if capped else ""),
                  fmt(1e3 * median(rows, "sinkhorn_s"), ".0f") + (f" ({timeouts} timed out)" if timeouts else ""),
                  fmt(median(rows, "sinkhorn_load"), ".2f"), fmt(gap(rows, "sinkhorn", reference), ".3f")]
    return "| " + " | ".join(cells) + " |"


def table_header(args):
    cells = ["T", "E", "T/E", "scores"]
    for name in args.solvers:
        cells += [f"{name} ms", f"{name} CPU ms", f"{name} syncs", f"{name} ops", f"{name} balanced",
                  f"{name} certified gap % (max)"]
        if name == "new":
            cells.append("new gap to exact % (max)")
    if len(args.solvers) == 2:
        cells.append("CPU old / new")
    if args.fairseq_sinkhorn:
        cells += ["fairseq ms", "fairseq gap %", "fairseq iters", "sinkhorn ms", "sinkhorn max/mean load",
                  "sinkhorn gap %"]
    return "| " + " | ".join(cells) + " |\n|" + "---|" * len(cells)


def print_targets(results):
    """The issue's targets that this run covered."""
    print("\nTargets (new solver):")
    ops = [row["new_ops"] for rows in results.values() for row in rows]
    syncs = [row["new_syncs"] for rows in results.values() for row in rows]
    print(f"  launched ops per solve <= 1500 at every size: max {max(ops)} -> {'yes' if max(ops) <= 1500 else 'NO'}")
    print(f"  host syncs per solve <= 1 (0 for CUDA graphs): max {max(syncs)} -> {'yes' if max(syncs) <= 1 else 'NO'}")
    gaps = {key: worst_gap(rows, "new", "new_bound") for key, rows in results.items()}
    dense = {key: value for key, value in gaps.items() if key[0] >= 32 * key[1]}
    if dense:
        worst = max(dense, key=dense.get)
        print(f"  certified gap <= 0.01 % at >= 32 tokens/expert: worst {dense[worst]:.5f} % ({worst[0]}x{worst[1]} "
              f"{worst[2]}) -> {'yes' if dense[worst] <= 0.01 else 'NO'}")
    sparse = {key: value for key, value in gaps.items() if key[0] < 32 * key[1]}
    for key, value in sorted(sparse.items()):
        print(f"  (reported) {key[0]}x{key[1]} {key[2]}, {key[0] // key[1]} tokens/expert: certified gap {value:.5f} %")
    for (num_tokens, num_experts), limit in (((32768, 128), 0.4), ((8192, 64), 0.1)):
        times = {kind: median(rows, "new_cpu_s") for (t, e, kind), rows in results.items()
                 if (t, e) == (num_tokens, num_experts)}
        if times:
            worst = max(times, key=times.get)
            print(f"  CPU time {num_tokens}x{num_experts} <= {limit} s every kind: worst {times[worst]:.3f} s ({worst}) "
                  f"-> {'yes' if times[worst] <= limit else 'NO'}")


# ------------------------------------------------------------------------------------- the estimate

# The H100 model of the issue; every figure is printed with the estimate.
H100 = dict(
    launch_eager_us=5.0,  # host cost of one launched op, eager PyTorch
    launch_graph_us=1.5,  # one kernel node of a replayed CUDA graph
    sync_us=40.0,  # one device-to-host round trip (the device drains its queue first), 20-50 us
    hbm_bytes_per_s=3.0e12,  # HBM3, of 3.35 TB/s peak
    tf32_flops=495e12,  # the solve's fp32 GEMMs at the dense TF32 tensor-core rate
    layer_flops=700e12,  # the layer's bf16 expert GEMMs: 989 TFLOP/s dense peak at ~70 % MFU
)
# (name, hidden, expert FFN, experts, active experts per token): BASE is top-1 at equal compute, i.e. one
# expert k times as wide, so the layer's FLOPs are those of the top-k model.
MODEL_SHAPES = [("Mixtral-8x7B", 4096, 14336, 8, 2), ("DeepSeek-V3-like", 7168, 2048, 256, 8)]
TOKENS_PER_SOLVE = [8192, 32768]  # tokens of one micro batch on one EP group's solving rank


def layer_ms(num_tokens, hidden, ffn, active):
    """Forward + backward of the routed experts' SwiGLU GEMMs (3 matrices, backward = 2x forward)."""
    return 3 * 2 * 3 * hidden * ffn * active * num_tokens / H100["layer_flops"] * 1e3


def solve_ms(counts, graph):
    launch = H100["launch_graph_us"] if graph else H100["launch_eager_us"]
    return (counts["ops"] * launch + counts["syncs"] * H100["sync_us"]) / 1e3 + 1e3 * (
        counts["bytes"] / H100["hbm_bytes_per_s"] + counts["gemm_flops"] / H100["tf32_flops"])


def estimate_rows(solvers=("new",)):
    """One row per model shape, token count and solver: counts, estimated solve ms and its share of the layer."""
    rows = []
    for model, hidden, ffn, experts, active in MODEL_SHAPES:
        for num_tokens in TOKENS_PER_SOLVE:
            scores = clustered_scores(num_tokens, experts, seed=0)
            layer = layer_ms(num_tokens, hidden, ffn, active)
            for name in solvers:
                counts = counted(SOLVERS[name], scores)
                eager, graph = solve_ms(counts, graph=False), solve_ms(counts, graph=True)
                rows.append(dict(model=model, tokens=num_tokens, experts=experts, solver=name, **counts,
                                 eager_ms=eager, graph_ms=graph, layer_ms=layer))
    return rows


def print_estimate(rows):
    h = H100
    print(f"\nH100 estimate. Assumptions: {h['launch_eager_us']:g} us per launched op eager, "
          f"{h['launch_graph_us']:g} us per op in a CUDA graph, {h['sync_us']:g} us per host sync, bytes moved at "
          f"{h['hbm_bytes_per_s'] / 1e12:g} TB/s (Traffic: every op's inputs + outputs), the solve's GEMMs at "
          f"{h['tf32_flops'] / 1e12:g} TFLOP/s (TF32), all added up (no overlap); the layer = its experts' SwiGLU "
          f"GEMMs forward + backward at {h['layer_flops'] / 1e12:g} TFLOP/s bf16 (989 peak, ~70 % MFU). "
          "Counted on clustered scores, seed 0. Target: the graph-captured solve <= 5 % of the layer.\n")
    header = ("| model | T | E | solver | syncs | ops | MB moved | GEMM GFLOP | solve ms eager | solve ms graph "
              "| layer fwd+bwd ms | eager / layer | graph / layer | graph <= 5 % |")
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    for r in rows:
        graph_ok = "" if r["syncs"] else ("yes" if r["graph_ms"] <= 0.05 * r["layer_ms"] else "NO")
        graph = f"{r['graph_ms']:.2f}" if not r["syncs"] else "- (syncs)"
        share = f"{100 * r['graph_ms'] / r['layer_ms']:.1f} %" if not r["syncs"] else "-"
        print(f"| {r['model']} | {r['tokens']} | {r['experts']} | {r['solver']} | {r['syncs']} | {r['ops']} "
              f"| {r['bytes'] / 1e6:.0f} | {r['gemm_flops'] / 1e9:.1f} | {r['eager_ms']:.2f} | {graph} "
              f"| {r['layer_ms']:.1f} | {100 * r['eager_ms'] / r['layer_ms']:.1f} % | {share} | {graph_ok or '-'} |",
              flush=True)


# ------------------------------------------------------------------------------------------- device

# The layer measured on one GPU: the experts one rank of an expert-parallel group holds (all of Mixtral's 8,
# 8 of DeepSeek's 256), each k times as wide as the model's (BASE top-1 at the top-k model's FLOPs).
LOCAL_EXPERTS = 8
TINY_SHAPES = [("tiny", 64, 32, 16, 2)]
TINY_TOKENS = [64, 256]


class _Clock:
    """Elapsed milliseconds of a callable: CUDA events on a GPU, perf_counter on a CPU (same code path)."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def median_ms(self, fn, repeats: int) -> float:
        times = []
        for _ in range(repeats):
            if self.cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end))
            else:
                began = time.perf_counter()
                fn()
                times.append(1e3 * (time.perf_counter() - began))
        return statistics.median(times)


def capture_graph(fn):
    """``fn`` captured in a CUDA graph after a warm-up on a side stream; returns the graph's replay."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    torch.cuda.synchronize()
    return graph.replay


def build_moe_layer(hidden, ffn, experts, device: torch.device):
    """Our MoE layer for ``--moe-router-type base`` (BASE router and dispatcher, SwiGLU experts) on one
    process; bf16 with Transformer Engine where installed on CUDA, fp32 local layers on CPU."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from megatron.core import parallel_state, tensor_parallel
        from megatron.core.transformer.spec_utils import build_module

        from megatron_moe.arguments import parse_args
        from megatron_moe.model import decoder_block_spec, transformer_config_from_args
        from megatron_moe.platform import init_distributed, select_platform

    cuda = device.type == "cuda"
    try:
        import transformer_engine  # noqa: F401

        impl = "transformer_engine" if cuda else "local"
    except ImportError:
        impl = "local"
    flags = ["--num-layers", "1", "--hidden-size", str(hidden), "--num-attention-heads", "8", "--seq-length", "128",
             "--max-position-embeddings", "128", "--swiglu", "--normalization", "RMSNorm",
             "--num-experts", str(experts), "--moe-ffn-hidden-size", str(ffn), "--moe-router-type", "base",
             "--moe-router-topk", "1", "--micro-batch-size", "1", "--train-iters", "1", "--lr", "1e-4",
             "--mock-data", "--tokenizer-type", "NullTokenizer", "--vocab-size", "1000", "--hidden-dropout", "0",
             "--attention-dropout", "0", "--device", device.type, "--transformer-impl", impl,
             *(["--bf16"] if cuda else [])]
    args = parse_args(flags, world_size=1)
    init_distributed(select_platform(device.type))
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel()
        torch.manual_seed(0)
        tensor_parallel.model_parallel_cuda_manual_seed(0)
    config = transformer_config_from_args(args)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        layer = build_module(decoder_block_spec(config, impl).layer_specs[0].submodules.mlp, config=config)
    return layer.to(device).train(), config.params_dtype, impl


def measure_on_device(device="cuda", tokens=None, repeats=20, tiny=False):
    """Measured solve and MoE layer times per model shape and token count on one ``device`` (module docstring).

    Returns a list of dicts: model, tokens, experts, solve_eager_ms, solve_graph_ms (None on CPU, or the
    capture error as ``graph_error``), layer_ms, layer_impl, and the estimate's graph_ms / eager_ms /
    layer_est_ms for the same shape."""
    device = torch.device(device)
    shapes, tokens = (TINY_SHAPES, tokens or TINY_TOKENS) if tiny else (MODEL_SHAPES, tokens or TOKENS_PER_SOLVE)
    clock = _Clock(device)
    rows = []
    for model, hidden, ffn, experts, active in shapes:
        layer, dtype, impl = build_moe_layer(hidden, ffn * active, min(experts, LOCAL_EXPERTS), device)
        for num_tokens in tokens:
            scores = clustered_scores(num_tokens, experts, seed=0).to(device)
            counts = counted(balanced_assignment, scores)
            row = dict(model=model, tokens=num_tokens, experts=experts, layer_impl=impl,
                       est_eager_ms=solve_ms(counts, graph=False), est_graph_ms=solve_ms(counts, graph=True),
                       est_layer_ms=layer_ms(num_tokens, hidden, ffn, active), solve_graph_ms=None)
            solve = lambda: balanced_assignment(scores)  # noqa: E731
            solve()
            row["solve_eager_ms"] = clock.median_ms(solve, repeats)
            if device.type == "cuda":
                try:
                    row["solve_graph_ms"] = clock.median_ms(capture_graph(solve), repeats)
                except Exception as error:  # a first contact reports what failed and goes on
                    row["graph_error"] = f"{type(error).__name__}: {error}".splitlines()[0][:200]
            hidden_states = torch.randn(num_tokens, 1, hidden, device=device, dtype=dtype, requires_grad=True)
            output_grad = torch.randn(num_tokens, 1, hidden, device=device, dtype=dtype)

            def forward_backward():
                output, _ = layer(hidden_states)
                output.backward(output_grad)

            forward_backward()
            row["layer_ms"] = clock.median_ms(forward_backward, max(3, repeats // 4))
            rows.append(row)
            del hidden_states, output_grad
    return rows


def format_device_rows(rows, device) -> str:
    lines = [f"Measured on {device}: solve of clustered scores (median of repeats; graph = replay of a captured "
             "CUDA graph) and our MoE layer (BASE, top-1, SwiGLU experts k times as wide; "
             f"{LOCAL_EXPERTS} local experts) forward + backward; beside them the estimate's figures.\n",
             "| model | T | E | solve eager ms | solve graph ms | layer fwd+bwd ms (impl) | measured solve / layer "
             "| est. solve graph ms | est. layer ms | est. solve / layer |", "|" + "---|" * 10]
    for r in rows:
        measured = r["solve_graph_ms"] if r["solve_graph_ms"] is not None else r["solve_eager_ms"]
        graph = f"{r['solve_graph_ms']:.3f}" if r["solve_graph_ms"] is not None else r.get("graph_error", "n/a (CPU)")
        lines.append(f"| {r['model']} | {r['tokens']} | {r['experts']} | {r['solve_eager_ms']:.3f} | {graph} "
                     f"| {r['layer_ms']:.2f} ({r['layer_impl']}) | {100 * measured / r['layer_ms']:.1f} % "
                     f"| {r['est_graph_ms']:.3f} | {r['est_layer_ms']:.2f} "
                     f"| {100 * r['est_graph_ms'] / r['est_layer_ms']:.1f} % |")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------- main


def parse_size(text):
    tokens, experts = text.lower().split("x")
    return int(tokens), int(experts)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--sizes", type=parse_size, nargs="+", default=DEFAULT_SIZES, metavar="TxE")
    parser.add_argument("--kinds", nargs="+", default=list(SCORES), choices=list(SCORES))
    parser.add_argument("--no-baseline", dest="baseline", action="store_false",
                        help="skip the old solver (benchmarks/baseline_balanced_assignment.py)")
    parser.add_argument("--fairseq-sinkhorn", action="store_true",
                        help="also fairseq's auction (our port) and megatron-core's sinkhorn + top-1")
    parser.add_argument("--exact-max-tokens", type=int, default=4096, help="largest T given to scipy's exact solver")
    parser.add_argument("--sinkhorn-limit", type=float, default=3.0, help="seconds per sinkhorn call")
    parser.add_argument("--no-estimate", dest="estimate", action="store_false", help="skip the H100 estimate")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (1: the solve's small ops lose more to thread wake-ups than they gain)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default=None,
                        help="measure the solve and the MoE layer on this device instead of the CPU table")
    parser.add_argument("--tokens", type=int, nargs="+", default=None, help="--device: tokens per solve")
    parser.add_argument("--repeats", type=int, default=20, help="--device: timed repeats (median)")
    parser.add_argument("--tiny", action="store_true", help="--device: toy sizes (the CI check of this path)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.device is not None:
        began = time.perf_counter()
        rows = measure_on_device(args.device, args.tokens, args.repeats, args.tiny)
        print(format_device_rows(rows, torch.cuda.get_device_name() if args.device == "cuda" else "cpu"))
        print(f"\ndevice run {time.perf_counter() - began:.0f} s")
        if not args.tiny and args.estimate:
            print_estimate(estimate_rows())
        return
    args.solvers = ["new", "old"] if args.baseline else ["new"]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.seeds} seeds; times are medians, "
          "gaps the worst seed\n")
    print(table_header(args))
    started, results = time.perf_counter(), {}
    for num_tokens, num_experts in args.sizes:
        for kind in args.kinds:
            rows = run_case(num_tokens, num_experts, kind, args)
            if rows:
                results[num_tokens, num_experts, kind] = rows
                print(table_line(num_tokens, num_experts, kind, rows, args), flush=True)
    print(f"\ntotal {time.perf_counter() - started:.0f} s")
    print_targets(results)
    if args.estimate:
        print_estimate(estimate_rows(args.solvers))


if __name__ == "__main__":
    main()
