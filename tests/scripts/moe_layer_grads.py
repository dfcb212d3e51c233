"""torchrun tests/scripts/moe_layer_grads.py OUT.pt VIRTUAL_RANKS <pretrain flags for a 1-layer MoE model>

Runs the first MoE layer forward and backward on the hidden states of VIRTUAL_RANKS ranks: a parallel run
gives rank r the states of virtual rank r; a 1-process run processes all of them in turn. Rank 0 saves the
outputs, input gradients and parameter gradients under global parameter names, with the gradients of
replicated (non-expert) parameters summed over ranks, as data-parallel reduction would.
"""

import sys

import torch
import torch.distributed as dist

from megatron_moe.model import global_parameter_name
from megatron_moe.training import setup


def hidden_states(virtual_rank: int, args):
    generator = torch.Generator().manual_seed(1000 + virtual_rank)
    shape = (args.seq_length, args.micro_batch_size, args.hidden_size)
    return torch.randn(shape, generator=generator), torch.randn(shape, generator=generator)


def main(out: str, virtual_ranks: int, argv):
    job = setup(argv)
    model = job.model[0].module
    layer = model.decoder.layers[0].mlp
    world, rank = dist.get_world_size(), dist.get_rank()
    mine = [rank] if world > 1 else range(virtual_ranks)
    results = {"output": {}, "input_grad": {}}
    for virtual_rank in mine:
        x, weights = hidden_states(virtual_rank, job.args)
        x.requires_grad_(True)
        output, _ = layer(x)
        (output * weights).sum().backward()
        results["output"][virtual_rank] = output.detach()
        results["input_grad"][virtual_rank] = x.grad
    grads = {}
    for name, param in layer.named_parameters():
        grad = param.main_grad.clone()
        if "experts" not in name and world > 1:
            dist.all_reduce(grad)
        grads[global_parameter_name(model, f"decoder.layers.0.mlp.{name}")] = grad
    results["grads"] = grads
    gathered = [None] * world
    dist.all_gather_object(gathered, results)
    if rank == 0:
        merged = {key: {} for key in results}
        for part in gathered:
            for key in merged:
                merged[key].update(part[key])
        torch.save(merged, out)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), sys.argv[3:])
