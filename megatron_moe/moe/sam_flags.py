"""SAM routing's command line (``--moe-router-type sam``): its flags, their checks and its options.

Light on purpose (no torch, no megatron-core): argument errors are reported before the heavy imports.
The router and dispatcher these options drive are in :mod:`megatron_moe.moe.sam`.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Dict, Optional

from megatron_moe.conversion.routing import EvalRouting, router_fp32
from megatron_moe.errors import ConfigError


@dataclass(frozen=True)
class SAMOptions:
    num_groups: int
    renormalize_gates: bool = False
    group_balance_loss_coeff: float = 0.0
    expert_balance_loss_coeff: float = 0.0
    alignment_loss_coeff: float = 0.0
    capacity_factor: Optional[float] = None  # None: dropless


def add_arguments(group: argparse._ArgumentGroup) -> None:
    group.add_argument("--sam-num-groups", type=int, default=None,
                       help="SAM: expert groups (default: --expert-model-parallel-size); each EP rank holds "
                            "whole groups; --moe-router-topk experts are used inside the chosen group")
    group.add_argument("--sam-renormalize-gates", action="store_true",
                       help="SAM: gates sum to 1 over the k chosen experts (default: raw softmax values)")
    group.add_argument("--sam-group-balance-loss-coeff", type=float, default=0.01)
    group.add_argument("--sam-expert-balance-loss-coeff", type=float, default=0.01)
    group.add_argument("--sam-alignment-loss-coeff", type=float, default=0.01)
    group.add_argument("--sam-capacity-factor", type=float, default=None,
                       help="SAM, training: each rank routes at most factor x tokens/groups tokens to each group "
                            "(default: dropless; evaluation is always dropless)")


def validate(config) -> Dict[str, object]:
    """Checks SAM's flags; fills in --sam-num-groups."""
    ep, experts, k = config.expert_model_parallel_size, config.num_experts, config.moe_router_topk
    groups = config.sam_num_groups or ep
    if groups < 1 or experts % groups != 0:
        raise ConfigError(f"--sam-num-groups {groups} must divide --num-experts {experts}")
    if groups % ep != 0:
        raise ConfigError(f"--sam-num-groups {groups} must be a multiple of --expert-model-parallel-size {ep} "
                          "(each expert-parallel rank holds whole groups)")
    if k > experts // groups:
        raise ConfigError(f"--moe-router-topk {k} exceeds the {experts // groups} experts of a SAM group; "
                          "lower it or use fewer --sam-num-groups")
    if config.moe_router_num_groups is not None:
        raise ConfigError("--moe-router-num-groups is megatron's group-limited topk routing; "
                          "with --moe-router-type sam use --sam-num-groups")
    if config.sam_capacity_factor is not None and config.sam_capacity_factor <= 0:
        raise ConfigError(f"--sam-capacity-factor must be > 0, got {config.sam_capacity_factor}")
    for name in ("group_balance", "expert_balance", "alignment"):
        if getattr(config, f"sam_{name}_loss_coeff") < 0:
            raise ConfigError(f"--sam-{name.replace('_', '-')}-loss-coeff must be >= 0")
    if config.moe_router_dtype == "fp64":
        raise ConfigError("--moe-router-dtype fp64 does not apply to --moe-router-type sam: its routing softmax "
                          "is fp32; use --moe-router-dtype fp32 (fp32 router GEMM)")
    return {"sam_num_groups": groups}


_OWN_CAPACITY = "SAM caps each group with --sam-capacity-factor"
# megatron's topk router flags that mean nothing here: flag dest -> why
INAPPLICABLE = {
    "moe_router_padding_for_fp8": "its dispatcher pads every expert's rows to the FP8 alignment under --fp8-format "
                                  "by itself",
    "moe_z_loss_coeff": "SAM's router losses are the --sam-*-loss-coeff ones",
    "moe_router_score_function": "SAM takes the softmax over all experts, then switches to a group",
    "moe_router_pre_softmax": "SAM takes the softmax over all experts, then switches to a group",
    "moe_expert_capacity_factor": _OWN_CAPACITY,
    "moe_token_drop_policy": _OWN_CAPACITY,
    "moe_pad_expert_input_to_capacity": _OWN_CAPACITY,
    "moe_permute_fusion": "SAM's dispatcher does its own permutation",
    "moe_router_enable_expert_bias": "SAM balances with its --sam-*-balance-loss-coeff losses",
    "moe_router_topk_scaling_factor": "SAM's gates are its softmax probabilities (--sam-renormalize-gates)",
}


def options_from_args(config) -> SAMOptions:
    return SAMOptions(
        num_groups=config.sam_num_groups,
        renormalize_gates=config.sam_renormalize_gates,
        group_balance_loss_coeff=config.sam_group_balance_loss_coeff,
        expert_balance_loss_coeff=config.sam_expert_balance_loss_coeff,
        alignment_loss_coeff=config.sam_alignment_loss_coeff,
        capacity_factor=config.sam_capacity_factor,
    )


def export(args) -> EvalRouting:
    """tools/convert_checkpoint.py export: SAM in evaluation mode (dropless whatever --sam-capacity-factor,
    the losses are training-only): no top-k rule, only our remote code's ``sam_route`` computes it."""
    flags = ["--moe-router-type", "sam", "--sam-num-groups", str(args.sam_num_groups)]
    return EvalRouting(topk=args.moe_router_topk, score=None, renormalize=args.sam_renormalize_gates,
                       router_fp32=router_fp32(args), flags="--moe-router-type sam",
                       remote_flags=tuple(flags + ["--sam-renormalize-gates"] * args.sam_renormalize_gates),
                       remote_config={"moe_router_type": "sam", "sam_num_groups": args.sam_num_groups,
                                      "sam_renormalize_gates": args.sam_renormalize_gates})
