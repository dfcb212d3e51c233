"""Our checkpoint's tensors <-> Hugging Face transformers' MoE classes: one record per architecture.

An architecture is one :class:`Architecture` in :data:`ARCHITECTURES`: its class name, the config.json
fields that make the class compute our model (or a refusal naming the flag it cannot honour), the flags
its config.json imports as, and its tensor-name map, role by role (attention, norms, dense MLP, router,
experts, shared expert, ...). Removing a record removes the architecture, in both directions.

Export decides from the run configuration alone, before any weight is read: :func:`check_exportable`
refuses what no record computes (normalisation, position embeddings, FP8 GEMMs), the routing scheme's
export hook says what its routing computes in evaluation mode (an
:class:`~megatron_moe.conversion.routing.EvalRouting`, or a refusal naming the flag), and the first record
of the table that computes the same model is the class: the native classes first, our remote code last.
A class always builds some parts our model may lack (Qwen2-MoE's q/k/v biases and shared expert, GLM-4.5's
shared expert and expert-bias buffer): those are written with the shapes the class builds and values that
make them compute exactly nothing, so that every folder loads with no missing, unexpected or zero-sized
tensor (``tests/test_convert_checkpoint.py`` checks it for every routing option). Import reads a record's
folders back; a part that computes nothing because all its weights are zero and that stays zero in
training (a shared expert) is dropped.

Tensors are mapped in :class:`Unit` s: one tensor of our checkpoint (or one expert's slice of it) <-> one
or a few Hugging Face tensors, with the transform both ways (fused QKV, fused gate/up, padded vocabulary).
Both directions use the same units, and nothing here imports transformers.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, FrozenSet, List, Mapping, Optional, Sequence, Tuple

import torch

from megatron_moe.conversion.routing import EvalRouting
from megatron_moe.moe.scheme_flags import SCHEME_FLAGS

REMOTE_CODE_DIR = Path(__file__).resolve().parent / "remote_code"
# config.json of our remote-code folders: the routing flags that rebuild the model on import
REMOTE_FLAGS = "megatron_moe_flags"
TORCH_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


class ConversionError(ValueError):
    """A checkpoint or config that cannot be converted: printed as one line naming the field."""


class Unfit(ValueError):
    """A class that does not compute this model: the message names the flag."""


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ConversionError(message)


def _fits(condition: bool, message: str) -> None:
    if not condition:
        raise Unfit(message)


# ----------------------------------------------------------------------------------------------------------
# our model, role by role
# ----------------------------------------------------------------------------------------------------------

_OURS = "decoder.layers.{layer}."
# the checkpoint key of each part of our model ({layer}: its layer)
OUR_KEYS = {
    "embedding": "embedding.word_embeddings.weight",
    "input_norm": _OURS + "self_attention.linear_qkv.layer_norm_weight",
    "qkv": _OURS + "self_attention.linear_qkv.weight",
    "qkv_bias": _OURS + "self_attention.linear_qkv.bias",
    "q_norm": _OURS + "self_attention.q_layernorm.weight",
    "k_norm": _OURS + "self_attention.k_layernorm.weight",
    "attn_out": _OURS + "self_attention.linear_proj.weight",
    "mlp_norm": _OURS + "mlp.linear_fc1.layer_norm_weight",
    "dense_fc1": _OURS + "mlp.linear_fc1.weight",
    "dense_fc2": _OURS + "mlp.linear_fc2.weight",
    "router": _OURS + "mlp.router.weight",
    "centroids": _OURS + "mlp.router.centroids",
    "expert_bias": _OURS + "mlp.router.expert_bias",
    "shared_fc1": _OURS + "mlp.shared_experts.linear_fc1.weight",
    "shared_fc2": _OURS + "mlp.shared_experts.linear_fc2.weight",
    "shared_gate": _OURS + "mlp.shared_experts.gate_weight",
    "expert_fc1": _OURS + "mlp.experts.experts.linear_fc1.weight",
    "expert_fc2": _OURS + "mlp.experts.experts.linear_fc2.weight",
    "final_norm": "decoder.final_layernorm.weight",
    "output": "output_layer.weight",
}
_EVERY_LAYER = ("input_norm", "qkv", "qkv_bias", "q_norm", "k_norm", "attn_out", "mlp_norm")  # others: MoE layers
_KINDS = {"embedding": "vocab", "output": "vocab", "qkv": "qkv", "qkv_bias": "qkv", "dense_fc1": "fc1",
          "shared_fc1": "fc1", "expert_fc1": "fc1"}  # others: copy
_PER_EXPERT = ("expert_fc1", "expert_fc2")
_FP32 = ("expert_bias",)  # kept in fp32 by the classes that have it (their routing reads it in fp32)


def head_dim(args) -> int:
    return args.kv_channels or args.hidden_size // args.num_attention_heads


def query_groups(args) -> int:
    return args.num_query_groups if args.group_query_attention else args.num_attention_heads


def _router_role(routing: EvalRouting) -> str:
    return "centroids" if routing.router_tensor == "centroids" else "router"


def _layer_roles(args, layer: int, routing: EvalRouting) -> List[str]:
    """The parts layer ``layer`` of our model has, in file order."""
    roles = (["input_norm", "qkv"] + ["qkv_bias"] * args.add_qkv_bias + ["q_norm", "k_norm"] * args.qk_layernorm
             + ["attn_out", "mlp_norm"])
    if not args.moe_layer_pattern[layer]:
        return roles + ["dense_fc1", "dense_fc2"]
    roles += [_router_role(routing)] + ["expert_bias"] * routing.expert_bias
    if args.moe_shared_expert_intermediate_size:
        roles += ["shared_fc1", "shared_fc2"] + ["shared_gate"] * args.moe_shared_expert_gate
    return roles + ["expert_fc1", "expert_fc2"]


def _model_roles(args, routing: EvalRouting) -> set:
    roles = {"embedding", "final_norm"} | ({"output"} if args.untie_embeddings_and_output_weights else set())
    for layer in range(args.num_layers):
        roles.update(_layer_roles(args, layer, routing))
    return roles


def _role_flag(role: str, args) -> str:
    """The flags that give our model this part, for messages."""
    shared = f"--moe-shared-expert-intermediate-size {args.moe_shared_expert_intermediate_size}"
    return {"qkv_bias": "--add-qkv-bias", "q_norm": "--qk-layernorm", "k_norm": "--qk-layernorm",
            "expert_bias": "--moe-router-enable-expert-bias", "shared_fc1": shared, "shared_fc2": shared,
            "shared_gate": f"{shared} --moe-shared-expert-gate", "centroids": "--moe-router-type base",
            "dense_fc1": f"--moe-layer-freq {list(args.moe_layer_pattern)}",
            "dense_fc2": f"--moe-layer-freq {list(args.moe_layer_pattern)}"}.get(role, role)


_ROLE_TEXT = {"qkv_bias": "q/k/v biases", "q_norm": "q/k norms", "k_norm": "q/k norms", "expert_bias": "expert bias",
              "shared_fc1": "shared expert", "shared_fc2": "shared expert",
              "shared_gate": "gated shared expert", "centroids": "BASE centroids", "dense_fc1": "dense layers",
              "dense_fc2": "dense layers"}


# ----------------------------------------------------------------------------------------------------------
# the architecture records
# ----------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Architecture:
    """One Hugging Face class: what it is written with, what it reads back as, and its tensor names.

    ``names``: role -> the class's tensor names ("{layer}", "{expert}" filled in); a role it lacks is a part
    of our model it cannot hold. ``config(args, routing)``: its config.json fields beyond the ones every
    record writes (:func:`hf_config`); raises :class:`Unfit` naming the flag it does not compute.
    ``flags(config, zero)``: our model flags for its config.json beyond the common ones (``zero(role)``:
    whether the folder's tensors of that role are all zero); ConversionError naming the field.
    ``builds``: roles the class always builds, written as zeros where our model has none. ``computes``:
    roles the class always computes and no value switches off (our model must have them). ``reads``:
    config.json attributes its modeling code (transformers', and vLLM's) reads beyond its config class's
    fields. ``partial_rotary``: its default ``partial_rotary_factor`` if it rotates part of the head,
    None if always the whole head. ``ties_head``: serving engines tie lm_head to the embeddings under
    ``tie_word_embeddings`` (if not, lm_head is written too). ``renames``: (regex, replacement) from other
    spellings of its tensor names (newer transformers) to ``names``.
    """

    name: str
    model_type: str
    names: Mapping[str, Tuple[str, ...]]
    config: Callable[[Any, EvalRouting], Dict[str, Any]]
    flags: Callable[[Dict[str, Any], Callable[[str], bool]], List[str]]
    builds: FrozenSet[str] = frozenset()
    computes: FrozenSet[str] = frozenset()
    reads: FrozenSet[str] = frozenset()
    partial_rotary: Optional[float] = None
    ties_head: bool = True
    renames: Tuple[Tuple[str, str], ...] = ()
    remote_code: bool = False


_L = "model.layers.{layer}."
_LLAMA = {  # what every record here shares: embeddings, norms, attention
    "embedding": ("model.embed_tokens.weight",),
    "input_norm": (_L + "input_layernorm.weight",),
    "qkv": (_L + "self_attn.q_proj.weight", _L + "self_attn.k_proj.weight", _L + "self_attn.v_proj.weight"),
    "attn_out": (_L + "self_attn.o_proj.weight",),
    "mlp_norm": (_L + "post_attention_layernorm.weight",),
    "final_norm": ("model.norm.weight",),
    "output": ("lm_head.weight",),
}
_QKV_BIAS = {"qkv_bias": (_L + "self_attn.q_proj.bias", _L + "self_attn.k_proj.bias", _L + "self_attn.v_proj.bias")}
_QK_NORM = {"q_norm": (_L + "self_attn.q_norm.weight",), "k_norm": (_L + "self_attn.k_norm.weight",)}
_DENSE_MLP = {"dense_fc1": (_L + "mlp.gate_proj.weight", _L + "mlp.up_proj.weight"),
              "dense_fc2": (_L + "mlp.down_proj.weight",)}
_EXPERTS = {"router": (_L + "mlp.gate.weight",),
            "expert_fc1": (_L + "mlp.experts.{expert}.gate_proj.weight", _L + "mlp.experts.{expert}.up_proj.weight"),
            "expert_fc2": (_L + "mlp.experts.{expert}.down_proj.weight",)}


def _routing_is_topk(routing: EvalRouting, score: str, name: str) -> None:
    _fits(routing.score == score, f"{routing.flags}: {name} routes on the {score} of its router logits")
    _fits(routing.num_groups is None, f"{routing.flags}: {name} has no group-limited routing")
    _fits(routing.scaling_factor is None, f"{routing.flags}: {name} has no routed scaling factor")


def _softmax_precision(args, routing: EvalRouting, name: str) -> None:
    """transformers' softmax routers take their logits in the model's dtype and their probabilities in
    fp32; megatron chooses on logits (probabilities, before the top k) of the router's dtype."""
    model_fp32 = not args.bf16
    if routing.renormalize:  # chosen on the logits, whose order fp32 probabilities keep
        _fits(routing.router_fp32 == model_fp32, f"{routing.flags} --moe-router-dtype fp32 in a --bf16 model: "
                                                 f"{name} computes its router logits in the model's dtype")
    else:
        _fits(model_fp32, f"{routing.flags} in a --bf16 model: megatron chooses among probabilities rounded to "
                          f"the router's dtype, {name} among fp32 probabilities of bf16 logits")


def _dense_layers(args) -> List[int]:
    return [i for i, moe in enumerate(args.moe_layer_pattern) if not moe]


def _mixtral_config(args, routing: EvalRouting) -> Dict[str, Any]:
    _routing_is_topk(routing, "softmax", "MixtralForCausalLM")
    _fits(routing.renormalize, f"{routing.flags}: MixtralForCausalLM renormalises the softmax over its top k")
    _softmax_precision(args, routing, "MixtralForCausalLM")
    return dict(num_local_experts=args.num_experts, intermediate_size=args.moe_ffn_hidden_size, head_dim=head_dim(args),
                sliding_window=None, router_jitter_noise=0.0, output_router_logits=False)


def _qwen2_moe_config(args, routing: EvalRouting) -> Dict[str, Any]:
    _routing_is_topk(routing, "softmax", "Qwen2MoeForCausalLM")
    _softmax_precision(args, routing, "Qwen2MoeForCausalLM")
    _fits(head_dim(args) * args.num_attention_heads == args.hidden_size,
          f"--kv-channels {args.kv_channels}: vLLM's Qwen2MoeForCausalLM takes head_dim as hidden size / heads")
    shared = args.moe_shared_expert_intermediate_size
    _fits(not shared or args.moe_shared_expert_gate, f"--moe-shared-expert-intermediate-size {shared} without "
                                                     "--moe-shared-expert-gate: Qwen2MoeForCausalLM gates it")
    return dict(num_experts=args.num_experts, intermediate_size=args.ffn_hidden_size,
                moe_intermediate_size=args.moe_ffn_hidden_size,
                shared_expert_intermediate_size=shared or args.moe_ffn_hidden_size, decoder_sparse_step=1,
                qkv_bias=True, mlp_only_layers=_dense_layers(args), use_sliding_window=False, sliding_window=None,
                norm_topk_prob=routing.renormalize, output_router_logits=False)


def _qwen3_moe_config(args, routing: EvalRouting) -> Dict[str, Any]:
    _routing_is_topk(routing, "softmax", "Qwen3MoeForCausalLM")
    _softmax_precision(args, routing, "Qwen3MoeForCausalLM")
    return dict(num_experts=args.num_experts, intermediate_size=args.ffn_hidden_size,
                moe_intermediate_size=args.moe_ffn_hidden_size, decoder_sparse_step=1,
                mlp_only_layers=_dense_layers(args), norm_topk_prob=routing.renormalize, head_dim=head_dim(args),
                attention_bias=False, use_sliding_window=False, sliding_window=None, output_router_logits=False)


def _glm4_moe_config(args, routing: EvalRouting) -> Dict[str, Any]:
    name = "Glm4MoeForCausalLM"
    _fits(routing.score == "sigmoid", f"{routing.flags}: {name} routes on the sigmoid of its router logits")
    _fits(routing.router_fp32, f"{routing.flags} in a --bf16 model: {name} computes its router in fp32, megatron "
                               "in bf16 (train with --moe-router-dtype fp32 for this class)")
    k, groups = routing.topk, routing.num_groups or 1
    if routing.num_groups and routing.group_topk < routing.num_groups:
        _fits(k // routing.group_topk == 2, f"{routing.flags}: {name} scores a group by its best 2 experts, "
                                            f"megatron by its best {k // routing.group_topk}")
    dense = len(_dense_layers(args))
    _fits(list(args.moe_layer_pattern) == [0] * dense + [1] * (args.num_layers - dense),
          f"--moe-layer-freq {list(args.moe_layer_pattern)}: {name}'s dense layers are its first ones")
    shared, width = args.moe_shared_expert_intermediate_size, args.moe_ffn_hidden_size
    _fits(not shared or shared % width == 0, f"--moe-shared-expert-intermediate-size {shared}: {name}'s shared "
                                             f"expert is a multiple of --moe-ffn-hidden-size {width}")
    return dict(n_routed_experts=args.num_experts, intermediate_size=args.ffn_hidden_size, moe_intermediate_size=width,
                n_shared_experts=shared // width if shared else 1, routed_scaling_factor=routing.scaling_factor or 1.0,
                n_group=groups, topk_group=routing.group_topk or 1, first_k_dense_replace=dense,
                norm_topk_prob=routing.renormalize, attention_bias=args.add_qkv_bias, use_qk_norm=args.qk_layernorm,
                head_dim=head_dim(args), num_nextn_predict_layers=0, output_router_logits=False)


def _remote_config(args, routing: EvalRouting) -> Dict[str, Any]:
    flags = list(routing.remote_flags) + (["--moe-router-dtype", "fp32"] if args.moe_router_dtype == "fp32" else [])
    shared = args.moe_shared_expert_intermediate_size
    if shared:
        flags += ["--moe-shared-expert-intermediate-size", str(shared)]
        flags += ["--moe-shared-expert-gate"] * args.moe_shared_expert_gate
    return dict(num_experts=args.num_experts, intermediate_size=args.ffn_hidden_size,
                moe_intermediate_size=args.moe_ffn_hidden_size, decoder_sparse_step=1, qkv_bias=args.add_qkv_bias,
                mlp_only_layers=_dense_layers(args), use_sliding_window=False, sliding_window=None,
                shared_expert_intermediate_size=0,  # its MoE blocks replace Qwen2-MoE's: nothing to build
                moe_shared_expert_intermediate_size=shared, moe_shared_expert_gate=args.moe_shared_expert_gate,
                head_dim=head_dim(args), moe_router_dtype=args.moe_router_dtype, output_router_logits=False,
                auto_map={"AutoConfig": "configuration_megatron_moe.MegatronMoeConfig",
                          "AutoModelForCausalLM": "modeling_megatron_moe.MegatronMoeForCausalLM"},
                **{REMOTE_FLAGS: flags}, **routing.remote_config)


def _experts_flags(num_experts: int, moe_ffn: int, ffn: int, pattern: Sequence[int]) -> List[str]:
    return ["--num-experts", str(num_experts), "--moe-ffn-hidden-size", str(moe_ffn), "--ffn-hidden-size", str(ffn),
            "--moe-layer-freq", "[" + ",".join(map(str, pattern)) + "]"]


def _qwen2_structure(config: Dict) -> List[str]:
    """Qwen2-MoE's experts, dense layers and q/k/v biases (its own, and our remote code's)."""
    _require(not config.get("use_sliding_window", False), "use_sliding_window true: not supported")
    layers, step = config["num_hidden_layers"], config.get("decoder_sparse_step", 1)
    dense = set(config.get("mlp_only_layers") or [])
    pattern = [int(i not in dense and (i + 1) % step == 0) for i in range(layers)]
    flags = _experts_flags(config["num_experts"], config["moe_intermediate_size"], config["intermediate_size"], pattern)
    return flags + (["--add-qkv-bias"] if config.get("qkv_bias", True) else [])


def _mixtral_flags(config: Dict, zero) -> List[str]:
    _require(config["num_experts_per_tok"] >= 2, "num_experts_per_tok 1: Mixtral renormalises a single expert to "
                                                 "weight 1, megatron's top-1 does not")
    _require(config.get("sliding_window") is None, f"sliding_window {config.get('sliding_window')}: not supported")
    return _experts_flags(config["num_local_experts"], config["intermediate_size"], config["intermediate_size"],
                          [1] * config["num_hidden_layers"])


def _softmax_topk_flags(config: Dict) -> List[str]:
    """Qwen2/3-MoE's router: softmax over all experts, the top k renormalised under ``norm_topk_prob``."""
    if not config.get("norm_topk_prob", False):  # softmax over all experts, top k not renormalised
        return ["--moe-router-pre-softmax"]
    _require(config["num_experts_per_tok"] > 1, "norm_topk_prob true with num_experts_per_tok 1: megatron's top-1 "
                                                "is not renormalised")
    return []


def _qwen2_moe_flags(config: Dict, zero) -> List[str]:
    flags = _qwen2_structure(config)
    shared = config.get("shared_expert_intermediate_size", 0)
    if shared and not (zero("shared_fc1") and zero("shared_fc2")):  # gated with sigmoid(h . g)
        flags += ["--moe-shared-expert-intermediate-size", str(shared), "--moe-shared-expert-gate"]
    return flags + _softmax_topk_flags(config)


def _qwen3_moe_flags(config: Dict, zero) -> List[str]:
    _require(not config.get("attention_bias", False), "attention_bias true: Qwen3-MoE then has an o_proj bias, which "
                                                      "our attention lacks")
    flags = _qwen2_structure({**config, "num_experts": config.get("num_experts") or config["num_local_experts"],
                              "qkv_bias": False})
    return flags + ["--qk-layernorm"] + _softmax_topk_flags(config)


def _glm4_moe_flags(config: Dict, zero) -> List[str]:
    k, layers = config["num_experts_per_tok"], config["num_hidden_layers"]
    width, dense = config["moe_intermediate_size"], config.get("first_k_dense_replace", 1)
    flags = _experts_flags(config["n_routed_experts"], width, config["intermediate_size"],
                           [0] * dense + [1] * (layers - dense))
    # its router computes in fp32 whatever the model's dtype
    flags += ["--moe-router-score-function", "sigmoid", "--moe-router-dtype", "fp32"]
    _require(config.get("norm_topk_prob", True) == (k > 1), f"norm_topk_prob {config.get('norm_topk_prob', True)} with "
             f"num_experts_per_tok {k}: megatron's sigmoid top-k renormalises exactly when k > 1")
    scaling = float(config.get("routed_scaling_factor", 1.0))
    if scaling != 1.0:  # megatron multiplies the gates after the renormalisation, as the class does
        flags += ["--moe-router-topk-scaling-factor", repr(scaling)]
    if not zero("expert_bias"):  # DeepSeek-V3's aux-loss-free balancing: trained on with its updates
        flags.append("--moe-router-enable-expert-bias")
    if config.get("use_qk_norm", False):
        flags.append("--qk-layernorm")
    groups, group_topk = config.get("n_group", 1), config.get("topk_group", 1)
    if groups > 1 and group_topk < groups:  # every group chosen: no limit
        _require(k // group_topk == 2, f"n_group {groups}, topk_group {group_topk}, num_experts_per_tok {k}: megatron "
                                       f"scores a group by its best k / topk_group experts, the class by its best 2")
        flags += ["--moe-router-num-groups", str(groups), "--moe-router-group-topk", str(group_topk)]
    shared = config.get("n_shared_experts") or 0
    if shared and not (zero("shared_fc1") and zero("shared_fc2")):  # ungated
        flags += ["--moe-shared-expert-intermediate-size", str(shared * width)]
    return flags + (["--add-qkv-bias"] if config.get("attention_bias", False) else [])


def _remote_flags(config: Dict, zero) -> List[str]:
    _require(isinstance(config.get(REMOTE_FLAGS), list),
             f"{REMOTE_FLAGS} is missing: not written by tools/convert_checkpoint.py export")
    return _qwen2_structure(config) + [str(flag) for flag in config[REMOTE_FLAGS]]


MIXTRAL = Architecture(
    "MixtralForCausalLM", "mixtral",
    names={**_LLAMA, "router": (_L + "block_sparse_moe.gate.weight",),
           "expert_fc1": (_L + "block_sparse_moe.experts.{expert}.w1.weight",
                          _L + "block_sparse_moe.experts.{expert}.w3.weight"),
           "expert_fc2": (_L + "block_sparse_moe.experts.{expert}.w2.weight",)},
    config=_mixtral_config, flags=_mixtral_flags,
    # transformers >= 5 names the block mlp and the experts' matrices gate/up/down_proj
    renames=((r"\.mlp\.gate\.", ".block_sparse_moe.gate."),
             (r"\.mlp\.experts\.(\d+)\.gate_proj\.", r".block_sparse_moe.experts.\1.w1."),
             (r"\.mlp\.experts\.(\d+)\.up_proj\.", r".block_sparse_moe.experts.\1.w3."),
             (r"\.mlp\.experts\.(\d+)\.down_proj\.", r".block_sparse_moe.experts.\1.w2.")),
)
QWEN2_MOE = Architecture(
    "Qwen2MoeForCausalLM", "qwen2_moe",
    names={**_LLAMA, **_QKV_BIAS, **_DENSE_MLP, **_EXPERTS,
           "shared_fc1": (_L + "mlp.shared_expert.gate_proj.weight", _L + "mlp.shared_expert.up_proj.weight"),
           "shared_fc2": (_L + "mlp.shared_expert.down_proj.weight",),
           "shared_gate": (_L + "mlp.shared_expert_gate.weight",)},
    config=_qwen2_moe_config, flags=_qwen2_moe_flags,
    # vLLM always builds q/k/v biases and the shared-expert gate; transformers always builds a shared expert
    builds=frozenset({"qkv_bias", "shared_fc1", "shared_fc2", "shared_gate"}),
)
QWEN3_MOE = Architecture(
    "Qwen3MoeForCausalLM", "qwen3_moe",
    names={**_LLAMA, **_QK_NORM, **_DENSE_MLP, **_EXPERTS},
    config=_qwen3_moe_config, flags=_qwen3_moe_flags,
    computes=frozenset({"q_norm", "k_norm"}),
    # not fields of transformers 5's config class, read by its modeling code (head_dim) and by vLLM's and
    # SGLang's (num_experts, head_dim; transformers 5 maps num_experts to num_local_experts)
    reads=frozenset({"head_dim", "num_experts"}),
)
GLM4_MOE = Architecture(
    "Glm4MoeForCausalLM", "glm4_moe",
    names={**_LLAMA, **_QKV_BIAS, **_QK_NORM, **_DENSE_MLP, **_EXPERTS,
           "centroids": (_L + "mlp.gate.weight",),  # BASE at evaluation is its sigmoid top-1
           "expert_bias": (_L + "mlp.gate.e_score_correction_bias",),
           "shared_fc1": (_L + "mlp.shared_experts.gate_proj.weight", _L + "mlp.shared_experts.up_proj.weight"),
           "shared_fc2": (_L + "mlp.shared_experts.down_proj.weight",)},
    config=_glm4_moe_config, flags=_glm4_moe_flags,
    builds=frozenset({"shared_fc1", "shared_fc2", "expert_bias"}),
    reads=frozenset({"head_dim"}), partial_rotary=0.5, ties_head=False,  # vLLM's class never ties lm_head
)
MEGATRON_MOE = Architecture(  # our modeling code (remote_code/), copied into the folder
    "MegatronMoeForCausalLM", "megatron_moe",
    names={**_LLAMA, **_QKV_BIAS, **_DENSE_MLP, **_EXPERTS, "centroids": (_L + "mlp.centroids",),
           "expert_bias": (_L + "mlp.expert_bias",),
           "shared_fc1": (_L + "mlp.shared_expert.gate_proj.weight", _L + "mlp.shared_expert.up_proj.weight"),
           "shared_fc2": (_L + "mlp.shared_expert.down_proj.weight",),
           "shared_gate": (_L + "mlp.shared_expert_gate.weight",)},
    config=_remote_config, flags=_remote_flags, remote_code=True,
)
# export takes the first that computes the model
ARCHITECTURES: Tuple[Architecture, ...] = (MIXTRAL, QWEN2_MOE, QWEN3_MOE, GLM4_MOE, MEGATRON_MOE)


def architecture(name: str) -> Architecture:
    found = [arch for arch in ARCHITECTURES if arch.name == name]
    _require(bool(found), f"architectures [{name!r}]: import supports {[arch.name for arch in ARCHITECTURES]}")
    return found[0]


# ----------------------------------------------------------------------------------------------------------
# export: which class computes the model (decided from the run configuration, before any weight is read)
# ----------------------------------------------------------------------------------------------------------

def check_exportable(args) -> None:
    """Raises ConversionError naming the first architecture flag no record computes."""
    _require(args.num_experts is not None, "--num-experts is unset: only MoE models are exported")
    _require(args.position_embedding_type == "rope",
             f"--position-embedding-type {args.position_embedding_type}: the exported classes need rope")
    _require(args.normalization == "RMSNorm", f"--normalization {args.normalization}: the exported classes need RMSNorm")
    _require(args.swiglu, "--swiglu is off: the exported classes use SwiGLU experts")
    _require(args.disable_bias_linear, "--disable-bias-linear is off: the model's linear layers have biases, the "
             "exported classes have none (export a model trained with --disable-bias-linear)")
    _require(not getattr(args, "apply_layernorm_1p", False),
             "--apply-layernorm-1p: the model's norms scale by 1 + weight, the exported classes' by the weight")
    _require(getattr(args, "fp8_format", None) is None,
             f"--fp8-format {args.fp8_format}: our model computes its GEMMs in FP8, the exported classes cannot")


@dataclass(frozen=True)
class Target:
    """The class that computes a model, the routing it computes and the class's own config.json fields."""

    architecture: Architecture
    routing: EvalRouting
    config: Dict[str, Any] = field(default_factory=dict)


def eval_routing(args) -> EvalRouting:
    """The routing scheme's export hook on these flags; ConversionError (naming the flag) if it refuses."""
    scheme = SCHEME_FLAGS.get(args.moe_router_type)
    _require(scheme is not None and scheme.export is not None,
             f"--moe-router-type {args.moe_router_type}: this routing scheme has no export "
             f"(exported: {', '.join(n for n, s in sorted(SCHEME_FLAGS.items()) if s.export)})")
    try:
        return scheme.export(args)
    except ValueError as refusal:
        raise ConversionError(str(refusal)) from None


def _target(arch: Architecture, args, routing: EvalRouting) -> Target:
    roles = _model_roles(args, routing)
    missing = sorted(roles - set(arch.names))
    if missing:
        raise Unfit(f"{_role_flag(missing[0], args)}: {arch.name} has no {_ROLE_TEXT.get(missing[0], missing[0])}")
    lacking = sorted(arch.computes - roles)
    if lacking:
        raise Unfit(f"no {_role_flag(lacking[0], args)}: {arch.name} always has {_ROLE_TEXT[lacking[0]]}")
    _fits(arch.remote_code or routing.score is not None, f"{routing.flags}: only our remote code computes it, not "
                                                         f"{arch.name}")
    _fits(arch.partial_rotary is not None or args.rotary_percent == 1.0,
          f"--rotary-percent {args.rotary_percent}: {arch.name} rotates the whole head")
    return Target(arch, routing, arch.config(args, routing))


def export_target(args) -> Target:
    """The first record whose class computes this model; ConversionError naming the flag none computes."""
    check_exportable(args)
    routing = eval_routing(args)
    refusals = []
    for arch in ARCHITECTURES:
        try:
            return _target(arch, args, routing)
        except Unfit as why:
            refusals.append(str(why))
    raise ConversionError("; ".join(reversed(refusals)))  # the most general record's reason first


def _rope(args, arch: Architecture) -> Dict[str, Any]:
    rope = {"rope_type": "default", "rope_theta": float(args.rotary_base)}
    if arch.partial_rotary is not None:
        rope["partial_rotary_factor"] = args.rotary_percent
    return rope


def hf_config(args, target: Target, vocab_size: int, bos_token_id, eos_token_id, dtype: torch.dtype) -> Dict:
    """config.json of the class that computes this model. Besides the fields of transformers 5's config
    classes, the legacy ``rope_theta`` / ``partial_rotary_factor`` / ``torch_dtype`` that transformers 5
    still reads and older transformers (and the serving engines built on them) read instead."""
    arch = target.architecture
    rope = _rope(args, arch)
    config = dict(
        architectures=[arch.name],
        model_type=arch.model_type,
        vocab_size=vocab_size,
        hidden_size=args.hidden_size,
        num_hidden_layers=args.num_layers,
        num_attention_heads=args.num_attention_heads,
        num_key_value_heads=query_groups(args),
        hidden_act="silu",
        max_position_embeddings=args.max_position_embeddings,
        rms_norm_eps=args.norm_epsilon,
        rope_parameters=rope,
        tie_word_embeddings=not args.untie_embeddings_and_output_weights,
        attention_dropout=0.0,
        num_experts_per_tok=args.moe_router_topk,
        initializer_range=args.init_method_std,
        torch_dtype=_DTYPE_NAMES[dtype],
        use_cache=True,
        bos_token_id=bos_token_id,
        eos_token_id=eos_token_id,
        **{key: value for key, value in rope.items() if key != "rope_type"},
    )
    config.update(target.config)
    return config


def args_from_hf_config(config: Dict, zero: Callable[[str], bool] = lambda role: False) -> List[str]:
    """Our model flags for a config.json a record reads; ConversionError names any other field.
    ``zero(role)``: whether the folder's tensors of that role are all zero (default: not known to be)."""
    arch = architecture(hf_architecture(config))
    quantized = config.get("quantization_config")
    _require(not quantized, f"quantization_config {(quantized or {}).get('quant_method', quantized)!r}: the folder "
             "stores quantized (FP8 or MXFP4) weights; convert them to bf16 first (dequantised weights, no "
             "quantization_config)")
    _require(config.get("hidden_act", "silu") == "silu", f"hidden_act {config.get('hidden_act')!r}: only 'silu' (SwiGLU)")
    scaling = config.get("rope_scaling") or {}
    rope = config.get("rope_parameters") or {}
    _require(scaling.get("rope_type", scaling.get("type", "default")) == "default"
             and rope.get("rope_type", "default") == "default",
             "rope_scaling: only the default (unscaled) rotary embedding is supported")
    rope_theta = rope.get("rope_theta", config.get("rope_theta", 10000.0))
    _require(float(rope_theta).is_integer(), f"rope_theta {rope_theta}: --rotary-base takes an integer")
    rotary = rope.get("partial_rotary_factor", config.get("partial_rotary_factor", arch.partial_rotary))
    _require(arch.partial_rotary is not None or rotary in (None, 1.0),
             f"partial_rotary_factor {rotary}: {arch.name} rotates the whole head")
    heads = config["num_attention_heads"]
    kv_heads = config.get("num_key_value_heads") or heads
    flags = [
        "--num-layers", str(config["num_hidden_layers"]), "--hidden-size", str(config["hidden_size"]),
        "--num-attention-heads", str(heads),
        *(["--group-query-attention", "--num-query-groups", str(kv_heads)] if kv_heads != heads else []),
        "--kv-channels", str(config.get("head_dim") or config["hidden_size"] // heads),
        "--max-position-embeddings", str(config["max_position_embeddings"]),
        "--normalization", "RMSNorm", "--norm-epsilon", repr(float(config["rms_norm_eps"])), "--swiglu",
        "--position-embedding-type", "rope", "--rotary-base", str(int(rope_theta)),
        "--moe-router-topk", str(config["num_experts_per_tok"]), "--disable-bias-linear",
    ]
    if rotary not in (None, 1.0):
        flags += ["--rotary-percent", repr(float(rotary))]
    if not config.get("tie_word_embeddings", False):
        flags.append("--untie-embeddings-and-output-weights")
    return flags + arch.flags(config, zero)


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
    fp32: bool = False  # written in fp32 whatever the folder's dtype


def _unit(arch: Architecture, role: str, layer: Optional[int] = None, expert: Optional[int] = None) -> Unit:
    return Unit(OUR_KEYS[role].format(layer=layer),
                tuple(name.format(layer=layer, expert=expert) for name in arch.names[role]),
                _KINDS.get(role, "copy"), expert, role in _FP32)


def units(args, target: Target) -> List[Unit]:
    """Every tensor of the model, in the order the Hugging Face files list them."""
    arch = target.architecture
    out = [_unit(arch, "embedding")]
    for layer in range(args.num_layers):
        for role in _layer_roles(args, layer, target.routing):
            experts = range(args.num_experts) if role in _PER_EXPERT else [None]
            out += [_unit(arch, role, layer, e) for e in experts]
    out.append(_unit(arch, "final_norm"))
    if args.untie_embeddings_and_output_weights:
        out.append(_unit(arch, "output"))
    return out


def export_only_units(args, target: Target) -> List[Unit]:
    """Tensors export writes besides :func:`units` (and import never reads): lm_head as a copy of the
    embeddings, for a class whose serving engines do not tie them."""
    if args.untie_embeddings_and_output_weights or target.architecture.ties_head:
        return []
    return [Unit(OUR_KEYS["embedding"], target.architecture.names["output"], "vocab")]


def _zero_shapes(role: str, args) -> List[Tuple[int, ...]]:
    hidden, width, dim = args.hidden_size, args.moe_ffn_hidden_size, head_dim(args)
    return {"qkv_bias": [(args.num_attention_heads * dim,), (query_groups(args) * dim,), (query_groups(args) * dim,)],
            # a shared expert of the routed experts' width, all zeros: its output is exactly 0
            "shared_fc1": [(width, hidden), (width, hidden)], "shared_fc2": [(hidden, width)],
            "shared_gate": [(1, hidden)], "expert_bias": [(args.num_experts,)]}[role]


def zero_fills(args, target: Target, dtype: torch.dtype) -> List[Tuple[str, Tuple[int, ...], torch.dtype]]:
    """(name, shape, dtype) of the tensors the class always builds and our model lacks, written as zeros."""
    arch, out = target.architecture, []
    for layer in range(args.num_layers):
        has = set(_layer_roles(args, layer, target.routing))
        for role in sorted(arch.builds - has):
            if role in _EVERY_LAYER or args.moe_layer_pattern[layer]:
                role_dtype = torch.float32 if role in _FP32 else dtype
                names = [name.format(layer=layer) for name in arch.names[role]]
                out += [(name, shape, role_dtype) for name, shape in zip(names, _zero_shapes(role, args))]
    return out


def role_names(arch: Architecture, role: str, layers: int) -> List[str]:
    """The class's tensors of a per-layer, not per-expert, role in every layer."""
    return [name.format(layer=layer) for layer in range(layers) for name in arch.names.get(role, ())]


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


_FUSED = re.compile(r"^model\.layers\.(\d+)\..*experts\.(gate_up_proj|down_proj)$")


def hf_locations(arch: Architecture, stored: Dict[str, Tuple[int, ...]]
                 ) -> Dict[str, Tuple[str, Optional[int], Optional[int]]]:
    """Where each tensor of the record's names lies among a folder's ``stored`` names (and shapes):
    ``{name: (stored name, expert, half)}``; the tensor is ``stored[expert]``, then its ``half``-th half of
    rows when set. transformers >= 5 may save the experts of a layer fused ([E, 2F, H] ``gate_up_proj``,
    [E, H, F] ``down_proj``) and spell names otherwise (the record's ``renames``)."""
    out: Dict[str, Tuple[str, Optional[int], Optional[int]]] = {}
    for name, shape in stored.items():
        match = _FUSED.match(name)
        if match is None:
            renamed = name
            for pattern, replacement in arch.renames:
                renamed = re.sub(pattern, replacement, renamed)
            out[renamed] = (name, None, None)
            continue
        layer, kind = int(match.group(1)), match.group(2)
        for e in range(shape[0] if shape else 0):
            if kind == "down_proj":
                out[arch.names["expert_fc2"][0].format(layer=layer, expert=e)] = (name, e, None)
            else:
                for half, per_expert in enumerate(arch.names["expert_fc1"]):
                    out[per_expert.format(layer=layer, expert=e)] = (name, e, half)
    return out
