"""Our checkpoint's tensors <-> Hugging Face transformers' MoE classes: which class, which names, which layout.

What a model computes is decided from its run configuration alone, before any weight is read:
:func:`check_exportable` refuses the architectures no exported class computes (naming the flag), and
the routing scheme's own export hook (``SchemeFlags.export``, beside its flags) either names the
class and config fields that reproduce its routing in evaluation mode or refuses. A scheme without a
hook is refused, so a new scheme cannot be exported by accident. The classes:

* ``MixtralForCausalLM``: every layer MoE, softmax over the top-k logits (= Mixtral's renormalised top k).
* ``Qwen2MoeForCausalLM``: dense layers in the mix (``mlp_only_layers``), or the softmax taken before the
  top-k selection (``--moe-router-pre-softmax``, top-1, sinkhorn's evaluation with k > 1:
  ``norm_topk_prob=False``), or a gated shared expert (``--moe-shared-expert-intermediate-size`` with
  ``--moe-shared-expert-gate``) or QKV biases (``--add-qkv-bias``). Without a shared expert of ours its
  shared expert is given zero width, so it adds exactly zero.
* ``MegatronMoeForCausalLM``: our modeling code (``remote_code/``, copied into the folder, loaded with
  ``trust_remote_code=True``): Qwen2-MoE with our MoE block for BASE, SAM and the top-k variants no
  transformers class has (sigmoid scores, group-limited top-k).

Tensors are mapped in :class:`Unit` s: one tensor of our checkpoint (or one expert's slice of it) <-> one
or a few Hugging Face tensors, with the transform both ways (fused QKV, fused gate/up, padded vocabulary).
Both directions use the same units, and nothing here imports transformers.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from megatron_moe.moe.scheme_flags import SCHEME_FLAGS

MIXTRAL = "MixtralForCausalLM"
QWEN2_MOE = "Qwen2MoeForCausalLM"
REMOTE = "MegatronMoeForCausalLM"  # our modeling code, shipped in the folder
REMOTE_CODE_DIR = Path(__file__).resolve().parent / "remote_code"
REMOTE_AUTO_MAP = {"AutoConfig": "configuration_megatron_moe.MegatronMoeConfig",
                   "AutoModelForCausalLM": "modeling_megatron_moe.MegatronMoeForCausalLM"}
# config.json of our remote-code folders: the routing flags that rebuild the model on import
REMOTE_FLAGS = "megatron_moe_flags"

# (block holding the router and experts, gate, up, down) of each class's per-expert checkpoint layout
_EXPERT_NAMES = {MIXTRAL: ("block_sparse_moe", "w1", "w3", "w2"), QWEN2_MOE: ("mlp", "gate_proj", "up_proj", "down_proj"),
                 REMOTE: ("mlp", "gate_proj", "up_proj", "down_proj")}
_MODEL_TYPES = {MIXTRAL: "mixtral", QWEN2_MOE: "qwen2_moe", REMOTE: "megatron_moe"}
TORCH_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


class ConversionError(ValueError):
    """A checkpoint or config that cannot be converted: printed as one line naming the field."""


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ConversionError(message)


# ----------------------------------------------------------------------------------------------------------
# which class computes the model (decided from the run configuration, before any weight is read)
# ----------------------------------------------------------------------------------------------------------

def head_dim(args) -> int:
    return args.kv_channels or args.hidden_size // args.num_attention_heads


def query_groups(args) -> int:
    return args.num_query_groups if args.group_query_attention else args.num_attention_heads


def check_exportable(args) -> None:
    """Raises ConversionError naming the first architecture flag no exported class reproduces."""
    _require(args.num_experts is not None, "--num-experts is unset: only MoE models are exported")
    _require(args.position_embedding_type == "rope",
             f"--position-embedding-type {args.position_embedding_type}: the exported classes need rope")
    _require(args.rotary_percent == 1.0, f"--rotary-percent {args.rotary_percent}: the exported classes need 1.0")
    _require(args.normalization == "RMSNorm", f"--normalization {args.normalization}: the exported classes need RMSNorm")
    _require(args.swiglu, "--swiglu is off: the exported classes use SwiGLU experts")
    _require(args.disable_bias_linear, "--disable-bias-linear is off: the model's linear layers have biases, the "
             "exported classes have none (export a model trained with --disable-bias-linear)")
    _require(getattr(args, "fp8_format", None) is None,
             f"--fp8-format {args.fp8_format}: our model computes its GEMMs in FP8, the exported classes cannot")


@dataclass(frozen=True)
class Target:
    """The class that computes a model, its routing's config.json fields and, for our remote code, the
    routing flags that rebuild it on import."""

    architecture: str
    config: Dict
    flags: Tuple[str, ...] = ()
    router_tensor: str = "weight"  # our router's parameter (BASE: centroids)


def export_target(args) -> Target:
    """The routing scheme's export hook on these flags; ConversionError (naming the flag) if it refuses."""
    check_exportable(args)
    scheme = SCHEME_FLAGS.get(args.moe_router_type)
    _require(scheme is not None and scheme.export is not None,
             f"--moe-router-type {args.moe_router_type}: this routing scheme has no export "
             f"(exported: {', '.join(n for n, s in sorted(SCHEME_FLAGS.items()) if s.export)})")
    try:
        target = Target(**scheme.export(args))
    except ValueError as refusal:
        raise ConversionError(str(refusal)) from None
    shared = args.moe_shared_expert_intermediate_size
    if shared or args.add_qkv_bias:  # Mixtral has neither; Qwen2-MoE both (its shared expert always gated)
        _require(not shared or args.moe_shared_expert_gate, f"--moe-shared-expert-intermediate-size {shared} without "
                 "--moe-shared-expert-gate: Qwen2-MoE always gates its shared expert")
        _require(not shared or target.architecture != REMOTE, f"--moe-shared-expert-intermediate-size {shared} with "
                 f"--moe-router-type {args.moe_router_type}: our remote code has no shared expert")
        if target.architecture == MIXTRAL:
            target = Target(QWEN2_MOE, {"norm_topk_prob": True})
    return target


def hf_config(args, target: Target, vocab_size: int, bos_token_id, eos_token_id, dtype: torch.dtype) -> Dict:
    """config.json of the class that computes this model."""
    arch = target.architecture
    config = dict(
        architectures=[arch],
        model_type=_MODEL_TYPES[arch],
        vocab_size=vocab_size,
        hidden_size=args.hidden_size,
        num_hidden_layers=args.num_layers,
        num_attention_heads=args.num_attention_heads,
        num_key_value_heads=query_groups(args),
        head_dim=head_dim(args),
        hidden_act="silu",
        max_position_embeddings=args.max_position_embeddings,
        rms_norm_eps=args.norm_epsilon,
        rope_theta=float(args.rotary_base),
        tie_word_embeddings=not args.untie_embeddings_and_output_weights,
        attention_dropout=0.0,
        num_experts_per_tok=args.moe_router_topk,
        initializer_range=args.init_method_std,
        torch_dtype=_DTYPE_NAMES[dtype],
        use_cache=True,
        bos_token_id=bos_token_id,
        eos_token_id=eos_token_id,
    )
    if arch == MIXTRAL:
        config.update(num_local_experts=args.num_experts, intermediate_size=args.moe_ffn_hidden_size,
                      sliding_window=None, router_jitter_noise=0.0, output_router_logits=False)
    else:
        config.update(num_experts=args.num_experts, intermediate_size=args.ffn_hidden_size,
                      moe_intermediate_size=args.moe_ffn_hidden_size,
                      shared_expert_intermediate_size=args.moe_shared_expert_intermediate_size or 0,
                      decoder_sparse_step=1, qkv_bias=args.add_qkv_bias,
                      mlp_only_layers=[i for i, moe in enumerate(args.moe_layer_pattern) if not moe],
                      use_sliding_window=False, sliding_window=None, output_router_logits=False)
    if arch == REMOTE:
        config.update(auto_map=REMOTE_AUTO_MAP, **{REMOTE_FLAGS: list(target.flags)})
    config.update(target.config)
    return config


def args_from_hf_config(config: Dict) -> List[str]:
    """Our model flags for a transformers config we can represent; ConversionError names any other field."""
    arch = (config.get("architectures") or [""])[0]
    _require(arch in _MODEL_TYPES, f"architectures {config.get('architectures')}: import supports {sorted(_MODEL_TYPES)}")
    _require(config.get("hidden_act", "silu") == "silu", f"hidden_act {config.get('hidden_act')!r}: only 'silu' (SwiGLU)")
    scaling = config.get("rope_scaling") or {}
    rope = config.get("rope_parameters") or {}
    _require(scaling.get("rope_type", scaling.get("type", "default")) == "default"
             and rope.get("rope_type", "default") == "default",
             "rope_scaling: only the default (unscaled) rotary embedding is supported")
    rope_theta = rope.get("rope_theta", config.get("rope_theta", 10000.0))
    _require(float(rope_theta).is_integer(), f"rope_theta {rope_theta}: --rotary-base takes an integer")
    layers = config["num_hidden_layers"]
    topk = config["num_experts_per_tok"]
    routing: List[str] = []
    if arch == MIXTRAL:
        num_experts, moe_ffn, ffn = config["num_local_experts"], config["intermediate_size"], config["intermediate_size"]
        _require(topk >= 2, "num_experts_per_tok 1: Mixtral renormalises a single expert to weight 1, "
                            "megatron's top-1 does not")
        _require(config.get("sliding_window") is None, f"sliding_window {config.get('sliding_window')}: not supported")
        pattern = [1] * layers
    else:
        num_experts, moe_ffn, ffn = config["num_experts"], config["moe_intermediate_size"], config["intermediate_size"]
        shared = config.get("shared_expert_intermediate_size", 0)
        if shared:  # Qwen2-MoE gates its shared expert with sigmoid(h . g)
            routing += ["--moe-shared-expert-intermediate-size", str(shared), "--moe-shared-expert-gate"]
        if config.get("qkv_bias", True):
            routing.append("--add-qkv-bias")
        _require(not config.get("use_sliding_window", False), "use_sliding_window true: not supported")
        step, dense = config.get("decoder_sparse_step", 1), set(config.get("mlp_only_layers") or [])
        pattern = [int(i not in dense and (i + 1) % step == 0) for i in range(layers)]
        if arch == REMOTE:
            _require(isinstance(config.get(REMOTE_FLAGS), list),
                     f"{REMOTE_FLAGS} is missing: not written by tools/convert_checkpoint.py export")
            routing += [str(flag) for flag in config[REMOTE_FLAGS]]
        elif not config.get("norm_topk_prob", False):  # softmax over all experts, top k not renormalised
            routing.append("--moe-router-pre-softmax")
        else:
            _require(topk > 1, "norm_topk_prob true with num_experts_per_tok 1: megatron's top-1 is not renormalised")
    heads = config["num_attention_heads"]
    kv_heads = config.get("num_key_value_heads") or heads
    flags = [
        "--num-layers", str(layers), "--hidden-size", str(config["hidden_size"]),
        "--num-attention-heads", str(heads),
        *(["--group-query-attention", "--num-query-groups", str(kv_heads)] if kv_heads != heads else []),
        "--kv-channels", str(config.get("head_dim") or config["hidden_size"] // heads),
        "--ffn-hidden-size", str(ffn), "--moe-ffn-hidden-size", str(moe_ffn),
        "--max-position-embeddings", str(config["max_position_embeddings"]),
        "--normalization", "RMSNorm", "--norm-epsilon", repr(float(config["rms_norm_eps"])), "--swiglu",
        "--position-embedding-type", "rope", "--rotary-base", str(int(rope_theta)),
        "--num-experts", str(num_experts), "--moe-router-topk", str(topk),
        "--moe-layer-freq", "[" + ",".join(map(str, pattern)) + "]", "--disable-bias-linear",
    ]
    if not config.get("tie_word_embeddings", False):
        flags.append("--untie-embeddings-and-output-weights")
    return flags + routing


def hf_architecture(config: Dict) -> str:
    return (config.get("architectures") or [""])[0]


# ----------------------------------------------------------------------------------------------------------
# tensors
# ----------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Unit:
    """Our checkpoint tensor ``key`` (its ``expert``-th slice when set) <-> the Hugging Face tensors ``hf``."""

    key: str
    hf: Tuple[str, ...]
    kind: str = "copy"  # copy | qkv | fc1 | vocab
    expert: Optional[int] = None


def units(args, target: Target) -> List[Unit]:
    """Every tensor of the model, in the order the Hugging Face files list them."""
    arch = target.architecture
    block, gate, up, down = _EXPERT_NAMES[arch]
    out = [Unit("embedding.word_embeddings.weight", ("model.embed_tokens.weight",), "vocab")]
    for layer in range(args.num_layers):
        ours, theirs = f"decoder.layers.{layer}.", f"model.layers.{layer}."
        attn = theirs + "self_attn."
        out += [Unit(ours + "self_attention.linear_qkv.layer_norm_weight", (theirs + "input_layernorm.weight",)),
                Unit(ours + "self_attention.linear_qkv.weight",
                     (attn + "q_proj.weight", attn + "k_proj.weight", attn + "v_proj.weight"), "qkv"),
                *([Unit(ours + "self_attention.linear_qkv.bias",
                        (attn + "q_proj.bias", attn + "k_proj.bias", attn + "v_proj.bias"), "qkv")] if args.add_qkv_bias else []),
                Unit(ours + "self_attention.linear_proj.weight", (attn + "o_proj.weight",)),
                Unit(ours + "mlp.linear_fc1.layer_norm_weight", (theirs + "post_attention_layernorm.weight",))]
        if not args.moe_layer_pattern[layer]:
            mlp = theirs + "mlp."
            out += [Unit(ours + "mlp.linear_fc1.weight", (mlp + "gate_proj.weight", mlp + "up_proj.weight"), "fc1"),
                    Unit(ours + "mlp.linear_fc2.weight", (mlp + "down_proj.weight",))]
            continue
        router_hf = "mlp.centroids" if target.router_tensor == "centroids" else f"{block}.gate.weight"
        out.append(Unit(ours + f"mlp.router.{target.router_tensor}", (theirs + router_hf,)))
        if args.moe_shared_expert_intermediate_size:
            shared = theirs + "mlp.shared_expert."
            out += [Unit(ours + "mlp.shared_experts.linear_fc1.weight",
                         (shared + "gate_proj.weight", shared + "up_proj.weight"), "fc1"),
                    Unit(ours + "mlp.shared_experts.linear_fc2.weight", (shared + "down_proj.weight",)),
                    Unit(ours + "mlp.shared_experts.gate_weight", (theirs + "mlp.shared_expert_gate.weight",))]
        for e in range(args.num_experts):
            expert = theirs + f"{block}.experts.{e}."
            out += [Unit(ours + "mlp.experts.experts.linear_fc1.weight",
                         (expert + f"{gate}.weight", expert + f"{up}.weight"), "fc1", e),
                    Unit(ours + "mlp.experts.experts.linear_fc2.weight", (expert + f"{down}.weight",), "copy", e)]
    out.append(Unit("decoder.final_layernorm.weight", ("model.norm.weight",)))
    if args.untie_embeddings_and_output_weights:
        out.append(Unit("output_layer.weight", ("lm_head.weight",), "vocab"))
    return out


def zero_shared_experts(args, target: Target) -> List[Tuple[str, Tuple[int, ...]]]:
    """Qwen2-MoE always builds a shared expert: width 0 (and its gate) makes its output exactly zero."""
    if target.architecture != QWEN2_MOE or args.moe_shared_expert_intermediate_size:
        return []
    hidden, out = args.hidden_size, []
    for layer in range(args.num_layers):
        if args.moe_layer_pattern[layer]:
            prefix = f"model.layers.{layer}.mlp."
            out += [(prefix + "shared_expert.gate_proj.weight", (0, hidden)),
                    (prefix + "shared_expert.up_proj.weight", (0, hidden)),
                    (prefix + "shared_expert.down_proj.weight", (hidden, 0)),
                    (prefix + "shared_expert_gate.weight", (1, hidden))]
    return out


def to_hf(unit: Unit, tensor: torch.Tensor, args, vocab_size: int) -> List[torch.Tensor]:
    """Our tensor (or expert slice) -> the unit's Hugging Face tensors (padded vocabulary rows dropped)."""
    if unit.kind == "vocab":
        return [tensor[:vocab_size]]
    if unit.kind == "fc1":
        return list(tensor.chunk(2))
    if unit.kind == "qkv":  # a weight, or a bias (one column)
        groups, dim = query_groups(args), head_dim(args)
        per_group = args.num_attention_heads // groups
        grouped = tensor.reshape(groups, per_group + 2, dim, -1)
        parts = [grouped[:, :per_group].reshape(groups * per_group * dim, -1),
                 grouped[:, per_group].reshape(groups * dim, -1), grouped[:, per_group + 1].reshape(groups * dim, -1)]
        return [part.reshape(-1) for part in parts] if tensor.dim() == 1 else parts
    return [tensor]


def from_hf(unit: Unit, tensors: Sequence[torch.Tensor], args, vocab_size: int, padded_rows: int) -> torch.Tensor:
    """The unit's Hugging Face tensors -> our tensor. The vocabulary keeps the tokenizer's ``vocab_size``
    rows (a config's extra rows are ids no token has) padded with zero rows to ``padded_rows``."""
    if unit.kind == "vocab":
        _require(tensors[0].shape[0] >= vocab_size, f"{unit.hf[0]} has {tensors[0].shape[0]} rows, fewer than the "
                                                    f"tokenizer's {vocab_size} tokens")
        rows = tensors[0][:vocab_size]
        return torch.cat([rows, rows.new_zeros(padded_rows - rows.shape[0], *rows.shape[1:])])
    if unit.kind == "fc1":
        return torch.cat(list(tensors))
    if unit.kind == "qkv":  # weights, or biases (one column)
        groups, dim = query_groups(args), head_dim(args)
        q, k, v = (t if t.dim() == 2 else t.unsqueeze(-1) for t in tensors)
        grouped = torch.cat([q.reshape(groups, -1, dim, q.shape[-1]), k.reshape(groups, 1, dim, k.shape[-1]),
                             v.reshape(groups, 1, dim, v.shape[-1])], dim=1)
        joined = grouped.reshape(-1, q.shape[-1])
        return joined if tensors[0].dim() == 2 else joined.reshape(-1)
    return tensors[0]


_FUSED = re.compile(r"(.*)\.experts\.(gate_up_proj|down_proj)$")


def hf_locations(arch: str, stored: Dict[str, Tuple[int, ...]]) -> Dict[str, Tuple[str, Optional[int], Optional[int]]]:
    """Where each Hugging Face tensor of :func:`units` lies among a folder's ``stored`` names (and shapes):
    ``{per-expert name: (stored name, expert, half)}``; the tensor is ``stored[expert]``, then its
    ``half``-th half of rows when set. transformers >= 5 saves experts fused ([E, 2F, H] gate_up_proj,
    [E, H, F] down_proj) and names Mixtral's block ``mlp`` with gate/up/down_proj."""
    block, gate, up, down = _EXPERT_NAMES[arch]
    out: Dict[str, Tuple[str, Optional[int], Optional[int]]] = {}
    for name, shape in stored.items():
        match = _FUSED.match(name)
        if match is None:
            mapped = name
            if arch == MIXTRAL:
                mapped = (name.replace(".mlp.", f".{block}.").replace(".gate_proj.", f".{gate}.")
                          .replace(".up_proj.", f".{up}.").replace(".down_proj.", f".{down}."))
            out[mapped] = (name, None, None)
            continue
        prefix, kind = match.groups()
        prefix = prefix.replace(".mlp", f".{block}") if arch == MIXTRAL else prefix
        for e in range(shape[0] if shape else 0):
            if kind == "down_proj":
                out[f"{prefix}.experts.{e}.{down}.weight"] = (name, e, None)
            else:
                out[f"{prefix}.experts.{e}.{gate}.weight"] = (name, e, 0)
                out[f"{prefix}.experts.{e}.{up}.weight"] = (name, e, 1)
    return out
