"""BASE layers (Lewis et al. 2021, arXiv 2103.16716): every token goes to exactly one expert, and every
expert gets exactly its share of the tokens, by solving a linear assignment.

The whole idea, in the order a token meets it (``--moe-router-type base``):

1. **Centroids.** Each expert ``e`` owns a learned centroid ``c_e`` (a row of ``BaseRouter.centroids``,
   [E, H], replicated on every rank). A token's affinity to an expert is ``s[t, e] = h_t · c_e``.
2. **Shuffle** (training only, ``--base-shuffle``, the default). A rank's tokens come from a few sequences,
   and tokens of one sequence are alike: forced to share the experts evenly they would be split by an
   arbitrary criterion. So the assignment is solved on a random sample of the expert-parallel group's
   tokens: each rank sends an equal slice of a random permutation of its rows to every rank, solves, and
   the answers travel back. Unlike fairseq we shuffle the affinity rows ([T, E]), not the hidden states
   ([T, H]): the assignment needs nothing else, so the shuffle costs E/H of a token all-to-all, needs no
   gradient and no un-shuffle of the expert output.
3. **Assignment.** In training, :func:`balanced_assignment` maximises ``sum_t s[t, a(t)]`` subject to each
   expert receiving ``expert_capacities(T, E)`` tokens of the batch it solves (T/E each when E divides T).
   At evaluation (``model.eval()``) each token simply takes its best expert (greedy), as in the paper:
   inference must not depend on the other tokens of the batch. "Best" is the top-1 of the fp32
   ``sigmoid(s[t, e])``, taken by the very ``torch.topk`` call of GLM-4.5's sigmoid router
   (``Glm4MoeTopkRouter``), so that the exported model (BASE is that router with one group, no bias and no
   renormalisation) chooses exactly as ours. It is the argmax of ``s`` except where two affinities have
   equal fp32 sigmoids (both above about 16.6, where the sigmoid is 1.0): there both take the same one.
4. **Gate.** The expert output is scaled by ``sigmoid(h_t · c_a(t))``. This is the only path by which the
   centroids receive a gradient (the assignment itself is not differentiable), and there is no auxiliary
   loss: balance is a constraint, not a penalty. megatron's experts apply the gate (``probs``).
5. **Dispatch.** :class:`BaseTokenDispatcher` is megatron's all-to-all dispatcher, except that when the
   routing of every rank is balanced (training without shuffle) it computes all the all-to-all split
   sizes from the number of local tokens and E alone: no count exchange and no device-to-host sync.
   Otherwise (greedy routing at eval, or shuffled routing whose per-rank counts only the solver ranks know)
   it exchanges counts exactly as megatron does.

Differences from fairseq's ``BaseLayer``: any number of experts per expert-parallel rank (fairseq: one per
data-parallel worker), tensor/sequence and pipeline parallelism, the shuffle moves scores instead of
tokens, and the solver is exact-balance with a bounded round count for any T and E (fairseq's auction
needs E to divide T).

FP8: under ``--fp8-format`` the dispatcher pads each local expert's rows to the FP8 GEMM alignment and
takes the padding out of the experts' output (:mod:`megatron_moe.moe.expert_padding`); T/E rows per expert
are rarely a multiple of 16.
"""

from __future__ import annotations

from typing import Callable, List, Optional

import numpy
import torch
import torch.distributed as dist

from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.moe.token_dispatcher import MoEAlltoAllTokenDispatcher

from megatron_moe.moe import expert_padding
from megatron_moe.moe.balanced_assignment import balanced_assignment
from megatron_moe.moe.base_flags import BaseOptions


# ----------------------------------------------------------------------------------------------------------
# router
# ----------------------------------------------------------------------------------------------------------


def equal_shares(num_items: int, parts: int) -> List[int]:
    """``num_items`` split into ``parts`` sizes differing by at most one, larger ones first: the host-side
    twin of ``expert_capacities``."""
    return [num_items // parts + (part < num_items % parts) for part in range(parts)]


def solve_on_shuffled_batch(
    scores: torch.Tensor, group, solve: Callable[[torch.Tensor], torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """``solve`` applied to a random sample of the group's score rows; returns this rank's answers.

    Every rank permutes its T rows at random and sends the i-th of ``equal_shares(T, group size)``
    slices to rank i (every rank holds the same T). Each rank solves the batch it received, and the
    answers travel back along the same routes. Returns (answer per local row, the answers this rank
    computed for its received batch).
    """
    sizes = equal_shares(scores.size(0), dist.get_world_size(group))
    received_sizes = [sizes[dist.get_rank(group)]] * len(sizes)
    order = torch.randperm(scores.size(0), device=scores.device)
    received = scores.new_empty(sum(received_sizes), scores.size(1))
    dist.all_to_all_single(received, scores[order].contiguous(), received_sizes, sizes, group=group)
    solved = solve(received)
    answers = solved.new_empty(scores.size(0))
    dist.all_to_all_single(answers, solved, sizes, received_sizes, group=group)
    return torch.empty_like(answers).index_copy_(0, order, answers), solved


def _count_per_expert(experts: torch.Tensor, num_experts: int) -> torch.Tensor:
    """bincount with a known length: no host sync (bincount reads the largest index first)."""
    return torch.zeros(num_experts, dtype=torch.long, device=experts.device).index_add_(
        0, experts, torch.ones_like(experts))


class BaseRouter(MegatronModule):
    """megatron-core router protocol: ``forward(hidden[, padding_mask]) -> (probs [T, E], routing_map [T, E])``.

    ``tokens_per_expert`` (LongTensor [E], on the hidden states' device) holds, after every forward,
    how many tokens of the batch this rank solved went to each expert: exactly ``expert_capacities(T, E)``
    in training (with shuffle, T is the size of the shuffled batch), the greedy counts at evaluation.
    Padding tokens are assigned like any other token.
    """

    def __init__(self, config, pg_collection=None):
        super().__init__(config)
        self.num_experts = config.num_moe_experts
        self.options: BaseOptions = config.moe_routing_options or BaseOptions()
        self.ep_group = pg_collection.ep if pg_collection is not None else None
        self.layer_number = None
        # Drawn by megatron_moe.model.initialize_weights like every matrix; a placeholder until then.
        self.centroids = torch.nn.Parameter(
            torch.empty(self.num_experts, config.hidden_size, dtype=config.params_dtype)
        )
        torch.nn.init.normal_(self.centroids, std=config.init_method_std)
        # Replicated; under sequence parallelism each tensor-parallel rank sees other tokens, so its
        # gradient is a partial sum that finalize_model_grads all-reduces over the TP group.
        setattr(self.centroids, "sequence_parallel", config.sequence_parallel)
        self.tokens_per_expert: Optional[torch.Tensor] = None

    def set_layer_number(self, layer_number: int) -> None:
        self.layer_number = layer_number

    def _shuffles(self) -> bool:
        return self.options.shuffle and self.ep_group is not None and dist.get_world_size(self.ep_group) > 1

    @torch.no_grad()
    def assign(self, scores: torch.Tensor) -> torch.Tensor:
        """Expert per token: balanced assignment in training; at evaluation the top-1 of the fp32 sigmoid of
        the affinities, as GLM-4.5's router takes it (same op on the same values: the same choice)."""
        if not self.training:
            experts = torch.topk(torch.sigmoid(scores), k=1, dim=-1, sorted=False)[1].squeeze(-1)
            self.tokens_per_expert = _count_per_expert(experts, self.num_experts)
            return experts
        if self._shuffles():
            experts, solved = solve_on_shuffled_batch(scores, self.ep_group, balanced_assignment)
        else:
            experts = solved = balanced_assignment(scores)
        self.tokens_per_expert = _count_per_expert(solved, self.num_experts)
        return experts

    def forward(self, hidden_states: torch.Tensor, padding_mask: Optional[torch.Tensor] = None):
        tokens = hidden_states.reshape(-1, hidden_states.size(-1))
        centroids = self.centroids.to(tokens.dtype)
        experts = self.assign(torch.nn.functional.linear(tokens.detach().float(), centroids.detach().float()))
        gate = torch.sigmoid((tokens * centroids[experts]).sum(dim=-1).float())
        chosen = experts.unsqueeze(1)
        probs = torch.zeros(tokens.size(0), self.num_experts, dtype=gate.dtype, device=tokens.device)
        probs = probs.scatter(1, chosen, gate.unsqueeze(1))
        routing_map = torch.zeros_like(probs, dtype=torch.bool).scatter_(1, chosen, True)
        if self.training and not self._shuffles():
            mark_balanced(routing_map)
        return probs, routing_map


# ----------------------------------------------------------------------------------------------------------
# dispatcher
# ----------------------------------------------------------------------------------------------------------

# The router tells the dispatcher that this routing gives every expert exactly expert_capacities(T, E) of
# every rank's T tokens. An attribute on the routing map travels with it through megatron's MoELayer and is
# lost by anything that rebuilds the map (e.g. megatron's quantization padding), which then safely falls
# back to counting.
_BALANCED = "base_balanced_per_rank"


def mark_balanced(routing_map: torch.Tensor) -> None:
    setattr(routing_map, _BALANCED, True)


def is_balanced(routing_map: torch.Tensor) -> bool:
    return getattr(routing_map, _BALANCED, False)


class BaseTokenDispatcher(MoEAlltoAllTokenDispatcher):
    """megatron's all-to-all dispatcher whose split sizes come from the balance guarantee when it holds.

    megatron's ``preprocess`` counts the tokens per expert, all-gathers the counts over the expert
    tensor x expert parallel group and copies them to the host to size the all-to-alls. With balanced routing
    every rank sends expert ``e`` exactly ``equal_shares(T, E)[e]`` tokens, where T is the number of
    tokens each rank holds (the same on every rank of the group, as megatron's fixed micro-batch shape
    guarantees), so all those sizes are known on the host without communication or host sync.

    Under ``--fp8-format`` each local expert's rows are padded to the FP8 GEMM alignment after the
    all-to-all (:mod:`megatron_moe.moe.expert_padding`), with the counts megatron's dispatch already holds
    on the host.
    """

    def __init__(self, num_local_experts, local_expert_indices, config, pg_collection=None):
        super().__init__(num_local_experts, local_expert_indices, config=config, pg_collection=pg_collection)
        align = expert_padding.alignment(config)
        self.padding = expert_padding.ExpertRowPadding(align) if align > 1 else None

    def preprocess(self, routing_map: torch.Tensor) -> torch.Tensor:
        # megatron's preprocess only ever moves its sync point earlier; one greedy (eval) forward would
        # otherwise leave every later balanced forward waiting on the device
        self.cuda_sync_point = "no_sync"
        if not is_balanced(routing_map):
            return super().preprocess(routing_map)
        num_tokens = routing_map.size(0)
        per_expert = equal_shares(num_tokens, self.num_experts)
        local = per_expert[self.local_expert_indices[0]: self.local_expert_indices[-1] + 1]
        self.num_out_tokens = num_tokens
        if self.ep_size > 1 or self.tp_size > 1:
            per_rank = [sum(per_expert[rank * self.num_local_experts: (rank + 1) * self.num_local_experts])
                        for rank in range(self.ep_size)]
            self.input_splits = numpy.array(per_rank)
            # every source rank (expert TP x EP) sends this rank's experts the same counts
            self.output_splits = numpy.full(self.ep_size, sum(local))
            self.output_splits_tp = numpy.full(self.tp_size, self.ep_size * sum(local))
        if self.num_local_experts > 1:
            # [source expert-TP x EP rank, local expert]
            self.num_global_tokens_per_local_expert = torch.tensor(local).expand(self.tp_size * self.ep_size, -1)
        return torch.tensor([self.tp_size * self.ep_size * count for count in local])

    def dispatch_postprocess(self, hidden_states, probs):
        hidden_states, tokens_per_expert, probs = super().dispatch_postprocess(hidden_states, probs)
        if self.padding is not None:  # tokens_per_expert: on the host, as megatron's experts take it
            hidden_states, probs, padded = self.padding.pad(hidden_states, probs, tokens_per_expert.tolist())
            tokens_per_expert = torch.tensor(padded)
        return hidden_states, tokens_per_expert, probs

    def combine_preprocess(self, hidden_states):
        if self.padding is not None:
            hidden_states = self.padding.unpad(hidden_states)
        return super().combine_preprocess(hidden_states)
