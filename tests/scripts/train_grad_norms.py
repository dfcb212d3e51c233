"""torchrun tests/scripts/train_grad_norms.py OUT.json <pretrain flags>: trains; the first rank writes each
iteration's grad norm (megatron-core's, over the whole model, before clipping: the same on every rank)."""

import json
import sys

import torch.distributed as dist

from megatron_moe import training

if __name__ == "__main__":
    out, argv = sys.argv[1], sys.argv[2:]
    norms = []
    train_step = training.train_step

    def recording_train_step(*args, **kwargs):
        step = train_step(*args, **kwargs)
        norms.append(step.grad_norm)
        return step

    training.train_step = recording_train_step
    training.pretrain(argv)
    if dist.get_rank() == 0:
        with open(out, "w") as f:
            json.dump(norms, f)
