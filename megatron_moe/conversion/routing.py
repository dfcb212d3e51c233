"""What a routing scheme computes in evaluation mode, described without naming any Hugging Face class.

Each routing scheme's export hook (``SchemeFlags.export``) returns an :class:`EvalRouting`; the
architecture records of :mod:`megatron_moe.conversion.hf_layout` then decide which class computes the
same. Light on purpose (no torch, no megatron-core): the export decides before anything heavy is imported.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Optional, Tuple


@dataclass(frozen=True)
class EvalRouting:
    """A routing rule in evaluation mode.

    ``score``: ``"softmax"`` or ``"sigmoid"`` when the rule is a top-k over those scores of the router
    logits (``None``: a rule only our remote code computes). ``renormalize``: the k gates are divided by
    their sum (softmax: megatron's softmax over the chosen logits; sigmoid: megatron with k > 1).
    ``num_groups`` / ``group_topk``: group-limited top-k, the ``group_topk`` groups whose best
    ``topk // group_topk`` scores sum highest. ``router_fp32``: the router's logits, and the scores the
    top-k compares, are fp32 (otherwise the model's bf16: megatron rounds the scores to the logits'
    dtype before choosing). ``router_tensor``: our router parameter, ``weight`` or BASE's ``centroids``.
    ``expert_bias``: a per-expert bias (the router's ``expert_bias`` tensor) is added to the sigmoid scores
    for the choice only; the gates are the scores. ``scaling_factor``: the gates are multiplied by it (after
    the renormalisation). ``remote_config`` / ``remote_flags``: how our remote code computes it (its
    config.json fields) and the flags that rebuild it on import. ``flags``: the flags that chose this rule,
    for messages.
    """

    topk: int
    score: Optional[str]
    renormalize: bool
    router_fp32: bool
    flags: str
    num_groups: Optional[int] = None
    group_topk: Optional[int] = None
    router_tensor: str = "weight"
    remote_config: Mapping[str, Any] = field(default_factory=dict)
    remote_flags: Tuple[str, ...] = ()
    expert_bias: bool = False
    scaling_factor: Optional[float] = None


def router_fp32(args) -> bool:
    """Whether megatron's router computes its logits in fp32 for this run (``--moe-router-dtype fp32``, or
    an fp32 model)."""
    return args.moe_router_dtype == "fp32" or not args.bf16
