"""FROZEN BASELINE, not part of the package: megatron_moe/moe/balanced_assignment.py as it was at commit 453a6fd
(the sync-bounded Jacobi auction), kept verbatim below this paragraph (but for ``expert_capacities``, which
the rewrite left unchanged and which is imported from it) only so that
benchmarks/balanced_assignment.py can measure the solver it replaced in the same run as the new one. Nothing
imports it but that benchmark; do not edit it or use it elsewhere.

Balanced token-to-expert assignment for BASE layers (Lewis et al. 2021, arXiv 2103.16716).

Given affinities ``scores[t, e]`` between T tokens and E experts, choose one expert per token to
maximise the summed score subject to every expert receiving its fixed share of the tokens
(:func:`expert_capacities`). This is a linear assignment problem on the T x T matrix whose columns
are the experts repeated ``capacity`` times; we solve it without materialising that matrix, by an
auction that certifies its own gap.

Dual certificate. For any expert prices ``p``, ``sum_t max_e(s[t, e] - p[e]) + sum_e capacity[e] *
p[e]`` is an upper bound on the optimum. A token's regret is how much more it would get at its best
expert than at its own, at prices ``p``; the bound minus our total score is exactly the summed
regret. The auction keeps every token it places below ``eps`` regret; ``return_prices`` gives the
prices, so every caller can certify its own gap.

Auction (Bertsekas). Each expert owns ``capacity[e]`` slots; a slot's price is the bid of the token
holding it (0 while empty) and the expert's price is its cheapest slot. Every round the bidders bid
at once (Jacobi): a token bids for its best expert its full margin over its second-best *expert*,
plus ``eps``. Each expert matches its highest bids with its cheapest slots and a winner evicts the
slot's holder, who bids again. (Bidding only the margin over the expert's second-cheapest slot, the
textbook rule for repeated columns, starts price wars between an expert's own slots: 3-12x more
rounds when we measured it.)

Made for a GPU step: no host sync inside the loop, and the loop's shape is decided by T and E, not
by the data. The bidders live in a buffer whose size is a function of the round only (about
4 T / round, a power of two, at least 2 E): every ``_REFILL_EVERY`` rounds it is refilled, by a
sort, with the first unplaced tokens (the others wait; a winner's entry is taken over by the token
it evicts, so the buffer never grows in between). The loop may stop only at four checks (after
1/16, 1/4, 3/8 and 1/2 of ``max_rounds``), each one host sync: at most 4 per solve. Whatever is
still unplaced after ``max_rounds`` fills the free slots, the i-th unplaced token the i-th free slot,
with no sync: balance is exact whatever happened, and the cost of that fill shows in the certified
gap. On the benchmark's score kinds the auction finishes before the fill (1000-2000 rounds at
32k x 128), so the fill places nothing.

``eps`` is a fraction of the spread of the scores that matters: scores are standardised first
(row and column means removed, divided by the std of the rest), which leaves the optimal
assignment unchanged. ``eps = 0.01`` was chosen by measurement on 32k tokens x 128 experts
(Gaussian, skewed and clustered scores of ``benchmarks/balanced_assignment.py``): certified gaps
0.0014-0.003 %, against 0.007-0.016 % at eps = 0.03 (about 35 % fewer rounds); eps = 0.003 gains
little accuracy for ~40 % more rounds.

The result is deterministic: no random numbers, stable sorts, ties broken by token and expert index.
Non-finite scores are replaced first: NaN and -inf by the smallest finite score, +inf by the
largest. fp16/bf16 inputs are solved in fp32, fp64 in fp64.
"""

from __future__ import annotations

import torch

from megatron_moe.moe.balanced_assignment import expert_capacities  # unchanged by the rewrite

__all__ = ["balanced_assignment", "expert_capacities"]

# Rounds between refills of the bidder buffer from all the unplaced tokens (a sort over T).
_REFILL_EVERY = 8
# The loop may stop after 1/16, 1/4, 3/8 and 1/2 of max_rounds (256, 1024, 1536, 2048 by default): at
# most 4 host syncs per solve. The benchmark's 8k x 64 solves converge in 300-2000 rounds, 32k x 128
# in 1300-1900.
_CHECK_FRACTIONS = (1 / 16, 1 / 4, 3 / 8, 1 / 2)


def balanced_assignment(
    scores: torch.Tensor,
    *,
    eps: float = 1e-2,
    max_rounds: int = 4096,
    return_prices: bool = False,
):
    """Expert index per token maximising ``sum_t scores[t, expert[t]]`` with exact balance.

    Args:
        scores: [T, E] floating-point token-expert affinities (any device; not differentiated).
        eps: bid increment as a fraction of the std of the scores once each row's and column's mean
            is removed; every token placed by the auction has regret below it.
        max_rounds: auction rounds at most; the loop stops early only at the checks after
            1/16, 1/4, 3/8 and 1/2 of ``max_rounds`` rounds (one host sync each). Tokens still
            unplaced after the last round fill the free slots (module docstring).
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
    if num_tokens == 0 or num_experts == 1:
        assignment = torch.zeros(num_tokens, dtype=torch.long, device=scores.device)
        return (assignment, scores.new_zeros(num_experts, dtype=dtype)) if return_prices else assignment

    normalised, column_shift, scale = _standardise(_finite(scores.detach().to(dtype)))
    auction = _Auction(normalised, eps)
    checks = {_refill_round(int(max_rounds * fraction)) for fraction in _CHECK_FRACTIONS}
    for round_index in range(max_rounds):
        if round_index % _REFILL_EVERY == 0:
            auction.refill(_buffer_size(round_index, num_tokens, num_experts))
            if round_index in checks and auction.all_placed():
                break
        auction.bid_round()
    auction.fill_free_slots()

    assignment = _assignment_from_owners(auction.owner_grid(), num_tokens)
    return (assignment, auction.expert_prices() * scale + column_shift) if return_prices else assignment


def _refill_round(round_index: int) -> int:
    return max(_REFILL_EVERY, round_index - round_index % _REFILL_EVERY)


def _buffer_size(round_index: int, num_tokens: int, num_experts: int) -> int:
    """Bidders per round, a function of the round alone: about 4 T / (round + 1) rounded up to a power
    of two, at least 2 E (or T). The unplaced tokens measured on the benchmark's score kinds fall
    below it at every round; when they do not, the surplus waits for a later refill."""
    wanted = max(2 * num_experts, 64, -(-4 * num_tokens // (round_index + 1)))
    return min(num_tokens, 1 << (wanted - 1).bit_length())


def _describe(value) -> str:
    return f"shape {tuple(value.shape)}" if isinstance(value, torch.Tensor) else type(value).__name__


def _finite(scores: torch.Tensor) -> torch.Tensor:
    """NaN and -inf become the smallest finite score, +inf the largest (all 0 if none is finite)."""
    finite = torch.isfinite(scores)
    inf = torch.tensor(float("inf"), dtype=scores.dtype, device=scores.device)
    low = torch.where(finite, scores, inf).amin()
    high = torch.where(finite, scores, -inf).amax()
    low, high = torch.where(torch.isfinite(low), low, 0), torch.where(torch.isfinite(high), high, 0)
    return torch.where(finite, scores, torch.where(scores == inf, high, low))


def _standardise(scores: torch.Tensor):
    """Remove every row's and column's mean, divide by the std of what is left.

    Adding a constant to a token's row, or to an expert's column, adds the same amount to every
    balanced assignment (each expert takes a fixed number of tokens), so the optimum is unchanged;
    what is left is the part of the scores that decides the assignment, and ``eps`` is measured
    against its spread, not inflated by a dominant expert. Prices on the standardised scores map
    back as ``prices * scale + column_shift``."""
    residual = scores - scores.mean(dim=1, keepdim=True)
    column_shift = residual.mean(dim=0)
    residual -= column_shift
    scale = residual.square().mean().sqrt()
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    return residual.div_(scale), column_shift, scale


def _rank_within_group(group: torch.Tensor, key: torch.Tensor):
    """Order entries by group, then by key descending (stable); return the order, the group of each
    ordered entry and its 0-based rank inside its group."""
    by_key = torch.sort(key, descending=True, stable=True).indices
    order = by_key[torch.sort(group[by_key], stable=True).indices]
    grouped = group[order]
    rank = torch.arange(grouped.numel(), device=group.device) - torch.searchsorted(grouped, grouped)
    return order, grouped, rank


def _assignment_from_owners(owner: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """Expert per token from the [E, C] slot-owner grid (-1 = empty or padding slot)."""
    num_experts, slots = owner.shape
    expert = torch.arange(num_experts, device=owner.device)[:, None].expand(num_experts, slots).reshape(-1)
    assignment = torch.empty(num_tokens + 1, dtype=torch.long, device=owner.device)
    owner = owner.reshape(-1)
    assignment[torch.where(owner >= 0, owner, num_tokens)] = expert  # entry num_tokens absorbs empties
    return assignment[:-1]


class _Auction:
    """Phase 1 on standardised scores [T, E] (E >= 2).

    Slots are a padded [E, C] grid (C = max capacity); padding slots have an infinite price so
    nobody wins them. The flat slot arrays end with one "dump" entry that absorbs the writes of
    losing bids, which keeps every update a fixed-shape scatter."""

    def __init__(self, scores: torch.Tensor, eps: float):
        self.scores, self.eps = scores, eps
        num_tokens, num_experts = scores.shape
        device = scores.device
        self.num_experts = num_experts
        self.slots_per_expert = -(-num_tokens // num_experts)
        self.dump = num_experts * self.slots_per_expert
        capacities = expert_capacities(num_tokens, num_experts, device)
        padding = torch.arange(self.slots_per_expert, device=device) >= capacities[:, None]
        self.slot_price = torch.zeros(self.dump + 1, dtype=scores.dtype, device=device)
        self.slot_price[:-1].masked_fill_(padding.reshape(-1), float("inf"))
        self.slot_owner = torch.full((self.dump + 1,), -1, dtype=torch.long, device=device)
        # Capping a bid's margin at the score range keeps prices finite when a token has a single
        # expert with room (T == 1); a smaller bid never breaks the regret bound.
        self.max_margin = scores.max() - scores.min() + eps
        self.unassigned = torch.arange(num_tokens, device=device)

    def _unplaced_first(self) -> torch.Tensor:
        """All token indices, the unplaced ones first, each part in index order (no host sync)."""
        num_tokens = self.scores.shape[0]
        placed = torch.zeros(num_tokens + 1, dtype=torch.bool, device=self.scores.device)
        placed[self.slot_owner] = True  # owner -1 (empty slot) marks the spare entry num_tokens
        key = torch.arange(num_tokens, device=placed.device) + num_tokens * placed[:-1]
        return key.sort().values

    def refill(self, size: int):
        """The next rounds' bidders: the first ``size`` unplaced tokens, -1 for the empty entries."""
        first = self._unplaced_first()[:size]
        self.unassigned = torch.where(first < self.scores.shape[0], first, -1)

    def all_placed(self) -> bool:
        """Host sync, right after a refill: is the buffer empty?"""
        return not bool((self.unassigned >= 0).any())

    def fill_free_slots(self):
        """Exact balance without a host sync: the i-th unplaced token takes the i-th free slot.

        There are as many free slots as unplaced tokens, so pairing the two lists position by
        position places every token whatever their number; the regret this costs shows in the
        certified gap. After a converged auction both lists are empty."""
        num_tokens = self.scores.shape[0]
        tokens = self._unplaced_first()
        slot = torch.arange(self.dump, device=tokens.device)
        free = (self.slot_owner[:-1] < 0) & torch.isfinite(self.slot_price[:-1])
        free_slots = (slot + self.dump * ~free).sort().values[:num_tokens]
        pairs = tokens < num_tokens
        self.slot_owner[torch.where(pairs, free_slots, self.dump)] = torch.where(pairs, tokens, -1)
        self.slot_owner[self.dump] = -1

    def owner_grid(self) -> torch.Tensor:
        return self.slot_owner[:-1].view(self.num_experts, self.slots_per_expert)

    def slot_prices(self) -> torch.Tensor:
        return self.slot_price[:-1].view(self.num_experts, self.slots_per_expert)

    def expert_prices(self) -> torch.Tensor:
        return self.slot_prices().amin(dim=1)

    def bid_round(self):
        """Every token in the buffer bids; every expert keeps its best bids."""
        buffer = self.unassigned
        # Only an expert's `depth` cheapest slots can be won this round (a bidder ranked deeper
        # bids again next round); a few times the mean bidders per expert keeps this cheap.
        depth = min(self.slots_per_expert, buffer.numel(), max(8, 4 * buffer.numel() // self.num_experts))
        cheapest_price, cheapest_slot = self.slot_prices().topk(depth, dim=1, largest=False)
        expert_price = cheapest_price[:, 0]

        top2 = (self.scores[buffer.clamp(min=0)] - expert_price).topk(2, dim=1)
        best_value, second_value = top2.values.unbind(1)
        best_expert = top2.indices[:, 0]
        margin = torch.minimum(best_value - second_value, self.max_margin)
        bid = expert_price[best_expert] + margin + self.eps

        group = torch.where(buffer >= 0, best_expert, self.num_experts)  # empty entries sort last
        order, expert, rank = _rank_within_group(group, bid)
        expert_c, rank_c = expert.clamp(max=self.num_experts - 1), rank.clamp(max=depth - 1)
        bid = bid[order]
        # A winning bid beats its slot by eps (rank 0 always does); eps/2 absorbs rounding.
        wins = (expert < self.num_experts) & (rank < depth) & (bid >= cheapest_price[expert_c, rank_c] + self.eps / 2)
        slot = torch.where(wins, expert_c * self.slots_per_expert + cheapest_slot[expert_c, rank_c], self.dump)

        bidder = buffer[order]
        evicted = self.slot_owner[slot]
        self.slot_owner[slot] = bidder
        self.slot_owner[self.dump] = -1
        self.slot_price[slot] = bid
        buffer[order] = torch.where(wins, evicted, bidder)
