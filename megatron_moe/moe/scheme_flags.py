"""The command-line half of every routing scheme: its name, flags, checks and options object.

Light on purpose (no torch, no megatron-core), so that ``megatron_moe.arguments`` parses and validates
before anything heavy is imported. The other half (router, dispatcher, the losses its router logs) is
:class:`megatron_moe.moe.registry.RoutingScheme`, which holds one of these.

To add a scheme: write its ``NAME_flags.py`` (``add_arguments``, ``validate``, ``options_from_args``,
``INAPPLICABLE``) and list it in :data:`SCHEME_FLAGS`, then its router in ``megatron_moe.moe.registry``.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Mapping, Optional

from megatron_moe.moe import base_flags, sam_flags


def _nothing(config) -> None:
    return None


@dataclass(frozen=True)
class SchemeFlags:
    name: str
    add_arguments: Optional[Callable[[argparse._ArgumentGroup], None]] = None
    # Raises ConfigError on a bad combination of flags; returns the values it fills in ({dest: value}) or None.
    validate: Callable[[Any], Optional[Dict[str, Any]]] = _nothing
    # The scheme's options object, stored as config.moe_routing_options for its router and dispatcher.
    options_from_args: Callable[[Any], Any] = _nothing
    # megatron's topk router flags that do not apply to this scheme: dest -> why (set to anything but the
    # default, each is a one-line error)
    inapplicable: Mapping[str, str] = field(default_factory=dict)


TOPK = SchemeFlags("topk")
BASE = SchemeFlags("base", base_flags.add_arguments, base_flags.validate, base_flags.options_from_args,
                   base_flags.INAPPLICABLE)
SAM = SchemeFlags("sam", sam_flags.add_arguments, sam_flags.validate, sam_flags.options_from_args,
                  sam_flags.INAPPLICABLE)

SCHEME_FLAGS: Dict[str, SchemeFlags] = {scheme.name: scheme for scheme in (TOPK, BASE, SAM)}
