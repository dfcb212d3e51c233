"""torchrun --nproc_per_node CP tests/scripts/context_parallel_batch.py OUT_DIR

What a training step does with a micro batch under context parallelism, without the model (megatron-core's
local attention has no context parallelism, Transformer Engine's needs a GPU): every rank takes the same
micro batch (tokens, labels, loss mask, position ids) and a per-token loss, keeps its part
(megatron_moe.context_parallel.batch_on_this_rank) and computes the micro batch's loss (lm_loss). Writes
OUT_DIR/rank{r}.pt: the full batch, this rank's parts, and the loss it back-propagates and reports.
"""

import os
import sys

import torch
import torch.distributed as dist

from megatron.core import parallel_state
from megatron_moe.context_parallel import batch_on_this_rank, lm_loss
from megatron_moe.platform import init_distributed, select_platform

if __name__ == "__main__":
    out_dir = sys.argv[1]
    init_distributed(select_platform("cpu"))
    parallel_state.initialize_model_parallel(context_parallel_size=dist.get_world_size())
    generator = torch.Generator().manual_seed(5)
    batch_size, seq = 2, 16
    full = {
        "tokens": torch.randint(0, 1000, (batch_size, seq), generator=generator),
        "labels": torch.randint(0, 1000, (batch_size, seq), generator=generator),
        # a few masked tokens, more on some ranks than others
        "loss_mask": (torch.rand(batch_size, seq, generator=generator) > 0.3).float(),
        "position_ids": torch.arange(seq).expand(batch_size, seq).clone(),
        "per_token_loss": torch.rand(batch_size, seq, generator=generator) * 10,
    }
    part = batch_on_this_rank({key: value.clone() for key, value in full.items()})
    loss, reported = lm_loss(part["loss_mask"], part["per_token_loss"])
    torch.save({"full": full, "part": part, "loss": loss, "reported": reported},
               os.path.join(out_dir, f"rank{dist.get_rank()}.pt"))
