"""BASE routing's command line (``--moe-router-type base``): its flags, their checks and its options.

Light on purpose (no torch, no megatron-core): argument errors are reported before the heavy imports.
The router and dispatcher these options drive are in :mod:`megatron_moe.moe.base`.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from megatron_moe.conversion.routing import EvalRouting
from megatron_moe.errors import ConfigError


@dataclass(frozen=True)
class BaseOptions:
    shuffle: bool = True  # solve the assignment on a random sample of the expert-parallel group's tokens


def add_arguments(group: argparse._ArgumentGroup) -> None:
    group.add_argument("--base-shuffle", action=argparse.BooleanOptionalAction, default=True,
                       help="base router: solve the balanced assignment on tokens shuffled across the "
                            "expert-parallel group (the paper's default); --no-base-shuffle solves it on "
                            "each rank's own tokens and lets the dispatcher skip the count exchange")


def validate(config) -> None:
    if config.moe_router_topk != 1:
        raise ConfigError(f"--moe-router-type base sends each token to exactly one expert: "
                          f"pass --moe-router-topk 1 (got {config.moe_router_topk})")
    coeffs = config.moe_aux_loss_coeff if isinstance(config.moe_aux_loss_coeff, tuple) else (config.moe_aux_loss_coeff,)
    if any(coeffs):
        raise ConfigError("--moe-router-type base balances loads exactly and has no auxiliary loss: "
                          f"remove --moe-aux-loss-coeff {' '.join(map(str, coeffs))} (or set it to 0)")


_EXACT = "every expert gets exactly its share of the tokens, none is dropped"
# megatron's topk router flags that mean nothing here: flag dest -> why
INAPPLICABLE = {
    "moe_router_padding_for_fp8": "its dispatcher pads every expert's rows to the FP8 alignment under --fp8-format "
                                  "by itself",
    "moe_z_loss_coeff": "its assignment is solved, not read from logits",
    "moe_router_dtype": "its token-centroid affinities are always computed in fp32",
    "moe_router_score_function": "its gate is sigmoid(token . centroid) of the assigned expert",
    "moe_router_pre_softmax": "its gate is sigmoid(token . centroid) of the assigned expert",
    "moe_expert_capacity_factor": _EXACT,
    "moe_token_drop_policy": _EXACT,
    "moe_pad_expert_input_to_capacity": _EXACT,
    "moe_router_enable_expert_bias": _EXACT,
    "moe_router_topk_scaling_factor": "its gate is sigmoid(token . centroid) of the assigned expert",
}


def options_from_args(config) -> BaseOptions:
    return BaseOptions(shuffle=config.base_shuffle)


def export(args) -> EvalRouting:
    """tools/convert_checkpoint.py export: BASE in evaluation mode (the balancing is training-only) sends each
    token to the top-1 of the fp32 sigmoid of ``h . c_e`` with gate ``sigmoid(h . c_e)``: a sigmoid top-1
    router without renormalisation, whose weight is the centroids."""
    return EvalRouting(topk=1, score="sigmoid", renormalize=False, router_fp32=True, flags="--moe-router-type base",
                       router_tensor="centroids", remote_config={"moe_router_type": "base"},
                       remote_flags=("--moe-router-type", "base", "--moe-router-topk", "1", "--moe-aux-loss-coeff", "0"))
