"""Context parallelism (``--context-parallel-size``): what a training step adds to megatron-core's.

megatron-core splits the attention of a sequence over the context-parallel ranks (Transformer Engine's
attention only; megatron-core's local ``DotProductAttention`` asserts CP = 1, so the local spec refuses the
flag). The ranks of a context-parallel group read the same micro batches (they share a data-parallel rank)
and each keeps its part of every sequence: :func:`batch_on_this_rank`, megatron-core's balanced split into
2 x CP chunks, rank r keeping chunks r and 2 x CP - 1 - r (causal attention costs the same on every rank).
Its gradients are reduced over data x context parallel ranks, as megatron-core's DDP does.

:func:`lm_loss` keeps the loss of a micro batch the mean over its whole sequences, as one process computes
it: each rank returns its tokens' loss sum over the group's token count. megatron-core's schedule multiplies a
loss by CP and the gradient reduction divides by DP x CP, so the ranks' gradients add up to the gradient of
that mean. (Megatron-LM 0.16.1 averages the ranks' own means instead, which differs when ``loss_mask`` holds
different numbers of tokens on the ranks.) With ``--calculate-per-token-loss`` (:func:`lm_loss_sum`) each
rank returns its own tokens' loss sum and count, as Megatron-LM does: megatron-core divides the gradients by
the count over the whole global batch.
"""

from __future__ import annotations

from typing import Dict, Tuple

import torch
import torch.distributed as dist

from megatron.core import parallel_state
from megatron.core.utils import get_batch_on_this_cp_rank


def batch_on_this_rank(batch: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """This context-parallel rank's part of every [batch, sequence] tensor of ``batch`` (the batch itself
    without context parallelism)."""
    return get_batch_on_this_cp_rank(batch)


def lm_loss(loss_mask: torch.Tensor, per_token_loss: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """(loss to back-propagate, the micro batch's mean loss to report) of this rank's tokens."""
    loss_mask = loss_mask.reshape(-1).float()
    loss_sum = torch.sum(per_token_loss.reshape(-1).float() * loss_mask)
    tokens = loss_mask.sum()
    if parallel_state.get_context_parallel_world_size() == 1:
        loss = loss_sum / tokens.clamp(min=1)
        return loss, loss.detach().clone()  # clone: the schedule divides the returned loss in place
    group = parallel_state.get_context_parallel_group()
    dist.all_reduce(tokens, group=group)
    loss = loss_sum / tokens.clamp(min=1)
    reported = loss.detach().clone()
    dist.all_reduce(reported, group=group)
    return loss, reported


def lm_loss_sum(loss_mask: torch.Tensor,
                per_token_loss: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``--calculate-per-token-loss``: (this rank's loss sum to back-propagate, its number of tokens, the micro
    batch's mean loss to report, as :func:`lm_loss` reports it). megatron-core's schedule adds up the numbers of
    tokens of the micro batches, and its ``finalize_model_grads`` divides the gradients (summed, not averaged,
    over data x context-parallel ranks) by their total: the gradient of the global batch's per-token mean."""
    loss_mask = loss_mask.reshape(-1).float()
    loss_sum = torch.sum(per_token_loss.reshape(-1).float() * loss_mask)
    tokens = loss_mask.sum()
    num_tokens = tokens.to(torch.int)
    total = torch.stack([loss_sum.detach(), tokens])
    if parallel_state.get_context_parallel_world_size() > 1:
        dist.all_reduce(total, group=parallel_state.get_context_parallel_group())
    return loss_sum, num_tokens, total[0] / total[1].clamp(min=1)
