"""Routing schemes: how a new router and token dispatcher plug into megatron-core's MoELayer.

A scheme names a router builder (megatron-core's ``MoESubmodules.router`` protocol:
``router(config=..., pg_collection=...)`` returning ``(probs, routing_map)``) and, optionally, its own
token dispatcher (megatron-core's ``MoETokenDispatcher`` interface). Without one, megatron's dispatcher
chosen by ``--moe-token-dispatcher-type`` moves the tokens. ``--moe-router-type NAME`` selects a scheme.

To add a scheme: define a :class:`RoutingScheme` in its own module and list it in :data:`ROUTING_SCHEMES`.
"""

from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional

from megatron.core.transformer.moe.moe_layer import MoELayer
from megatron.core.transformer.moe.moe_utils import get_default_pg_collection
from megatron.core.transformer.moe.router import TopKRouter

from megatron_moe.moe import comm_stats


def _no_options(args: argparse.Namespace) -> None:
    return None


def _no_validation(args: argparse.Namespace) -> None:
    return None


def _no_losses(args: argparse.Namespace) -> List[str]:
    return []


@dataclass(frozen=True)
class RoutingScheme:
    name: str
    router: Callable[..., Any]
    dispatcher: Optional[type] = None  # None: megatron's --moe-token-dispatcher-type
    add_arguments: Optional[Callable[[argparse._ArgumentGroup], None]] = None
    # Raises megatron_moe.arguments.ConfigError on a bad combination of flags.
    validate: Callable[[argparse.Namespace], None] = _no_validation
    # The scheme's options object, stored as config.moe_routing_options for its router and dispatcher.
    options_from_args: Callable[[argparse.Namespace], Any] = _no_options
    # The names its router records in megatron's aux-loss tracker with these flags. Every rank joins the
    # tracker's reduction under each name, also a pipeline stage without MoE layers.
    tracked_losses: Callable[[argparse.Namespace], List[str]] = _no_losses
    # tools/convert_checkpoint.py export: the Hugging Face class that computes this routing in evaluation
    # mode with these flags, as keyword arguments of megatron_moe.conversion.hf_layout.Target
    # (architecture, config, flags, router_tensor); raises ValueError naming the flag it cannot
    # reproduce. None: the scheme is never exported.
    export: Optional[Callable[[argparse.Namespace], Dict[str, Any]]] = None


# megatron-core's tracker name for each --moe-router-load-balancing-type that adds a loss
_AUX_LOSS_NAMES = {"aux_loss": "load_balancing_loss", "seq_aux_loss": "seq_load_balancing_loss"}


def _topk_losses(args: argparse.Namespace) -> List[str]:
    names = []
    if args.moe_aux_loss_coeff > 0 and args.moe_router_load_balancing_type in _AUX_LOSS_NAMES:
        names.append(_AUX_LOSS_NAMES[args.moe_router_load_balancing_type])
    if args.moe_z_loss_coeff is not None:
        names.append("z_loss")
    return names


def _topk_export(args: argparse.Namespace) -> Dict[str, Any]:
    """megatron-core's TopKRouter in evaluation mode: softmax routing to Mixtral / Qwen2-MoE, sigmoid scores
    and group-limited top-k to our remote code (its ``topk_route``); token dropping is refused."""
    if args.moe_expert_capacity_factor is not None:
        raise ValueError(f"--moe-expert-capacity-factor {args.moe_expert_capacity_factor}: megatron drops tokens "
                         "over an expert's capacity also in evaluation, by the load of the whole batch; no exported "
                         "class computes that (export a dropless run)")
    if args.moe_router_dtype == "fp64":
        raise ValueError("--moe-router-dtype fp64: the exported classes compute the router in the model's dtype")
    k = args.moe_router_topk
    if args.moe_router_load_balancing_type == "sinkhorn":
        # sinkhorn only balances in training; evaluation takes sigmoid (k = 1) or softmax scores' top k
        score, pre_softmax, groups = ("sigmoid", False, None) if k == 1 else ("softmax", True, None)
    else:
        score = args.moe_router_score_function
        pre_softmax = args.moe_router_pre_softmax or (k == 1 and score == "softmax")  # as the model config
        groups = args.moe_router_num_groups if args.moe_router_group_topk else None
    if score == "softmax" and groups is None:
        if not pre_softmax and all(args.moe_layer_pattern):
            return dict(architecture="MixtralForCausalLM", config={})
        return dict(architecture="Qwen2MoeForCausalLM", config={"norm_topk_prob": not pre_softmax})
    flags = ["--moe-router-score-function", score] + (["--moe-router-pre-softmax"] if pre_softmax else [])
    if groups is not None:
        flags += ["--moe-router-num-groups", str(groups), "--moe-router-group-topk", str(args.moe_router_group_topk)]
    return dict(architecture="MegatronMoeForCausalLM", flags=tuple(flags), config={
        "moe_router_type": "topk", "moe_router_score_function": score, "moe_router_pre_softmax": pre_softmax,
        "moe_router_num_groups": groups, "moe_router_group_topk": args.moe_router_group_topk if groups else None})


TOPK = RoutingScheme(name="topk", router=TopKRouter, tracked_losses=_topk_losses, export=_topk_export)


def _registered_schemes() -> Dict[str, RoutingScheme]:
    from megatron_moe.moe import base, sam

    return {scheme.name: scheme for scheme in (TOPK, base.routing_scheme(), sam.routing_scheme())}


ROUTING_SCHEMES: Dict[str, RoutingScheme] = _registered_schemes()


class _SubclassNotUnknown(logging.Filter):
    """TransformerLayer passes ``pg_collection`` only to the exact MoELayer class and logs every other MLP
    class as unknown; RoutedMoELayer resolves the same default process groups itself."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Unknown MLP type" not in record.getMessage()


logging.getLogger("megatron.core.transformer.transformer_layer").addFilter(_SubclassNotUnknown())


class RoutedMoELayer(MoELayer):
    """megatron-core's MoELayer whose token dispatcher comes from the routing scheme, when it has one."""

    def __init__(self, config, submodules=None, layer_number=None, pg_collection=None):
        pg_collection = pg_collection if pg_collection is not None else get_default_pg_collection()
        super().__init__(config, submodules=submodules, layer_number=layer_number, pg_collection=pg_collection)
        scheme = ROUTING_SCHEMES[config.moe_router_type]
        if scheme.dispatcher is not None:
            self.token_dispatcher = scheme.dispatcher(
                self.num_local_experts, self.local_expert_indices, config=config, pg_collection=pg_collection
            )
        comm_stats.track_layers(config.num_layers)

    # The dispatcher's collectives happen in these two steps: count what they send (training forwards).
    def dispatch(self, hidden_states, probs):
        if not self.training:
            return super().dispatch(hidden_states, probs)
        with comm_stats.count(self.layer_number, "dispatch", self.token_dispatcher, (hidden_states, probs)):
            return super().dispatch(hidden_states, probs)

    def combine(self, output):
        if not self.training:
            return super().combine(output)
        with comm_stats.count(self.layer_number, "combine", self.token_dispatcher, (output,)):
            return super().combine(output)
