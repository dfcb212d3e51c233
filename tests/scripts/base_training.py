"""torchrun tests/scripts/base_training.py OUT.json <pretrain flags>: trains; writes the lm losses and, after
every iteration, the tokens per expert of every MoE layer summed over all ranks (megatron_moe.metrics)."""

import json
import sys

import torch.distributed as dist

from megatron_moe import metrics
from megatron_moe.training import model_modules, setup, train

if __name__ == "__main__":
    out, argv = sys.argv[1], sys.argv[2:]
    job = setup(argv)
    args = job.args
    expert_load = metrics.ExpertLoad(model_modules(job), args.num_layers, args.num_experts, job.platform.device)
    loads = []
    losses = train(job, lambda iteration, losses: loads.append(expert_load.collect()))
    if losses and dist.get_rank() == dist.get_world_size() - 1:
        with open(out, "w") as f:
            json.dump({"losses": losses, "expert_load": loads}, f)
