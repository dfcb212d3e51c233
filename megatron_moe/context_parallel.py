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
different numbers of tokens on the ranks.)
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
