"""balanced_assignment: exact balance always, optimality against scipy's exact solver, a certificate that holds,
no host sync and a schedule that does not depend on the data, bad inputs; the benchmark's device path on CPU."""

import math
import os
import subprocess
import sys

import pytest
import torch

from launcher import REPO
from megatron_moe.host_sync import HostSyncCounter
from megatron_moe.moe.balanced_assignment import balanced_assignment, expert_capacities


def affinities(num_tokens, num_experts, seed, dim=32):
    """Realistic BASE scores: Gaussian token embeddings dot Gaussian expert centroids, fp64."""
    generator = torch.Generator().manual_seed(seed)
    tokens = torch.randn(num_tokens, dim, generator=generator, dtype=torch.float64) / math.sqrt(dim)
    centroids = torch.randn(num_experts, dim, generator=generator, dtype=torch.float64)
    return tokens @ centroids.T


def exact_optimum(scores):
    """Best balanced total: scipy's Hungarian solver on the experts' columns repeated capacity times."""
    scipy_optimize = pytest.importorskip("scipy.optimize")
    num_tokens, num_experts = scores.shape
    columns = torch.arange(num_experts).repeat_interleave(expert_capacities(num_tokens, num_experts))
    matrix = scores.double()[:, columns].numpy()
    rows, picked = scipy_optimize.linear_sum_assignment(matrix, maximize=True)
    return float(matrix[rows, picked].sum())


def total(scores, assignment):
    return float(scores.double().gather(1, assignment[:, None]).sum())


def assert_balanced(assignment, num_tokens, num_experts):
    assert assignment.dtype == torch.long and assignment.shape == (num_tokens,)
    counts = torch.bincount(assignment, minlength=num_experts)
    assert counts.tolist() == expert_capacities(num_tokens, num_experts).tolist()


def upper_bound(scores, prices):
    """The dual bound of the prices: >= every balanced total (experts of capacity 0 left out)."""
    scores, prices = scores.double(), prices.double()
    capacities = expert_capacities(*scores.shape).double()
    served = capacities > 0
    return float((scores[:, served] - prices[served]).amax(dim=1).sum() + (capacities * prices)[served].sum())


def assert_near_optimal(scores, assignment, relative_gap=1e-4):
    """Never above the exact optimum, and within ``relative_gap`` of it (the 0.01 % quality target)."""
    optimum, ours = exact_optimum(scores), total(scores, assignment)
    slack = 1e-9 * max(1.0, abs(optimum))
    assert ours <= optimum + slack
    assert optimum - ours <= relative_gap * abs(optimum) + slack, (optimum, ours)


def assert_certified(scores, assignment, prices, relative_gap=None):
    """The prices' bound is above the exact optimum (when scipy can solve it) and above our total; where
    given, it certifies ``relative_gap``."""
    bound, ours = upper_bound(scores, prices), total(scores, assignment)
    slack = 1e-9 * max(1.0, abs(bound))
    assert ours <= bound + slack
    if scores.shape[0] <= 1024:
        assert exact_optimum(scores) <= bound + slack
    if relative_gap is not None:
        assert bound - ours <= relative_gap * abs(bound) + slack, (bound, ours)


def dominant_expert(num_tokens, num_experts, seed):
    """Expert 3 is every token's first choice by far, by a different amount for each token."""
    scores = affinities(num_tokens, num_experts, seed)
    scores[:, 3] += 50.0 * (1 + torch.rand(num_tokens, generator=torch.Generator().manual_seed(seed)))
    return scores


def low_rank(num_tokens, num_experts, seed):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(num_tokens, 1, generator=generator, dtype=torch.float64) @ torch.randn(
        1, num_experts, generator=generator, dtype=torch.float64
    )


def identical_tokens(num_tokens, num_experts, seed):
    return affinities(1, num_experts, seed).expand(num_tokens, num_experts).clone()


def integer_ties(num_tokens, num_experts, seed):
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 3, (num_tokens, num_experts), generator=generator).double()


def wide_range(num_tokens, num_experts, seed):
    """Column scales from 1e-3 to 1e3: a 1e6 spread."""
    return affinities(num_tokens, num_experts, seed) * torch.logspace(-3, 3, num_experts, dtype=torch.float64)


@pytest.mark.parametrize("num_tokens,num_experts", [(64, 4), (256, 8), (1000, 16), (512, 64), (96, 7), (10, 3)])
@pytest.mark.parametrize("seed", [0, 1])
def test_random_affinities_are_balanced_and_near_optimal(num_tokens, num_experts, seed):
    scores = affinities(num_tokens, num_experts, seed)
    assignment = balanced_assignment(scores)
    assert_balanced(assignment, num_tokens, num_experts)
    assert_near_optimal(scores, assignment)


@pytest.mark.parametrize("make", [dominant_expert, low_rank, identical_tokens, integer_ties, wide_range])
@pytest.mark.parametrize("num_tokens,num_experts", [(128, 8), (103, 8)])
def test_adversarial_affinities_are_balanced_and_near_optimal(make, num_tokens, num_experts):
    scores = make(num_tokens, num_experts, seed=0)
    assignment, prices = balanced_assignment(scores, return_prices=True)
    assert_balanced(assignment, num_tokens, num_experts)
    assert_near_optimal(scores, assignment)
    assert_certified(scores, assignment, prices)


def test_many_tokens_run_the_late_steps_on_the_active_tokens():
    # Above 4096 tokens the last Newton steps see the least settled tokens only (module docstring, 1).
    scores = affinities(8192, 16, seed=4)
    assignment, prices = balanced_assignment(scores, return_prices=True)
    assert_balanced(assignment, 8192, 16)
    assert_certified(scores, assignment, prices, relative_gap=1e-4)


def test_extra_tokens_go_to_the_lowest_index_experts():
    assert expert_capacities(10, 4).tolist() == [3, 3, 2, 2]
    assert expert_capacities(5, 8).tolist() == [1, 1, 1, 1, 1, 0, 0, 0]
    scores = affinities(10, 4, seed=0)
    scores[:, 3] += 10.0  # the most popular expert still gets only its floor share
    assert torch.bincount(balanced_assignment(scores), minlength=4).tolist() == [3, 3, 2, 2]


def test_fewer_tokens_than_experts():
    scores = affinities(5, 8, seed=3)
    assignment, prices = balanced_assignment(scores, return_prices=True)
    assert sorted(assignment.tolist()) == [0, 1, 2, 3, 4]
    assert total(scores, assignment) == pytest.approx(exact_optimum(scores), rel=1e-12)
    assert torch.isinf(prices[5:]).all() and torch.isfinite(prices[:5]).all()
    assert_certified(scores, assignment, prices)
    assert balanced_assignment(affinities(1, 8, seed=3)).tolist() == [0]


def test_all_equal_rows_have_prices_zero_and_a_zero_certified_gap():
    for scores in (torch.zeros(256, 8), torch.full((100, 7), 3.0), identical_tokens(96, 6, seed=2)):
        assignment, prices = balanced_assignment(scores, return_prices=True)
        assert_balanced(assignment, *scores.shape)
        shifted = prices - scores[0].to(prices.dtype)  # identical rows: the prices are the row, up to a shift
        assert float(shifted.max() - shifted.min()) <= 1e-6 * max(1.0, float(scores.abs().max()))
        assert upper_bound(scores, prices) - total(scores, assignment) <= 1e-6 * scores.shape[0]


def test_an_expert_nobody_wants_still_gets_its_share():
    scores = affinities(300, 6, seed=11)
    scores[:, 2] = -float("inf")
    assignment, prices = balanced_assignment(scores, return_prices=True)
    assert_balanced(assignment, 300, 6)
    clean = scores.clone()
    clean[:, 2] = float(scores[:, [0, 1, 3, 4, 5]].min())  # -inf is the smallest finite score
    assert_near_optimal(clean, assignment)
    assert_certified(clean, assignment, prices)


@pytest.mark.parametrize("max_rounds", [0, 1, 2, 5])
def test_a_round_bound_keeps_exact_balance_and_the_certificate_valid(max_rounds):
    # Few rounds: the tokens left over fill the free slots; balance stays exact, and the price bound
    # still bounds the optimum from above (it does not depend on how the tokens were placed).
    scores = integer_ties(300, 12, seed=1)
    assignment, prices = balanced_assignment(scores, max_rounds=max_rounds, return_prices=True)
    assert_balanced(assignment, 300, 12)
    optimum = exact_optimum(scores)
    assert total(scores, assignment) <= optimum * (1 + 1e-12)
    assert optimum <= upper_bound(scores, prices) * (1 + 1e-12)


def test_no_host_sync_and_a_schedule_independent_of_the_scores():
    # The same launched ops for any scores of a shape (a CUDA graph can replay the solve), never a sync,
    # and at most 1500 ops whatever the size (the target; about 540 today).
    for shape in [(100, 3), (3000, 8), (2000, 64), (8192, 16)]:
        counts = set()
        for scores in (affinities(*shape, seed=9), integer_ties(*shape, seed=9), dominant_expert(*shape, seed=9)
                       if shape[1] > 3 else low_rank(*shape, seed=9)):
            with HostSyncCounter() as counter:
                balanced_assignment(scores.float(), return_prices=True)
            assert counter.num_syncs == 0, counter.describe()
            counts.add(counter.num_ops)
        assert len(counts) == 1 and counts.pop() <= 1500, counts


def test_prices_certify_the_gap():
    scores = dominant_expert(2048, 32, seed=5)
    assignment, prices = balanced_assignment(scores, return_prices=True)
    optimum, ours, bound = exact_optimum(scores), total(scores, assignment), upper_bound(scores, prices)
    assert ours <= optimum * (1 + 1e-12) and optimum <= bound * (1 + 1e-12)
    assert bound - ours <= 1e-4 * abs(bound)


def test_non_finite_scores_are_replaced_by_extreme_finite_ones():
    scores = affinities(64, 4, seed=6)
    dirty = scores.clone()
    dirty[0, 1], dirty[5, 2], dirty[9, 0], dirty[9, 3] = float("nan"), float("inf"), -float("inf"), float("nan")
    clean = scores.clone()
    low, high = float(scores.min()), float(scores.max())
    clean[0, 1], clean[5, 2], clean[9, 0], clean[9, 3] = low, high, low, low
    assignment = balanced_assignment(dirty)
    assert torch.equal(assignment, balanced_assignment(clean))
    assert_balanced(assignment, 64, 4)
    assert_near_optimal(clean, assignment)
    assert_balanced(balanced_assignment(torch.full((12, 3), float("nan"))), 12, 3)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_low_precision_inputs_are_solved_in_fp32(dtype):
    scores = affinities(512, 8, seed=7).to(dtype)
    assignment = balanced_assignment(scores)
    assert assignment.device == scores.device
    assert_balanced(assignment, 512, 8)
    assert_near_optimal(scores.double(), assignment)
    assert torch.equal(assignment, balanced_assignment(scores.float()))


def test_fp64_prices_are_fp64():
    assignment, prices = balanced_assignment(affinities(256, 8, seed=8), return_prices=True)
    assert prices.dtype == torch.float64
    assert_balanced(assignment, 256, 8)


def test_deterministic():
    scores = integer_ties(777, 16, seed=8)  # many exact ties
    original = scores.clone()
    first = balanced_assignment(scores)
    assert all(torch.equal(first, balanced_assignment(scores)) for _ in range(3))
    assert torch.equal(scores, original)  # the input is left alone
    assert torch.equal(balanced_assignment(scores, max_rounds=2), balanced_assignment(scores, max_rounds=2))


def test_degenerate_shapes():
    assert balanced_assignment(torch.zeros(0, 4)).shape == (0,)
    assert balanced_assignment(torch.randn(7, 1)).tolist() == [0] * 7
    assert_balanced(balanced_assignment(torch.zeros(48, 6)), 48, 6)
    assignment, prices = balanced_assignment(torch.randn(1, 3), return_prices=True)
    assert assignment.tolist() == [0] and prices[0] == 0 and torch.isinf(prices[1:]).all()


@pytest.mark.parametrize(
    "bad,message",
    [
        (torch.randn(8), "2-D"),
        (torch.randint(0, 5, (8, 2)), "floating point"),
        (torch.randn(8, 0), "0 experts"),
        ([[1.0, 2.0]], "2-D"),
    ],
)
def test_bad_inputs_get_a_one_line_error(bad, message):
    with pytest.raises(ValueError, match=message):
        balanced_assignment(bad)


@pytest.mark.parametrize("options", [{"eps": 0}, {"max_rounds": -1}])
def test_bad_options_get_a_one_line_error(options):
    with pytest.raises(ValueError, match="need eps > 0, max_rounds >= 0"):
        balanced_assignment(torch.randn(8, 2), **options)


def run_benchmark(*flags):
    env = dict(os.environ, PYTHONPATH=str(REPO), PYTHONWARNINGS="ignore")
    result = subprocess.run([sys.executable, str(REPO / "benchmarks" / "balanced_assignment.py"), *flags],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def test_benchmark_device_path_runs_on_cpu_at_tiny_sizes():
    # The code path of `--device cuda` (solve timed eager, our BASE MoE layer forward + backward, the
    # ratio beside the estimate's), on CPU where there is no CUDA graph to capture.
    out = run_benchmark("--device", "cpu", "--tiny", "--repeats", "2")
    rows = [line for line in out.splitlines() if line.startswith("| tiny |")]
    assert len(rows) == 2, out
    for row in rows:
        cells = [cell.strip() for cell in row.strip("|").split("|")]
        assert cells[4] == "n/a (CPU)" and float(cells[3]) > 0 and cells[6].endswith("%"), row
        assert "(local)" in cells[5], row


def test_benchmark_table_runs():
    out = run_benchmark("--sizes", "64x4", "--kinds", "gaussian", "--seeds", "1", "--no-estimate")
    row = next(line for line in out.splitlines() if line.startswith("| 64 | 4 |"))
    assert "| yes |" in row and "NO" not in row, out
    assert "launched ops per solve <= 1500 at every size" in out and "-> yes" in out, out
