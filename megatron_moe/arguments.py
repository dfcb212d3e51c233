"""Command line: Megatron-LM's flag names and meanings, validation, and the TransformerConfig they describe.

A Megatron-LM launch script should need only its script name changed. Flags we add are few:
``--device``, ``--transformer-impl``, ``--moe-router-type`` and the options of each routing scheme
(registered by the scheme itself, see ``megatron_moe.moe.registry``).

Every invalid combination is reported by :func:`validate_args` as one line naming the offender and the
fix, before any process group or model exists.
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
from typing import Dict, List, Optional

import torch
import torch.nn.functional as F
from megatron.core.transformer.enums import AttnBackend


class ConfigError(ValueError):
    """A user error in the command line: printed as one line, exit status 2."""


def _add_model_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--num-layers", type=int, required=True)
    g.add_argument("--hidden-size", type=int, required=True)
    g.add_argument("--ffn-hidden-size", type=int, default=None, help="default: 4 x hidden size")
    g.add_argument("--num-attention-heads", type=int, required=True)
    g.add_argument("--num-query-groups", type=int, default=None, help="grouped-query attention")
    g.add_argument("--kv-channels", type=int, default=None)
    g.add_argument("--seq-length", type=int, required=True)
    g.add_argument("--max-position-embeddings", type=int, default=None)
    g.add_argument("--normalization", choices=["LayerNorm", "RMSNorm"], default="LayerNorm")
    g.add_argument("--norm-epsilon", type=float, default=1e-5)
    g.add_argument("--swiglu", action="store_true")
    g.add_argument("--position-embedding-type", choices=["learned_absolute", "rope"], default="learned_absolute")
    g.add_argument("--rotary-base", type=int, default=10000)
    g.add_argument("--rotary-percent", type=float, default=1.0)
    g.add_argument("--untie-embeddings-and-output-weights", action="store_true")
    g.add_argument("--make-vocab-size-divisible-by", type=int, default=128)
    g.add_argument("--init-method-std", type=float, default=0.02)
    g.add_argument("--hidden-dropout", type=float, default=0.1)
    g.add_argument("--attention-dropout", type=float, default=0.1)
    g.add_argument("--disable-bias-linear", action="store_true")
    g.add_argument("--add-qkv-bias", action="store_true",
                   help="biases on the query/key/value projection only (Qwen2's attention), also in MoE models")
    g.add_argument("--transformer-impl", choices=["local", "transformer_engine"], default=None,
                   help="default: transformer_engine on CUDA, local on CPU")
    g.add_argument("--fp8-format", choices=["e4m3", "hybrid"], default=None,
                   help="FP8 GEMMs through Transformer Engine (needs --transformer-impl transformer_engine)")
    g.add_argument("--attention-backend", choices=[backend.name for backend in AttnBackend], default="auto",
                   help="megatron-core AttnBackend: flash/fused/unfused pick Transformer Engine's kernel; the local "
                        "spec has only megatron's unfused attention (unfused, local or auto)")
    g.add_argument("--use-flash-attn", action="store_true",
                   help="deprecated in Megatron-LM: same as --attention-backend flash (Transformer Engine only)")


def _add_moe_args(p: argparse.ArgumentParser) -> None:
    from megatron_moe.moe.registry import ROUTING_SCHEMES

    g = p.add_argument_group("mixture of experts")
    g.add_argument("--num-experts", type=int, default=None, help="experts per MoE layer (unset: dense)")
    g.add_argument("--moe-ffn-hidden-size", type=int, default=None, help="default: --ffn-hidden-size")
    g.add_argument("--moe-router-topk", type=int, default=2)
    g.add_argument("--moe-shared-expert-intermediate-size", type=int, default=None,
                   help="width of a shared expert every token also passes through (Qwen2-MoE; default: none)")
    g.add_argument("--moe-shared-expert-gate", action="store_true",
                   help="scale the shared expert's output by sigmoid(h . g), a learned g (Qwen2-MoE's shared_expert_gate)")
    g.add_argument("--moe-layer-freq", type=str, default="1",
                   help="N: MoE every N-th layer; or a Python list such as '[0,1,1,1]' (1 = MoE)")
    g.add_argument("--moe-router-type", choices=sorted(ROUTING_SCHEMES), default="topk",
                   help="topk: megatron's router and dispatcher; base: balanced assignment; sam: switch and mixture")
    g.add_argument("--moe-aux-loss-coeff", type=float, default=0.0)
    g.add_argument("--moe-router-load-balancing-type", choices=["aux_loss", "seq_aux_loss", "sinkhorn", "none"],
                   default="aux_loss")
    g.add_argument("--moe-token-dispatcher-type", choices=["allgather", "alltoall"], default="alltoall",
                   help="megatron's dispatcher for --moe-router-type topk")
    g.add_argument("--moe-router-num-groups", type=int, default=None, help="megatron group-limited routing")
    g.add_argument("--moe-router-group-topk", type=int, default=None)
    g.add_argument("--moe-router-score-function", choices=["softmax", "sigmoid"], default="softmax",
                   help="topk: score function of the router logits")
    g.add_argument("--moe-router-pre-softmax", action="store_true",
                   help="topk: softmax (sigmoid) before the top-k selection instead of after it; always on "
                        "for --moe-router-topk 1 with softmax (megatron-core needs it there)")
    g.add_argument("--moe-router-dtype", choices=["fp32", "fp64"], default=None,
                   help="topk and sam: precision of the router GEMM and routing probabilities (default: params dtype)")
    g.add_argument("--moe-z-loss-coeff", type=float, default=None,
                   help="topk: z-loss coefficient (ST-MoE), penalising large router logits; 1e-3 is a good start")
    g.add_argument("--moe-expert-capacity-factor", type=float, default=None,
                   help="topk: each expert takes at most factor x tokens x topk / experts tokens of a micro batch; "
                        "the rest are dropped (default: dropless)")
    g.add_argument("--moe-token-drop-policy", choices=["probs", "position"], default="probs",
                   help="topk with a capacity factor: drop the lowest-probability tokens (probs) or the last ones "
                        "of the batch (position)")
    g.add_argument("--moe-pad-expert-input-to-capacity", action="store_true",
                   help="topk with a capacity factor: pad every expert's input to its capacity (static shapes)")
    g.add_argument("--moe-grouped-gemm", action="store_true",
                   help="all local experts in one grouped GEMM (Transformer Engine's TEGroupedMLP; "
                        "needs --transformer-impl transformer_engine)")
    g.add_argument("--moe-permute-fusion", action="store_true",
                   help="fused token permutation in megatron's dispatchers (Transformer Engine kernels; "
                        "topk and base)")
    for scheme in ROUTING_SCHEMES.values():
        if scheme.add_arguments is not None:
            scheme.add_arguments(g)


def _add_parallel_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("parallelism")
    g.add_argument("--tensor-model-parallel-size", type=int, default=1)
    g.add_argument("--pipeline-model-parallel-size", type=int, default=1)
    g.add_argument("--expert-model-parallel-size", type=int, default=1)
    g.add_argument("--sequence-parallel", action="store_true")
    g.add_argument("--use-distributed-optimizer", action="store_true")
    g.add_argument("--device", choices=["cpu", "cuda"], default=None, help="default: cuda if a GPU is visible")
    g.add_argument("--distributed-backend", choices=["nccl", "gloo"], default=None,
                   help="default: nccl on CUDA, gloo on CPU; must agree with the device")
    g.add_argument("--distributed-timeout-minutes", type=int, default=10,
                   help="timeout of torch.distributed collectives")
    g.add_argument("--overlap-grad-reduce", action="store_true",
                   help="data-parallel gradient reduction in buckets, launched during the backward pass")
    g.add_argument("--overlap-param-gather", action="store_true",
                   help="distributed optimizer: all-gather updated parameters bucket by bucket during the next "
                        "forward pass (needs --use-distributed-optimizer and --overlap-grad-reduce)")
    g.add_argument("--ddp-bucket-size", type=int, default=None,
                   help="parameters per gradient-reduction bucket with --overlap-grad-reduce "
                        "(default: max(40M, 1M x data-parallel size))")


def _add_recompute_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("activation recomputation")
    g.add_argument("--recompute-granularity", choices=["full", "selective"], default=None,
                   help="full: recompute whole transformer layers (needs --recompute-method and "
                        "--recompute-num-layers); selective: recompute the --recompute-modules")
    g.add_argument("--recompute-method", choices=["uniform", "block"], default=None,
                   help="full recompute: uniform checkpoints every chunk of --recompute-num-layers layers; block "
                        "checkpoints the first --recompute-num-layers layers of each pipeline stage")
    g.add_argument("--recompute-num-layers", type=int, default=None)
    g.add_argument("--recompute-modules", nargs="+", default=None,
                   choices=["core_attn", "moe_act", "layernorm", "mla_up_proj", "mlp", "moe", "shared_experts"],
                   help="selective recompute: submodules to recompute (default: core_attn)")
    g.add_argument("--recompute-activations", action="store_true",
                   help="same as --recompute-granularity selective")
    g.add_argument("--moe-layer-recompute", action="store_true",
                   help="deprecated in Megatron-LM: same as --recompute-granularity selective with 'moe' added "
                        "to --recompute-modules")


def _add_training_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("training")
    g.add_argument("--micro-batch-size", type=int, required=True)
    g.add_argument("--global-batch-size", type=int, default=None, help="default: micro batch x data parallel")
    g.add_argument("--train-iters", type=int, required=True)
    g.add_argument("--lr", type=float, required=True)
    g.add_argument("--min-lr", type=float, default=0.0)
    g.add_argument("--lr-warmup-iters", type=int, default=0)
    g.add_argument("--lr-decay-iters", type=int, default=None)
    g.add_argument("--lr-decay-style", choices=["constant", "linear", "cosine", "inverse-square-root", "WSD"],
                   default="linear")
    g.add_argument("--weight-decay", type=float, default=0.01)
    g.add_argument("--clip-grad", type=float, default=1.0)
    g.add_argument("--adam-beta1", type=float, default=0.9)
    g.add_argument("--adam-beta2", type=float, default=0.999)
    g.add_argument("--adam-eps", type=float, default=1e-8)
    g.add_argument("--bf16", action="store_true")
    g.add_argument("--accumulate-allreduce-grads-in-fp32", action="store_true",
                   help="accumulate and all-reduce gradients in fp32: the default with --bf16, as in Megatron-LM "
                        "(fp32 runs do it anyway)")
    g.add_argument("--grad-reduce-in-bf16", action="store_true",
                   help="--bf16: accumulate and reduce gradients in bf16 (half the gradient memory and traffic)")
    g.add_argument("--seed", type=int, default=1234)


def _add_data_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("data")
    g.add_argument("--mock-data", action="store_true", help="synthetic tokens (no files)")
    g.add_argument("--tokenizer-type", default="NullTokenizer",
                   choices=["NullTokenizer", "GPT2BPETokenizer", "HuggingFaceTokenizer"])
    g.add_argument("--vocab-size", type=int, default=None, help="NullTokenizer vocabulary size")
    g.add_argument("--vocab-file", default=None)
    g.add_argument("--merge-file", default=None)
    g.add_argument("--tokenizer-model", default=None, help="HuggingFaceTokenizer: a local directory")
    g.add_argument("--data-path", nargs="*", default=None,
                   help="indexed dataset prefixes, optionally weighted: 'PREFIX' or '0.3 PREFIX_A 0.7 PREFIX_B'")
    g.add_argument("--split", default="969,30,1", help="train,valid,test proportions of each dataset")
    g.add_argument("--data-cache-path", default=None, help="where the sample index caches go")


def _add_logging_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("logging")
    g.add_argument("--log-interval", type=int, default=100)
    g.add_argument("--log-throughput", action="store_true",
                   help="accepted for Megatron-LM scripts: the log line always shows throughput (tokens/s)")
    g.add_argument("--eval-interval", type=int, default=1000)
    g.add_argument("--eval-iters", type=int, default=100)
    g.add_argument("--tensorboard-dir", default=None, help="write TensorBoard scalars here (pip install tensorboard)")
    g.add_argument("--log-expert-load", action=argparse.BooleanOptionalAction, default=True,
                   help="per-layer tokens per expert in TensorBoard")


def _add_checkpoint_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("checkpointing")
    g.add_argument("--save", default=None, help="checkpoint directory to write")
    g.add_argument("--load", default=None, help="checkpoint directory to resume from (its latest iteration)")
    g.add_argument("--ckpt-format", choices=["torch", "torch_dist", "torch_dcp", "fsdp_dtensor"], default="torch_dist",
                   help="only torch_dist (megatron-core distributed checkpoints) is written and read")
    g.add_argument("--save-interval", type=int, default=None, help="save every N iterations (and at the end)")
    g.add_argument("--exit-signal-handler", action="store_true", help="on SIGTERM: save, then exit")
    g.add_argument("--finetune", action="store_true",
                   help="load model weights only; iteration, data position, optimizer and RNG start fresh")
    g.add_argument("--no-load-optim", action="store_true", help="do not load optimizer and scheduler state")
    g.add_argument("--no-load-rng", action="store_true", help="do not load the RNG states")
    g.add_argument("--dist-ckpt-optim-fully-reshardable", action="store_true",
                   help="make optimizer distributed checkpoint fully reshardable (TP/PP/EP/DP) as opposed to plain "
                        "DP reshardability (--use-distributed-optimizer; other optimizers always reshard fully)")
    g.add_argument("--no-check-for-nan-in-loss-and-grad", dest="check_for_nan_in_loss_and_grad",
                   action="store_false", help="do not stop on a NaN/Inf loss or grad norm")
    g.add_argument("--skip-nan-iterations", action="store_true",
                   help="on a NaN/Inf loss: skip the update and count it instead of stopping")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pretrain_gpt_moe.py", description="Pretrain a GPT mixture-of-experts model.", allow_abbrev=False
    )
    for add in (_add_model_args, _add_moe_args, _add_parallel_args, _add_recompute_args, _add_training_args,
                _add_data_args, _add_logging_args, _add_checkpoint_args):
        add(parser)
    return parser


def parse_args(argv: Optional[List[str]] = None, world_size: int = 1) -> argparse.Namespace:
    """Parses and validates; derived values (data-parallel size, defaults) are filled in."""
    args = build_parser().parse_args(argv)
    validate_args(args, world_size)
    return args


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


def moe_layer_pattern(args: argparse.Namespace) -> List[int]:
    """1 for each layer that is MoE, 0 for dense, from ``--moe-layer-freq``."""
    spec = args.moe_layer_freq.strip()
    if spec.startswith("["):
        try:
            pattern = [int(x) for x in spec.strip("[]").split(",")]
        except ValueError:
            raise ConfigError(f"--moe-layer-freq {spec!r}: expected an integer or a list like '[0,1,1,1]'")
        _require(len(pattern) == args.num_layers and set(pattern) <= {0, 1},
                 f"--moe-layer-freq list must hold {args.num_layers} entries of 0 or 1, got {spec}")
        return pattern
    _require(spec.isdigit() and int(spec) > 0, f"--moe-layer-freq must be a positive integer or a list, got {spec!r}")
    return [1 if i % int(spec) == 0 else 0 for i in range(args.num_layers)]


@functools.lru_cache(maxsize=None)
def _default_parser() -> argparse.ArgumentParser:
    return build_parser()


def reject_flags_that_do_not_apply(args: argparse.Namespace, router_type: str, reasons: Dict[str, str]) -> None:
    """For a routing scheme's ``validate``: ``reasons`` maps a flag's dest to why it does not apply to
    ``--moe-router-type router_type``; the first such flag set to anything but its default is a ConfigError."""
    for dest, why in reasons.items():
        if getattr(args, dest) != _default_parser().get_default(dest):
            raise ConfigError(f"--{dest.replace('_', '-')} does not apply to --moe-router-type {router_type}: "
                              f"{why}; remove it")


def _validate_runtime(args: argparse.Namespace) -> None:
    """Device, backend, attention kernels and the checkpoint format. Fills in --transformer-impl."""
    from megatron_moe.platform import wants_cuda

    device = "cuda" if wants_cuda(args.device) else "cpu"
    args.transformer_impl = args.transformer_impl or ("transformer_engine" if device == "cuda" else "local")
    if args.distributed_backend is not None:
        wanted = "cuda" if args.distributed_backend == "nccl" else "cpu"
        _require(device == wanted, f"--distributed-backend {args.distributed_backend} needs the {wanted} device, "
                                   f"but this run uses the {device} (--device, or no GPU visible); "
                                   f"use --distributed-backend {'nccl' if device == 'cuda' else 'gloo'} or leave it out")
    _require(args.distributed_timeout_minutes >= 1,
             f"--distributed-timeout-minutes must be >= 1, got {args.distributed_timeout_minutes}")
    te = args.transformer_impl == "transformer_engine"
    if args.use_flash_attn:
        _require(args.attention_backend in ("auto", "flash"),
                 f"--use-flash-attn means --attention-backend flash; it contradicts --attention-backend "
                 f"{args.attention_backend}")
        _require(te, "--use-flash-attn (= --attention-backend flash) needs --transformer-impl transformer_engine")
        args.attention_backend = "flash"
    if te:
        _require(args.attention_backend != "local",
                 "--attention-backend local needs --transformer-impl local (Megatron-LM: --spec local)")
    else:
        _require(args.attention_backend in ("local", "unfused", "auto"),
                 f"--attention-backend {args.attention_backend} needs --transformer-impl transformer_engine "
                 "(the local spec has megatron's unfused attention only: unfused, local or auto)")
    for flag in ("fp8_format", "moe_grouped_gemm", "moe_permute_fusion"):
        _require(te or getattr(args, flag) in (None, False),
                 f"--{flag.replace('_', '-')} needs --transformer-impl transformer_engine (Transformer Engine "
                 "kernels, CUDA only)")
    _require(args.ckpt_format == "torch_dist",
             f"--ckpt-format {args.ckpt_format}: checkpoints are megatron-core distributed checkpoints only; "
             "use --ckpt-format torch_dist or leave it out")


def _validate_data_parallel(args: argparse.Namespace) -> None:
    """Gradient reduction and parameter gathering (megatron-core DistributedDataParallelConfig)."""
    if args.overlap_param_gather:
        _require(args.use_distributed_optimizer,
                 "--overlap-param-gather needs --use-distributed-optimizer (it gathers the optimizer's shards)")
        _require(args.overlap_grad_reduce, "--overlap-param-gather needs --overlap-grad-reduce (as in Megatron-LM)")
    if args.ddp_bucket_size is not None:
        _require(args.overlap_grad_reduce,
                 "--ddp-bucket-size needs --overlap-grad-reduce (without it gradients are reduced in one bucket)")
        _require(args.ddp_bucket_size >= 1, f"--ddp-bucket-size must be >= 1, got {args.ddp_bucket_size}")
    _require(not (args.grad_reduce_in_bf16 and args.accumulate_allreduce_grads_in_fp32),
             "--grad-reduce-in-bf16 and --accumulate-allreduce-grads-in-fp32 exclude each other; give one")
    _require(args.bf16 or not args.grad_reduce_in_bf16, "--grad-reduce-in-bf16 needs --bf16")
    # Megatron-LM: fp32 accumulation and reduction is the default with --bf16; fp32 gradients are fp32 anyway.
    args.accumulate_allreduce_grads_in_fp32 = not args.grad_reduce_in_bf16


def _validate_recompute(args: argparse.Namespace) -> None:
    """Megatron-LM's activation recomputation rules; fills in the selective modules."""
    for flag in ("recompute_activations", "moe_layer_recompute"):
        if getattr(args, flag):
            _require(args.recompute_granularity != "full",
                     f"--{flag.replace('_', '-')} is selective recomputation; it contradicts --recompute-granularity full")
            args.recompute_granularity = "selective"
    layers_per_stage = args.num_layers // args.pipeline_model_parallel_size
    if args.recompute_granularity == "full":
        _require(args.recompute_method is not None,
                 "--recompute-granularity full needs --recompute-method uniform or block")
        n = args.recompute_num_layers
        _require(n is not None and 1 <= n <= layers_per_stage,
                 f"--recompute-granularity full needs --recompute-num-layers between 1 and the {layers_per_stage} "
                 f"layers of a pipeline stage, got {n}")
        _require(args.recompute_modules is None,
                 "--recompute-modules needs --recompute-granularity selective (full recomputes whole layers)")
    elif args.recompute_granularity == "selective":
        _require(args.recompute_method is None and args.recompute_num_layers is None,
                 "--recompute-method and --recompute-num-layers need --recompute-granularity full")
        modules = list(args.recompute_modules or ["core_attn"])
        if args.moe_layer_recompute and "moe" not in modules:
            modules.append("moe")
        _require("moe_act" not in modules or args.moe_grouped_gemm,
                 "--recompute-modules moe_act needs --moe-grouped-gemm (megatron-core recomputes the grouped "
                 "experts' activation only)")
        for module, missing in (("mla_up_proj", "multi-latent attention"), ("shared_experts", "shared experts")):
            _require(module not in modules, f"--recompute-modules {module} needs {missing}, which this model lacks")
        _require(args.fp8_format is None or not {"moe_act", "layernorm"} & set(modules),
                 "--recompute-modules moe_act and layernorm do not work with --fp8-format (delayed scaling)")
        # megatron-core 0.16.1's output-discarding checkpoint reads Transformer Engine's FP8 state unconditionally
        _require("layernorm" not in modules or importlib.util.find_spec("transformer_engine") is not None,
                 "--recompute-modules layernorm needs Transformer Engine installed (megatron-core's "
                 "output-discarding checkpoint uses it); recompute core_attn or moe instead")
        args.recompute_modules = modules
    else:
        for flag in ("recompute_method", "recompute_num_layers", "recompute_modules"):
            _require(getattr(args, flag) is None,
                     f"--{flag.replace('_', '-')} needs --recompute-granularity full or selective")


def _validate_router_flags(args: argparse.Namespace) -> None:
    """megatron-core's topk router options (routing schemes reject those that do not apply to them)."""
    if args.moe_z_loss_coeff is not None:
        _require(args.moe_z_loss_coeff >= 0, f"--moe-z-loss-coeff must be >= 0, got {args.moe_z_loss_coeff}")
        if args.moe_z_loss_coeff == 0:
            args.moe_z_loss_coeff = None  # off; megatron would log z-loss / 0
    factor = args.moe_expert_capacity_factor
    if factor is None:
        _require(not args.moe_pad_expert_input_to_capacity,
                 "--moe-pad-expert-input-to-capacity needs --moe-expert-capacity-factor")
        _require(args.moe_token_drop_policy == "probs",
                 "--moe-token-drop-policy needs --moe-expert-capacity-factor (without it no token is dropped)")
    else:
        _require(factor > 0, f"--moe-expert-capacity-factor must be > 0, got {factor} (unset: dropless)")
        _require(args.moe_router_load_balancing_type != "sinkhorn",
                 "--moe-expert-capacity-factor does not work with --moe-router-load-balancing-type sinkhorn "
                 "(megatron-core: aux_loss, seq_aux_loss or none)")


def validate_args(args: argparse.Namespace, world_size: int) -> None:
    """Checks the parallel layout and model shape; fills in derived values. Raises ConfigError."""
    from megatron_moe.moe.registry import ROUTING_SCHEMES

    for flag in ("num_layers", "hidden_size", "num_attention_heads", "seq_length", "micro_batch_size"):
        _require(getattr(args, flag) >= 1, f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    tp, pp, ep = args.tensor_model_parallel_size, args.pipeline_model_parallel_size, args.expert_model_parallel_size
    for name, size in (("tensor", tp), ("pipeline", pp), ("expert", ep)):
        _require(size >= 1, f"--{name}-model-parallel-size must be >= 1, got {size}")
    _require(world_size % (tp * pp) == 0,
             f"world size {world_size} is not divisible by tensor x pipeline parallel = {tp} x {pp}; "
             "change the number of processes or the parallel sizes")
    args.data_parallel_size = world_size // (tp * pp)
    _require(args.data_parallel_size % ep == 0,
             f"--expert-model-parallel-size {ep} must divide the data-parallel size {args.data_parallel_size} "
             "(world size / (tensor x pipeline)); experts are sharded across data-parallel ranks")
    _require(args.num_layers % pp == 0,
             f"--num-layers {args.num_layers} is not divisible by --pipeline-model-parallel-size {pp}")
    _require(args.hidden_size % args.num_attention_heads == 0,
             f"--hidden-size {args.hidden_size} is not divisible by --num-attention-heads {args.num_attention_heads}")
    _require(args.num_attention_heads % tp == 0,
             f"--num-attention-heads {args.num_attention_heads} is not divisible by --tensor-model-parallel-size {tp}")
    if args.num_query_groups is not None:
        _require(args.num_attention_heads % args.num_query_groups == 0 and args.num_query_groups % tp == 0,
                 f"--num-query-groups {args.num_query_groups} must divide --num-attention-heads and be "
                 f"divisible by --tensor-model-parallel-size {tp}")
    args.ffn_hidden_size = args.ffn_hidden_size or 4 * args.hidden_size
    args.max_position_embeddings = args.max_position_embeddings or args.seq_length
    _require(args.seq_length <= args.max_position_embeddings or args.position_embedding_type == "rope",
             f"--seq-length {args.seq_length} exceeds --max-position-embeddings {args.max_position_embeddings}")
    if args.sequence_parallel:
        _require(args.seq_length % tp == 0,
                 f"--seq-length {args.seq_length} is not divisible by --tensor-model-parallel-size {tp} "
                 "(sequence parallelism splits the sequence)")
    if tp == 1:
        args.sequence_parallel = False

    if args.num_experts is None:
        _require(ep == 1, "--expert-model-parallel-size > 1 needs --num-experts")
    else:
        _require(args.num_experts >= 1, f"--num-experts must be >= 1, got {args.num_experts}")
        _require(args.num_experts % ep == 0,
                 f"--num-experts {args.num_experts} is not divisible by --expert-model-parallel-size {ep}")
        _require(tp == 1 or args.sequence_parallel,
                 "MoE with --tensor-model-parallel-size > 1 needs --sequence-parallel (megatron-core requires it)")
        _require(1 <= args.moe_router_topk <= args.num_experts,
                 f"--moe-router-topk {args.moe_router_topk} must be between 1 and --num-experts {args.num_experts}")
        args.moe_ffn_hidden_size = args.moe_ffn_hidden_size or args.ffn_hidden_size
        args.moe_layer_pattern = moe_layer_pattern(args)
        _validate_router_flags(args)
        ROUTING_SCHEMES[args.moe_router_type].validate(args)

    args.global_batch_size = args.global_batch_size or args.micro_batch_size * args.data_parallel_size
    per_step = args.micro_batch_size * args.data_parallel_size
    _require(args.global_batch_size % per_step == 0,
             f"--global-batch-size {args.global_batch_size} is not divisible by micro batch x data parallel "
             f"= {args.micro_batch_size} x {args.data_parallel_size}")
    args.num_microbatches = args.global_batch_size // per_step
    _require(pp == 1 or args.num_microbatches >= 1, "pipeline parallelism needs at least one micro batch")
    decay_iters = args.lr_decay_iters or args.train_iters
    _require(args.lr_warmup_iters == 0 or args.lr_warmup_iters < decay_iters,
             f"--lr-warmup-iters {args.lr_warmup_iters} must be below the decay length {decay_iters} "
             "(--lr-decay-iters, default --train-iters); shorten the warmup or lengthen the decay")

    if args.tokenizer_type == "NullTokenizer":
        _require(args.vocab_size is not None, "--tokenizer-type NullTokenizer needs --vocab-size")
    if not args.mock_data:
        _require(args.data_path, "give --data-path PREFIX [...] or --mock-data")
    _require(not (args.mock_data and args.data_path), "--mock-data and --data-path exclude each other; give one")
    if args.tokenizer_type == "GPT2BPETokenizer":
        _require(args.vocab_file and args.merge_file, "--tokenizer-type GPT2BPETokenizer needs --vocab-file and --merge-file")
    if args.tokenizer_type == "HuggingFaceTokenizer":
        _require(args.tokenizer_model, "--tokenizer-type HuggingFaceTokenizer needs --tokenizer-model DIR")
    split = args.split.replace("/", ",").split(",")
    _require(all(x.strip().replace(".", "", 1).isdigit() for x in split) and 1 <= len(split) <= 3,
             f"--split {args.split!r}: expected up to three numbers such as 969,30,1")
    for name in ("log_interval", "eval_interval", "eval_iters", "save_interval"):
        value = getattr(args, name)
        _require(value is None or value >= 1, f"--{name.replace('_', '-')} must be >= 1, got {value}")
    _require(args.save_interval is None or args.save, "--save-interval needs --save DIR")
    _require(not args.exit_signal_handler or args.save, "--exit-signal-handler saves on SIGTERM: it needs --save DIR")
    _validate_runtime(args)
    _validate_data_parallel(args)
    _validate_recompute(args)


def padded_vocab_size(vocab_size: int, args: argparse.Namespace) -> int:
    """Megatron-LM's padding: a multiple of make-vocab-size-divisible-by x tensor-parallel size."""
    multiple = args.make_vocab_size_divisible_by * args.tensor_model_parallel_size
    return -(-vocab_size // multiple) * multiple


def transformer_config_from_args(args: argparse.Namespace):
    """The megatron-core TransformerConfig (plus our routing fields) these flags describe."""
    from megatron_moe.model import GPTMoEConfig
    from megatron_moe.moe.registry import ROUTING_SCHEMES

    moe = args.num_experts is not None
    dtype = torch.bfloat16 if args.bf16 else torch.float32
    fp8 = {}
    if args.fp8_format is not None:
        fp8 = dict(fp8=args.fp8_format, fp8_recipe="delayed")
    scheme = ROUTING_SCHEMES[args.moe_router_type] if moe else None
    moe_options = {}
    if moe:
        moe_options = dict(
            # megatron-core's top-1 softmax routing needs the softmax before the selection
            moe_router_pre_softmax=args.moe_router_pre_softmax
            or (args.moe_router_topk == 1 and args.moe_router_score_function == "softmax"),
            moe_router_score_function=args.moe_router_score_function,
            moe_router_dtype=args.moe_router_dtype,
            moe_z_loss_coeff=args.moe_z_loss_coeff,
            moe_expert_capacity_factor=args.moe_expert_capacity_factor,
            moe_token_drop_policy=args.moe_token_drop_policy,
            moe_pad_expert_input_to_capacity=args.moe_pad_expert_input_to_capacity,
            moe_grouped_gemm=args.moe_grouped_gemm,
            moe_permute_fusion=args.moe_permute_fusion,
            moe_shared_expert_intermediate_size=args.moe_shared_expert_intermediate_size,
            moe_shared_expert_gate=args.moe_shared_expert_gate,
        )
    return GPTMoEConfig(
        num_layers=args.num_layers,
        hidden_size=args.hidden_size,
        ffn_hidden_size=args.ffn_hidden_size,
        num_attention_heads=args.num_attention_heads,
        num_query_groups=args.num_query_groups,
        kv_channels=args.kv_channels,
        normalization=args.normalization,
        layernorm_epsilon=args.norm_epsilon,
        gated_linear_unit=args.swiglu,
        activation_func=F.silu if args.swiglu else F.gelu,
        add_bias_linear=not (args.disable_bias_linear or moe),
        add_qkv_bias=args.add_qkv_bias,
        hidden_dropout=args.hidden_dropout,
        attention_dropout=args.attention_dropout,
        init_method_std=args.init_method_std,
        tensor_model_parallel_size=args.tensor_model_parallel_size,
        pipeline_model_parallel_size=args.pipeline_model_parallel_size,
        expert_model_parallel_size=args.expert_model_parallel_size,
        expert_tensor_parallel_size=args.tensor_model_parallel_size,
        sequence_parallel=args.sequence_parallel,
        num_moe_experts=args.num_experts,
        moe_router_topk=args.moe_router_topk if moe else 2,
        moe_ffn_hidden_size=args.moe_ffn_hidden_size if moe else None,
        moe_layer_freq=args.moe_layer_pattern if moe else 1,
        moe_aux_loss_coeff=args.moe_aux_loss_coeff,
        moe_router_load_balancing_type=args.moe_router_load_balancing_type,
        moe_token_dispatcher_type=args.moe_token_dispatcher_type,
        moe_router_num_groups=args.moe_router_num_groups,
        moe_router_group_topk=args.moe_router_group_topk,
        moe_router_type=args.moe_router_type if moe else None,
        moe_routing_options=scheme.options_from_args(args) if scheme else None,
        bf16=args.bf16,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        autocast_dtype=dtype,
        variable_seq_lengths=moe and args.pipeline_model_parallel_size > 1,
        attention_backend=AttnBackend[args.attention_backend],
        recompute_granularity=args.recompute_granularity,
        recompute_method=args.recompute_method,
        recompute_num_layers=args.recompute_num_layers,
        recompute_modules=args.recompute_modules,
        # megatron-core initialises first because only its init routines set the tensor-parallel attributes
        # of a weight; megatron_moe.model.initialize_weights then redraws every matrix layout-independently.
        perform_initialization=True,
        use_cpu_initialization=False,
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        masked_softmax_fusion=False,
        apply_rope_fusion=False,
        gradient_accumulation_fusion=False,
        persist_layer_norm=False,
        deallocate_pipeline_outputs=True,
        **moe_options,
        **fp8,
    )
