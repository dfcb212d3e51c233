#!/usr/bin/env python3
"""Save the token-expert affinities a BASE router solves, after a short BASE pretraining, as a score kind
for ``benchmarks/balanced_assignment.py``.

    torchrun --nproc_per_node 1 benchmarks/dump_base_affinities.py OUT.pt <pretrain flags with
        --moe-router-type base --moe-router-topk 1 --moe-aux-loss-coeff 0>

Every training forward of the first MoE layer's router overwrites the capture; after the last iteration
the last batch's ``[tokens, experts]`` affinities (``h · c_e``, fp32 in the router) are saved in fp16.
"""

import sys

import torch

from megatron_moe.moe.base import BaseRouter
from megatron_moe.training import setup, train

if __name__ == "__main__":
    out, argv = sys.argv[1], sys.argv[2:]
    job = setup(argv)
    router = next(module for module in job.model[0].module.modules() if isinstance(module, BaseRouter))
    captured = {}
    solve = router.assign

    def capture_and_assign(scores):
        captured["scores"] = scores.detach().to(torch.float16).cpu()
        return solve(scores)

    router.assign = capture_and_assign
    train(job)
    torch.save(captured["scores"], out)
    print(f"saved {tuple(captured['scores'].shape)} affinities of layer {router.layer_number} to {out}")
