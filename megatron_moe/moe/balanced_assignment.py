"""Balanced token-to-expert assignment for BASE layers (Lewis et al. 2021, arXiv 2103.16716).

Given affinities ``s[t, e]`` between T tokens and E experts, choose one expert per token to maximise
``sum_t s[t, a(t)]`` subject to expert e receiving exactly ``capacity[e]`` tokens (:func:`expert_capacities`).
Prices first, then tokens:

0. **Scores** are standardised (row and column means removed, divided by the std of the rest: the optimum is
   unchanged) and exact ties broken by adding 1e-4 of a fixed pseudo-random pattern in (t, e).
1. **Prices by Newton.** The dual has one variable per expert, its price ``p[e]``: ``U(p) = sum_t max_e(s[t, e]
   - p[e]) + capacity . p`` bounds every balanced total from above, and at the optimal prices every token's
   own best expert ``argmax_e(s[t, e] - p[e])`` is balanced. We minimise the smoothed dual ``tau sum_t
   logsumexp((s_t - p) / tau) + capacity . p``: convex in E variables, gradient ``capacity - loads`` (column
   sums of the softmax ``pi``), Hessian ``(diag(loads) - pi^T pi) / tau`` (one [E, T] x [T, E] GEMM). One
   Newton step per tau, tau halving from 1 to 1e-2, then x 0.6 down to 2e-6 (24 steps). The Hessian is a
   graph Laplacian, singular along the all-ones direction (prices are defined up to a shift): a ridge of
   1e-3 tokens makes it definite and leaves that direction out; each step is clipped to 8 tau per price.
   While tau >= 0.1 the softmax is smooth and every 2nd-4th token stands for the others (>= 64 per
   expert). Once tau <= 2e-3 a token far from a tie keeps its split: the last 14 steps run on the least
   settled tokens only (T/8, at least 4 per expert; all of them up to 4096 tokens).
2. **Tokens** take their best expert at those prices (a frozen token draws from its split, a low-discrepancy
   sequence over the tokens, so that a group of tied tokens divides in its split's proportions); an expert
   given more than its capacity keeps the tokens with the largest margins (best minus next value).
3. **Auction on the unsettled tokens.** The tokens left over (usually none: a few near-ties) bid in a
   warm-started auction (Bertsekas; Jacobi rounds; a buffer of 256 or 2E bidders): a placed token holds its
   slot at the price it would have bid (its expert's price plus its margin), an empty slot costs its
   expert's price. A bidder offers its best expert its margin over its second-best plus ``eps`` and evicts
   the holder of the cheapest slot, who bids next round. In the last round only empty slots are for sale:
   whoever is left takes its best expert with room.
4. **Exact-balance fill.** Whatever is still unplaced takes the free slots, i-th token the i-th slot.

Certificate: ``return_prices`` gives the auction's expert prices (each expert's cheapest slot, in score
units); ``U(prices)`` minus our total is the summed regret, an upper bound on our gap to the optimum that
every caller can check. A token placed by its best expert has regret 0, by the auction below ``eps``.

Made for a GPU step: the schedule (steps, sample and active-set sizes, rounds) depends on T and E only, so
a solve is ~540 launched ops at any size and never reads the device from the host: no host sync, and it
can be captured in a CUDA graph (``cholesky_ex``: no error check; the Hessian is built diagonally dominant,
so definite however its GEMM rounds, TF32 included). Deterministic: no random numbers, stable sorts, ties by
index. Non-finite scores are replaced first: NaN and -inf by the smallest finite score, +inf by the largest.
fp16/bf16 inputs are solved in fp32, fp64 in fp64.
"""

from __future__ import annotations

import torch

__all__ = ["balanced_assignment", "expert_capacities"]

# Scores are standardised first: tau, the tie break, the ridge's effect and eps are in units of their spread.
_TAU_LAST = 2e-6  # the schedule's end (_tau_schedule)
_TIE_BREAK = 1e-4  # amplitude of the fixed pattern that breaks exact ties
_RIDGE = 1e-3  # added to the Hessian (times tau), in tokens
_TRUST = 8.0  # largest price change per step and expert, in units of tau
_SAMPLE_ABOVE = 0.1  # steps at tau >= this see every stride-th token ...
_SAMPLE_PER_EXPERT = 64  # ... keeping at least this many per expert (stride <= 4)
_ACTIVE_BELOW = 2e-3  # steps at tau <= this see the least settled tokens only: ...
_ACTIVE_ALL_UP_TO = 4096  # ... all of them up to this many tokens, else T/8 ...
_ACTIVE_MIN_PER_EXPERT = 4  # ... and at least this many per expert
_BIDDERS = 256  # auction buffer (at least 2E)


def expert_capacities(num_tokens: int, num_experts: int, device=None) -> torch.Tensor:
    """Tokens per expert: ``num_tokens // num_experts`` each, plus one for the lowest-index
    ``num_tokens % num_experts`` experts. It depends only on the sizes, so every rank can compute
    the all-to-all split sizes of a balanced dispatch without exchanging counts."""
    capacities = torch.full((num_experts,), num_tokens // num_experts, dtype=torch.long, device=device)
    capacities[: num_tokens % num_experts] += 1
    return capacities


def balanced_assignment(
    scores: torch.Tensor,
    *,
    eps: float = 1e-3,
    max_rounds: int = 6,
    return_prices: bool = False,
):
    """Expert index per token maximising ``sum_t scores[t, expert[t]]`` with exact balance.

    Args:
        scores: [T, E] floating-point token-expert affinities (any device; not differentiated).
        eps: auction bid increment as a fraction of the std of the scores once each row's and column's
            mean is removed; every token placed by the auction has regret below it.
        max_rounds: auction rounds (module docstring); tokens still unplaced after them fill the free
            slots. 0 skips the auction.
        return_prices: also return expert prices [E] (in score units) for the dual upper bound
            ``sum_t max_e(scores[t, e] - prices[e]) + sum_e capacity[e] * prices[e]`` (+inf for
            experts of capacity 0, when T < E: leave them out of the second sum).

    Returns:
        LongTensor [T] on ``scores.device``; expert ``e`` receives exactly
        ``expert_capacities(T, E)[e]`` tokens. With ``return_prices``: ``(assignment, prices)``.
    """
    if not isinstance(scores, torch.Tensor) or scores.dim() != 2:
        raise ValueError(f"balanced_assignment: scores must be a 2-D [tokens, experts] tensor, got {_describe(scores)}")
    if not scores.is_floating_point():
        raise ValueError(f"balanced_assignment: scores must be floating point, got {scores.dtype}; cast with .float()")
    num_tokens, num_experts = scores.shape
    if num_experts == 0:
        raise ValueError("balanced_assignment: scores has 0 experts (columns); need at least one")
    if not eps > 0 or max_rounds < 0:
        raise ValueError(f"balanced_assignment: need eps > 0, max_rounds >= 0; got eps={eps}, max_rounds={max_rounds}")
    dtype = torch.float64 if scores.dtype == torch.float64 else torch.float32
    if num_tokens <= 1 or num_experts == 1:
        assignment = torch.zeros(num_tokens, dtype=torch.long, device=scores.device)
        if not return_prices:
            return assignment
        prices = scores.new_zeros(num_experts, dtype=dtype)
        prices[num_tokens:] = float("inf")  # capacity 0
        return assignment, prices

    normalised, column_shift, scale = _standardise(_finite(scores.detach().to(dtype)))
    capacities = expert_capacities(num_tokens, num_experts, scores.device)
    positions = _low_discrepancy(num_tokens, normalised)
    _break_ties(normalised, positions)
    if num_tokens < num_experts:  # experts of capacity 0 get no token
        normalised[:, num_tokens:] = -float("inf")
    prices, frozen = _newton(normalised, capacities)
    choice = None if frozen is None else _stratified_choice(normalised, prices, positions, *frozen)
    auction = _Auction(normalised, capacities, prices, choice, eps)
    for round_index in range(max_rounds):
        auction.bid_round(free_only=round_index == max_rounds - 1)
    assignment = auction.fill_free_slots()
    return (assignment, auction.expert_prices() * scale + column_shift) if return_prices else assignment


def _describe(value) -> str:
    return f"shape {tuple(value.shape)}" if isinstance(value, torch.Tensor) else type(value).__name__


def _finite(scores: torch.Tensor) -> torch.Tensor:
    """NaN and -inf become the smallest finite score, +inf the largest (all 0 if none is finite)."""
    inf = float("inf")
    low = torch.nan_to_num(scores, nan=inf, neginf=inf).amin()
    high = torch.nan_to_num(scores, nan=-inf, posinf=-inf).amax()
    clipped = torch.nan_to_num(scores, nan=-inf, posinf=inf, neginf=-inf).clamp_(min=low, max=high)
    return clipped.nan_to_num_(posinf=0.0, neginf=0.0)  # nothing finite: low = inf, high = -inf


def _standardise(scores: torch.Tensor):
    """Remove every row's and column's mean, divide by the std of what is left.

    Adding a constant to a token's row, or to an expert's column, adds the same amount to every
    balanced assignment (each expert takes a fixed number of tokens), so the optimum is unchanged;
    what is left is the part of the scores that decides the assignment, and the schedule's ``tau``
    and ``eps`` are measured against its spread. Prices on the standardised scores map back as
    ``prices * scale + column_shift``."""
    residual = scores - scores.mean(dim=1, keepdim=True)
    column_shift = residual.mean(dim=0)
    residual -= column_shift
    scale = residual.std(correction=0).clamp_(min=torch.finfo(scores.dtype).tiny)
    return residual.div_(scale), column_shift, scale


def _low_discrepancy(num_tokens, like):
    """``frac(t * golden ratio)`` for every token t: evenly spread over [0, 1) in any run of tokens."""
    golden = 0.6180339887498949
    token = torch.arange(0.0, num_tokens * golden - golden / 2, golden, dtype=torch.float64, device=like.device)
    return token.frac_().to(like.dtype)


def _break_ties(scores, positions):
    """Adds ``_TIE_BREAK * frac(positions_t * (e + 1) * sqrt 2)`` in place: a fixed pseudo-random pattern, so
    that a group of tied tokens splits over their experts instead of all taking the lowest-index one."""
    root2 = 1.4142135623730951
    expert = torch.arange(root2, (scores.shape[1] + 0.5) * root2, root2, dtype=scores.dtype, device=scores.device)
    scores.add_(torch.outer(positions, expert).frac_(), alpha=_TIE_BREAK)


def _tau_schedule():
    """Halving from 1 while the softmax is smooth, then slower (x 0.6), the path sharper, to _TAU_LAST."""
    taus = [1.0]
    for rate, last in ((0.5, 1e-2), (0.6, _TAU_LAST)):
        while taus[-1] * rate >= last * 0.999:
            taus.append(taus[-1] * rate)
    return taus


def _newton(scores: torch.Tensor, capacities: torch.Tensor):
    """Prices [E] minimising the smoothed dual along the fixed tau schedule (module docstring, 1), and
    None or, when the last steps ran on the active tokens only, (softmax of every token at the switch,
    the active tokens' indices)."""
    num_tokens, num_experts = scores.shape
    step = _NewtonStep(scores, capacities.to(scores.dtype))
    # While the softmax is smooth, every stride-th token only (stride <= 4, keeping >= 64 per expert),
    # each expert's target scaled alike.
    stride = min(4, max(1, num_tokens // (_SAMPLE_PER_EXPERT * num_experts)))
    sample = scores[::stride], step.target * (-(-num_tokens // stride) / num_tokens)
    active_count = _active_count(num_tokens, num_experts)
    rows, target, frozen, soft = scores, step.target, None, None
    for tau in _tau_schedule():
        if frozen is None and tau <= _ACTIVE_BELOW and active_count < num_tokens:
            # The least settled tokens go on; the others keep their split of the last full step.
            active = soft.amax(dim=1).topk(active_count, largest=False).indices
            ones = step.ones_for(soft.shape[0])
            target = torch.addmv(torch.addmv(target, soft.T, ones, alpha=-1), soft[active].T, ones[:active_count])
            rows, frozen = scores[active], (soft, active)
        soft = step(*(sample if tau >= _SAMPLE_ABOVE and stride > 1 else (rows, target)), tau)
    return step.prices, frozen


def _active_count(num_tokens, num_experts):
    if num_tokens <= _ACTIVE_ALL_UP_TO:
        return num_tokens
    return min(num_tokens, max(num_tokens // 8, _ACTIVE_MIN_PER_EXPERT * num_experts))


def _stratified_choice(scores, prices, positions, frozen_soft, active):
    """Each token's expert drawn from its softmax row, token t at ``positions[t]`` of the row's cumulative
    distribution: the frozen tokens' rows from the switch, the active ones' at the final prices and tau.
    A one-hot row gives its expert; a group of tied tokens splits in its rows' proportions, up to a token
    or two per expert (``positions`` is a low-discrepancy sequence)."""
    final = torch.softmax(torch.add(prices * (-1 / _TAU_LAST), scores[active], alpha=1 / _TAU_LAST), dim=1)
    cumulative = frozen_soft.index_copy_(0, active, final).cumsum_(dim=1)
    return (cumulative < positions[:, None]).sum(dim=1).clamp_(max=scores.shape[1] - 1)


class _NewtonStep:
    """One clipped Newton step on ``prices`` (in place) for the smoothed dual at temperature ``tau``, on
    the given token rows and target loads; 11 launched ops."""

    def __init__(self, scores, target):
        num_experts = scores.shape[1]
        self.prices = scores.new_zeros(num_experts)
        self.target = target
        self.ones = {}  # one vector of ones per number of rows (full, sampled, active)
        self.experts_ones = scores.new_ones(num_experts)
        self.ridge = scores.new_full((num_experts,), _RIDGE)

    def ones_for(self, num_rows):
        if num_rows not in self.ones:
            self.ones[num_rows] = self.prices.new_ones(num_rows)
        return self.ones[num_rows]

    def __call__(self, rows, target, tau):
        """The step; returns the softmax of ``rows`` at the prices before it."""
        soft = torch.softmax(torch.add(self.prices * (-1 / tau), rows, alpha=1 / tau), dim=1)
        gradient = torch.addmv(target, soft.T, self.ones_for(soft.shape[0]), alpha=-1)  # target - loads
        # Hessian times tau: the Laplacian diag(P 1) - P of the coupling P = soft^T soft, plus a ridge.
        # Its diagonal comes from P itself (with 1e-5 to spare for rounding), so it is diagonally
        # dominant, hence definite, however the GEMM rounds (TF32 included).
        hessian = torch.addmm(self.ridge, soft.T, soft, beta=0, alpha=-1)
        hessian.diagonal().add_(torch.addmv(self.ridge, hessian, self.experts_ones, alpha=-(1 + 1e-5)))
        factor = torch.linalg.cholesky_ex(hessian).L
        direction = torch.cholesky_solve(gradient.unsqueeze(1), factor).squeeze(1)
        self.prices.sub_(direction.clamp_(-_TRUST, _TRUST), alpha=tau)
        return soft


def _rank_within_group(group: torch.Tensor, key: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Each entry's 0-based rank inside its group when ordered by key descending, ties by position
    (``positions`` = arange(len(group)))."""
    by_key = torch.sort(key, descending=True, stable=True).indices
    grouped, within = torch.sort(group[by_key], stable=True)
    return torch.empty_like(within).index_put_((by_key[within],), positions - torch.searchsorted(grouped, grouped))


class _Auction:
    """Steps 2-4 on standardised scores [T, E] (E >= 2, T >= 2), warm-started from Newton's prices.

    Each expert owns ``capacity`` slots of a padded [E, C] grid (C = max capacity); a padding slot costs
    +inf, so nobody wins it. The flat slot arrays end with one "dump" entry that absorbs the writes of
    losing bids, which keeps every update a fixed-shape scatter. Token index T marks "nobody" (an empty
    slot's owner, an empty bidder entry). The bidders live in a buffer of fixed size; a winner's entry
    is taken over by the token it evicts."""

    def __init__(self, scores, capacities, prices, choice, eps):
        self.scores, self.eps = scores, eps
        num_tokens, num_experts = scores.shape
        device = scores.device
        self.num_tokens, self.num_experts = num_tokens, num_experts
        self.slots_per_expert = slots = -(-num_tokens // num_experts)
        self.dump = dump = num_experts * slots
        self.padding = torch.arange(slots, device=device) >= capacities[:, None]
        self.no_expert = torch.full((), num_experts, device=device)

        # Each token's expert: its best at the final prices, or ``choice``. A placed token holds its slot
        # at the price it would have bid, its margin over its next choice (0 if that is better): the
        # cheapest slot of an expert is held by its least attached token.
        values = scores - prices
        top2 = values.topk(2, dim=1)
        if choice is None:
            best, margin = top2.indices[:, 0], top2.values[:, 0] - top2.values[:, 1]
        else:
            best = choice
            other = torch.where(top2.indices[:, 0] == choice, top2.values[:, 1], top2.values[:, 0])
            margin = (values.gather(1, choice[:, None]).squeeze(1) - other).clamp_(min=0)
        positions = torch.arange(num_tokens, device=device)
        rank = _rank_within_group(best, margin, positions)
        placed = rank < capacities[best]
        slot = torch.where(placed, best * slots + rank, dump)
        self.slot_price = prices.new_full((dump + 1,), float("inf"))
        self.slot_price[:-1].view(num_experts, slots).copy_(prices[:, None]).masked_fill_(self.padding, float("inf"))
        self.slot_price[slot] = prices[best] + margin
        self.slot_owner = torch.full((dump + 1,), num_tokens, device=device)
        self.slot_owner[slot] = positions
        # The unplaced tokens first, in token order; the buffer holds as many as can be unplaced when
        # the prices are near the optimum (about E), and some more.
        size = min(num_tokens, max(_BIDDERS, 2 * num_experts))
        self.bidders = torch.sort(torch.where(placed, num_tokens, positions)).values[:size]
        self.bidder_positions = positions[:size]

    def expert_prices(self) -> torch.Tensor:
        return self.slot_price[:-1].view(self.num_experts, self.slots_per_expert).amin(dim=1)

    def bid_round(self, free_only=False):
        """Every token in the buffer bids; every expert keeps its best bids. ``free_only``: only empty
        slots are for sale, at their price (the last round: the tokens left over take their best
        expert with room, nobody is evicted)."""
        buffer, slots, num_experts = self.bidders, self.slots_per_expert, self.num_experts
        price = self.slot_price[:-1]
        if free_only:
            price = torch.where(self.slot_owner[:-1] == self.num_tokens, price, float("inf"))
        # Only an expert's `depth` cheapest slots can be won this round (a bidder ranked deeper bids
        # again next round). Padded with +inf to [E + 1, len(buffer)]: row E for the empty entries.
        depth = min(slots, buffer.numel())
        cheapest_price, cheapest_slot = price.view(num_experts, slots).topk(depth, dim=1, largest=False)
        padding = (0, buffer.numel() - depth, 0, 1)
        cheapest_price = torch.nn.functional.pad(cheapest_price, padding, value=float("inf"))
        cheapest_slot = torch.nn.functional.pad(cheapest_slot, padding)

        rows = self.scores[buffer.clamp(max=self.num_tokens - 1)]
        top2 = (rows - cheapest_price[:-1, 0]).topk(2, dim=1)
        # Its value at its best expert's price, less its value at its second-best expert, plus eps.
        bid = (rows.gather(1, top2.indices[:, :1]).squeeze(1) - top2.values[:, 1]).add_(self.eps)
        expert = torch.where(buffer < self.num_tokens, top2.indices[:, 0], self.no_expert)
        rank = _rank_within_group(expert, bid, self.bidder_positions)
        # The r-th best bid for an expert takes its r-th cheapest slot if it beats its price by eps
        # (rank 0 always does; eps/2 absorbs rounding). Strictly: an infinite bid (a single expert with
        # room in the last round) never takes an unsold (+inf) slot.
        wins = bid > cheapest_price[expert, rank] + self.eps / 2
        slot = torch.where(wins, expert * slots + cheapest_slot[expert, rank], self.dump)
        evicted = self.slot_owner[slot]  # losers read the dump entry, and keep bidding
        self.slot_owner[slot] = buffer
        if not free_only:
            self.slot_price[slot] = bid
        self.bidders = torch.where(wins, evicted, buffer)

    def fill_free_slots(self) -> torch.Tensor:
        """Expert per token; the i-th unplaced token takes the i-th free slot (exact balance, no sync).

        There are as many free slots as unplaced tokens, so pairing the two lists position by position
        places every token whatever their number; the regret this costs shows in the certificate."""
        num_tokens, num_experts, dump = self.num_tokens, self.num_experts, self.dump
        device = self.scores.device
        slot_index = torch.arange(dump + 1, device=device)
        expert_of_slot = slot_index // self.slots_per_expert  # E for the dump
        assignment = torch.full((num_tokens + 1,), num_experts, device=device)
        assignment[self.slot_owner] = expert_of_slot  # empty slots write entry T
        unplaced = torch.sort(torch.where(assignment[:-1] == num_experts, slot_index[:num_tokens], num_tokens)).values
        free = (self.slot_owner[:-1] == num_tokens) & ~self.padding.view(-1)
        free_slots = torch.sort(torch.where(free, slot_index[:-1], dump)).values[:num_tokens]
        assignment[unplaced] = expert_of_slot[free_slots]  # past the unplaced: entry T
        return assignment[:-1]
