"""The configuration half of every routing scheme: its name, flags, checks, options object, and what it
computes in evaluation mode (for export).

Light on purpose (no torch, no megatron-core), so that ``megatron_moe.arguments`` parses and validates
before anything heavy is imported, and ``tools/convert_checkpoint.py export`` decides the Hugging Face class
without megatron-core. The other half (router, dispatcher, the losses its router logs) is
:class:`megatron_moe.moe.registry.RoutingScheme`, which holds one of these.

To add a scheme: write its ``NAME_flags.py`` (``add_arguments``, ``validate``, ``options_from_args``,
``INAPPLICABLE``, ``export`` if it can be exported) and list it in :data:`SCHEME_FLAGS`, then its router in
``megatron_moe.moe.registry``.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Mapping, Optional

from megatron_moe.conversion.routing import EvalRouting, router_fp32
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
    # tools/convert_checkpoint.py export: what this routing computes in evaluation mode with these flags (a
    # RunConfig), as a megatron_moe.conversion.routing.EvalRouting; the architecture records of
    # megatron_moe.conversion.hf_layout pick the class that computes the same. Raises ValueError naming
    # the flag no class reproduces. None: the scheme is never exported. Kept here, not beside the router,
    # so that export starts without importing megatron-core.
    export: Optional[Callable[[Any], EvalRouting]] = None


def _topk_export(args) -> EvalRouting:
    """megatron-core's TopKRouter in evaluation mode; token dropping is refused."""
    if args.moe_expert_capacity_factor is not None:
        raise ValueError(f"--moe-expert-capacity-factor {args.moe_expert_capacity_factor}: megatron drops tokens "
                         "over an expert's capacity also in evaluation, by the load of the whole batch; no exported "
                         "class computes that (export a dropless run)")
    if args.moe_router_dtype == "fp64":
        raise ValueError("--moe-router-dtype fp64: no exported class computes its router in fp64")
    k = args.moe_router_topk
    if args.moe_router_load_balancing_type == "sinkhorn":
        # sinkhorn only balances in training; evaluation takes sigmoid (k = 1) or softmax scores' top k
        score, pre_softmax, groups = ("sigmoid", False, None) if k == 1 else ("softmax", True, None)
        chosen = f"--moe-router-load-balancing-type sinkhorn --moe-router-topk {k}"
    else:
        score = args.moe_router_score_function
        pre_softmax = args.moe_router_pre_softmax or (k == 1 and score == "softmax")  # as the model config
        groups = args.moe_router_num_groups if args.moe_router_group_topk else None
        chosen = f"--moe-router-score-function {score} --moe-router-topk {k}" + " --moe-router-pre-softmax" * pre_softmax
    flags = ["--moe-router-score-function", score] + (["--moe-router-pre-softmax"] if pre_softmax else [])
    group_topk = args.moe_router_group_topk if groups else None
    if groups is not None:
        flags += ["--moe-router-num-groups", str(groups), "--moe-router-group-topk", str(group_topk)]
        chosen += f" --moe-router-num-groups {groups} --moe-router-group-topk {group_topk}"
    bias, scaling = args.moe_router_enable_expert_bias, args.moe_router_topk_scaling_factor
    if bias:  # sigmoid only (arguments.moe): the bias moves the choice, not the gates
        flags.append("--moe-router-enable-expert-bias")
        chosen += " --moe-router-enable-expert-bias"
    if scaling is not None:
        flags += ["--moe-router-topk-scaling-factor", repr(scaling)]
        chosen += f" --moe-router-topk-scaling-factor {scaling}"
    # megatron's sigmoid gates are renormalised when k > 1; its softmax ones unless taken before the top k
    renormalize = k > 1 if score == "sigmoid" else not pre_softmax
    return EvalRouting(
        topk=k, score=score, renormalize=renormalize, router_fp32=router_fp32(args), flags=chosen,
        num_groups=groups, group_topk=group_topk, remote_flags=tuple(flags), expert_bias=bias, scaling_factor=scaling,
        remote_config={"moe_router_type": "topk", "moe_router_score_function": score,
                       "moe_router_pre_softmax": pre_softmax, "moe_router_num_groups": groups,
                       "moe_router_group_topk": group_topk, "moe_router_enable_expert_bias": bias,
                       "moe_router_topk_scaling_factor": scaling})


TOPK = SchemeFlags("topk", export=_topk_export)
BASE = SchemeFlags("base", base_flags.add_arguments, base_flags.validate, base_flags.options_from_args,
                   base_flags.INAPPLICABLE, base_flags.export)
SAM = SchemeFlags("sam", sam_flags.add_arguments, sam_flags.validate, sam_flags.options_from_args,
                  sam_flags.INAPPLICABLE, sam_flags.export)

SCHEME_FLAGS: Dict[str, SchemeFlags] = {scheme.name: scheme for scheme in (TOPK, BASE, SAM)}
