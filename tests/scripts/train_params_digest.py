"""torchrun tests/scripts/train_params_digest.py OUT_PREFIX <pretrain flags>: trains; every rank writes
OUT_PREFIX.<rank>.json with its lm losses and the sum of each of its parameters after training."""

import json
import sys

import torch.distributed as dist

from megatron_moe.training import setup, train

if __name__ == "__main__":
    prefix, argv = sys.argv[1], sys.argv[2:]
    job = setup(argv)
    losses = train(job)
    sums = {name: param.double().sum().item() for name, param in job.model[0].module.named_parameters()}
    with open(f"{prefix}.{dist.get_rank()}.json", "w") as f:
        json.dump({"losses": losses, "parameter_sums": sums}, f)
