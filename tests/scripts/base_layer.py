"""torchrun tests/scripts/base_layer.py OUT_DIR NUM_CHUNKS <pretrain flags>: one BASE MoE layer, forward and
backward on NUM_CHUNKS deterministic token batches, then greedy forwards at eval.

Rank r of W processes handles chunks [r*K/W, (r+1)*K/W) in turn, so one process sees every chunk as its own
assignment batch, exactly like the ranks of an expert-parallel run (with --no-base-shuffle). Writes
OUT_DIR/rank{r}.pt with per-chunk outputs, input gradients, routes and loads; expert gradients by global
expert index; the centroid gradient summed over all ranks.
"""

import sys
from pathlib import Path

import torch
import torch.distributed as dist

from megatron_moe.training import setup

SEQ, BATCH = 16, 2


def chunk_inputs(chunk: int, hidden_size: int, device):
    generator = torch.Generator().manual_seed(1000 + chunk)
    hidden = torch.randn(SEQ, BATCH, hidden_size, generator=generator)
    output_weight = torch.randn(SEQ, BATCH, hidden_size, generator=generator)
    return hidden.to(device).requires_grad_(), output_weight.to(device)


def main(out_dir: Path, num_chunks: int, argv):
    job = setup(argv)
    rank, world = dist.get_rank(), dist.get_world_size()
    layer = job.model[0].module.decoder.layers[0].mlp
    router = layer.router
    routes = []
    router.register_forward_hook(lambda module, inputs, output: routes.append(output[1].float().argmax(-1)))
    chunks = range(rank * num_chunks // world, (rank + 1) * num_chunks // world)
    job.model[0].zero_grad_buffer()
    result = {"chunks": list(chunks), "output": [], "input_grad": [], "route": [], "load": [], "received": []}
    for chunk in chunks:
        hidden, output_weight = chunk_inputs(chunk, job.args.hidden_size, job.platform.device)
        output, _ = layer(hidden)
        (output * output_weight).sum().backward()
        result["output"].append(output.detach().cpu())
        result["input_grad"].append(hidden.grad.cpu())
        result["route"].append(routes[-1].cpu())
        result["load"].append(router.tokens_per_expert.cpu())

    grads = {}
    for local, expert in zip(layer.local_expert_indices, layer.experts.local_experts):
        for name, param in expert.named_parameters():
            grads[f"{local}.{name}"] = param.main_grad.detach().cpu().clone()
    result["expert_grads"] = grads
    centroid_grad = router.centroids.main_grad.detach().clone()
    dist.all_reduce(centroid_grad)
    result["centroid_grad"] = centroid_grad.cpu()

    job.model[0].eval()
    result["eval_output"], result["eval_route"], result["greedy_route"] = [], [], []
    with torch.no_grad():
        for chunk in chunks:
            hidden, _ = chunk_inputs(chunk, job.args.hidden_size, job.platform.device)
            output, _ = layer(hidden)
            result["eval_output"].append(output.cpu())
            result["eval_route"].append(routes[-1].cpu())
            scores = hidden.reshape(-1, hidden.size(-1)) @ router.centroids.t()
            result["greedy_route"].append(scores.argmax(-1).cpu())
    torch.save(result, out_dir / f"rank{rank}.pt")


if __name__ == "__main__":
    main(Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3:])
