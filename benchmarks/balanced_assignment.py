#!/usr/bin/env python3
"""balanced_assignment: time, host syncs, launches, certified gap and balance; against the exact optimum,
fairseq's BASE auction and megatron's sinkhorn; a paper estimate of the solve on an H100 next to the MoE layer.

    PYTHONPATH=. python benchmarks/balanced_assignment.py [--seeds 3] [--sizes 1024x8 8192x64 32768x128]
        [--kinds gaussian skewed clustered real] [--no-baselines] [--exact-max-tokens 8192]
        [--exact-max-tokens-skewed 1024] [--sinkhorn-limit 3] [--threads 1] [--no-estimate]

For every size and score kind, over the seeds, it prints medians of:

* ours: wall time (best of 3) and CPU time of one solve; host syncs and launched aten operations per
  solve (``megatron_moe.host_sync.HostSyncCounter``); whether every expert got exactly its capacity;
  gap to the exact optimum; certified gap ``(U - ours) / U`` where U is the dual upper bound
  ``sum_t max_e(s - p_e) + sum_e capacity_e * p_e`` from our prices (no exact solve needed);
* exact: scipy ``linear_sum_assignment`` on the T x T matrix of the experts' columns repeated
  T/E times, its time and our speed-up over it. Only up to --exact-max-tokens (8192) tokens, and
  1024 for the skewed scores, whose many equal columns and near-identical rows make it slow;
* fairseq: our port of fairseq's auction (``fairseq/clib/libbase/balanced_assignment.cpp``: experts
  bid for tokens, fixed eps = (max S - min S) / 50, no eps-scaling) with an iteration cap it does
  not have (it never stops when E does not divide T), its gap and time;
* sinkhorn: megatron-core's ``sinkhorn`` then top-1, as its "sinkhorn" load balancing routes: time
  (with a per-call limit, since it loops until converged with a host sync per iteration),
  iterations, max/mean expert load (1.00 = balanced) and its score gap. It is not balanced, so its
  total may exceed the balanced optimum (a negative gap).

Scores: ``gaussian`` = token embeddings h ~ N(0, 1/d) (d = 64) dot centroids c ~ N(0, 1);
``skewed`` = tokens from 4 tight clusters with Zipf sizes (near-identical tokens competing for
the same experts) plus a per-expert popularity bias ~ N(0, 2^2); ``clustered`` ("trained-like") =
tokens from 16 clusters, centroids sharing a popular direction; ``real`` = the affinities a BASE
router solved after a short BASE pretraining (``benchmarks/data/base_affinities_8192x64.pt``, written
by ``benchmarks/dump_base_affinities.py``; the first T rows, only where E = 64 and T <= 8192).

Then the paper estimate: syncs and launches counted on clustered scores at Mixtral-8x7B and
DeepSeek-V3 shapes, turned into H100 time with the assumptions printed beside it, next to the
MoE layer's forward + backward expert GEMM time for the same tokens.

One process, one torch thread (--threads), CPU. Wall times are noisy on a shared machine; the CPU
time is steadier.
"""

import argparse
import math
import signal
import statistics
import time
import warnings
from pathlib import Path

import torch

from megatron_moe.host_sync import HostSyncCounter
from megatron_moe.moe.balanced_assignment import balanced_assignment, expert_capacities

with warnings.catch_warnings():  # megatron-core announces its Apex / Transformer Engine fallbacks
    warnings.simplefilter("ignore")
    from megatron.core.transformer.moe.moe_utils import sinkhorn

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


def total(scores, assignment):
    return float(scores.double().gather(1, assignment[:, None]).sum())


def dual_upper_bound(scores, prices):
    scores, prices = scores.double(), prices.double()
    capacities = expert_capacities(*scores.shape).double()
    return float((scores - prices).amax(dim=1).sum() + (capacities * prices).sum())


def cpu_timed(fn, *args):
    """(result, CPU seconds of all threads): less disturbed by other processes than wall time."""
    start = time.process_time()
    result = fn(*args)
    return result, time.process_time() - start


def counted(fn, *args):
    """(host syncs, launched ops) of one call."""
    with HostSyncCounter() as counter:
        fn(*args)
    return counter.num_syncs, counter.num_ops


def timed(fn, *args, repeats=1):
    """(result, best wall time over ``repeats`` runs): the best filters out other processes' noise."""
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn(*args)
        best = min(best, time.perf_counter() - start)
    return result, best


def exact_assignment(scores):
    from scipy.optimize import linear_sum_assignment

    num_tokens, num_experts = scores.shape
    columns = torch.arange(num_experts).repeat_interleave(expert_capacities(num_tokens, num_experts))
    rows, picked = linear_sum_assignment(scores.double()[:, columns].numpy(), maximize=True)
    assignment = torch.empty(num_tokens, dtype=torch.long)
    assignment[torch.from_numpy(rows)] = columns[torch.from_numpy(picked)]
    return assignment


def fairseq_auction(scores, max_iterations=FAIRSEQ_MAX_ITERATIONS):
    """Port of fairseq's auction (experts bid for their top T/E tokens, token prices rise, fixed
    eps, a 'keep last round's items' bid for the first 100 iterations); returns (assignment,
    iterations, capped). When the cap is hit, tokens nobody bid for keep their greedy argmax."""
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


def run_case(num_tokens, num_experts, kind, seeds, args):
    rows = []
    for seed in range(seeds):
        scores = SCORES[kind](num_tokens, num_experts, seed)
        if scores is None:
            return rows
        row = {}
        balanced_assignment(scores[:64])  # warm-up outside the timing
        solve = lambda s: balanced_assignment(s, return_prices=True)  # noqa: E731
        (ours, prices), row["ours_s"] = timed(solve, scores, repeats=3)
        row["ours_cpu_s"] = cpu_timed(solve, scores)[1]
        row["syncs"], row["ops"] = counted(solve, scores)
        row["balanced"] = torch.equal(torch.bincount(ours, minlength=num_experts),
                                      expert_capacities(num_tokens, num_experts))
        row["ours"], row["bound"] = total(scores, ours), dual_upper_bound(scores, prices)
        if num_tokens <= (args.exact_max_tokens_skewed if kind == "skewed" else args.exact_max_tokens):
            exact, row["exact_s"] = timed(exact_assignment, scores)
            row["optimum"] = total(scores, exact)
        if args.baselines:
            (fairseq, iterations, capped), row["fairseq_s"] = timed(fairseq_auction, scores, repeats=3)
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


def fmt(value, spec, missing="-"):
    return missing if value is None else format(value, spec)


# Paper estimate: what a solve would cost inside an H100 training step.
LAUNCH_US = 5.0  # host cost of one kernel launch, eager PyTorch
SYNC_US = 40.0  # one device-to-host round trip (the device drains its queue first), 20-50 us
EFFECTIVE_TFLOPS = 700.0  # H100 SXM bf16 dense: 989 TFLOP/s peak at ~70 % MFU for the expert GEMMs
HBM_TBPS = 3.35
# (name, hidden, expert FFN, experts, active experts per token): BASE is top-1 at equal compute, i.e. one
# expert k times as wide, so the layer's FLOPs are those of the top-k model.
MODEL_SHAPES = [("Mixtral-8x7B", 4096, 14336, 8, 2), ("DeepSeek-V3-like", 7168, 2048, 256, 8)]
TOKENS_PER_SOLVE = [8192, 32768]  # tokens of one micro batch on one EP group's solving rank


def layer_ms(num_tokens, hidden, ffn, active):
    """Forward + backward of the routed experts' SwiGLU GEMMs (3 matrices, backward = 2x forward)."""
    return 3 * 2 * 3 * hidden * ffn * active * num_tokens / (EFFECTIVE_TFLOPS * 1e12) * 1e3


def print_paper_estimate():
    print(f"\nPaper estimate on an H100, assumptions: {LAUNCH_US:g} us per launched op (eager), {SYNC_US:g} us per "
          f"host sync, expert GEMMs at {EFFECTIVE_TFLOPS:g} TFLOP/s bf16 (989 peak, ~70 % MFU), solve memory "
          f"traffic not added (a round reads at most the bidders' score rows and the slot grid, "
          f"<= T x E x 4 bytes: <= 10 us at {HBM_TBPS} TB/s, below its launch cost). Syncs and ops counted here "
          f"on clustered scores, seed 0. Target: solve <= 5 % of the layer.\n")
    header = "| model | T | E | syncs | ops | solve ms (est.) | layer fwd+bwd ms (est.) | solve / layer | <= 5 % |"
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    for name, hidden, ffn, experts, active in MODEL_SHAPES:
        for num_tokens in TOKENS_PER_SOLVE:
            scores = clustered_scores(num_tokens, experts, seed=0)
            syncs, ops = counted(balanced_assignment, scores)
            solve = (ops * LAUNCH_US + syncs * SYNC_US) / 1e3
            layer = layer_ms(num_tokens, hidden, ffn, active)
            print(f"| {name} | {num_tokens} | {experts} | {syncs} | {ops} | {solve:.1f} | {layer:.1f} "
                  f"| {100 * solve / layer:.1f} % | {'yes' if solve <= 0.05 * layer else 'no'} |", flush=True)


def parse_size(text):
    tokens, experts = text.lower().split("x")
    return int(tokens), int(experts)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--sizes", type=parse_size, nargs="+", default=[(1024, 8), (8192, 64), (32768, 128)],
                        metavar="TxE")
    parser.add_argument("--kinds", nargs="+", default=list(SCORES), choices=list(SCORES))
    parser.add_argument("--baselines", action=argparse.BooleanOptionalAction, default=True,
                        help="also run scipy's exact solver, fairseq's auction and megatron's sinkhorn")
    parser.add_argument("--exact-max-tokens", type=int, default=8192, help="largest T given to scipy")
    parser.add_argument("--exact-max-tokens-skewed", type=int, default=1024, help="the same for skewed scores")
    parser.add_argument("--sinkhorn-limit", type=float, default=3.0, help="seconds per sinkhorn call")
    parser.add_argument("--no-estimate", dest="estimate", action="store_false", help="skip the paper estimate")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (1: a round's small ops lose more to thread wake-ups than they gain)")
    args = parser.parse_args()
    if not args.baselines:
        args.exact_max_tokens = args.exact_max_tokens_skewed = 0
    torch.set_num_threads(args.threads)

    header = (
        "| T | E | scores | ours ms | ours CPU ms | syncs | ops | exact balance | gap to exact % | certified gap % "
        "| exact s | speed-up vs exact | fairseq ms | fairseq gap % | fairseq iters | sinkhorn ms | sinkhorn iters "
        "| sinkhorn max/mean load | sinkhorn gap % |"
    )
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.seeds} seeds, medians\n")
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    started, results = time.perf_counter(), {}
    for num_tokens, num_experts in args.sizes:
        for kind in args.kinds:
            rows = run_case(num_tokens, num_experts, kind, args.seeds, args)
            if not rows:
                continue
            results[num_tokens, num_experts, kind] = rows
            has_exact = any("optimum" in row for row in rows)
            reference = "optimum" if has_exact else "bound"
            speedups = [row["exact_s"] / row["ours_s"] for row in rows if "exact_s" in row]
            capped = sum(row.get("fairseq_capped", 0) for row in rows)
            timeouts = sum("sinkhorn" not in row for row in rows)
            # Gaps of the baselines are to the optimum where known, else to our certified bound.
            mark = "" if has_exact else " (to bound)"
            baselines = (
                f"| {median(rows, 'fairseq_s') * 1e3:.0f} | {gap(rows, 'fairseq', reference):.3f}{mark} "
                f"| {median(rows, 'fairseq_iterations'):.0f}{f' ({capped} capped)' if capped else ''} "
                f"| {median(rows, 'sinkhorn_s') * 1e3:.0f}{f' ({timeouts} timed out)' if timeouts else ''} "
                f"| {median(rows, 'sinkhorn_iterations'):.0f} | {fmt(median(rows, 'sinkhorn_load'), '.2f')} "
                f"| {fmt(gap(rows, 'sinkhorn', reference), '.3f')}{mark if timeouts < len(rows) else ''} |"
                if args.baselines else "| - | - | - | - | - | - | - |"
            )
            print(
                f"| {num_tokens} | {num_experts} | {kind} | {median(rows, 'ours_s') * 1e3:.0f} "
                f"| {median(rows, 'ours_cpu_s') * 1e3:.0f} | {max(row['syncs'] for row in rows)} "
                f"| {median(rows, 'ops'):.0f} | {'yes' if all(row['balanced'] for row in rows) else 'NO'} "
                f"| {fmt(gap(rows, 'ours', 'optimum'), '.5f')} | {gap(rows, 'ours', 'bound'):.5f} "
                f"| {fmt(median(rows, 'exact_s'), '.2f')} "
                f"| {fmt(statistics.median(speedups) if speedups else None, '.0f')}{'x' if speedups else ''} "
                + baselines,
                flush=True,
            )
    print(f"\ntotal {time.perf_counter() - started:.0f} s")
    print_goals(results)
    if args.estimate:
        print_paper_estimate()


def print_goals(results):
    """The issue's targets, where this run covered them."""
    for (num_tokens, num_experts, kind), rows in results.items():
        if (num_tokens, num_experts) in ((8192, 64), (32768, 128)):
            print(
                f"{num_tokens} x {num_experts} {kind}: {max(row['syncs'] for row in rows)} host syncs (goal <= 4), "
                f"certified gap {gap(rows, 'ours', 'bound'):.5f} % (goal <= 0.01 %), exact balance "
                f"{'yes' if all(row['balanced'] for row in rows) else 'NO'}, "
                f"{median(rows, 'ours_s') * 1e3:.0f} ms wall (goal < 1000 ms at 32768 x 128)"
            )


if __name__ == "__main__":
    main()
