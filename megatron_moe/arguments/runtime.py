"""Where and how the run computes: device, communication backend, Transformer Engine or the local spec,
FP8 and attention kernels. Its check is the last one: it imports torch (to see whether a GPU is visible),
so that every cheaper error comes seconds earlier."""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any, Dict

from megatron_moe.arguments.flags import RUN, FlagGroup, above, given, require

# megatron-core's AttnBackend names (tests/test_run_config.py checks them against megatron-core)
ATTENTION_BACKENDS = ("flash", "fused", "unfused", "local", "auto")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    g = FlagGroup(parser, "device and communication", RUN)
    g.add("--device", choices=["cpu", "cuda"], default=None, help="default: cuda if a GPU is visible")
    g.add("--distributed-backend", choices=["nccl", "gloo"], default=None,
          help="default: nccl on CUDA, gloo on CPU; must agree with the device")
    g.add("--distributed-timeout-minutes", type=float, default=10, valid=above(0),
          help="timeout of every torch.distributed collective, in every process group: a frozen or dead "
               "rank ends the job after this long (minutes as in Megatron-LM; fractions accepted)")

    g = FlagGroup(parser, "kernels", RUN)
    g.add("--transformer-impl", choices=["local", "transformer_engine"], default=None,
          help="default: transformer_engine on CUDA, local on CPU")
    g.add("--fp8-format", choices=["e4m3", "hybrid"], default=None, needs_transformer_engine=True,
          help="FP8 GEMMs through Transformer Engine (needs --transformer-impl transformer_engine)")
    g.add("--attention-backend", choices=ATTENTION_BACKENDS, default="auto",
          help="megatron-core AttnBackend: flash/fused/unfused pick Transformer Engine's kernel; the local "
               "spec has only megatron's unfused attention (unfused, local or auto)")
    g.add("--use-flash-attn", action="store_true",
          help="deprecated in Megatron-LM: same as --attention-backend flash (Transformer Engine only)")


def validate(c) -> Dict[str, Any]:
    """Device, backend and kernels. Fills in --transformer-impl and, for --use-flash-attn, --attention-backend."""
    from megatron_moe.platform import wants_cuda  # needs torch: imported only here

    device = "cuda" if wants_cuda(c.device) else "cpu"
    transformer_impl = c.transformer_impl or ("transformer_engine" if device == "cuda" else "local")
    if c.distributed_backend is not None:
        wanted = "cuda" if c.distributed_backend == "nccl" else "cpu"
        require(device == wanted, f"--distributed-backend {c.distributed_backend} needs the {wanted} device, "
                                  f"but this run uses the {device} (--device, or no GPU visible); "
                                  f"use --distributed-backend {'nccl' if device == 'cuda' else 'gloo'} or leave it out")
    te = transformer_impl == "transformer_engine"
    attention_backend = c.attention_backend
    if c.use_flash_attn:
        require(attention_backend in ("auto", "flash"),
                f"--use-flash-attn means --attention-backend flash; it contradicts --attention-backend "
                f"{attention_backend}")
        require(te, "--use-flash-attn (= --attention-backend flash) needs --transformer-impl transformer_engine")
        attention_backend = "flash"
    if te:
        require(attention_backend != "local",
                "--attention-backend local needs --transformer-impl local (Megatron-LM: --spec local)")
    else:
        require(attention_backend in ("local", "unfused", "auto"),
                f"--attention-backend {attention_backend} needs --transformer-impl transformer_engine "
                "(the local spec has megatron's unfused attention only: unfused, local or auto)")
    for field in dataclasses.fields(c):
        if field.metadata.get("needs_transformer_engine") and given(c, field.name):
            require(te, f"{field.metadata['flag']} needs --transformer-impl transformer_engine (Transformer Engine "
                        "kernels, CUDA only)")
    return {"transformer_impl": transformer_impl, "attention_backend": attention_backend}


CHECKS = (validate,)
