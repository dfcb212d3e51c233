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
from typing import Callable, Dict, List, Optional

from megatron.core.transformer.moe.moe_layer import MoELayer
from megatron.core.transformer.moe.moe_utils import get_default_pg_collection
from megatron.core.transformer.moe.router import Router, TopKRouter
from megatron.core.transformer.moe.token_dispatcher import MoETokenDispatcher

from megatron_moe.arguments.moe import load_balancing_losses
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

    @property
    def name(self) -> str:
        return self.flags.name


# megatron-core's tracker name for each --moe-router-load-balancing-type that adds a loss
_AUX_LOSS_NAMES = {"aux_loss": "load_balancing_loss", "seq_aux_loss": "seq_load_balancing_loss"}


def _topk_losses(config) -> List[str]:
    names = [_AUX_LOSS_NAMES[kind] for kind, coeff in load_balancing_losses(config).items()
             if coeff > 0 and kind in _AUX_LOSS_NAMES]
    if config.moe_z_loss_coeff is not None:
        names.append("z_loss")
    return names


ROUTING_SCHEMES: Dict[str, RoutingScheme] = {scheme.name: scheme for scheme in (
    RoutingScheme(SCHEME_FLAGS["topk"], router=TopKRouter, tracked_losses=_topk_losses),
    RoutingScheme(SCHEME_FLAGS["base"], router=base.BaseRouter, dispatcher=base.BaseTokenDispatcher),
    RoutingScheme(SCHEME_FLAGS["sam"], router=sam.SAMRouter, dispatcher=sam.SAMDispatcher,
                  tracked_losses=sam.tracked_losses),
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
