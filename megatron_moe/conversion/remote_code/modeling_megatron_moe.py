"""Hugging Face model of a megatron-moe model routed by a rule no transformers class computes (SAM, and the
top-k options listed in megatron-moe's docs/conversion.md).

Written into exported folders by megatron-moe's tools/convert_checkpoint.py, loaded with
``trust_remote_code=True``. The model is Qwen2-MoE's (attention, norms, rotary embedding, dense layers,
KV cache, ``generate()``) with each MoE block replaced by :class:`MegatronMoeSparseBlock`, which computes
what megatron-moe computes in evaluation mode.

The routing functions are COPIES of megatron-moe's training code, because this file must run where
megatron-moe is not installed: ``base_route`` of ``megatron_moe.moe.base.BaseRouter`` in evaluation
mode, ``sam_route`` of ``megatron_moe.moe.sam.sam_route``, ``topk_route`` of megatron-core's
``topk_routing_with_score_function`` (TopKRouter in evaluation mode). megatron-moe's
tests/test_convert_checkpoint.py (``test_remote_code_routing_equals_training_code``) keeps each equal to
the code it copies, decision for decision and gate for gate, on random inputs for every option.
"""

import torch
from torch import nn
from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeForCausalLM, Qwen2MoeMLP, Qwen2MoeSparseMoeBlock

from .configuration_megatron_moe import MegatronMoeConfig


def base_route(hidden: torch.Tensor, centroids: torch.Tensor):
    """BASE at inference: the expert of largest fp32 ``sigmoid(h . c_e)`` (greedy, no balancing), gate
    ``sigmoid(h . c_e)``. Returns (experts [T, 1], gates [T, 1], fp32)."""
    affinities = nn.functional.linear(hidden.float(), centroids.float())
    experts = torch.topk(torch.sigmoid(affinities), k=1, dim=-1, sorted=False)[1]
    gates = torch.sigmoid((hidden * centroids[experts[:, 0]]).sum(-1, keepdim=True).float())
    return experts, gates


def sam_route(logits: torch.Tensor, num_groups: int, topk: int, renormalize: bool):
    """SAM: ``p = softmax(logits)`` over all experts; the group whose experts' ``p`` sum highest; its ``topk``
    most probable experts (ascending ids), gated by their ``p`` (divided by the sum of the k with
    ``renormalize``)."""
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
    return experts, gates


def topk_route(logits: torch.Tensor, topk: int, score_function: str, pre_softmax: bool, num_groups, group_topk,
               scaling_factor=None, expert_bias=None):
    """megatron-core's top-k router (evaluation): softmax before or after the top-k selection, or sigmoid
    scores renormalised over the k chosen when k > 1 (``expert_bias`` added to them for the choice only);
    with ``group_topk``, the top k among the experts of the ``group_topk`` groups whose best
    ``k / group_topk`` scores sum highest; the gates multiplied by ``scaling_factor``."""

    def select(scores):
        if not group_topk:
            return torch.topk(scores, k=topk, dim=1)
        tokens, num_experts = scores.shape
        group_scores = scores.view(tokens, num_groups, -1).topk(topk // group_topk, dim=-1)[0].sum(dim=-1)
        group_idx = torch.topk(group_scores, k=group_topk, dim=-1, sorted=False)[1]
        group_mask = torch.zeros_like(group_scores).scatter_(1, group_idx, 1)
        score_mask = group_mask.unsqueeze(-1).expand(tokens, num_groups, num_experts // num_groups).reshape(tokens, -1)
        return torch.topk(scores.masked_fill(~score_mask.bool(), float("-inf")), k=topk, dim=-1)

    if score_function == "sigmoid":
        scores = torch.sigmoid(logits.float()).type_as(logits)
        if expert_bias is not None:
            _, experts = select(scores + expert_bias)
            scores = torch.gather(scores, dim=1, index=experts).type_as(logits)
        else:
            scores, experts = select(scores)
        gates = scores / (scores.sum(dim=-1, keepdim=True) + 1e-20) if topk > 1 else scores
    elif pre_softmax:
        gates, experts = select(torch.softmax(logits, dim=-1, dtype=torch.float32).type_as(logits))
    else:
        scores, experts = select(logits)
        gates = torch.softmax(scores, dim=-1, dtype=torch.float32).type_as(logits)
    if scaling_factor:
        gates = gates * scaling_factor
    return experts, gates


class MegatronMoeSparseBlock(nn.Module):
    """Routes each token to its experts (SwiGLU MLPs) and sums their outputs scaled by the gates, plus the
    shared expert's output (scaled by ``sigmoid(h . g)`` when gated), as megatron-core's MoE layer does."""

    def __init__(self, config: MegatronMoeConfig):
        super().__init__()
        self.config = config
        if config.moe_router_type == "base":
            self.centroids = nn.Parameter(torch.empty(config.num_experts, config.hidden_size))
        elif config.moe_router_type in ("sam", "topk"):
            self.gate = nn.Linear(config.hidden_size, config.num_experts, bias=False)
        else:
            raise ValueError(f"moe_router_type {config.moe_router_type!r}: expected 'topk', 'base' or 'sam'")
        if getattr(config, "moe_router_enable_expert_bias", False):
            # trained state, kept in fp32 as megatron keeps it (MegatronMoeForCausalLM._keep_in_fp32_modules_strict)
            self.expert_bias = nn.Buffer(torch.zeros(config.num_experts, dtype=torch.float32))
        self.experts = nn.ModuleList(Qwen2MoeMLP(config, intermediate_size=config.moe_intermediate_size)
                                     for _ in range(config.num_experts))
        shared = config.moe_shared_expert_intermediate_size
        self.shared_expert = Qwen2MoeMLP(config, intermediate_size=shared) if shared else None
        self.shared_expert_gate = (nn.Linear(config.hidden_size, 1, bias=False)
                                   if shared and config.moe_shared_expert_gate else None)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        if self.config.moe_router_dtype == "fp32":  # megatron's --moe-router-dtype fp32
            return nn.functional.linear(hidden.float(), self.gate.weight.float())
        return self.gate(hidden)

    def route(self, hidden: torch.Tensor):
        if self.config.moe_router_type == "base":
            return base_route(hidden, self.centroids)
        if self.config.moe_router_type == "topk":
            c = self.config
            return topk_route(self.logits(hidden), c.num_experts_per_tok, c.moe_router_score_function,
                              c.moe_router_pre_softmax, c.moe_router_num_groups, c.moe_router_group_topk,
                              c.moe_router_topk_scaling_factor, getattr(self, "expert_bias", None))
        return sam_route(self.logits(hidden), self.config.sam_num_groups, self.config.num_experts_per_tok,
                         self.config.sam_renormalize_gates)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        hidden = hidden_states.reshape(-1, hidden_states.shape[-1])
        experts, gates = self.route(hidden)
        out = torch.zeros_like(hidden)
        for expert in experts.unique().tolist():
            rows, slot = (experts == expert).nonzero(as_tuple=True)
            scaled = self.experts[expert](hidden[rows]) * gates[rows, slot].unsqueeze(1).to(hidden.dtype)
            out.index_add_(0, rows, scaled)
        if self.shared_expert is not None:
            shared = self.shared_expert(hidden)
            if self.shared_expert_gate is not None:
                shared = shared * torch.sigmoid(self.shared_expert_gate(hidden))
            out = out + shared
        return out.view(hidden_states.shape)


class MegatronMoeForCausalLM(Qwen2MoeForCausalLM):
    config_class = MegatronMoeConfig
    _keep_in_fp32_modules_strict = ["expert_bias"]

    def __init__(self, config: MegatronMoeConfig):
        super().__init__(config)
        for layer in self.model.layers:
            if isinstance(layer.mlp, Qwen2MoeSparseMoeBlock):
                layer.mlp = MegatronMoeSparseBlock(config)
        self.post_init()

    def _init_weights(self, module):
        super()._init_weights(module)
        if isinstance(module, MegatronMoeSparseBlock) and hasattr(module, "centroids"):
            with torch.no_grad():
                module.centroids.normal_(mean=0.0, std=self.config.initializer_range)
