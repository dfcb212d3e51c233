"""torchrun tests/scripts/train_with_nan.py OUT_PREFIX <pretrain flags>: pretrain_gpt_moe.py's main (same exit
statuses and error lines) with a non-finite value injected on one rank at one iteration.

Environment: NAN_RANK (global rank), NAN_ITERATION, NAN_KIND:
- ``loss``: the loss is +inf while its gradients stay finite (``loss + inf`` back-propagates 1);
- ``grad``: the loss is finite and the gradients it back-propagates are NaN.
Every rank writes OUT_PREFIX.<rank>.json after each iteration: the sum of every parameter (float64), per
iteration, so a test can tell whether an update was applied.
"""

import json
import math
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import pretrain_gpt_moe  # noqa: E402
from megatron_moe import training  # noqa: E402


class _NaNGradient(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * math.nan


def main() -> int:
    prefix = sys.argv.pop(1)
    nan_rank, nan_iteration, kind = int(os.environ["NAN_RANK"]), int(os.environ["NAN_ITERATION"]), os.environ["NAN_KIND"]
    state = {"iteration": 0, "parameter_sums": {}}
    loss_func = training._loss_func

    def injecting_loss_func(*args):
        *leading, per_token_loss = args
        if dist.get_rank() == nan_rank and state["iteration"] == nan_iteration:
            if kind == "loss":
                per_token_loss = per_token_loss + math.inf
            else:
                per_token_loss = _NaNGradient.apply(per_token_loss)
        return loss_func(*leading, per_token_loss)

    train_step = training.train_step

    def counting_train_step(job, micro_batch_iter, iteration=0, *rest):
        state["iteration"] = iteration
        return train_step(job, micro_batch_iter, iteration, *rest)

    def after_iteration(iteration, losses):
        state["parameter_sums"][iteration] = sum(p.double().sum().item() for p in state["job"].model[0].module.parameters())
        Path(f"{prefix}.{dist.get_rank()}.json").write_text(json.dumps(state["parameter_sums"]))

    def pretrain(argv=None, args=None):
        state["job"] = training.setup(argv, args)
        return training.train(state["job"], after_iteration)

    training._loss_func = injecting_loss_func
    training.train_step = counting_train_step
    training.pretrain = pretrain
    return pretrain_gpt_moe.main()


if __name__ == "__main__":
    sys.exit(main())
