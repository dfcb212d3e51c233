"""Activation recomputation flags, with Megatron-LM's rules."""

from __future__ import annotations

import argparse
import importlib.util
from typing import Any, Dict, Optional

from megatron_moe.arguments.flags import RUN, FlagGroup, flag_name, require
from megatron_moe.arguments.moe import MOE_ONLY
from megatron_moe.arguments.parallel import model_chunk_layers

def add_arguments(parser: argparse.ArgumentParser) -> None:
    g = FlagGroup(parser, "activation recomputation", RUN)
    g.add("--recompute-granularity", choices=["full", "selective"], default=None,
          help="full: recompute whole transformer layers (needs --recompute-method and "
               "--recompute-num-layers); selective: recompute the --recompute-modules")
    g.add("--recompute-method", choices=["uniform", "block"], default=None,
          help="full recompute: uniform checkpoints every chunk of --recompute-num-layers layers; block "
               "checkpoints the first --recompute-num-layers layers of each pipeline stage")
    g.add("--recompute-num-layers", type=int, default=None)
    g.add("--recompute-modules", nargs="+", default=None, 
          choices=["core_attn", "moe_act", "layernorm", "mla_up_proj", "mlp", "moe", "shared_experts"],
          help="selective recompute: submodules to recompute (default: core_attn)")
    g.add("--recompute-activations", action="store_true", help="same as --recompute-granularity selective")
    g.add("--moe-layer-recompute", action="store_true", requires=MOE_ONLY,
          help="deprecated in Megatron-LM: same as --recompute-granularity selective with 'moe' added "
               "to --recompute-modules")


def validate(c) -> Optional[Dict[str, Any]]:
    """Megatron-LM's activation recomputation rules; fills in the granularity and the selective modules."""
    granularity = c.recompute_granularity
    for flag in ("recompute_activations", "moe_layer_recompute"):
        if getattr(c, flag):
            require(granularity != "full",
                    f"{flag_name(flag)} is selective recomputation; it contradicts --recompute-granularity full")
            granularity = "selective"
    chunk_layers = model_chunk_layers(c)  # megatron-core recomputes each model chunk (pipeline stage) apart
    if granularity == "full":
        require(c.recompute_method is not None, "--recompute-granularity full needs --recompute-method uniform or block")
        n = c.recompute_num_layers
        require(n is not None and 1 <= n <= max(chunk_layers),
                f"--recompute-granularity full needs --recompute-num-layers between 1 and the {max(chunk_layers)} "
                f"layers of a pipeline stage, got {n}")
        require(c.recompute_method != "uniform" or all(layers % n == 0 for layers in chunk_layers),
                f"--recompute-method uniform recomputes groups of --recompute-num-layers {n} layers, which must "
                f"divide the layers of every pipeline stage ({', '.join(map(str, sorted(chunk_layers)))}; "
                "megatron-core fails on a partial group); change it or use --recompute-method block")
        require(c.recompute_modules is None,
                "--recompute-modules needs --recompute-granularity selective (full recomputes whole layers)")
        return None
    if granularity == "selective":
        require(c.recompute_method is None and c.recompute_num_layers is None,
                "--recompute-method and --recompute-num-layers need --recompute-granularity full")
        modules = list(c.recompute_modules or ["core_attn"])
        if c.moe_layer_recompute and "moe" not in modules:
            modules.append("moe")
        require("moe_act" not in modules or c.moe_grouped_gemm,
                "--recompute-modules moe_act needs --moe-grouped-gemm (megatron-core recomputes the grouped "
                "experts' activation only)")
        require("mla_up_proj" not in modules,
                "--recompute-modules mla_up_proj needs multi-latent attention, which this model lacks")
        require("shared_experts" not in modules or c.moe_shared_expert_intermediate_size is not None,
                "--recompute-modules shared_experts needs shared experts (--moe-shared-expert-intermediate-size), "
                "which this model lacks")
        require(c.fp8_format is None or not {"moe_act", "layernorm"} & set(modules),
                "--recompute-modules moe_act and layernorm do not work with --fp8-format (delayed scaling)")
        # megatron-core 0.16.1's output-discarding checkpoint reads Transformer Engine's FP8 state unconditionally
        require("layernorm" not in modules or importlib.util.find_spec("transformer_engine") is not None,
                "--recompute-modules layernorm needs Transformer Engine installed (megatron-core's "
                "output-discarding checkpoint uses it); recompute core_attn or moe instead")
        return {"recompute_granularity": granularity, "recompute_modules": modules}
    for flag in ("recompute_method", "recompute_num_layers", "recompute_modules"):
        require(getattr(c, flag) is None, f"{flag_name(flag)} needs --recompute-granularity full or selective")
    return None


CHECKS = (validate,)
