"""Our parameter names and tensor layouts <-> Hugging Face transformers' MoE classes.

Two transformers classes compute exactly what a top-k softmax megatron-moe model computes (RMSNorm,
RoPE over the whole head, SwiGLU, no linear biases):

* ``MixtralForCausalLM`` when every layer is MoE and top-k >= 2: Mixtral takes the softmax over all
  experts and renormalises the top k, which equals megatron's softmax over the top-k logits.
* ``Qwen2MoeForCausalLM`` otherwise (dense layers in the mix: ``mlp_only_layers``; top-1: megatron takes
  the softmax over all experts without renormalising, Qwen2-MoE's ``norm_topk_prob=False``). Its shared
  expert is given zero width, so it adds exactly zero.

BASE and SAM routing (``--moe-router-type base|sam``) have no transformers class: they are exported as
``MegatronMoeForCausalLM``, our own modeling code (``remote_code/``: Qwen2-MoE with our MoE block) that the
export copies into the folder and registers through ``auto_map`` (``trust_remote_code=True`` loads it).

Tensors are written in the per-expert layout of the published Mixtral / Qwen checkpoints, which every
transformers version loads. Everything here works on plain ``{name: tensor}`` dicts of the one-process
model (global layer and expert numbers, full tensors); nothing imports transformers.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Dict, List, Tuple

import torch

MIXTRAL = "MixtralForCausalLM"
QWEN2_MOE = "Qwen2MoeForCausalLM"
REMOTE = "MegatronMoeForCausalLM"  # our modeling code, shipped in the folder
REMOTE_CODE_DIR = Path(__file__).resolve().parent / "remote_code"
REMOTE_AUTO_MAP = {"AutoConfig": "configuration_megatron_moe.MegatronMoeConfig",
                   "AutoModelForCausalLM": "modeling_megatron_moe.MegatronMoeForCausalLM"}

# (block holding the router and experts, gate, up, down) of each class's per-expert checkpoint layout
_EXPERT_NAMES = {MIXTRAL: ("block_sparse_moe", "w1", "w3", "w2"), QWEN2_MOE: ("mlp", "gate_proj", "up_proj", "down_proj"),
                 REMOTE: ("mlp", "gate_proj", "up_proj", "down_proj")}
_MODEL_TYPES = {MIXTRAL: "mixtral", QWEN2_MOE: "qwen2_moe", REMOTE: "megatron_moe"}
EXPORTED_ROUTERS = ("topk", "base", "sam")


class ConversionError(ValueError):
    """A checkpoint or config that cannot be converted: printed as one line naming the field."""


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ConversionError(message)


# ----------------------------------------------------------------------------------------------------------
# the model's shape, read from our run arguments
# ----------------------------------------------------------------------------------------------------------

def head_dim(args) -> int:
    return args.kv_channels or args.hidden_size // args.num_attention_heads


def query_groups(args) -> int:
    return args.num_query_groups or args.num_attention_heads


def check_exportable(args) -> None:
    """Raises ConversionError naming the first flag no transformers built-in class reproduces."""
    _require(args.num_experts is not None, "--num-experts is unset: only MoE models are exported")
    _require(args.moe_router_type in EXPORTED_ROUTERS,
             f"--moe-router-type {args.moe_router_type}: export supports {', '.join(EXPORTED_ROUTERS)}")
    _require(getattr(args, "moe_router_load_balancing_type", "aux_loss") != "sinkhorn",
             "--moe-router-load-balancing-type sinkhorn: its routing has no exported equivalent")
    _require(args.position_embedding_type == "rope",
             f"--position-embedding-type {args.position_embedding_type}: the exported classes need rope")
    _require(args.rotary_percent == 1.0, f"--rotary-percent {args.rotary_percent}: the exported classes need 1.0")
    _require(args.normalization == "RMSNorm", f"--normalization {args.normalization}: the exported classes need RMSNorm")
    _require(args.swiglu, "--swiglu is off: the exported classes use SwiGLU experts")
    _require(args.moe_router_num_groups is None,
             "--moe-router-num-groups: group-limited routing has no transformers built-in equivalent")


def hf_architecture(args) -> str:
    if args.moe_router_type != "topk":
        return REMOTE
    all_moe = all(args.moe_layer_pattern)
    return MIXTRAL if all_moe and args.moe_router_topk >= 2 else QWEN2_MOE


def hf_config(args, vocab_size: int, eos_token_id) -> Dict:
    """config.json of the transformers class that computes this model."""
    check_exportable(args)
    arch = hf_architecture(args)
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
        torch_dtype="float32",
        use_cache=True,
        bos_token_id=eos_token_id,
        eos_token_id=eos_token_id,
    )
    if arch == MIXTRAL:
        config.update(num_local_experts=args.num_experts, intermediate_size=args.moe_ffn_hidden_size,
                      sliding_window=None, router_jitter_noise=0.0, output_router_logits=False)
        return config
    config.update(num_experts=args.num_experts, intermediate_size=args.ffn_hidden_size,
                  moe_intermediate_size=args.moe_ffn_hidden_size, shared_expert_intermediate_size=0,
                  decoder_sparse_step=1, norm_topk_prob=args.moe_router_topk > 1, qkv_bias=False,
                  mlp_only_layers=[i for i, moe in enumerate(args.moe_layer_pattern) if not moe],
                  use_sliding_window=False, sliding_window=None, output_router_logits=False)
    if arch == REMOTE:
        config.update(auto_map=REMOTE_AUTO_MAP, moe_router_type=args.moe_router_type)
        if args.moe_router_type == "sam":
            config.update(sam_num_groups=args.sam_num_groups, sam_renormalize_gates=args.sam_renormalize_gates)
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
    if arch == MIXTRAL:
        num_experts, moe_ffn, ffn = config["num_local_experts"], config["intermediate_size"], config["intermediate_size"]
        _require(topk >= 2, "num_experts_per_tok 1: Mixtral renormalises a single expert to weight 1, "
                            "megatron's top-1 does not")
        _require(config.get("sliding_window") is None, f"sliding_window {config.get('sliding_window')}: not supported")
        pattern = [1] * layers
    else:
        num_experts, moe_ffn, ffn = config["num_experts"], config["moe_intermediate_size"], config["intermediate_size"]
        _require(config.get("shared_expert_intermediate_size", 0) == 0,
                 f"shared_expert_intermediate_size {config.get('shared_expert_intermediate_size')}: shared experts "
                 "are not supported (must be 0)")
        _require(config.get("qkv_bias", True) is False, "qkv_bias true: our MoE attention has no biases")
        _require(bool(config.get("norm_topk_prob", False)) == (topk > 1),
                 f"norm_topk_prob {config.get('norm_topk_prob')} with num_experts_per_tok {topk}: our router "
                 "renormalises the top-k weights exactly when k > 1")
        _require(not config.get("use_sliding_window", False), "use_sliding_window true: not supported")
        step, dense = config.get("decoder_sparse_step", 1), set(config.get("mlp_only_layers") or [])
        pattern = [int(i not in dense and (i + 1) % step == 0) for i in range(layers)]
    heads = config["num_attention_heads"]
    flags = [
        "--num-layers", str(layers), "--hidden-size", str(config["hidden_size"]),
        "--num-attention-heads", str(heads), "--num-query-groups", str(config.get("num_key_value_heads") or heads),
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
    return flags


# ----------------------------------------------------------------------------------------------------------
# tensors
# ----------------------------------------------------------------------------------------------------------

def _split_qkv(qkv: torch.Tensor, args) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """megatron's fused QKV rows, per query group [q heads of the group; k; v] -> HF's q, k, v."""
    groups, dim = query_groups(args), head_dim(args)
    per_group = args.num_attention_heads // groups
    grouped = qkv.reshape(groups, per_group + 2, dim, -1)
    q = grouped[:, :per_group].reshape(groups * per_group * dim, -1)
    return q, grouped[:, per_group].reshape(groups * dim, -1), grouped[:, per_group + 1].reshape(groups * dim, -1)


def _join_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, args) -> torch.Tensor:
    groups, dim = query_groups(args), head_dim(args)
    per_group = args.num_attention_heads // groups
    grouped = torch.cat([q.reshape(groups, per_group, dim, -1), k.reshape(groups, 1, dim, -1),
                         v.reshape(groups, 1, dim, -1)], dim=1)
    return grouped.reshape(groups * (per_group + 2) * dim, -1)


def _layer_pairs(args, arch: str, layer: int) -> List[Tuple[str, str]]:
    """(our name, HF name) of the one-to-one parameters of a layer, QKV and fc1 excepted."""
    ours, theirs = f"decoder.layers.{layer}.", f"model.layers.{layer}."
    block = _EXPERT_NAMES[arch][0]
    pairs = [
        (ours + "input_layernorm.weight", theirs + "input_layernorm.weight"),
        (ours + "self_attention.linear_proj.weight", theirs + "self_attn.o_proj.weight"),
        (ours + "pre_mlp_layernorm.weight", theirs + "post_attention_layernorm.weight"),
    ]
    if args.moe_layer_pattern[layer] and args.moe_router_type == "base":
        pairs.append((ours + "mlp.router.centroids", theirs + "mlp.centroids"))
    elif args.moe_layer_pattern[layer]:
        pairs.append((ours + "mlp.router.weight", theirs + f"{block}.gate.weight"))
    return pairs


def _mlps(args, arch: str, layer: int) -> List[Tuple[str, str, Tuple[str, str, str]]]:
    """(our fc prefix, HF prefix, (gate, up, down) names) of every SwiGLU MLP of a layer."""
    ours, theirs = f"decoder.layers.{layer}.mlp.", f"model.layers.{layer}."
    block, gate, up, down = _EXPERT_NAMES[arch]
    if not args.moe_layer_pattern[layer]:
        return [(ours, theirs + "mlp.", ("gate_proj", "up_proj", "down_proj"))]
    return [(ours + f"experts.local_experts.{e}.", theirs + f"{block}.experts.{e}.", (gate, up, down))
            for e in range(args.num_experts)]


def to_hf(state: Dict[str, torch.Tensor], args, vocab_size: int) -> Dict[str, torch.Tensor]:
    """Our one-process state dict -> the HF class's tensors (padded vocabulary rows dropped)."""
    check_exportable(args)
    arch = hf_architecture(args)
    hf = {"model.embed_tokens.weight": state["embedding.word_embeddings.weight"][:vocab_size],
          "model.norm.weight": state["decoder.final_layernorm.weight"]}
    if args.untie_embeddings_and_output_weights:
        hf["lm_head.weight"] = state["output_layer.weight"][:vocab_size]
    for layer in range(args.num_layers):
        for ours, theirs in _layer_pairs(args, arch, layer):
            hf[theirs] = state[ours]
        q, k, v = _split_qkv(state[f"decoder.layers.{layer}.self_attention.linear_qkv.weight"], args)
        prefix = f"model.layers.{layer}.self_attn."
        hf.update({prefix + "q_proj.weight": q, prefix + "k_proj.weight": k, prefix + "v_proj.weight": v})
        for ours, theirs, (gate, up, down) in _mlps(args, arch, layer):
            hf[theirs + f"{gate}.weight"], hf[theirs + f"{up}.weight"] = state[ours + "linear_fc1.weight"].chunk(2)
            hf[theirs + f"{down}.weight"] = state[ours + "linear_fc2.weight"]
        if arch == QWEN2_MOE and args.moe_layer_pattern[layer]:
            hf.update(_zero_shared_expert(f"model.layers.{layer}.mlp.", args.hidden_size, state))
    return {name: tensor.detach().contiguous().clone() for name, tensor in hf.items()}


def _zero_shared_expert(prefix: str, hidden: int, state) -> Dict[str, torch.Tensor]:
    """Qwen2-MoE always builds a shared expert: width 0 makes its output exactly zero."""
    dtype = state["decoder.final_layernorm.weight"].dtype
    return {prefix + "shared_expert.gate_proj.weight": torch.zeros(0, hidden, dtype=dtype),
            prefix + "shared_expert.up_proj.weight": torch.zeros(0, hidden, dtype=dtype),
            prefix + "shared_expert.down_proj.weight": torch.zeros(hidden, 0, dtype=dtype),
            prefix + "shared_expert_gate.weight": torch.zeros(1, hidden, dtype=dtype)}


def _unfuse_experts(hf: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """transformers >= 5 may save experts fused ([E, 2F, H] gate_up_proj, [E, H, F] down_proj): split them
    into the per-expert layout (Qwen2-MoE names; Mixtral's fused names are mapped the same way)."""
    fused = re.compile(r"(.*)\.experts\.(gate_up_proj|down_proj)$")
    out = {}
    for name, tensor in hf.items():
        match = fused.match(name)
        if match is None:
            out[name] = tensor
            continue
        prefix, kind = match.groups()
        for e, expert in enumerate(tensor.unbind(0)):
            if kind == "down_proj":
                out[f"{prefix}.experts.{e}.down_proj.weight"] = expert
            else:
                gate, up = expert.chunk(2)
                out[f"{prefix}.experts.{e}.gate_proj.weight"], out[f"{prefix}.experts.{e}.up_proj.weight"] = gate, up
    return out


def from_hf(hf: Dict[str, torch.Tensor], args, padded_vocab_size: int) -> Dict[str, torch.Tensor]:
    """The HF class's tensors -> our one-process state dict (vocabulary padded with zero rows)."""
    arch = hf_architecture(args)
    hf = _unfuse_experts(hf)
    if arch == MIXTRAL:  # transformers >= 5 names the block "mlp" and experts gate/up/down_proj
        hf = {name.replace(".mlp.", ".block_sparse_moe.").replace(".gate_proj.", ".w1.").replace(".up_proj.", ".w3.")
              .replace(".down_proj.", ".w2."): t for name, t in hf.items()}

    def take(name: str) -> torch.Tensor:
        _require(name in hf, f"tensor {name} is missing from the Hugging Face checkpoint")
        return hf[name]

    def pad(rows: torch.Tensor) -> torch.Tensor:
        return torch.cat([rows, rows.new_zeros(padded_vocab_size - rows.shape[0], rows.shape[1])])

    state = {"embedding.word_embeddings.weight": pad(take("model.embed_tokens.weight")),
             "decoder.final_layernorm.weight": take("model.norm.weight")}
    if args.untie_embeddings_and_output_weights:
        state["output_layer.weight"] = pad(take("lm_head.weight"))
    for layer in range(args.num_layers):
        for ours, theirs in _layer_pairs(args, arch, layer):
            state[ours] = take(theirs)
        prefix = f"model.layers.{layer}.self_attn."
        state[f"decoder.layers.{layer}.self_attention.linear_qkv.weight"] = _join_qkv(
            take(prefix + "q_proj.weight"), take(prefix + "k_proj.weight"), take(prefix + "v_proj.weight"), args)
        for ours, theirs, (gate, up, down) in _mlps(args, arch, layer):
            state[ours + "linear_fc1.weight"] = torch.cat([take(theirs + f"{gate}.weight"), take(theirs + f"{up}.weight")])
            state[ours + "linear_fc2.weight"] = take(theirs + f"{down}.weight")
    return state
