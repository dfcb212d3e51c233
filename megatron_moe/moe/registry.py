"""Routing schemes: how a new router and token dispatcher plug into megatron-core's MoELayer.

A scheme names a router builder (megatron-core's ``MoESubmodules.router`` protocol:
``router(config=..., pg_collection=...)`` returning ``(probs, routing_map)``) and, optionally, its own
token dispatcher (megatron-core's ``MoETokenDispatcher`` interface). Without one, megatron's dispatcher
chosen by ``--moe-token-dispatcher-type`` moves the tokens. ``--moe-router-type NAME`` selects a scheme.

To add a scheme: its command line goes in ``megatron_moe.moe.scheme_flags`` (light: parsed before megatron-core
is imported), its router and dispatcher in its own module, and a :class:`RoutingScheme` joining both in
:data:`ROUTING_SCHEMES`. The registry imports the schemes; they never import it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional

from megatron.core.transformer.moe.moe_layer import MoELayer
from megatron.core.transformer.moe.moe_utils import get_default_pg_collection
from megatron.core.transformer.moe.router import Router, TopKRouter
from megatron.core.transformer.moe.token_dispatcher import MoETokenDispatcher

from megatron_moe.arguments import RunConfig
from megatron_moe.moe import base, comm_stats, sam
from megatron_moe.moe.scheme_flags import SCHEME_FLAGS, SchemeFlags


def _no_losses(config) -> List[str]:
    return []


@dataclass(frozen=True)
class RoutingScheme:
    flags: SchemeFlags  # name, command-line flags, their checks, the options object (light module)
    router: type[Router]  # megatron-core's router protocol, see the module docstring
    dispatcher: Optional[type[MoETokenDispatcher]] = None  # None: megatron's --moe-token-dispatcher-type
    # The names its router records in megatron's aux-loss tracker with these flags. Every rank joins the
    # tracker's reduction under each name, also a pipeline stage without MoE layers.
    tracked_losses: Callable[[object], List[str]] = _no_losses
    # tools/convert_checkpoint.py export: the Hugging Face class that computes this routing in evaluation
    # mode with these flags (a RunConfig), as keyword arguments of megatron_moe.conversion.hf_layout.Target
    # (architecture, config, flags, router_tensor); raises ValueError naming the flag it cannot
    # reproduce. None: the scheme is never exported.
    export: Optional[Callable[[RunConfig], Dict[str, Any]]] = None

    @property
    def name(self) -> str:
        return self.flags.name


# megatron-core's tracker name for each --moe-router-load-balancing-type that adds a loss
_AUX_LOSS_NAMES = {"aux_loss": "load_balancing_loss", "seq_aux_loss": "seq_load_balancing_loss"}


def _topk_losses(config) -> List[str]:
    names = []
    if config.moe_aux_loss_coeff > 0 and config.moe_router_load_balancing_type in _AUX_LOSS_NAMES:
        names.append(_AUX_LOSS_NAMES[config.moe_router_load_balancing_type])
    if config.moe_z_loss_coeff is not None:
        names.append("z_loss")
    return names


def _topk_export(args: RunConfig) -> Dict[str, Any]:
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


ROUTING_SCHEMES: Dict[str, RoutingScheme] = {scheme.name: scheme for scheme in (
    RoutingScheme(SCHEME_FLAGS["topk"], router=TopKRouter, tracked_losses=_topk_losses, export=_topk_export),
    RoutingScheme(SCHEME_FLAGS["base"], router=base.BaseRouter, dispatcher=base.BaseTokenDispatcher,
                  export=base.export),
    RoutingScheme(SCHEME_FLAGS["sam"], router=sam.SAMRouter, dispatcher=sam.SAMDispatcher,
                  tracked_losses=sam.tracked_losses, export=sam.export),
)}
assert set(ROUTING_SCHEMES) == set(SCHEME_FLAGS), "every scheme's flags need its router here"


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
