"""torchrun tests/scripts/fp8_aligned_layers.py OUT_DIR <pretrain flags of a 1-layer MoE model>

FP8-aligned dispatch without FP8: for each routing variant, one MoE layer built from the run's config and
one from the same config with ``fp8`` set (and, for topk, ``moe_router_padding_for_fp8``), with the same
weights and the same stand-in experts: a per-expert matrix product that records each expert's row count
(and, in the fp8 layer, asserts it is a multiple of the FP8 alignment, 16). Both run forward and backward
on the same tokens; rank r writes OUT_DIR/rank{r}.pt with the largest differences between them and the row
counts each stand-in saw. (``fp8`` is set on a copy of the config, after its checks, which need
Transformer Engine for MoE FP8: nothing here computes in FP8.)

Also writes, per rank, the BASE dispatcher's megatron sync point after an evaluation forward followed by a
balanced training forward.
"""

import copy
import dataclasses
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from megatron.core.transformer.spec_utils import build_module

from megatron_moe.model import decoder_block_spec
from megatron_moe.moe.base_flags import BaseOptions
from megatron_moe.moe.sam_flags import SAMOptions
from megatron_moe.training import setup

ALIGN = 16
SEQ, BATCH = 10, 2  # 20 tokens per rank: 5 per expert under BASE, never a multiple of 16 rows per expert
VARIANTS = {
    "topk": dict(moe_router_type="topk", moe_router_topk=2, moe_routing_options=None),
    "base": dict(moe_router_type="base", moe_router_topk=1, moe_aux_loss_coeff=0.0, moe_router_pre_softmax=True,
                 moe_routing_options=BaseOptions(shuffle=True)),
    "base-no-shuffle": dict(moe_router_type="base", moe_router_topk=1, moe_aux_loss_coeff=0.0,
                            moe_router_pre_softmax=True, moe_routing_options=BaseOptions(shuffle=False)),
    "sam": dict(moe_router_type="sam", moe_router_topk=2,
                moe_routing_options=SAMOptions(num_groups=2, group_balance_loss_coeff=0.01,
                                               expert_balance_loss_coeff=0.01, alignment_loss_coeff=0.01)),
    "sam-capacity": dict(moe_router_type="sam", moe_router_topk=2,
                         moe_routing_options=SAMOptions(num_groups=2, capacity_factor=0.5)),
}


class StandInExperts(torch.nn.Module):
    """megatron's experts interface ``(rows, tokens_per_expert, probs) -> (output, None)``: expert e's rows
    times its matrix, scaled by the gates."""

    def __init__(self, weight: torch.Tensor, align: int):
        super().__init__()
        self.weight = torch.nn.Parameter(weight.clone())
        self.align = align
        self.row_counts = []

    def forward(self, rows, tokens_per_expert, probs):
        counts = tokens_per_expert.tolist()
        assert all(count % self.align == 0 for count in counts), f"rows per expert {counts}, not multiples of {self.align}"
        self.row_counts.append(counts)
        outputs = [chunk @ weight for chunk, weight in zip(rows.split(counts), self.weight)]
        return torch.cat(outputs) * probs.unsqueeze(-1).to(rows.dtype), None


def fp8_config(config, topk: bool):
    aligned = copy.copy(config)
    aligned.fp8, aligned.fp8_recipe = "e4m3", "delayed"
    aligned.moe_router_padding_for_fp8 = aligned.moe_router_padding_for_quantization = topk
    return aligned


def layer_pair(run_config, variant: str):
    config = dataclasses.replace(run_config, **VARIANTS[variant])
    spec = decoder_block_spec(config, "local").layer_specs[0].submodules.mlp
    reference = build_module(spec, config=config, layer_number=1)
    aligned = build_module(spec, config=fp8_config(config, variant == "topk"), layer_number=1)
    aligned.load_state_dict(reference.state_dict())
    generator = torch.Generator().manual_seed(7)
    weight = torch.randn(config.num_moe_experts, config.hidden_size, config.hidden_size, generator=generator)
    local = weight[reference.local_expert_indices[0]: reference.local_expert_indices[-1] + 1] / config.hidden_size ** 0.5
    reference.experts = StandInExperts(local, align=1)
    aligned.experts = StandInExperts(local, align=ALIGN)
    return reference, aligned


def run(layer, hidden, output_weight):
    hidden = hidden.clone().requires_grad_()
    output, _ = layer(hidden)
    (output * output_weight).sum().backward()
    grads = {name: p.grad.clone() for name, p in layer.named_parameters() if p.grad is not None}
    return {"output": output.detach(), "input_grad": hidden.grad, **grads}


def main(out_dir: Path, argv):
    job = setup(argv)
    rank = dist.get_rank()
    run_config = job.model[0].module.decoder.layers[0].mlp.config
    generator = torch.Generator().manual_seed(100 + rank)
    hidden = torch.randn(SEQ, BATCH, run_config.hidden_size, generator=generator)
    output_weight = torch.randn(SEQ, BATCH, run_config.hidden_size, generator=generator)
    result = {}
    for variant in VARIANTS:
        torch.manual_seed(1)  # the same shuffle permutation in both layers
        reference, aligned = layer_pair(run_config, variant)
        torch.manual_seed(2)
        expected = run(reference, hidden, output_weight)
        torch.manual_seed(2)
        got = run(aligned, hidden, output_weight)
        assert expected.keys() == got.keys(), (expected.keys(), got.keys())
        result[variant] = {
            "differences": {name: (got[name] - value).abs().max().item() for name, value in expected.items()},
            "scales": {name: value.abs().max().item() for name, value in expected.items()},
            "reference_rows": reference.experts.row_counts,
            "aligned_rows": aligned.experts.row_counts,
        }
    reference, _ = layer_pair(run_config, "base-no-shuffle")
    reference.eval()
    with torch.no_grad():
        reference(hidden)
    reference.train()
    reference(hidden)
    result["base_sync_point_after_eval_then_train"] = reference.token_dispatcher.cuda_sync_point
    torch.save(result, out_dir / f"rank{rank}.pt")


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2:])
