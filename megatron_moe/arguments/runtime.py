"""Where and how the run computes: device, communication backend, Transformer Engine or the local spec,
FP8, attention and the other kernels, and the speed-only switches of Megatron-LM. Its check is the last one:
it imports torch (to see whether a GPU is visible), so that every cheaper error comes seconds earlier; it
also prints the info line of each flag given that has no effect in this run."""

from __future__ import annotations

import argparse
import dataclasses
import os
from typing import Any, Dict

from megatron_moe.arguments.flags import RUN, FlagGroup, NoEffect, above, at_least, given, note_no_effect, require

# megatron-core's AttnBackend names (tests/test_run_config.py checks them against megatron-core)
ATTENTION_BACKENDS = ("flash", "fused", "unfused", "local", "auto")
# what the no-FP8 flags mean without --fp8-format
_NEEDS_FP8 = ("fp8_format", "without it nothing runs in FP8")


def _local_spec(c) -> bool:
    return c.transformer_impl == "local"


_UNFUSED_ONLY = "the local spec (--transformer-impl local) has megatron's unfused attention only"
_TE_KERNEL = NoEffect("with --transformer-impl transformer_engine", _UNFUSED_ONLY, lambda c, device: _local_spec(c))
_LOCAL_ATTENTION = NoEffect("with --transformer-impl transformer_engine", _UNFUSED_ONLY,
                            lambda c, device: _local_spec(c) and c.attention_backend not in ("local", "unfused"))
_TP_COMM_OVERLAP = NoEffect("with --transformer-impl transformer_engine and tensor parallelism (Transformer Engine's "
                            "userbuffers)", "the local spec has no Transformer Engine userbuffers to overlap with",
                            lambda c, device: _local_spec(c))
_ALWAYS_OFF = "accepted: this fusion is always off here"
# megatron-core's GPTModel sets these for its attention backend and asserts any value already set (a shell's
# export, or an earlier model with another backend in the same process): (flash, fused, unfused) per backend
NVTE_ATTENTION_VARIABLES = ("NVTE_FLASH_ATTN", "NVTE_FUSED_ATTN", "NVTE_UNFUSED_ATTN")
NVTE_ATTENTION_VALUES = {"local": (0, 0, 0), "flash": (1, 0, 0), "fused": (0, 1, 0), "unfused": (0, 0, 1),
                         "auto": (1, 1, 1)}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    g = FlagGroup(parser, "device and communication", RUN)
    g.add("--device", choices=["cpu", "cuda"], default=None, help="default: cuda if a GPU is visible")
    g.add("--distributed-backend", choices=["nccl", "gloo"], default=None,
          help="default: nccl on CUDA, gloo on CPU; must agree with the device")
    g.add("--distributed-timeout-minutes", type=float, default=10, valid=above(0),
          help="timeout of every torch.distributed collective, in every process group: a frozen or dead "
               "rank ends the job after this long (minutes as in Megatron-LM; fractions accepted)")
    g.add("--local-rank", type=int, default=0,
          no_effect=NoEffect.never("the launcher's LOCAL_RANK environment variable is read instead, as Megatron-LM "
                                   "does"))
    g.add("--deterministic-mode", action="store_true",
          help="deterministic kernels (torch.use_deterministic_algorithms); on CUDA NCCL_ALGO must name a "
               "deterministic all-reduce algorithm, as Megatron-LM asks")

    g = FlagGroup(parser, "kernels", RUN)
    g.add("--transformer-impl", choices=["local", "transformer_engine"], default=None,
          help="default: transformer_engine on CUDA, local on CPU")
    g.add("--attention-backend", choices=ATTENTION_BACKENDS, default="auto", no_effect=_LOCAL_ATTENTION,
          help="megatron-core AttnBackend: flash/fused/unfused pick Transformer Engine's kernel; the local "
               "spec has only megatron's unfused attention (the others have no effect there)")
    g.add("--use-flash-attn", action="store_true", no_effect=_TE_KERNEL,
          help="deprecated in Megatron-LM: same as --attention-backend flash")
    g.add("--cross-entropy-loss-fusion", action="store_true",
          help="megatron-core's fused (vocab-parallel) cross entropy: the same loss, fewer kernels")
    g.add("--cross-entropy-fusion-impl", choices=["native", "te"], default="native",
          requires=("cross_entropy_loss_fusion", "without it the cross entropy is not fused"),
          help="native: megatron-core's; te: Transformer Engine's (needs --transformer-impl transformer_engine)")
    g.add("--disable-bf16-reduced-precision-matmul", action="store_true",
          no_effect=NoEffect("on CUDA with --bf16", "it switches off a CUDA matmul setting of bf16 runs",
                             lambda c, device: not (device == "cuda" and c.bf16)),
          help="--bf16 on CUDA: no reduced-precision accumulation in bf16 matmuls")
    g.add("--cuda-graph-impl", choices=["none"], default="none", help="none: the step runs eagerly")

    g = FlagGroup(parser, "kernels: FP8 (Transformer Engine)", RUN)
    g.add("--fp8-format", choices=["e4m3", "hybrid"], default=None, needs_transformer_engine=True,
          help="FP8 GEMMs through Transformer Engine (needs --transformer-impl transformer_engine)")
    g.add("--fp8-recipe", choices=["tensorwise", "delayed", "blockwise"], default="delayed",
          needs_transformer_engine=True, requires=_NEEDS_FP8,
          help="delayed: scales from an amax history; tensorwise: current per-tensor scaling; blockwise")
    g.add("--fp8-param-gather", action="store_true", needs_transformer_engine=True, requires=_NEEDS_FP8,
          help="keep the compute weights in FP8 and gather them in FP8 (needs --use-distributed-optimizer)")
    g.add("--fp8-margin", type=int, default=0, needs_transformer_engine=True, requires=_NEEDS_FP8)
    g.add("--fp8-interval", type=int, default=1, requires=_NEEDS_FP8,
          no_effect=NoEffect.never("deprecated in Transformer Engine 1.8 (Megatron-LM ignores it too)"))
    g.add("--fp8-amax-history-len", type=int, default=1, valid=at_least(1), needs_transformer_engine=True,
          requires=_NEEDS_FP8, help="delayed scaling: length of the amax history")
    g.add("--fp8-amax-compute-algo", choices=["most_recent", "max"], default="most_recent",
          needs_transformer_engine=True, requires=_NEEDS_FP8, help="delayed scaling: amax from the history's")
    g.add("--no-fp8-wgrad", "--disable-fp8-wgrad", dest="fp8_wgrad", action="store_false",
          needs_transformer_engine=True, requires=_NEEDS_FP8, help="weight gradients in higher precision")

    g = FlagGroup(parser, "kernels: tensor-parallel communication overlap (Transformer Engine)", RUN)
    g.add("--tp-comm-overlap", action="store_true", no_effect=_TP_COMM_OVERLAP,
          help="overlap tensor-parallel all-gathers and reduce-scatters with GEMMs (needs --sequence-parallel)")
    overlap = ("tp_comm_overlap", "the overlap is off")
    g.add("--no-tp-comm-bulk-wgrad", "--disable-tp-comm-bulk-wgrad", dest="tp_comm_bulk_wgrad", action="store_false",
          requires=overlap)
    g.add("--no-tp-comm-bulk-dgrad", "--disable-tp-comm-bulk-dgrad", dest="tp_comm_bulk_dgrad", action="store_false",
          requires=overlap)
    g.add("--no-tp-comm-overlap-ag", "--disable-tp-comm-overlap-ag", dest="tp_comm_overlap_ag", action="store_false",
          requires=overlap)
    g.add("--no-tp-comm-overlap-rs", "--disable-tp-comm-overlap-rs", dest="tp_comm_overlap_rs", action="store_false",
          requires=overlap)
    g.add("--tp-comm-overlap-rs-dgrad", action="store_true", requires=overlap)
    g.add("--no-tp-comm-split-ag", "--disable-tp-comm-split-ag", dest="tp_comm_split_ag", action="store_false",
          requires=overlap)
    g.add("--no-tp-comm-split-rs", "--disable-tp-comm-split-rs", dest="tp_comm_split_rs", action="store_false",
          requires=overlap)
    g.add("--tp-comm-overlap-cfg", default=None, requires=overlap, help="Transformer Engine's userbuffer YAML file")
    g.add("--tp-comm-bootstrap-backend", choices=["nccl", "mpi", "gloo"], default="nccl", requires=overlap)

    g = FlagGroup(parser, "kernels: fusions (always off here)", RUN)
    g.add("--no-masked-softmax-fusion", dest="masked_softmax_fusion", action="store_false", help=_ALWAYS_OFF)
    g.add("--no-bias-gelu-fusion", dest="bias_gelu_fusion", action="store_false", help=_ALWAYS_OFF)
    g.add("--no-bias-swiglu-fusion", dest="bias_swiglu_fusion", action="store_false", help=_ALWAYS_OFF)
    g.add("--no-bias-dropout-fusion", dest="bias_dropout_fusion", action="store_false", help=_ALWAYS_OFF)
    g.add("--no-rope-fusion", dest="apply_rope_fusion", action="store_false", help=_ALWAYS_OFF)
    g.add("--no-persist-layer-norm", action="store_true", help=_ALWAYS_OFF)
    g.add("--no-gradient-accumulation-fusion", dest="gradient_accumulation_fusion", action="store_false",
          help=_ALWAYS_OFF)
    g.add("--disable-jit-fuser", action="store_true", help=_ALWAYS_OFF + " (the fused cross entropy still compiles "
                                                           "with torch.compile)")
    deprecated = NoEffect.never("deprecated in Megatron-LM, which ignores it")
    g.add("--no-async-tensor-model-parallel-allreduce", "--disable-async-tensor-model-parallel-allreduce",
          dest="async_tensor_model_parallel_allreduce", action="store_false", no_effect=deprecated)
    g.add("--moe-extended-tp", action="store_true", no_effect=deprecated)


def validate(c) -> Dict[str, Any]:
    """Device, backend and kernels. Fills in --transformer-impl and, for --use-flash-attn, --attention-backend;
    prints the info line of each flag given that has no effect here."""
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
        attention_backend = "flash"
    for name, value in zip(NVTE_ATTENTION_VARIABLES, NVTE_ATTENTION_VALUES[attention_backend]):
        require(os.environ.get(name) in (None, str(value)),
                f"the environment sets {name}={os.environ.get(name)}, which contradicts --attention-backend "
                f"{attention_backend} ({name}={value}); unset {', '.join(NVTE_ATTENTION_VARIABLES)} and choose "
                "with --attention-backend, as megatron-core asks")
    if te:
        require(attention_backend != "local",
                "--attention-backend local needs --transformer-impl local (Megatron-LM: --spec local)")
    for field in dataclasses.fields(c):
        if field.metadata.get("needs_transformer_engine") and given(c, field.name):
            require(te, f"{field.metadata['flag']} needs --transformer-impl transformer_engine (Transformer Engine "
                        "kernels, CUDA only)")
    require(c.cross_entropy_fusion_impl != "te" or te,
            "--cross-entropy-fusion-impl te needs --transformer-impl transformer_engine; use native")
    if c.tp_comm_overlap:
        require(c.sequence_parallel, "--tp-comm-overlap needs --sequence-parallel with --tensor-model-parallel-size "
                                     "> 1 (Megatron-LM: the overlap happens only with sequence parallelism)")
    if c.fp8_param_gather:
        require(c.use_distributed_optimizer, "--fp8-param-gather needs --use-distributed-optimizer")
    if c.deterministic_mode:
        require(not c.cross_entropy_loss_fusion, "--deterministic-mode and --cross-entropy-loss-fusion exclude each "
                                                 "other (the fused cross entropy is not deterministic)")
        require(attention_backend != "flash", "--deterministic-mode and flash attention exclude each other")
        algorithms = ("Tree", "Ring", "CollnetDirect", "CollnetChain", "^NVLS")
        require(device == "cpu" or os.environ.get("NCCL_ALGO") in algorithms,
                f"--deterministic-mode on CUDA needs NCCL_ALGO set to one of {', '.join(algorithms)} (Megatron-LM's "
                "rule: a deterministic all-reduce)")
    note_no_effect(c.replace(transformer_impl=transformer_impl), device)
    return {"transformer_impl": transformer_impl, "attention_backend": attention_backend}


CHECKS = (validate,)
