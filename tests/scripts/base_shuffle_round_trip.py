"""torchrun tests/scripts/base_shuffle_round_trip.py OUT.json: solve_on_shuffled_batch with a 'solver' that
answers each row with the global row id written in it, over 7 rows per rank (uneven shares 4 + 3)."""

import json
import sys

import torch
import torch.distributed as dist

from megatron_moe.moe.base import solve_on_shuffled_batch

ROWS = 7

if __name__ == "__main__":
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(rank)
    row_ids = torch.arange(ROWS) + rank * ROWS
    scores = torch.stack([row_ids.double(), torch.full((ROWS,), float(rank), dtype=torch.double)], dim=1)
    batches = []

    def solve(batch):
        batches.append(batch)
        return batch[:, 0].long()

    answers, solved = solve_on_shuffled_batch(scores, dist.group.WORLD, solve)
    result = [None] * world
    dist.all_gather_object(result, {"answers": answers.tolist(), "row_ids": row_ids.tolist(),
                                    "received_from": sorted({int(r) for r in batches[0][:, 1].tolist()})})
    if rank == 0:
        with open(sys.argv[1], "w") as f:
            json.dump(result, f)
    dist.destroy_process_group()
