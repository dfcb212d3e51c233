"""SAM routing (``--moe-router-type sam``): switch to one expert group, mix k experts inside it, and send
each token over the network once.

SAM ("switch and mixture", Jiang et al. 2021, arXiv 2110.07431). The paper's text is not available to us;
the formulation follows the one public implementation, a third-party one in Hetu
(``python/hetu/layers/SAMGate.py``, ``sam_layer.py``). For a token with router logits ``z`` over E experts
split into G equal, contiguous groups:

- ``p = softmax(z)`` over all E experts (one softmax);
- switch: group score ``s_g = sum of p over group g's experts``; the token goes to ``argmax_g s_g``;
- mixture: the k experts with the largest ``p`` inside that group;
- gates: their raw ``p`` (Hetu's choice), or with ``--sam-renormalize-gates`` ``p / sum of the k p``.

The rule is deterministic (no noise), so training and evaluation route alike; evaluation is greedy.
``--sam-capacity-factor f`` lets each rank route at most ``ceil(f * tokens / G)`` of its tokens to each
group in training (those with the largest gate sum; the others skip the layer through the residual).
Evaluation is always dropless, so that a token's output does not depend on the rest of its batch.

Losses (each has its own coefficient, is attached to the probs with megatron's ``MoEAuxLossAutoScaler`` so
it back-propagates, and is logged under its own name by megatron's aux-loss tracker). All are means over
this micro batch's tokens, as megatron's own aux loss is; under sequence (or context) parallelism the
micro batch's tokens are spread over the tensor (x context) parallel ranks, so token counts are summed over
them and each rank attaches its share of the loss (see :func:`sam_losses`):

- ``sam_group_balance_loss``: Switch balance over groups, ``G * sum_g mean_t(s_g) * fraction_t(group = g)``
  (1 when balanced);
- ``sam_expert_balance_loss``: Switch balance of the experts inside each group, over the tokens that chose
  that group, with the in-group distribution ``p_e / s_g``; averaged over groups (1 when balanced). Hetu
  balances all E experts globally instead; we balance inside groups because the group loss already
  balances across them;
- ``sam_alignment_loss``: Hetu's, ``sum over experts j outside the chosen group of max(0, p_j - p_kth)``
  where ``p_kth`` is the smallest selected gate: no expert left behind should outrank a chosen one.

Unlike Hetu (which places k copies of a token and allows k <= 2) :class:`SAMDispatcher` sends each token
ONCE: groups are laid out so that each expert-parallel rank holds whole groups; the token travels to the
rank of its group, is expanded there to its k local experts, the k outputs are combined with the gates on
that rank, and one vector per token comes back. With expert tensor parallelism (``--expert-tensor-parallel-size``
> 1, megatron-core's expert-TP group) the ranks sharing an expert's weights all-gather the tokens they
received and reduce-scatter the combined vectors, inside that group: each token still crosses the
expert-parallel network once each way. Same code on CPU/gloo and GPU/NCCL.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.distributed as dist

from megatron.core import utils
from megatron.core.tensor_parallel import (
    all_to_all,
    gather_from_sequence_parallel_region,
    reduce_scatter_to_sequence_parallel_region,
)
from megatron.core.transformer.moe.moe_utils import MoEAuxLossAutoScaler, save_to_aux_losses_tracker
from megatron.core.transformer.moe.router import Router
from megatron.core.transformer.moe.token_dispatcher import MoETokenDispatcher

from megatron_moe.moe import expert_padding, packed_rows
from megatron_moe.moe.sam_flags import SAMOptions


# ----------------------------------------------------------------------------------------------------------
# router
# ----------------------------------------------------------------------------------------------------------


def sam_route(logits: torch.Tensor, num_groups: int, topk: int, renormalize: bool):
    """The SAM rule on ``logits [T, E]``: returns ``p [T, E]`` (softmax), ``group [T]``, ``experts [T, k]``
    (global ids, ascending), ``gates [T, k]``."""
    tokens, num_experts = logits.shape
    width = num_experts // num_groups
    p = torch.softmax(logits.float(), dim=-1)
    group = p.view(tokens, num_groups, width).sum(-1).argmax(-1)
    in_group = p.view(tokens, num_groups, width)[torch.arange(tokens, device=p.device), group]
    _, slot = torch.topk(in_group, topk, dim=-1)
    experts = (group.unsqueeze(1) * width + slot).sort(-1).values
    gates = p.gather(1, experts)
    if renormalize:
        gates = gates / gates.sum(-1, keepdim=True)
    return p, group, experts, gates


def within_capacity(group: torch.Tensor, gates: torch.Tensor, num_groups: int, capacity_factor: float):
    """Bool [T]: the tokens each group keeps, at most ``ceil(factor * T / G)`` per group, those with the
    largest gate sum first (ties: the earlier token)."""
    capacity = math.ceil(capacity_factor * group.numel() / num_groups)
    by_score = torch.argsort(gates.detach().sum(-1), descending=True, stable=True)
    ranked = by_score[torch.argsort(group[by_score], stable=True)]  # by group, best first inside each
    per_group = torch.bincount(group, minlength=num_groups)
    first_of_group = torch.cumsum(per_group, 0) - per_group
    position = torch.empty_like(ranked)
    position[ranked] = torch.arange(ranked.numel(), device=ranked.device) - first_of_group[group[ranked]]
    return position < capacity


def _summed_over(counts: torch.Tensor, group) -> torch.Tensor:
    """``counts`` summed over the ranks of ``group`` (no gradient: they are token counts)."""
    counts = counts.detach().clone()
    if group is not None and utils.get_pg_size(group) > 1:
        dist.all_reduce(counts, group=group)
    return counts


def sam_losses(p: torch.Tensor, group: torch.Tensor, experts: torch.Tensor, num_groups: int,
               valid: torch.Tensor, reduce_group=None):
    """(group balance, expert balance inside groups, alignment) on ``valid`` tokens; see the module doc.

    With sequence (or context) parallelism this rank holds a shard of the micro batch's tokens and the
    other shards are on ``reduce_group``. Token counts are then summed over it while the sums of ``p``
    stay local, so each loss is this rank's share of the micro batch's loss: the shares add up to it and
    each rank's gradient is the gradient of the whole loss with respect to its own tokens (megatron's
    TopKRouter splits its aux loss the same way)."""
    tokens, num_experts = p.shape
    width, topk = num_experts // num_groups, experts.shape[1]
    valid = valid.to(p.dtype).unsqueeze(1)
    group_score = p.view(tokens, num_groups, width).sum(-1)
    # scatter, not one_hot: one_hot reads the largest group id back to the host to check it
    chosen = group_score.new_zeros(tokens, num_groups).scatter(1, group.view(tokens, 1), 1.0) * valid
    selected = torch.zeros_like(p).scatter(1, experts, 1.0) * valid
    counts = _summed_over(torch.cat([valid.sum(0), chosen.sum(0), selected.sum(0)]), reduce_group)
    num_tokens, per_group, per_expert = counts[0].clamp(min=1), counts[1 : 1 + num_groups], counts[1 + num_groups :]

    group_balance = num_groups * ((group_score * valid).sum(0) / num_tokens * per_group / num_tokens).sum()

    in_chosen_group = chosen.repeat_interleave(width, dim=1)  # [T, E]: a valid token of the expert's group
    tokens_in_group = per_group.repeat_interleave(width).clamp(min=1)
    in_group_share = p / group_score.repeat_interleave(width, dim=1)
    mean_share = (in_group_share * in_chosen_group).sum(0) / tokens_in_group
    fraction = per_expert / (topk * tokens_in_group)
    expert_balance = (width / num_groups) * (mean_share * fraction).sum()

    kth_gate = p.gather(1, experts).min(-1, keepdim=True).values
    outside = valid - in_chosen_group  # [T, E]: a valid token, the expert outside its group
    alignment = (torch.relu(p - kth_gate) * outside).sum() / num_tokens
    return group_balance, expert_balance, alignment


class SAMRouter(Router):
    """Switch to one group, mix k experts inside it (megatron's router protocol: ``(probs, routing_map)``)."""

    LOSS_NAMES = ("sam_group_balance_loss", "sam_expert_balance_loss", "sam_alignment_loss")

    def __init__(self, config, pg_collection=None):
        super().__init__(config=config, pg_collection=pg_collection)
        self.options: SAMOptions = config.moe_routing_options
        self.topk = config.moe_router_topk

    def routing(self, logits: torch.Tensor, padding_mask: Optional[torch.Tensor] = None):
        opts = self.options
        p, group, experts, gates = sam_route(logits, opts.num_groups, self.topk, opts.renormalize_gates)
        probs = torch.zeros_like(p).scatter(1, experts, gates)
        routing_map = torch.zeros_like(p, dtype=torch.bool).scatter(1, experts, True)
        if self.training and opts.capacity_factor is not None:
            kept = within_capacity(group, gates, opts.num_groups, opts.capacity_factor).unsqueeze(1)
            probs, routing_map = probs * kept, routing_map & kept
        coeffs = (opts.group_balance_loss_coeff, opts.expert_balance_loss_coeff, opts.alignment_loss_coeff)
        if self.training and torch.is_grad_enabled() and any(coeffs):
            valid = torch.ones(p.shape[0], dtype=p.dtype, device=p.device)
            if padding_mask is not None:
                valid = padding_mask.reshape(-1).to(p.dtype)
            # under sequence/context parallelism the micro batch's other tokens are on tp_cp_group
            losses = sam_losses(p, group, experts, opts.num_groups, valid, reduce_group=self.tp_cp_group)
            # --calculate-per-token-loss: finalize_model_grads divides every gradient by the global batch's
            # tokens, so a loss that is a mean over this rank's tokens is scaled by their number (megatron-core's
            # router does the same with its losses)
            scale = valid.sum() if self.config.calculate_per_token_loss else 1
            for name, loss, coeff in zip(self.LOSS_NAMES, losses, coeffs):
                if coeff > 0:
                    probs = MoEAuxLossAutoScaler.apply(probs, coeff * loss * scale)
                    # logged: the shares summed over tp_cp_group, then averaged over data-parallel ranks
                    save_to_aux_losses_tracker(name, loss, self.layer_number, self.config.num_layers,
                                               reduce_group=self.tp_cp_group)
        return probs, routing_map

    def forward(self, input: torch.Tensor, padding_mask: Optional[torch.Tensor] = None):
        logits = self.gating(input).view(-1, self.config.num_moe_experts)
        return self.routing(logits, padding_mask)


# ----------------------------------------------------------------------------------------------------------
# dispatcher
# ----------------------------------------------------------------------------------------------------------


class SAMDispatcher(MoETokenDispatcher):
    """One copy of each token per expert-parallel rank: all-to-all to its group's rank, expand to its k local
    experts (sorted by expert for megatron's experts, which apply the gates), combine the k outputs there,
    all-to-all one vector back, restore the token order.

    Rows on the expert-parallel network per token: 1 (dispatch) + 1 (combine), whatever k. A dispatch row
    carries the hidden state, the k gates (fp32) and the k local expert ids as raw bytes
    (:mod:`megatron_moe.moe.packed_rows`), so each direction makes ONE token all-to-all, in forward and in
    backward (which sends the hidden-state and gate gradients back packed the same way). The combine row is
    the combined vector alone: the receiver restores the order it sent. megatron's alltoall dispatcher sends
    k rows each way, hidden states and probs in two all-to-alls.

    One host sync per forward, as megatron's alltoall dispatcher: each rank's token count per expert (E
    numbers) is all-gathered over expert TP x EP and read once on the host; every split size and each local
    expert's row count follow from it (a token sends k (token, expert) pairs to the rank of its group, so
    tokens per rank = pairs / k). The combine and both backward all-to-alls reuse them.

    With expert tensor parallelism (ETP > 1; ``tp_group`` is megatron-core's expert-TP group, whose ranks
    route different tokens: their sequence shards under TP with sequence parallelism, other data-parallel
    batches when ETP exceeds TP) every ETP rank of an expert holds a slice of its weights and must see all of
    its tokens, as in megatron's alltoall dispatcher: after the all-to-all the ETP ranks all-gather what they
    received (one packed row per token, inside the expert-TP group), compute their partial expert outputs,
    combine the k of them per token, and reduce-scatter the sums back so each ETP rank returns its own
    tokens through the all-to-all.

    Under ``--fp8-format`` each local expert's rows are padded to the FP8 GEMM alignment
    (:mod:`megatron_moe.moe.expert_padding`).
    """

    def __init__(self, num_local_experts, local_expert_indices, config, pg_collection=None):
        super().__init__(config=config, pg_collection=pg_collection)
        self.num_local_experts = num_local_experts
        self.topk = config.moe_router_topk
        self.options: SAMOptions = config.moe_routing_options
        self.ep_rank = utils.get_pg_rank(self.ep_group)
        self.id_dtype = packed_rows.id_dtype(num_local_experts)
        align = expert_padding.alignment(config)
        self.padding = expert_padding.ExpertRowPadding(align) if align > 1 else None

    def dispatch_preprocess(self, hidden_states, routing_map, probs):
        self.hidden_shape = hidden_states.shape
        hidden = hidden_states.reshape(-1, hidden_states.shape[-1])
        self.num_tokens, num_experts = routing_map.shape
        # each token's k experts, ascending: the k largest of (E - expert id) among its chosen ones
        descending_ids = torch.arange(num_experts, 0, -1, device=routing_map.device, dtype=torch.float32)
        experts = torch.topk(routing_map * descending_ids, self.topk, dim=-1).indices
        gates = probs.gather(1, experts)
        rank = experts[:, 0] // self.num_local_experts  # a group (all k experts) lives on one rank
        local_ids = experts - (rank * self.num_local_experts).unsqueeze(1)
        # tokens the router dropped (capacity factor) have no expert: they sort last, and are not sent
        destination = torch.where(routing_map.any(dim=-1), rank, self.ep_size)
        by_rank = torch.argsort(destination, stable=True)
        # the split sizes are settled here, as megatron's alltoall dispatcher settles its own in
        # preprocess, so that token_dispatch holds nothing but the token all-to-all
        self._settle_splits(routing_map.sum(dim=0))
        by_rank = by_rank[: sum(self.input_splits)]
        self.order = by_rank
        self.local_ids = local_ids[by_rank].to(self.id_dtype)
        self.packed_row_bytes = packed_rows.row_bytes([hidden[:1], gates[:1], self.local_ids[:1]])
        return hidden[by_rank], gates[by_rank]

    def _settle_splits(self, pairs_per_expert):
        """From every expert-TP x EP rank's (token, expert) pairs per expert, read on the host once: the rows
        this rank sends to / receives from each EP rank, (ETP > 1) the rows each ETP rank of this expert
        received, and the rows each local expert computes."""
        every = pairs_per_expert
        if self.ep_size * self.tp_size > 1:
            every = gather_from_sequence_parallel_region(pairs_per_expert, group=self.tp_ep_group)
        # [EP source, ETP, expert] (megatron's expert TP x EP rank order)
        pairs = every.view(self.ep_size, self.tp_size, -1).tolist()  # the one host sync
        first = self.ep_rank * self.num_local_experts
        mine = slice(first, first + self.num_local_experts)

        def tokens(per_expert, experts=slice(None)):
            return sum(per_expert[experts]) // self.topk

        sent = pairs[self.ep_rank][self.tp_rank]
        self.input_splits = [tokens(sent, slice(r * self.num_local_experts, (r + 1) * self.num_local_experts))
                             for r in range(self.ep_size)]
        self.output_splits = [tokens(pairs[source][self.tp_rank], mine) for source in range(self.ep_size)]
        self.tp_splits = None
        if self.tp_size > 1:
            self.tp_splits = [sum(tokens(pairs[source][t], mine) for source in range(self.ep_size))
                              for t in range(self.tp_size)]
        # every expert-TP rank of this expert computes the tokens all of them received
        self.rows_per_local_expert = [sum(pairs[source][t][e] for source in range(self.ep_size)
                                          for t in range(self.tp_size))
                                      for e in range(first, first + self.num_local_experts)]

    def token_dispatch(self, hidden, gates):
        hidden, gates, self.received_ids = packed_rows.all_to_all(
            self.ep_group, (hidden, gates, self.local_ids), self.output_splits, self.input_splits)
        return hidden, gates

    def dispatch_postprocess(self, hidden, gates):
        self.gate_dtype = gates.dtype
        local_ids = self.received_ids
        if self.tp_splits is not None:
            # what every rank of this expert-TP group received, in TP-rank order (each rank's own tokens
            # are the tp_splits[tp_rank] rows after the earlier ranks')
            hidden, gates, local_ids = packed_rows.all_gather(self.tp_group, (hidden, gates, local_ids),
                                                              self.tp_splits)
        self.num_received = hidden.shape[0]
        by_expert = torch.argsort(local_ids.reshape(-1).long(), stable=True)  # (token, slot) pairs by expert
        self.rows = by_expert // self.topk
        expanded, expanded_gates = hidden[self.rows], gates.reshape(-1)[by_expert]
        rows_per_expert = self.rows_per_local_expert
        if self.padding is not None:
            expanded, expanded_gates, rows_per_expert = self.padding.pad(expanded, expanded_gates, rows_per_expert)
        return expanded, torch.tensor(rows_per_expert, dtype=torch.long), expanded_gates

    def combine_preprocess(self, expert_output):
        if self.padding is not None:
            expert_output = self.padding.unpad(expert_output)
        combined = expert_output.new_zeros(self.num_received, expert_output.shape[-1])
        combined = combined.index_add(0, self.rows, expert_output)  # the k outputs were already gate-scaled
        if self.tp_splits is not None:
            # each expert-TP rank holds partial sums (row-parallel fc2): add them up in the gates' precision (as
            # megatron's alltoall dispatcher does), keep this rank's tokens
            combined = reduce_scatter_to_sequence_parallel_region(
                combined.to(self.gate_dtype), group=self.tp_group, input_split_sizes=self.tp_splits
            ).to(combined.dtype)
        return combined

    def token_combine(self, hidden):
        # the rows come back in the order they were sent: no metadata
        return all_to_all(self.ep_group, hidden, self.input_splits, self.output_splits)

    def combine_postprocess(self, hidden):
        # tokens the router dropped contribute nothing (the residual carries them)
        out = hidden.new_zeros(self.num_tokens, hidden.shape[-1]).index_copy(0, self.order, hidden)
        return out.view(self.hidden_shape)


def tracked_losses(config) -> list:
    """The aux-loss tracker names SAMRouter logs with these flags (those with a positive coefficient)."""
    coeffs = (config.sam_group_balance_loss_coeff, config.sam_expert_balance_loss_coeff,
              config.sam_alignment_loss_coeff)
    return [name for name, coeff in zip(SAMRouter.LOSS_NAMES, coeffs) if coeff > 0]
