"""torchrun tests/scripts/moe_layer_step.py OUT_DIR TOTAL_TOKENS <pretrain flags for a 1-layer model>

Runs the model's MoE layer alone, forward and backward, on fixed tokens: TOTAL_TOKENS drawn from a seeded
generator and split evenly over the ranks (one process runs all of them: the reference); with tensor
parallelism a rank's tokens are its sequence-parallel shard. Each rank saves OUT_DIR/rank{r}.pt: its
tokens, output, input gradient, the router weight gradient summed over ranks, the weights of its experts by
global index (this rank's slices when TP > 1), the comm_stats counts of the layer, the collectives its
forward and its backward started (``comm_stats.collectives``), and the output of an evaluation-mode forward
on the same tokens.
"""

import os
import sys

import torch
import torch.distributed as dist

from megatron_moe.moe import comm_stats
from megatron_moe.training import setup

if __name__ == "__main__":
    out_dir, total_tokens, argv = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
    job = setup(argv)
    layer = job.model[0].module.decoder.layers[0].mlp
    rank, world = dist.get_rank(), dist.get_world_size()
    hidden = job.args.hidden_size
    generator = torch.Generator().manual_seed(7)
    all_tokens = torch.randn(total_tokens, 1, hidden, generator=generator)
    all_weights = torch.randn(total_tokens, 1, hidden, generator=generator)  # loss = sum(output * weights)
    per_rank = total_tokens // world
    mine = slice(rank * per_rank, (rank + 1) * per_rank)
    tokens = all_tokens[mine].clone().to(job.platform.device).requires_grad_(True)

    comm_stats.reset()
    with comm_stats.collectives() as forward_collectives:
        output, _ = layer(tokens)
    loss = (output * all_weights[mine].to(output.device)).sum()
    with comm_stats.collectives() as backward_collectives:
        loss.backward()

    counts = comm_stats.local_counts()
    layer.eval()
    with torch.no_grad():
        eval_output, _ = layer(tokens)

    router_grad = layer.router.weight.main_grad.clone()  # megatron DDP accumulates into main_grad
    dist.all_reduce(router_grad)
    experts = {global_index: {name: p.detach().cpu() for name, p in expert.named_parameters()}
               for global_index, expert in zip(layer.local_expert_indices, layer.experts.local_experts)}
    torch.save(dict(tokens=tokens.detach().cpu(), output=output.detach().cpu(), input_grad=tokens.grad.cpu(),
                    router_weight=layer.router.weight.detach().cpu(), router_grad=router_grad.cpu(),
                    experts=experts, counts=counts, eval_output=eval_output.cpu(),
                    collectives=dict(forward=forward_collectives, backward=backward_collectives)),
               os.path.join(out_dir, f"rank{rank}.pt"))
