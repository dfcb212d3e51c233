"""balanced_assignment: exact balance always, optimality against scipy's exact solver, a bounded number of host
syncs, bad inputs."""

import math

import pytest
import torch

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


def residual_std(scores):
    """Std of the scores once every row and column mean is removed: the scale of eps."""
    scores = scores.double()
    residual = scores - scores.mean(dim=1, keepdim=True) - scores.mean(dim=0) + scores.mean()
    return float(residual.std(correction=0))


def assert_near_optimal(scores, assignment, eps=1e-2, relative_gap=None):
    """Within the documented bound T * eps * residual std of the exact optimum (never above it)
    and, where given, within ``relative_gap`` of it."""
    optimum, ours = exact_optimum(scores), total(scores, assignment)
    slack = 1e-9 * max(1.0, abs(optimum))
    assert optimum - scores.shape[0] * eps * residual_std(scores) - slack <= ours <= optimum + slack
    if relative_gap is not None:
        assert optimum - ours <= relative_gap * abs(optimum) + slack


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


@pytest.mark.parametrize("num_tokens,num_experts", [(64, 4), (256, 8), (1000, 16), (512, 64), (96, 7), (10, 3)])
@pytest.mark.parametrize("seed", [0, 1])
def test_random_affinities_are_balanced_and_near_optimal(num_tokens, num_experts, seed):
    scores = affinities(num_tokens, num_experts, seed)
    assignment = balanced_assignment(scores)
    assert_balanced(assignment, num_tokens, num_experts)
    assert_near_optimal(scores, assignment, relative_gap=1e-4)  # the 0.01 % quality target


@pytest.mark.parametrize("make", [dominant_expert, low_rank, identical_tokens, integer_ties])
@pytest.mark.parametrize("num_tokens,num_experts", [(128, 8), (103, 8)])
def test_adversarial_affinities_are_balanced_and_near_optimal(make, num_tokens, num_experts):
    scores = make(num_tokens, num_experts, seed=0)
    assignment = balanced_assignment(scores)
    assert_balanced(assignment, num_tokens, num_experts)
    assert_near_optimal(scores, assignment, relative_gap=1e-4)


def test_extra_tokens_go_to_the_lowest_index_experts():
    assert expert_capacities(10, 4).tolist() == [3, 3, 2, 2]
    assert expert_capacities(5, 8).tolist() == [1, 1, 1, 1, 1, 0, 0, 0]
    scores = affinities(10, 4, seed=0)
    scores[:, 3] += 10.0  # the most popular expert still gets only its floor share
    assert torch.bincount(balanced_assignment(scores), minlength=4).tolist() == [3, 3, 2, 2]


def test_fewer_tokens_than_experts():
    scores = affinities(5, 8, seed=3)
    assignment = balanced_assignment(scores)
    assert sorted(assignment.tolist()) == [0, 1, 2, 3, 4]
    assert total(scores, assignment) == pytest.approx(exact_optimum(scores), rel=1e-12)
    assert balanced_assignment(affinities(1, 8, seed=3)).tolist() == [0]


def certified_gap(scores, assignment, prices):
    """Dual upper bound from the prices minus our total: >= the true gap to the optimum."""
    capacities = expert_capacities(*scores.shape).double()
    upper_bound = float((scores - prices).amax(dim=1).sum() + (capacities * prices).sum())
    return upper_bound - total(scores, assignment)


@pytest.mark.parametrize("max_rounds", [0, 1, 2, 5])
def test_a_round_bound_keeps_exact_balance_and_the_certificate_valid(max_rounds):
    # Too few rounds: the unplaced tokens fill the free slots; balance stays exact, and the price
    # bound still bounds the optimum from above (it does not depend on how the tokens were placed).
    scores = dominant_expert(300, 12, seed=1)
    assignment, prices = balanced_assignment(scores, max_rounds=max_rounds, return_prices=True)
    assert_balanced(assignment, 300, 12)
    optimum = exact_optimum(scores)
    assert total(scores, assignment) <= optimum * (1 + 1e-12)
    assert certified_gap(scores, assignment, prices) >= optimum - total(scores, assignment) - 1e-9 * abs(optimum)


def test_host_syncs_per_solve_are_bounded_whatever_the_size_and_scores():
    # At most 4 convergence checks and nothing else reads the device; the same with max_rounds=0.
    cases = [affinities(4000, 32, seed=9), dominant_expert(2000, 64, seed=9), integer_ties(3000, 8, seed=9),
             affinities(100, 3, seed=9)]
    for scores in cases:
        for options in ({}, {"max_rounds": 0}, {"max_rounds": 64}):
            with HostSyncCounter() as counter:
                balanced_assignment(scores, return_prices=True, **options)
            assert counter.num_syncs <= 4, counter.describe()
            assert all("all_placed" in sync.where for sync in counter.syncs), counter.describe()


def test_prices_certify_the_gap():
    scores = dominant_expert(2048, 32, seed=5)
    assignment, prices = balanced_assignment(scores, return_prices=True)
    capacities = expert_capacities(2048, 32).double()
    upper_bound = float((scores - prices).amax(dim=1).sum() + (capacities * prices).sum())
    optimum, ours = exact_optimum(scores), total(scores, assignment)
    assert ours <= optimum * (1 + 1e-12) and optimum <= upper_bound * (1 + 1e-12)
    assert upper_bound - ours <= 2048 * 1e-2 * residual_std(scores)


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


def test_deterministic():
    scores = integer_ties(777, 16, seed=8)  # many exact ties
    original = scores.clone()
    first = balanced_assignment(scores)
    assert all(torch.equal(first, balanced_assignment(scores)) for _ in range(3))
    assert torch.equal(scores, original)  # the input is left alone
    assert torch.equal(balanced_assignment(scores, max_rounds=5), balanced_assignment(scores, max_rounds=5))


def test_degenerate_shapes():
    assert balanced_assignment(torch.zeros(0, 4)).shape == (0,)
    assert balanced_assignment(torch.randn(7, 1)).tolist() == [0] * 7
    assert_balanced(balanced_assignment(torch.zeros(48, 6)), 48, 6)


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
