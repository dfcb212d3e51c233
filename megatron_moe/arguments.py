"""Command line: Megatron-LM's flag names and meanings, validated into one frozen :class:`RunConfig`.

A Megatron-LM launch script should need only its script name changed. Flags we add are few:
``--device``, ``--transformer-impl``, ``--moe-router-type`` and the options of each routing scheme
(``megatron_moe.moe.scheme_flags``).

:func:`parse_args` returns a :class:`RunConfig`: a frozen dataclass with one field per parser destination
(generated from the parser, so a new flag is a field by construction) plus the derived run values declared
in :data:`DERIVED`. Validation never mutates the parsed namespace: each ``_validate_*`` step checks the
config so far and returns the values it fills in (defaults that depend on other flags, derived sizes).
Every invalid combination is one :class:`ConfigError` line naming the offender and the fix.

This module imports neither megatron-core nor the routing schemes' models (nor torch, until the last
checks need the device), so argument errors appear before the seconds those imports take.

What a checkpoint's config means for ``--load`` and export is a category per argument group (a field's
``metadata["category"]``):

- :data:`ARCHITECTURE`: fixes the shapes and meaning of the saved tensors; ``--load`` refuses a difference;
- :data:`MODEL`: what the model computes besides that (router options, epsilons, dropout); export rebuilds it;
- :data:`TOKENIZER`: the tokenizer; export rebuilds it;
- :data:`RUN`: how this run trains, is laid out, logs and saves.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import importlib.util
from typing import Any, Dict, FrozenSet, Iterable, List, Optional, Tuple

from megatron_moe.errors import ConfigError  # re-exported: `from megatron_moe.arguments import ConfigError`
from megatron_moe.moe.scheme_flags import SCHEME_FLAGS

ARCHITECTURE, MODEL, TOKENIZER, RUN = "architecture", "model", "tokenizer", "run"
# megatron-core's AttnBackend names (tests/test_arguments.py checks them against megatron-core)
ATTENTION_BACKENDS = ("flash", "fused", "unfused", "local", "auto")


def _group(p: argparse.ArgumentParser, title: str, category: str) -> argparse._ArgumentGroup:
    """An argument group whose flags all have ``category`` (see the module docstring)."""
    group = p.add_argument_group(title)
    group.category = category
    return group


def _add_model_args(p: argparse.ArgumentParser) -> None:
    g = _group(p, "model", ARCHITECTURE)
    g.add_argument("--num-layers", type=int, required=True)
    g.add_argument("--hidden-size", type=int, required=True)
    g.add_argument("--ffn-hidden-size", type=int, default=None, help="default: 4 x hidden size")
    g.add_argument("--num-attention-heads", type=int, required=True)
    g.add_argument("--num-query-groups", type=int, default=None, help="grouped-query attention")
    g.add_argument("--kv-channels", type=int, default=None)
    g.add_argument("--max-position-embeddings", type=int, default=None)
    g.add_argument("--normalization", choices=["LayerNorm", "RMSNorm"], default="LayerNorm")
    g.add_argument("--norm-epsilon", type=float, default=1e-5)
    g.add_argument("--swiglu", action="store_true")
    g.add_argument("--position-embedding-type", choices=["learned_absolute", "rope"], default="learned_absolute")
    g.add_argument("--rotary-base", type=int, default=10000)
    g.add_argument("--rotary-percent", type=float, default=1.0)
    g.add_argument("--untie-embeddings-and-output-weights", action="store_true")
    g.add_argument("--disable-bias-linear", action="store_true")
    g.add_argument("--add-qkv-bias", action="store_true",
                   help="biases on the query/key/value projection only (Qwen2's attention), also in MoE models")

    g = _group(p, "model: sequence, vocabulary, initialisation, dropout", MODEL)
    g.add_argument("--seq-length", type=int, required=True)
    g.add_argument("--make-vocab-size-divisible-by", type=int, default=128,
                   help="pad the vocabulary to a multiple of this x tensor-parallel size (the padded rows are "
                        "masked out of the softmax; a checkpoint keeps its padding when it is loaded)")
    g.add_argument("--init-method-std", type=float, default=0.02)
    g.add_argument("--hidden-dropout", type=float, default=0.1)
    g.add_argument("--attention-dropout", type=float, default=0.1)

    g = _group(p, "model: kernels", RUN)
    g.add_argument("--transformer-impl", choices=["local", "transformer_engine"], default=None,
                   help="default: transformer_engine on CUDA, local on CPU")
    g.add_argument("--fp8-format", choices=["e4m3", "hybrid"], default=None,
                   help="FP8 GEMMs through Transformer Engine (needs --transformer-impl transformer_engine)")
    g.add_argument("--attention-backend", choices=ATTENTION_BACKENDS, default="auto",
                   help="megatron-core AttnBackend: flash/fused/unfused pick Transformer Engine's kernel; the local "
                        "spec has only megatron's unfused attention (unfused, local or auto)")
    g.add_argument("--use-flash-attn", action="store_true",
                   help="deprecated in Megatron-LM: same as --attention-backend flash (Transformer Engine only)")


def _add_moe_args(p: argparse.ArgumentParser) -> None:
    g = _group(p, "mixture of experts", ARCHITECTURE)
    g.add_argument("--num-experts", type=int, default=None, help="experts per MoE layer (unset: dense)")
    g.add_argument("--moe-ffn-hidden-size", type=int, default=None, help="default: --ffn-hidden-size")
    g.add_argument("--moe-router-type", choices=sorted(SCHEME_FLAGS), default="topk",
                   help="topk: megatron's router and dispatcher; base: balanced assignment; sam: switch and mixture")
    g.add_argument("--moe-shared-expert-intermediate-size", type=int, default=None,
                   help="width of a shared expert every token also passes through (Qwen2-MoE; default: none)")
    g.add_argument("--moe-shared-expert-gate", action="store_true",
                   help="scale the shared expert's output by sigmoid(h . g), a learned g (Qwen2-MoE's shared_expert_gate)")

    g = _group(p, "mixture of experts: routing", MODEL)
    g.add_argument("--moe-router-topk", type=int, default=2)
    g.add_argument("--moe-layer-freq", type=str, default="1",
                   help="N: MoE every N-th layer; or a Python list such as '[0,1,1,1]' (1 = MoE)")
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
    for scheme in SCHEME_FLAGS.values():
        if scheme.add_arguments is not None:
            scheme.add_arguments(g)

    g = _group(p, "mixture of experts: kernels", RUN)
    g.add_argument("--moe-grouped-gemm", action="store_true",
                   help="all local experts in one grouped GEMM (Transformer Engine's TEGroupedMLP; "
                        "needs --transformer-impl transformer_engine)")
    g.add_argument("--moe-permute-fusion", action="store_true",
                   help="fused token permutation in megatron's dispatchers (Transformer Engine kernels; "
                        "topk and base)")
    g.add_argument("--moe-router-padding-for-fp8", action="store_true",
                   help="topk with --fp8-format: pad the routing map so that every expert gets a multiple of 16 "
                        "tokens (gate 0), sparing the experts' own FP8 padding (Megatron-LM's flag; the BASE and "
                        "SAM dispatchers always align under --fp8-format)")


def _add_parallel_args(p: argparse.ArgumentParser) -> None:
    g = _group(p, "parallelism", RUN)
    g.add_argument("--tensor-model-parallel-size", type=int, default=1)
    g.add_argument("--pipeline-model-parallel-size", type=int, default=1)
    g.add_argument("--expert-model-parallel-size", type=int, default=1)
    g.add_argument("--sequence-parallel", action="store_true")
    g.add_argument("--use-distributed-optimizer", action="store_true")
    g.add_argument("--device", choices=["cpu", "cuda"], default=None, help="default: cuda if a GPU is visible")
    g.add_argument("--distributed-backend", choices=["nccl", "gloo"], default=None,
                   help="default: nccl on CUDA, gloo on CPU; must agree with the device")
    g.add_argument("--distributed-timeout-minutes", type=float, default=10,
                   help="timeout of every torch.distributed collective, in every process group: a frozen or dead "
                        "rank ends the job after this long (minutes as in Megatron-LM; fractions accepted)")
    g.add_argument("--overlap-grad-reduce", action="store_true",
                   help="data-parallel gradient reduction in buckets, launched during the backward pass")
    g.add_argument("--overlap-param-gather", action="store_true",
                   help="distributed optimizer: all-gather updated parameters bucket by bucket during the next "
                        "forward pass (needs --use-distributed-optimizer and --overlap-grad-reduce)")
    g.add_argument("--ddp-bucket-size", type=int, default=None,
                   help="parameters per gradient-reduction bucket with --overlap-grad-reduce "
                        "(default: max(40M, 1M x data-parallel size))")


def _add_recompute_args(p: argparse.ArgumentParser) -> None:
    g = _group(p, "activation recomputation", RUN)
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
    g = _group(p, "training", RUN)
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
    g.add_argument("--exit-interval", type=int, default=None,
                   help="save (with --save) and exit after an iteration divisible by N")
    g.add_argument("--exit-duration-in-mins", type=float, default=None,
                   help="save (with --save) and exit 0 once the job has run this long (every rank agrees)")


def _add_data_args(p: argparse.ArgumentParser) -> None:
    g = _group(p, "tokenizer", TOKENIZER)
    g.add_argument("--tokenizer-type", default="NullTokenizer",
                   choices=["NullTokenizer", "GPT2BPETokenizer", "HuggingFaceTokenizer"])
    g.add_argument("--vocab-size", type=int, default=None, help="NullTokenizer vocabulary size")
    g.add_argument("--vocab-file", default=None)
    g.add_argument("--merge-file", default=None)
    g.add_argument("--tokenizer-model", default=None, help="HuggingFaceTokenizer: a local directory")

    g = _group(p, "data", RUN)
    g.add_argument("--mock-data", action="store_true", help="synthetic tokens (no files)")
    g.add_argument("--data-path", nargs="*", default=None,
                   help="indexed dataset prefixes, optionally weighted: 'PREFIX' or '0.3 PREFIX_A 0.7 PREFIX_B'")
    g.add_argument("--split", default="969,30,1", help="train,valid,test proportions of each dataset")
    g.add_argument("--data-cache-path", default=None, help="where the sample index caches go")


def _add_logging_args(p: argparse.ArgumentParser) -> None:
    g = _group(p, "logging", RUN)
    g.add_argument("--log-interval", type=int, default=100)
    g.add_argument("--log-throughput", action="store_true",
                   help="accepted for Megatron-LM scripts: the log line always shows throughput (tokens/s)")
    g.add_argument("--eval-interval", type=int, default=1000)
    g.add_argument("--eval-iters", type=int, default=100, help="0: no validation (as in Megatron-LM)")
    g.add_argument("--tensorboard-dir", default=None, help="write TensorBoard scalars here (pip install tensorboard)")
    g.add_argument("--log-expert-load", action=argparse.BooleanOptionalAction, default=True,
                   help="per-layer tokens per expert in TensorBoard")


def _add_checkpoint_args(p: argparse.ArgumentParser) -> None:
    g = _group(p, "checkpointing", RUN)
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
    g.add_argument("--max-consecutive-skipped-iterations", type=int, default=10,
                   help="--skip-nan-iterations: stop (status 1, no save) after this many skipped updates in a row")
    g.add_argument("--max-skipped-iterations", type=int, default=100,
                   help="--skip-nan-iterations: stop (status 1, no save) after this many skipped updates in one launch")
    g.add_argument("--no-verify-checkpoint", dest="verify_checkpoint", action="store_false",
                   help="load without checking the checkpoint's file digests (manifest.json)")
    g.add_argument("--override-opt_param-scheduler", action="store_true",
                   help="on --load: the LR schedule follows these flags where it differs from the checkpoint's")
    g.add_argument("--use-checkpoint-opt_param-scheduler", action="store_true",
                   help="on --load: the LR schedule follows the checkpoint where it differs from these flags")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pretrain_gpt_moe.py", description="Pretrain a GPT mixture-of-experts model.", allow_abbrev=False
    )
    for add in (_add_model_args, _add_moe_args, _add_parallel_args, _add_recompute_args, _add_training_args,
                _add_data_args, _add_logging_args, _add_checkpoint_args):
        add(parser)
    return parser


@functools.lru_cache(maxsize=None)
def _default_parser() -> argparse.ArgumentParser:
    return build_parser()


# ----------------------------------------------------------------------------------------------------------
# the run config
# ----------------------------------------------------------------------------------------------------------

# Derived run values (not flags): name -> (category, type). Validation fills in the first three, setup the
# vocabulary once the tokenizer is built (the padded size is the checkpoint's on --load).
DERIVED: Dict[str, Tuple[str, Any]] = {
    "world_size": (RUN, Optional[int]),
    "data_parallel_size": (RUN, Optional[int]),
    "num_microbatches": (RUN, Optional[int]),
    "moe_layer_pattern": (ARCHITECTURE, Optional[Tuple[int, ...]]),  # 1 per MoE layer, 0 per dense one
    "tokenizer_vocab_size": (ARCHITECTURE, Optional[int]),
    "padded_vocab_size": (RUN, Optional[int]),
}


def _frozen(value):
    """Lists (nargs flags, JSON arrays) as tuples, so that a RunConfig cannot change."""
    return tuple(_frozen(v) for v in value) if isinstance(value, (list, tuple)) else value


def _field_type(action: argparse.Action):
    if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction, argparse.BooleanOptionalAction)):
        return bool
    kind = action.type or str
    return Optional[Tuple[kind, ...]] if action.nargs in ("*", "+") else Optional[kind]


def _flag_actions(parser: argparse.ArgumentParser) -> Dict[str, Tuple[argparse.Action, str]]:
    """dest -> (action, category of its group) for every flag."""
    return {action.dest: (action, group.category) for group in parser._action_groups
            if hasattr(group, "category") for action in group._group_actions}


class _RunConfigMethods:
    """What every RunConfig can do; its fields are generated from the parser below."""

    def replace(self, **changes) -> "RunConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> Dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    @classmethod
    def names(cls, categories: Iterable[str]) -> FrozenSet[str]:
        """The fields of these categories."""
        wanted = set(categories)
        return frozenset(f.name for f in dataclasses.fields(cls) if f.metadata["category"] in wanted)

    def flags(self, categories: Iterable[str]) -> List[str]:
        """The command line that gives these categories' flags their values here (defaults left out)."""
        names, argv = self.names(categories), []
        for action, _ in _flag_actions(_default_parser()).values():
            value = getattr(self, action.dest)
            if action.dest not in names or value == _frozen(action.default):
                continue
            flag = action.option_strings[0]
            if isinstance(action, argparse.BooleanOptionalAction):
                argv.append(flag if value else f"--no-{flag[2:]}")
            elif isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
                argv.append(flag)
            elif action.nargs in ("*", "+"):
                argv += [flag, *map(str, value)]
            else:
                argv += [flag, str(value)]
        return argv

    def __post_init__(self):
        for f in dataclasses.fields(self):
            object.__setattr__(self, f.name, _frozen(getattr(self, f.name)))


def _run_config_class(parser: argparse.ArgumentParser) -> type:
    fields = [(dest, _field_type(action), dataclasses.field(default=_frozen(action.default),
                                                            metadata={"category": category}))
              for dest, (action, category) in _flag_actions(parser).items()]
    fields += [(name, kind, dataclasses.field(default=None, metadata={"category": category}))
               for name, (category, kind) in DERIVED.items()]
    return dataclasses.make_dataclass("RunConfig", fields, bases=(_RunConfigMethods,), frozen=True,
                                      namespace={"__module__": __name__})


RunConfig = _run_config_class(_default_parser())
RunConfig.__doc__ = """One run's whole configuration, validated: every flag (its parser destination, derived defaults
filled in) and the DERIVED run values. Frozen; ``replace(**changes)`` gives a changed copy. A checkpoint saves
it whole as run_config.json; ``megatron_moe.run_config.load(iter_dir)`` reads it back."""


def parse_args(argv: Optional[List[str]] = None, world_size: int = 1) -> RunConfig:
    """Parses and validates: the run's RunConfig. Raises ConfigError (argparse itself exits 2 on a bad flag)."""
    return validate_args(build_parser().parse_args(argv), world_size)


def validate_args(args: argparse.Namespace, world_size: int) -> RunConfig:
    """The RunConfig these parsed flags describe on ``world_size`` processes; ``args`` is left as parsed."""
    config = RunConfig(**vars(args), world_size=world_size)
    for step in (_validate_ranges, _validate_layout, _validate_model, _validate_moe, _validate_batch,
                 _validate_lr_schedule, _validate_data, _validate_logging_and_checkpoints, _validate_data_parallel,
                 _validate_recompute, _validate_runtime):
        filled = step(config)
        if filled:
            config = config.replace(**filled)
    return config


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


def _flag(dest: str) -> str:
    return f"--{dest.replace('_', '-')}"


def moe_layer_pattern(args) -> List[int]:
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


def padded_vocab_size(vocab_size: int, args) -> int:
    """Megatron-LM's padding: a multiple of make-vocab-size-divisible-by x tensor-parallel size."""
    multiple = args.make_vocab_size_divisible_by * args.tensor_model_parallel_size
    return -(-vocab_size // multiple) * multiple


# ----------------------------------------------------------------------------------------------------------
# validation: each step checks the config so far and returns the values it fills in
# ----------------------------------------------------------------------------------------------------------

# flag dest -> smallest valid value (an unset optional flag is not checked)
_AT_LEAST = {
    "num_layers": 1, "hidden_size": 1, "ffn_hidden_size": 1, "num_attention_heads": 1, "num_query_groups": 1,
    "kv_channels": 1, "seq_length": 1, "max_position_embeddings": 1, "make_vocab_size_divisible_by": 1,
    "rotary_base": 1, "norm_epsilon": 0, "init_method_std": 0,
    "num_experts": 1, "moe_ffn_hidden_size": 1, "moe_router_num_groups": 1, "moe_router_group_topk": 1,
    "moe_aux_loss_coeff": 0,
    "tensor_model_parallel_size": 1, "pipeline_model_parallel_size": 1, "expert_model_parallel_size": 1,
    "exit_interval": 1, "max_consecutive_skipped_iterations": 1, "max_skipped_iterations": 1,
    "micro_batch_size": 1, "global_batch_size": 1, "train_iters": 1, "lr": 0, "min_lr": 0, "lr_warmup_iters": 0,
    "lr_decay_iters": 1, "weight_decay": 0, "clip_grad": 0, "adam_eps": 0, "vocab_size": 1,
    "log_interval": 1, "eval_interval": 1, "eval_iters": 0, "save_interval": 1,
}
# flag dest -> (low, high, whether high itself is valid)
_BETWEEN = {
    "hidden_dropout": (0.0, 1.0, True), "attention_dropout": (0.0, 1.0, True),
    "adam_beta1": (0.0, 1.0, False), "adam_beta2": (0.0, 1.0, False), "rotary_percent": (0.0, 1.0, True),
}


def _validate_ranges(c: RunConfig) -> None:
    """Every number within its range (issue: a bad value otherwise surfaces as a traceback much later)."""
    for dest, low in _AT_LEAST.items():
        value = getattr(c, dest)
        _require(value is None or value >= low, f"{_flag(dest)} must be >= {low}, got {value}")
    for dest, (low, high, high_valid) in _BETWEEN.items():
        value = getattr(c, dest)
        _require(low <= value <= high and (high_valid or value < high),
                 f"{_flag(dest)} must be in [{low}, {high}{']' if high_valid else ')'}, got {value}")
    for dest in ("rotary_percent", "distributed_timeout_minutes", "exit_duration_in_mins"):
        value = getattr(c, dest)
        _require(value is None or value > 0, f"{_flag(dest)} must be > 0, got {value}")


def _validate_layout(c: RunConfig) -> Dict[str, Any]:
    """The parallel layout on this many processes; fills in the data-parallel size."""
    tp, pp, ep = c.tensor_model_parallel_size, c.pipeline_model_parallel_size, c.expert_model_parallel_size
    _require(c.world_size % (tp * pp) == 0,
             f"world size {c.world_size} is not divisible by tensor x pipeline parallel = {tp} x {pp}; "
             "change the number of processes or the parallel sizes")
    data_parallel_size = c.world_size // (tp * pp)
    _require(data_parallel_size % ep == 0,
             f"--expert-model-parallel-size {ep} must divide the data-parallel size {data_parallel_size} "
             "(world size / (tensor x pipeline)); experts are sharded across data-parallel ranks")
    _require(c.num_layers % pp == 0,
             f"--num-layers {c.num_layers} is not divisible by --pipeline-model-parallel-size {pp}")
    _require(c.num_attention_heads % tp == 0,
             f"--num-attention-heads {c.num_attention_heads} is not divisible by --tensor-model-parallel-size {tp}")
    if c.sequence_parallel and tp > 1:
        _require(c.seq_length % tp == 0,
                 f"--seq-length {c.seq_length} is not divisible by --tensor-model-parallel-size {tp} "
                 "(sequence parallelism splits the sequence)")
    return {"data_parallel_size": data_parallel_size, "sequence_parallel": c.sequence_parallel and tp > 1}


def _validate_model(c: RunConfig) -> Dict[str, Any]:
    """The model's shape; fills in --ffn-hidden-size and --max-position-embeddings."""
    tp = c.tensor_model_parallel_size
    _require(c.hidden_size % c.num_attention_heads == 0,
             f"--hidden-size {c.hidden_size} is not divisible by --num-attention-heads {c.num_attention_heads}")
    if c.num_query_groups is not None:
        _require(c.num_attention_heads % c.num_query_groups == 0 and c.num_query_groups % tp == 0,
                 f"--num-query-groups {c.num_query_groups} must divide --num-attention-heads and be "
                 f"divisible by --tensor-model-parallel-size {tp}")
    max_positions = c.max_position_embeddings or c.seq_length
    _require(c.seq_length <= max_positions or c.position_embedding_type == "rope",
             f"--seq-length {c.seq_length} exceeds --max-position-embeddings {max_positions}")
    return {"ffn_hidden_size": c.ffn_hidden_size or 4 * c.hidden_size, "max_position_embeddings": max_positions}


def _validate_moe(c: RunConfig) -> Optional[Dict[str, Any]]:
    """Experts, router and routing scheme; fills in --moe-ffn-hidden-size and the MoE layer pattern."""
    ep = c.expert_model_parallel_size
    if c.num_experts is None:
        _require(ep == 1, "--expert-model-parallel-size > 1 needs --num-experts")
        return None
    _require(c.num_experts % ep == 0,
             f"--num-experts {c.num_experts} is not divisible by --expert-model-parallel-size {ep}")
    _require(c.tensor_model_parallel_size == 1 or c.sequence_parallel,
             "MoE with --tensor-model-parallel-size > 1 needs --sequence-parallel (megatron-core requires it)")
    _require(1 <= c.moe_router_topk <= c.num_experts,
             f"--moe-router-topk {c.moe_router_topk} must be between 1 and --num-experts {c.num_experts}")
    filled = {"moe_ffn_hidden_size": c.moe_ffn_hidden_size or c.ffn_hidden_size,
              "moe_layer_pattern": moe_layer_pattern(c), **_validate_router_flags(c)}
    scheme = SCHEME_FLAGS[c.moe_router_type]
    filled.update(scheme.validate(c) or {})
    for dest, why in scheme.inapplicable.items():
        _require(getattr(c, dest) == _default_parser().get_default(dest),
                 f"{_flag(dest)} does not apply to --moe-router-type {scheme.name}: {why}; remove it")
    return filled


def _validate_router_flags(c: RunConfig) -> Dict[str, Any]:
    """megatron-core's topk router options (routing schemes reject those that do not apply to them)."""
    filled = {}
    if c.moe_z_loss_coeff is not None:
        _require(c.moe_z_loss_coeff >= 0, f"--moe-z-loss-coeff must be >= 0, got {c.moe_z_loss_coeff}")
        if c.moe_z_loss_coeff == 0:
            filled["moe_z_loss_coeff"] = None  # off; megatron would log z-loss / 0
    if c.moe_router_padding_for_fp8:
        _require(c.fp8_format is not None, "--moe-router-padding-for-fp8 pads for FP8 GEMMs: it needs --fp8-format")
        _require(c.moe_token_dispatcher_type == "alltoall",
                 "--moe-router-padding-for-fp8 needs --moe-token-dispatcher-type alltoall (megatron-core's "
                 "allgather dispatcher cannot pad)")
    factor = c.moe_expert_capacity_factor
    if factor is None:
        _require(not c.moe_pad_expert_input_to_capacity,
                 "--moe-pad-expert-input-to-capacity needs --moe-expert-capacity-factor")
        _require(c.moe_token_drop_policy == "probs",
                 "--moe-token-drop-policy needs --moe-expert-capacity-factor (without it no token is dropped)")
    else:
        _require(factor > 0, f"--moe-expert-capacity-factor must be > 0, got {factor} (unset: dropless)")
        _require(c.moe_router_load_balancing_type != "sinkhorn",
                 "--moe-expert-capacity-factor does not work with --moe-router-load-balancing-type sinkhorn "
                 "(megatron-core: aux_loss, seq_aux_loss or none)")
    return filled


def _validate_batch(c: RunConfig) -> Dict[str, Any]:
    """Micro and global batches; fills in --global-batch-size and the number of micro batches."""
    per_step = c.micro_batch_size * c.data_parallel_size
    global_batch_size = c.global_batch_size or per_step
    _require(global_batch_size % per_step == 0,
             f"--global-batch-size {global_batch_size} is not divisible by micro batch x data parallel "
             f"= {c.micro_batch_size} x {c.data_parallel_size}")
    return {"global_batch_size": global_batch_size, "num_microbatches": global_batch_size // per_step}


def _validate_lr_schedule(c: RunConfig) -> None:
    _require(c.min_lr <= c.lr, f"--min-lr {c.min_lr} exceeds --lr {c.lr}; lower --min-lr or raise --lr")
    decay_iters = c.lr_decay_iters or c.train_iters
    _require(c.lr_warmup_iters == 0 or c.lr_warmup_iters < decay_iters,
             f"--lr-warmup-iters {c.lr_warmup_iters} must be below the decay length {decay_iters} "
             "(--lr-decay-iters, default --train-iters); shorten the warmup or lengthen the decay")
    _require(not (c.override_opt_param_scheduler and c.use_checkpoint_opt_param_scheduler),
             "--override-opt_param-scheduler and --use-checkpoint-opt_param-scheduler exclude each other; give one")


def _validate_data(c: RunConfig) -> None:
    if c.tokenizer_type == "NullTokenizer":
        _require(c.vocab_size is not None, "--tokenizer-type NullTokenizer needs --vocab-size")
    if not c.mock_data:
        _require(c.data_path, "give --data-path PREFIX [...] or --mock-data")
    _require(not (c.mock_data and c.data_path), "--mock-data and --data-path exclude each other; give one")
    if c.tokenizer_type == "GPT2BPETokenizer":
        _require(c.vocab_file and c.merge_file, "--tokenizer-type GPT2BPETokenizer needs --vocab-file and --merge-file")
    if c.tokenizer_type == "HuggingFaceTokenizer":
        _require(c.tokenizer_model, "--tokenizer-type HuggingFaceTokenizer needs --tokenizer-model DIR")
    split = c.split.replace("/", ",").split(",")
    _require(all(x.strip().replace(".", "", 1).isdigit() for x in split) and 1 <= len(split) <= 3,
             f"--split {c.split!r}: expected up to three numbers such as 969,30,1")


def _validate_logging_and_checkpoints(c: RunConfig) -> None:
    _require(c.save_interval is None or c.save, "--save-interval needs --save DIR")
    _require(not c.exit_signal_handler or c.save, "--exit-signal-handler saves on SIGTERM: it needs --save DIR")


def _validate_runtime(c: RunConfig) -> Dict[str, Any]:
    """Device, backend, attention kernels and the checkpoint format. Fills in --transformer-impl and, for
    --use-flash-attn, --attention-backend."""
    # the device rule needs torch: imported only here, so the cheaper checks come seconds earlier
    from megatron_moe.platform import wants_cuda

    device = "cuda" if wants_cuda(c.device) else "cpu"
    transformer_impl = c.transformer_impl or ("transformer_engine" if device == "cuda" else "local")
    if c.distributed_backend is not None:
        wanted = "cuda" if c.distributed_backend == "nccl" else "cpu"
        _require(device == wanted, f"--distributed-backend {c.distributed_backend} needs the {wanted} device, "
                                   f"but this run uses the {device} (--device, or no GPU visible); "
                                   f"use --distributed-backend {'nccl' if device == 'cuda' else 'gloo'} or leave it out")
    te = transformer_impl == "transformer_engine"
    attention_backend = c.attention_backend
    if c.use_flash_attn:
        _require(attention_backend in ("auto", "flash"),
                 f"--use-flash-attn means --attention-backend flash; it contradicts --attention-backend "
                 f"{attention_backend}")
        _require(te, "--use-flash-attn (= --attention-backend flash) needs --transformer-impl transformer_engine")
        attention_backend = "flash"
    if te:
        _require(attention_backend != "local",
                 "--attention-backend local needs --transformer-impl local (Megatron-LM: --spec local)")
    else:
        _require(attention_backend in ("local", "unfused", "auto"),
                 f"--attention-backend {attention_backend} needs --transformer-impl transformer_engine "
                 "(the local spec has megatron's unfused attention only: unfused, local or auto)")
    for flag in ("fp8_format", "moe_grouped_gemm", "moe_permute_fusion"):
        _require(te or getattr(c, flag) in (None, False),
                 f"{_flag(flag)} needs --transformer-impl transformer_engine (Transformer Engine "
                 "kernels, CUDA only)")
    _require(c.ckpt_format == "torch_dist",
             f"--ckpt-format {c.ckpt_format}: checkpoints are megatron-core distributed checkpoints only; "
             "use --ckpt-format torch_dist or leave it out")
    return {"transformer_impl": transformer_impl, "attention_backend": attention_backend}


def _validate_data_parallel(c: RunConfig) -> Dict[str, Any]:
    """Gradient reduction and parameter gathering (megatron-core DistributedDataParallelConfig)."""
    if c.overlap_param_gather:
        _require(c.use_distributed_optimizer,
                 "--overlap-param-gather needs --use-distributed-optimizer (it gathers the optimizer's shards)")
        _require(c.overlap_grad_reduce, "--overlap-param-gather needs --overlap-grad-reduce (as in Megatron-LM)")
    if c.ddp_bucket_size is not None:
        _require(c.overlap_grad_reduce,
                 "--ddp-bucket-size needs --overlap-grad-reduce (without it gradients are reduced in one bucket)")
        _require(c.ddp_bucket_size >= 1, f"--ddp-bucket-size must be >= 1, got {c.ddp_bucket_size}")
    _require(not (c.grad_reduce_in_bf16 and c.accumulate_allreduce_grads_in_fp32),
             "--grad-reduce-in-bf16 and --accumulate-allreduce-grads-in-fp32 exclude each other; give one")
    _require(c.bf16 or not c.grad_reduce_in_bf16, "--grad-reduce-in-bf16 needs --bf16")
    # Megatron-LM: fp32 accumulation and reduction is the default with --bf16; fp32 gradients are fp32 anyway.
    return {"accumulate_allreduce_grads_in_fp32": not c.grad_reduce_in_bf16}


def _validate_recompute(c: RunConfig) -> Optional[Dict[str, Any]]:
    """Megatron-LM's activation recomputation rules; fills in the granularity and the selective modules."""
    granularity = c.recompute_granularity
    for flag in ("recompute_activations", "moe_layer_recompute"):
        if getattr(c, flag):
            _require(granularity != "full",
                     f"{_flag(flag)} is selective recomputation; it contradicts --recompute-granularity full")
            granularity = "selective"
    layers_per_stage = c.num_layers // c.pipeline_model_parallel_size
    if granularity == "full":
        _require(c.recompute_method is not None,
                 "--recompute-granularity full needs --recompute-method uniform or block")
        n = c.recompute_num_layers
        _require(n is not None and 1 <= n <= layers_per_stage,
                 f"--recompute-granularity full needs --recompute-num-layers between 1 and the {layers_per_stage} "
                 f"layers of a pipeline stage, got {n}")
        _require(c.recompute_modules is None,
                 "--recompute-modules needs --recompute-granularity selective (full recomputes whole layers)")
        return None
    if granularity == "selective":
        _require(c.recompute_method is None and c.recompute_num_layers is None,
                 "--recompute-method and --recompute-num-layers need --recompute-granularity full")
        modules = list(c.recompute_modules or ["core_attn"])
        if c.moe_layer_recompute and "moe" not in modules:
            modules.append("moe")
        _require("moe_act" not in modules or c.moe_grouped_gemm,
                 "--recompute-modules moe_act needs --moe-grouped-gemm (megatron-core recomputes the grouped "
                 "experts' activation only)")
        for module, missing in (("mla_up_proj", "multi-latent attention"), ("shared_experts", "shared experts")):
            _require(module not in modules, f"--recompute-modules {module} needs {missing}, which this model lacks")
        _require(c.fp8_format is None or not {"moe_act", "layernorm"} & set(modules),
                 "--recompute-modules moe_act and layernorm do not work with --fp8-format (delayed scaling)")
        # megatron-core 0.16.1's output-discarding checkpoint reads Transformer Engine's FP8 state unconditionally
        _require("layernorm" not in modules or importlib.util.find_spec("transformer_engine") is not None,
                 "--recompute-modules layernorm needs Transformer Engine installed (megatron-core's "
                 "output-discarding checkpoint uses it); recompute core_attn or moe instead")
        return {"recompute_granularity": granularity, "recompute_modules": modules}
    for flag in ("recompute_method", "recompute_num_layers", "recompute_modules"):
        _require(getattr(c, flag) is None, f"{_flag(flag)} needs --recompute-granularity full or selective")
    return None
