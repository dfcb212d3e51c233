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


# megatron-core's tracker name for each --moe-router-load-balancing-type that adds a loss
_AUX_LOSS_NAMES = {"aux_loss": "load_balancing_loss", "seq_aux_loss": "seq_load_balancing_loss"}


def _topk_losses(args: argparse.Namespace) -> List[str]:
    names = []
    if args.moe_aux_loss_coeff > 0 and args.moe_router_load_balancing_type in _AUX_LOSS_NAMES:
        names.append(_AUX_LOSS_NAMES[args.moe_router_load_balancing_type])
    if args.moe_z_loss_coeff is not None:
        names.append("z_loss")
    return names


TOPK = RoutingScheme(name="topk", router=TopKRouter, tracked_losses=_topk_losses)


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
