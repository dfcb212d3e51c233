"""Balanced token-to-expert assignment for BASE layers (Lewis et al. 2021, arXiv 2103.16716).

Given affinities ``scores[t, e]`` between T tokens and E experts, choose one expert per token to
maximise the summed score subject to every expert receiving its fixed share of the tokens
(:func:`expert_capacities`). This is a linear assignment problem on the T x T matrix whose columns
are the experts repeated ``capacity`` times; we solve it without materialising that matrix, in two
phases that share one dual certificate.

Dual certificate. For any expert prices ``p``, ``sum_t max_e(s[t, e] - p[e]) + sum_e capacity[e] *
p[e]`` is an upper bound on the optimum. A token's regret is how much more it would get at its best
expert than at its own, at prices ``p``; the bound minus our total score is exactly the summed
regret. Both phases keep every placed token's regret below ``eps``, so the result is within
``T * eps`` (in the standardised units below) of the optimum, and in practice much closer.

Phase 1, auction (Bertsekas), for the bulk. Each expert owns ``capacity[e]`` slots; a slot's price is
the bid of the token holding it (0 while empty) and the expert's price is its cheapest slot. Every
round all unassigned tokens bid at once (Jacobi): a token bids for its best expert its full margin
over its second-best *expert*, plus ``eps``. Each expert matches its highest bids with its cheapest
slots and a winner evicts the slot's holder, who bids again next round. (Bidding only the margin over
the expert's second-cheapest slot, the textbook rule for repeated columns, starts price wars between
an expert's own slots: 3-12x more rounds when we measured it.) Unassigned tokens live in a buffer that
is compacted at each convergence check; a winner's entry is taken over by the token it evicts, so
the buffer never grows between checks and no round needs a host-side value. On CPU we check every
round (free there); on GPU every ``check_every`` rounds, one host sync per check, not per round.

Phase 2, shortest augmenting paths, for the tail. An auction places its last tokens slowly: each
evicted token only moves the price of one expert by a small step. So once a window of rounds places
fewer than one token per round (or after ``max_rounds``), the remaining tokens are placed along
shortest paths over the E experts (successive shortest paths on the "move one token from expert a
to expert b" graph, with the expert prices as potentials). A path places a token at zero regret and
keeps every other regret below ``eps``; one Bellman-Ford relaxation (a few O(E^2) sweeps) serves all the paths
that share no expert, and only the rows of the experts on them are recomputed. This phase syncs
with the host a few times per relaxation; the tail is short (tens to a few hundred tokens). It
always terminates, at most one relaxation per remaining token, with exact balance: it is the hard
bound and the fallback. With ``max_rounds=0`` it alone solves the problem exactly (slowly).

``eps`` is a fraction of the spread of the scores that matters: scores are standardised first
(row and column means removed, divided by the std of the rest), which leaves the optimal
assignment unchanged. ``eps = 0.003`` and the switch rule were chosen by measurement (the score
kinds of ``benchmarks/balanced_assignment.py``): on 32k tokens x 128 experts, eps = 0.003 / 0.01 /
0.03 / 0.1 gave certified gaps of 0.00001 / 0.00003 / 0.0007 / 0.03 % on Gaussian scores and
0.00001 / 0.0002 / 0.007 / 0.11 % on skewed ones, while 0.01 saved only 5-20 % of the time (0.1:
35-45 %) and lost 0.05 % on low-rank test scores where 0.003 is exact. Switching to paths at 0.25
to 4 tokens per stalled round changed the time by less than the noise.

The result is deterministic: no random numbers, stable sorts, ties broken by token and expert index.
Non-finite scores are replaced first: NaN and -inf by the smallest finite score, +inf by the
largest. fp16/bf16 inputs are solved in fp32, fp64 in fp64.
"""

from __future__ import annotations

import torch

__all__ = ["balanced_assignment", "expert_capacities"]

# The auction hands over to augmenting paths when a window of this many rounds places fewer tokens
# than it has rounds: a path then costs less than the rounds the auction would spend per token.
_STALL_WINDOW = 16


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
    eps: float = 3e-3,
    max_rounds: int = 1000,
    check_every: int | None = None,
    return_prices: bool = False,
):
    """Expert index per token maximising ``sum_t scores[t, expert[t]]`` with exact balance.

    Args:
        scores: [T, E] floating-point token-expert affinities (any device; not differentiated).
        eps: bid increment as a fraction of the std of the scores once each row's and column's mean
            is removed; the result is within ``T * eps * that std`` of the optimum.
        max_rounds: hard bound on auction rounds before the remaining tokens are placed by
            augmenting paths (module docstring).
        check_every: auction rounds between convergence checks (host syncs); default 1 on CPU,
            16 on other devices.
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
    if not eps > 0 or max_rounds < 0 or (check_every is not None and check_every < 1):
        raise ValueError(
            "balanced_assignment: need eps > 0, max_rounds >= 0, check_every >= 1; "
            f"got eps={eps}, max_rounds={max_rounds}, check_every={check_every}"
        )
    if check_every is None:
        check_every = 1 if scores.device.type == "cpu" else 16
    dtype = torch.float64 if scores.dtype == torch.float64 else torch.float32
    if num_tokens == 0 or num_experts == 1:
        assignment = torch.zeros(num_tokens, dtype=torch.long, device=scores.device)
        return (assignment, scores.new_zeros(num_experts, dtype=dtype)) if return_prices else assignment

    normalised, column_shift, scale = _standardise(_finite(scores.detach().to(dtype)))

    auction = _Auction(normalised, eps)
    remaining, rounds, history = auction.num_unassigned(), 0, []
    lag = -(-_STALL_WINDOW // check_every)  # checks per stall window
    while remaining > 0 and rounds < max_rounds:
        for _ in range(min(check_every, max_rounds - rounds)):
            auction.bid_round()
            rounds += 1
        remaining = auction.num_unassigned()
        history.append(remaining)
        if len(history) > lag and history[-1 - lag] - remaining < lag * check_every:
            break  # stalled: the last window placed fewer tokens than it spent rounds
    prices = auction.expert_prices()
    if remaining > 0:
        prices = _place_by_shortest_paths(normalised, auction.owner_grid(), prices, auction.unassigned)

    assignment = _assignment_from_owners(auction.owner_grid(), num_tokens)
    return (assignment, prices * scale + column_shift) if return_prices else assignment


def _describe(value) -> str:
    return f"shape {tuple(value.shape)}" if isinstance(value, torch.Tensor) else type(value).__name__


def _finite(scores: torch.Tensor) -> torch.Tensor:
    """NaN and -inf become the smallest finite score, +inf the largest (all 0 if none is finite)."""
    finite = torch.isfinite(scores)
    if bool(finite.all()):
        return scores
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
    expert = torch.arange(num_experts, device=owner.device).repeat_interleave(slots)
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

    def num_unassigned(self) -> int:
        """Host sync: drop the empty entries of the buffer and count the rest."""
        self.unassigned = self.unassigned[self.unassigned >= 0]
        return self.unassigned.numel()

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


def _place_by_shortest_paths(
    scores: torch.Tensor, owner: torch.Tensor, prices: torch.Tensor, unassigned: torch.Tensor
) -> torch.Tensor:
    """Phase 2: place the unassigned tokens along shortest augmenting paths; updates ``owner`` in
    place and returns the new expert prices.

    Values are ``v[t, e] = scores[t, e] - prices[e]``. Moving a token from expert a to expert b costs
    its value loss ``v[t, a] - v[t, b]`` (>= -eps for placed tokens, clamped at 0); ``move[a, b]``
    holds the cheapest such move (which token that is, we look up only for the moves we make). An
    unassigned token enters expert b at cost ``max_e v[t, e] - v[t, b]``. Bellman-Ford over the E
    experts gives the shortest paths from the unassigned tokens to every expert. Lowering each
    expert's price by ``min(distance, cap)`` makes every shortest path to an expert within ``cap``
    free and keeps every other move non-negative (so no regret exceeds eps); we then augment along
    all the paths to experts with free slots that share no expert and no entering token, with cap =
    the farthest of them. A price shift moves ``move[a, b]`` by the shift of a minus that of b, so
    only the rows of the experts on the paths are recomputed."""
    num_experts, slots = owner.shape
    device = owner.device
    inf = float("inf")
    has_slot = torch.isfinite(prices)[:, None] & (
        torch.arange(slots, device=device) < expert_capacities(scores.shape[0], num_experts, device)[:, None]
    )
    unassigned = unassigned.tolist()

    def own_values(rows: torch.Tensor):
        """Holders [R, C] of the rows' slots and their values there (+inf for an empty slot, so
        that moving it costs +inf)."""
        holders = owner[rows]
        own = scores[holders.clamp(min=0), rows[:, None]] - prices[rows, None]
        return holders, own.masked_fill_(holders < 0, inf)

    def cheapest_moves(rows: torch.Tensor) -> torch.Tensor:
        holders, own = own_values(rows)
        return torch.add(own[:, :, None], prices).sub_(scores[holders.clamp(min=0)]).amin(dim=1)

    def cheapest_mover(rows: torch.Tensor, to: torch.Tensor) -> torch.Tensor:
        """Slot column, in each row, of the token that loses least by moving to expert ``to``."""
        holders, own = own_values(rows)
        return (own - scores[holders.clamp(min=0), to[:, None]] + prices[to, None]).argmin(dim=1)

    move = cheapest_moves(torch.arange(num_experts, device=device))
    while unassigned:
        value = scores[unassigned] - prices  # [U, E]
        distance, entrant = (value.amax(dim=1, keepdim=True) - value).min(dim=0)
        predecessor = torch.full((num_experts,), -1, dtype=torch.long, device=device)
        edge = move.clamp(min=0).fill_diagonal_(inf)
        for _ in range(num_experts):
            relaxed, via = (distance[:, None] + edge).min(dim=0)
            better = relaxed < distance
            if not bool(better.any()):
                break
            distance, predecessor = torch.where(better, relaxed, distance), torch.where(better, via, predecessor)

        # Pick disjoint paths, nearest sinks first, on the host (E small integers).
        free = (owner < 0) & has_slot
        pred, dist, entering = predecessor.tolist(), distance.tolist(), entrant.tolist()
        sinks = sorted((d, e) for e, (d, room) in enumerate(zip(dist, free.any(dim=1).tolist())) if room)
        used, taken, nodes, successor, cap = set(), set(), [], [], 0.0
        for cap_candidate, sink in sinks:
            path = [sink]
            while pred[path[-1]] >= 0:
                path.append(pred[path[-1]])
            if used.isdisjoint(path) and entering[path[-1]] not in taken:
                used.update(path)
                taken.add(entering[path[-1]])
                nodes += path
                successor += [-1] + path[:-1]
                cap = cap_candidate
        shift = distance.clamp(max=cap)
        prices = prices - shift
        move += shift[:, None] - shift[None, :]

        # Every expert on a path hands one token to its successor and receives one from its
        # predecessor (or from the unassigned tokens), into the slot just vacated (a free slot for
        # a sink).
        nodes_t, successor_t = torch.tensor(nodes, device=device), torch.tensor(successor, device=device)
        vacated = torch.where(
            successor_t < 0,
            free[nodes_t].to(torch.int8).argmax(dim=1),
            cheapest_mover(nodes_t, successor_t.clamp(min=0)),
        )
        column = torch.zeros(num_experts, dtype=torch.long, device=device).index_put_((nodes_t,), vacated)
        source = predecessor[nodes_t]
        newcomer = torch.tensor([unassigned[entering[n]] if pred[n] < 0 else -1 for n in nodes], device=device)
        incoming = torch.where(source < 0, newcomer, owner[source.clamp(min=0), column[source.clamp(min=0)]])
        owner[nodes_t, vacated] = incoming
        unassigned = [token for index, token in enumerate(unassigned) if index not in taken]
        move[nodes_t] = cheapest_moves(nodes_t)
    return prices
