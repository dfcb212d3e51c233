"""Mixture-of-experts flags: the experts, megatron's router, the routing scheme (each scheme's own flags are in
its ``megatron_moe.moe.NAME_flags`` module) and the MoE kernels."""

from __future__ import annotations

import argparse
import ast
from typing import Any, Dict, List, Optional

from megatron_moe.arguments.flags import (ARCHITECTURE, MODEL, RUN, FlagGroup, NoEffect, above, at_least, flag_name,
                                          given, require)
from megatron_moe.errors import ConfigError
from megatron_moe.moe.scheme_flags import SCHEME_FLAGS


# Every MoE flag (the routing schemes' too) but --num-experts: refused on a dense model, which would ignore it
MOE_ONLY = ("num_experts", "without it the model is dense and the flag would be ignored")


# speed-only MoE kernels of Transformer Engine: accepted on the local spec, where they cannot act
_TE_ONLY = NoEffect("with --transformer-impl transformer_engine",
                    "it is a Transformer Engine kernel, and the local spec (--transformer-impl local) has none",
                    lambda c, device: c.transformer_impl == "local")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    g = FlagGroup(parser, "mixture of experts", ARCHITECTURE, requires=MOE_ONLY)
    g.add("--num-experts", type=int, default=None, valid=at_least(1), help="experts per MoE layer (unset: dense)")
    g.add("--moe-ffn-hidden-size", type=int, default=None, valid=at_least(1), help="default: --ffn-hidden-size")
    g.add("--moe-router-type", choices=sorted(SCHEME_FLAGS), default="topk",
          help="topk: megatron's router and dispatcher; base: balanced assignment; sam: switch and mixture")
    g.add("--moe-shared-expert-intermediate-size", type=int, default=None,
          help="width of a shared expert every token also passes through (Qwen2-MoE; default: none)")
    g.add("--moe-shared-expert-gate", action="store_true",
          help="scale the shared expert's output by sigmoid(h . g), a learned g (Qwen2-MoE's shared_expert_gate); "
               "without it the shared expert is ungated (DeepSeek-V3, GLM-4.5)")
    g.add("--moe-router-enable-expert-bias", action="store_true",
          help="topk with --moe-router-score-function sigmoid: DeepSeek-V3's aux-loss-free balancing, a per-expert "
               "bias added to the scores for the choice of experts only (not to the gates), updated after every "
               "global batch by --moe-router-bias-update-rate towards equal loads; trained state, saved in checkpoints")

    g = FlagGroup(parser, "mixture of experts: routing", MODEL, requires=MOE_ONLY)
    g.add("--moe-router-topk", type=int, default=2)
    g.add("--moe-layer-freq", type=str, default="1",
          help="N: MoE every N-th layer (the first is MoE); or a Python list expression of 0 (dense) and 1 (MoE) per "
               "layer, such as '[0,1,1,1]' or '([0]*1+[1]*3)' (lists, integers, + and *)")
    g.add("--moe-aux-loss-coeff", type=float, nargs="+", default=0.0, valid=at_least(0),
          help="coefficient of the load-balancing loss; several: one per --moe-router-load-balancing-type")
    g.add("--moe-router-load-balancing-type", nargs="+", choices=["aux_loss", "seq_aux_loss", "sinkhorn", "none"],
          default="aux_loss",
          help="aux_loss (GShard/Switch), seq_aux_loss (DeepSeek-V2, per sequence), sinkhorn (S-BASE routing, "
               "alone) or none; several losses are summed, each with its --moe-aux-loss-coeff")
    g.add("--moe-router-bias-update-rate", type=float, default=1e-3, valid=at_least(0),
          requires=("moe_router_enable_expert_bias", "without it there is no expert bias to update"),
          help="expert bias: added to the bias of every expert that got fewer tokens than the mean in a global "
               "batch (all ranks' counts), subtracted from the others (DeepSeek-V3: 1e-3)")
    g.add("--moe-router-topk-scaling-factor", type=float, default=None, valid=above(0),
          help="topk: multiply the gates of the chosen experts by this factor (DeepSeek-V3's and GLM-4.5's "
               "routed_scaling_factor; default: none)")
    g.add("--moe-token-dispatcher-type", choices=["allgather", "alltoall"], default="allgather",
          help="megatron's dispatcher for --moe-router-type topk")
    g.add("--moe-router-num-groups", type=int, default=None, valid=at_least(1),
          help="megatron group-limited routing")
    g.add("--moe-router-group-topk", type=int, default=None, valid=at_least(1))
    g.add("--moe-router-score-function", choices=["softmax", "sigmoid"], default="softmax",
          help="topk: score function of the router logits")
    g.add("--moe-router-pre-softmax", action="store_true",
          help="topk: softmax (sigmoid) before the top-k selection instead of after it; always on "
               "for --moe-router-topk 1 with softmax (megatron-core needs it there)")
    g.add("--moe-router-dtype", choices=["fp32", "fp64"], default=None,
          help="topk and sam: precision of the router GEMM and routing probabilities (default: params dtype)")
    g.add("--moe-z-loss-coeff", type=float, default=None, valid=at_least(0),
          help="topk: z-loss coefficient (ST-MoE), penalising large router logits; 1e-3 is a good start")
    g.add("--moe-expert-capacity-factor", type=float, default=None, valid=above(0),
          help="topk: each expert takes at most factor x tokens x topk / experts tokens of a micro batch; "
               "the rest are dropped (default: dropless)")
    g.add("--moe-token-drop-policy", choices=["probs", "position"], default="probs",
          help="topk with a capacity factor: drop the lowest-probability tokens (probs) or the last ones "
               "of the batch (position)")
    g.add("--moe-pad-expert-input-to-capacity", action="store_true",
          help="topk with a capacity factor: pad every expert's input to its capacity (static shapes)")
    for scheme in SCHEME_FLAGS.values():
        if scheme.add_arguments is not None:
            scheme.add_arguments(g.group)

    g = FlagGroup(parser, "mixture of experts: kernels", RUN, requires=MOE_ONLY)
    g.add("--moe-grouped-gemm", action="store_true", no_effect=_TE_ONLY,
          help="all local experts in one grouped GEMM (Transformer Engine's TEGroupedMLP; the local spec runs "
               "one GEMM per expert)")
    g.add("--moe-permute-fusion", action="store_true", no_effect=_TE_ONLY,
          help="fused token permutation in megatron's dispatchers (Transformer Engine kernels; topk and base)")
    g.add("--moe-router-fusion", action="store_true", no_effect=_TE_ONLY,
          help="fused top-k routing and aux-loss computation (Transformer Engine 2.7+ kernels; topk)")
    g.add("--moe-router-padding-for-fp8", action="store_true",
          help="topk with --fp8-format: pad the routing map so that every expert gets a multiple of 16 tokens "
               "(gate 0), sparing the experts' own FP8 padding; the BASE and SAM dispatchers always align under "
               "--fp8-format")


def validate(c) -> Optional[Dict[str, Any]]:
    """Experts, router and routing scheme; fills in --moe-ffn-hidden-size and the MoE layer pattern."""
    ep = c.expert_model_parallel_size
    if c.num_experts is None:
        require(ep == 1, "--expert-model-parallel-size > 1 needs --num-experts")
        return None
    require(c.num_experts % ep == 0,
            f"--num-experts {c.num_experts} is not divisible by --expert-model-parallel-size {ep}")
    require(c.tensor_model_parallel_size == 1 or c.sequence_parallel,
            "MoE with --tensor-model-parallel-size > 1 needs --sequence-parallel (megatron-core requires it)")
    require(1 <= c.moe_router_topk <= c.num_experts,
            f"--moe-router-topk {c.moe_router_topk} must be between 1 and --num-experts {c.num_experts}")
    if not c.disable_bias_linear:  # what megatron-core 0.16.1's experts can do with biases
        require(c.expert_tensor_parallel_size == 1,
                f"MoE layers with linear biases need --expert-tensor-parallel-size 1 (megatron-core), got "
                f"{c.expert_tensor_parallel_size} (its default is --tensor-model-parallel-size): pass "
                "--expert-tensor-parallel-size 1 or --disable-bias-linear")
        require(c.moe_shared_expert_intermediate_size is None,
                "--moe-shared-expert-intermediate-size needs --disable-bias-linear (megatron-core's shared experts "
                "have no biases)")
    scheme = SCHEME_FLAGS[c.moe_router_type]
    for dest, why in scheme.inapplicable.items():
        require(not given(c, dest), f"{flag_name(dest)} does not apply to --moe-router-type {scheme.name}: {why}; "
                                    "remove it")
    filled = {"moe_ffn_hidden_size": c.moe_ffn_hidden_size or c.ffn_hidden_size,
              "moe_layer_pattern": moe_layer_pattern(c), **_validate_load_balancing(c)}
    c = c.replace(**filled)
    filled.update(_validate_router_flags(c))
    filled.update(scheme.validate(c) or {})
    return filled


def _as_tuple(value) -> tuple:
    return tuple(value) if isinstance(value, (tuple, list)) else (value,)


def _validate_load_balancing(c) -> Dict[str, Any]:
    """Megatron-LM's list forms: one coefficient per load-balancing type; a list of one is its value."""
    types, coeffs = _as_tuple(c.moe_router_load_balancing_type), _as_tuple(c.moe_aux_loss_coeff)
    if len(types) > 1 or len(coeffs) > 1:
        require(len(types) == len(coeffs),
                f"--moe-router-load-balancing-type {' '.join(types)} needs one --moe-aux-loss-coeff per type, got "
                f"{' '.join(map(str, coeffs))} (megatron-core)")
        require("sinkhorn" not in types, "--moe-router-load-balancing-type sinkhorn is a routing, not a loss: give it "
                                         "alone (megatron-core reads it only as the one type)")
        require(len(set(types)) == len(types),
                f"--moe-router-load-balancing-type {' '.join(types)} names a type twice")
    return {"moe_router_load_balancing_type": types[0] if len(types) == 1 else types,
            "moe_aux_loss_coeff": coeffs[0] if len(coeffs) == 1 else coeffs}


def load_balancing_losses(c) -> Dict[str, float]:
    """{load-balancing type: its coefficient} of a validated config (sinkhorn and none included)."""
    return dict(zip(_as_tuple(c.moe_router_load_balancing_type), _as_tuple(c.moe_aux_loss_coeff)))


def _validate_router_flags(c) -> Dict[str, Any]:
    """megatron-core's topk router options (routing schemes reject those that do not apply to them)."""
    filled = {}
    sinkhorn = c.moe_router_load_balancing_type == "sinkhorn"
    if c.moe_router_enable_expert_bias:
        require(c.moe_router_score_function == "sigmoid",
                "--moe-router-enable-expert-bias needs --moe-router-score-function sigmoid (megatron-core: the bias is "
                "added to sigmoid scores)")
    for flag in ("moe_router_enable_expert_bias", "moe_router_topk_scaling_factor"):
        require(not (sinkhorn and given(c, flag)),
                f"{flag_name(flag)} does not work with --moe-router-load-balancing-type sinkhorn: megatron-core's "
                "sinkhorn routing never reads it")
    if c.moe_z_loss_coeff == 0:
        filled["moe_z_loss_coeff"] = None  # off; megatron would log z-loss / 0
    if c.moe_router_padding_for_fp8:
        require(c.fp8_format is not None, "--moe-router-padding-for-fp8 pads for FP8 GEMMs: it needs --fp8-format")
        require(c.moe_token_dispatcher_type == "alltoall",
                "--moe-router-padding-for-fp8 needs --moe-token-dispatcher-type alltoall (megatron-core's allgather "
                "dispatcher cannot pad)")
    if c.moe_expert_capacity_factor is None:
        require(not c.moe_pad_expert_input_to_capacity,
                "--moe-pad-expert-input-to-capacity needs --moe-expert-capacity-factor")
        require(c.moe_token_drop_policy == "probs",
                "--moe-token-drop-policy needs --moe-expert-capacity-factor (without it no token is dropped)")
    else:
        require(c.moe_router_load_balancing_type != "sinkhorn",
                "--moe-expert-capacity-factor does not work with --moe-router-load-balancing-type sinkhorn "
                "(megatron-core: aux_loss, seq_aux_loss or none)")
    return filled


CHECKS = (validate,)


def moe_layer_pattern(args) -> List[int]:
    """1 for each layer that is MoE, 0 for dense, from ``--moe-layer-freq``: an integer N (MoE every N-th
    layer, starting with the first) or a list expression, as Megatron-LM reads them."""
    spec = args.moe_layer_freq.strip()
    if "[" in spec:
        pattern = list_expression(spec, "--moe-layer-freq", longest=args.num_layers)
        require(isinstance(pattern, list) and len(pattern) == args.num_layers
                and all(type(x) is int and x in (0, 1) for x in pattern),
                f"--moe-layer-freq list must hold {args.num_layers} entries of 0 or 1, got {spec} = {pattern}")
        return pattern
    require(spec.isdigit() and int(spec) > 0, f"--moe-layer-freq must be a positive integer or a list, got {spec!r}")
    return [1 if i % int(spec) == 0 else 0 for i in range(args.num_layers)]


def list_expression(text: str, flag: str, longest: int):
    """The value of a Python expression of lists, integers, ``+`` and ``*`` (Megatron-LM evaluates such flags
    with ``eval``; this reads only those forms, so a flag never runs code). Lists longer than ``longest``
    are refused before they are built."""
    try:
        tree = ast.parse(text.strip(), mode="eval")
    except SyntaxError:
        raise ConfigError(f"{flag} {text!r} is not a list expression such as '[0,1,1,1]' or '([0]*1+[1]*3)'") from None

    def value(node):
        if isinstance(node, ast.Constant) and type(node.value) is int:
            return node.value
        if isinstance(node, ast.List):
            return [value(element) for element in node.elts]
        if isinstance(node, ast.BinOp) and isinstance(node.op, (ast.Add, ast.Mult)):
            left, right = value(node.left), value(node.right)
            if isinstance(node.op, ast.Mult) and isinstance(left, list) != isinstance(right, list):
                items, times = (left, right) if isinstance(left, list) else (right, left)
                require(len(items) * max(times, 0) <= longest,
                        f"{flag} {text!r} makes a list longer than the {longest} layers")
                return items * times
            if type(left) is type(right):
                return left + right if isinstance(node.op, ast.Add) else left * right
        raise ConfigError(f"{flag} {text!r}: only lists, integers, + and * are allowed, not "
                          f"{ast.get_source_segment(text.strip(), node) or type(node).__name__}")

    return value(tree.body)
