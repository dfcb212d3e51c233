"""torchrun tests/scripts/step_host_syncs.py OUT.json ITERATIONS <pretrain flags>: the host syncs of whole
training iterations.

Runs ``pretrain``'s loop and counts, with ``HostSyncCounter``, each iteration named in ITERATIONS (comma
separated) from the start of its ``train_step`` to the start of the next one: forward, backward, optimizer,
logging (or not), evaluation and saving if due. Rank 0 writes, per counted iteration, every sync with its
source line and origin (``megatron_moe.host_sync``), and the losses the run returned.
"""

import dataclasses
import json
import sys

import torch.distributed as dist

from megatron_moe import training
from megatron_moe.host_sync import HostSyncCounter


def main(out: str, iterations, argv) -> None:
    counters = {}
    open_counter = []
    train_step = training.train_step

    def counted_step(job, micro_batch_iter, iteration=0, *rest):
        if open_counter:
            open_counter.pop().__exit__(None, None, None)
        if iteration in iterations:
            counters[iteration] = HostSyncCounter().__enter__()
            open_counter.append(counters[iteration])
        return train_step(job, micro_batch_iter, iteration, *rest)

    training.train_step = counted_step
    losses = training.train(training.setup(argv))
    if open_counter:
        open_counter.pop().__exit__(None, None, None)
    if dist.get_rank() == 0:
        with open(out, "w") as f:
            json.dump({"losses": losses,
                       "iterations": {iteration: {"syncs": [dataclasses.asdict(sync) for sync in counter.syncs],
                                                  "description": counter.describe()}
                                      for iteration, counter in counters.items()}}, f)


if __name__ == "__main__":
    main(sys.argv[1], {int(i) for i in sys.argv[2].split(",")}, sys.argv[3:])
