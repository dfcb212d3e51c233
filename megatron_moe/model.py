"""The GPT mixture-of-experts model: megatron-core's GPTModel built from our layer spec.

The spec is megatron-core's decoder block spec (dense and MoE layers per ``--moe-layer-freq``) with four
swaps: our sequence-parallel norms and expert fc2 (:class:`ExpertRowParallelLinear`) on the local path,
``RoutedMoELayer`` for the MoE MLP, and the router of the chosen routing scheme. Nothing the model computes
depends on the parallel layout:

- initialisation is ours (:func:`initialize_weights`): every TP/PP (virtual stages too)/EP/ETP/DP layout
  starts from the same model as one process does, which is what makes the parity tests exact;
- the padded vocabulary rows (Megatron pads to a multiple of make-vocab-size-divisible-by x TP, so their
  number depends on TP) get -inf logits (:func:`mask_padded_vocabulary`): they never take part in the
  softmax of the loss or in sampling, and the exported model, trimmed to the real vocabulary, is the
  trained one.
"""

from __future__ import annotations

import math
import re
import zlib
from dataclasses import dataclass
from typing import Any, List, Optional

import torch
import torch.nn.functional as F

from megatron.core import parallel_state
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec
from megatron.core.tensor_parallel import RowParallelLinear
from megatron.core.transformer.enums import AttnBackend
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.moe.moe_layer import MoELayer
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_moe.arguments import RunConfig
from megatron_moe.moe.registry import ROUTING_SCHEMES, RoutedMoELayer
from megatron_moe.platform import require_transformer_engine
from megatron_moe.norms import norm_class


@dataclass
class GPTMoEConfig(TransformerConfig):
    """megatron-core's TransformerConfig plus the routing scheme and its options."""

    moe_router_type: Optional[str] = None  # a key of ROUTING_SCHEMES; None for a dense model
    moe_routing_options: Any = None  # the scheme's options object (SchemeFlags.options_from_args)


class ExpertRowParallelLinear(RowParallelLinear):
    """The local spec's expert fc2, whose output may be changed in place.

    megatron-core 0.16.1's expert MLP adds its fc2 bias, scaled by the routing probability, in place
    (``MLP.forward``: ``output += output_bias * per_token_scale``). With one expert-parallel and one expert
    tensor-parallel rank, RowParallelLinear returns its output through an identity autograd Function, and
    autograd forbids changing that in place; biased experts train on a copy then.
    """

    def forward(self, input_):
        output, bias = super().forward(input_)
        if bias is not None and not self.explicit_expert_comm:
            output = output.clone()
        return output, bias


def decoder_block_spec(config: GPTMoEConfig, transformer_impl: str, pp_rank: Optional[int] = None,
                       vp_stage: Optional[int] = None):
    """Layer specs of this pipeline stage (of its virtual stage ``vp_stage``), with our norms (local path) and
    routing scheme plugged in."""
    use_te = transformer_impl == "transformer_engine"
    if use_te:
        require_transformer_engine()  # one line naming --transformer-impl local, if TE is missing
    block: TransformerBlockSubmodules = get_gpt_decoder_block_spec(
        config, use_transformer_engine=use_te, normalization=config.normalization, vp_stage=vp_stage, pp_rank=pp_rank
    )
    norm = norm_class(config.normalization)
    for layer_spec in block.layer_specs:
        layers = layer_spec.submodules
        if not use_te:
            for field in ("input_layernorm", "pre_mlp_layernorm"):
                if getattr(layers, field) is not IdentityOp:
                    setattr(layers, field, norm)
            attention = layers.self_attention.submodules
            for field in ("q_layernorm", "k_layernorm"):  # --qk-layernorm: per head, of head width
                if getattr(attention, field) not in (None, IdentityOp):
                    setattr(attention, field, norm)
        if layers.mlp.module is MoELayer:
            layers.mlp.module = RoutedMoELayer
            layers.mlp.submodules.router = ROUTING_SCHEMES[config.moe_router_type].router
            if not use_te:
                layers.mlp.submodules.experts.submodules.linear_fc2 = ExpertRowParallelLinear
    if not use_te:
        block.layer_norm = norm
    return block


def _list_if_several(value):
    return list(value) if isinstance(value, tuple) else value


def transformer_config_from_args(args: RunConfig) -> GPTMoEConfig:
    """The megatron-core TransformerConfig (plus our routing fields) a run config describes."""
    moe = args.num_experts is not None
    te = args.transformer_impl == "transformer_engine"
    interleaved = args.virtual_pipeline_model_parallel_size is not None
    dtype = torch.bfloat16 if args.bf16 else torch.float16 if args.fp16 else torch.float32
    fp8 = {}
    if args.fp8_format is not None:
        fp8 = dict(fp8=args.fp8_format, fp8_recipe=args.fp8_recipe, fp8_param=args.fp8_param_gather,
                   fp8_margin=args.fp8_margin, fp8_interval=args.fp8_interval,
                   fp8_amax_history_len=args.fp8_amax_history_len, fp8_amax_compute_algo=args.fp8_amax_compute_algo,
                   fp8_wgrad=args.fp8_wgrad)
    tp_comm_overlap = {}
    if te and args.tp_comm_overlap:  # Transformer Engine's userbuffers (the local spec has none)
        tp_comm_overlap = dict(
            tp_comm_overlap=True, tp_comm_bulk_wgrad=args.tp_comm_bulk_wgrad, tp_comm_bulk_dgrad=args.tp_comm_bulk_dgrad,
            tp_comm_overlap_ag=args.tp_comm_overlap_ag, tp_comm_overlap_rs=args.tp_comm_overlap_rs,
            tp_comm_overlap_rs_dgrad=args.tp_comm_overlap_rs_dgrad, tp_comm_split_ag=args.tp_comm_split_ag,
            tp_comm_split_rs=args.tp_comm_split_rs, tp_comm_bootstrap_backend=args.tp_comm_bootstrap_backend)
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
            # Transformer Engine kernels: the local spec runs without them (speed only)
            moe_grouped_gemm=args.moe_grouped_gemm and te,
            moe_permute_fusion=args.moe_permute_fusion and te,
            moe_router_fusion=args.moe_router_fusion and te,
            moe_router_padding_for_fp8=args.moe_router_padding_for_fp8,
            moe_shared_expert_intermediate_size=args.moe_shared_expert_intermediate_size,
            moe_shared_expert_gate=args.moe_shared_expert_gate,
            moe_router_enable_expert_bias=args.moe_router_enable_expert_bias,
            moe_router_bias_update_rate=args.moe_router_bias_update_rate,
            moe_router_topk_scaling_factor=args.moe_router_topk_scaling_factor,
        )
    return GPTMoEConfig(
        num_layers=args.num_layers,
        hidden_size=args.hidden_size,
        ffn_hidden_size=args.ffn_hidden_size,
        num_attention_heads=args.num_attention_heads,
        num_query_groups=args.num_query_groups if args.group_query_attention else None,
        kv_channels=args.kv_channels,
        qk_layernorm=args.qk_layernorm,
        normalization=args.normalization,
        layernorm_epsilon=args.norm_epsilon,
        gated_linear_unit=args.swiglu,
        activation_func=F.silu if args.swiglu else F.gelu,
        add_bias_linear=not args.disable_bias_linear,
        add_qkv_bias=args.add_qkv_bias,
        hidden_dropout=args.hidden_dropout,
        attention_dropout=args.attention_dropout,
        init_method_std=args.init_method_std,
        tensor_model_parallel_size=args.tensor_model_parallel_size,
        pipeline_model_parallel_size=args.pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=args.virtual_pipeline_model_parallel_size,
        num_layers_in_first_pipeline_stage=args.decoder_first_pipeline_num_layers,
        num_layers_in_last_pipeline_stage=args.decoder_last_pipeline_num_layers,
        account_for_embedding_in_pipeline_split=args.account_for_embedding_in_pipeline_split,
        account_for_loss_in_pipeline_split=args.account_for_loss_in_pipeline_split,
        context_parallel_size=args.context_parallel_size,
        cp_comm_type="p2p" if args.context_parallel_size > 1 else None,  # Megatron-LM's default
        # Megatron-LM: overlapped (unbatched) send/receive in the interleaved schedule only
        overlap_p2p_comm=interleaved and args.overlap_p2p_comm,
        batch_p2p_comm=not (interleaved and args.overlap_p2p_comm),
        expert_model_parallel_size=args.expert_model_parallel_size,
        expert_tensor_parallel_size=args.expert_tensor_parallel_size,
        sequence_parallel=args.sequence_parallel,
        num_moe_experts=args.num_experts,
        moe_router_topk=args.moe_router_topk if moe else 2,
        moe_ffn_hidden_size=args.moe_ffn_hidden_size if moe else None,
        moe_layer_freq=list(args.moe_layer_pattern) if moe else 1,
        # several load-balancing losses: megatron-core takes lists
        moe_aux_loss_coeff=_list_if_several(args.moe_aux_loss_coeff),
        moe_router_load_balancing_type=_list_if_several(args.moe_router_load_balancing_type),
        moe_token_dispatcher_type=args.moe_token_dispatcher_type,
        moe_router_num_groups=args.moe_router_num_groups,
        moe_router_group_topk=args.moe_router_group_topk,
        moe_router_type=args.moe_router_type if moe else None,
        moe_routing_options=ROUTING_SCHEMES[args.moe_router_type].flags.options_from_args(args) if moe else None,
        bf16=args.bf16,
        fp16=args.fp16,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        autocast_dtype=dtype,
        variable_seq_lengths=moe and args.pipeline_model_parallel_size > 1,
        attention_backend=AttnBackend[args.attention_backend],
        # Megatron-LM passes its flag (default off) over megatron-core's default (on); layer scaling implies it
        attention_softmax_in_fp32=args.attention_softmax_in_fp32 or args.apply_query_key_layer_scaling,
        apply_query_key_layer_scaling=args.apply_query_key_layer_scaling,
        layernorm_zero_centered_gamma=args.apply_layernorm_1p,
        cross_entropy_loss_fusion=args.cross_entropy_loss_fusion,
        cross_entropy_fusion_impl=args.cross_entropy_fusion_impl,
        calculate_per_token_loss=args.calculate_per_token_loss,
        deterministic_mode=args.deterministic_mode,
        disable_bf16_reduced_precision_matmul=args.disable_bf16_reduced_precision_matmul,
        recompute_granularity=args.recompute_granularity,
        recompute_method=args.recompute_method,
        recompute_num_layers=args.recompute_num_layers,
        recompute_modules=list(args.recompute_modules) if args.recompute_modules is not None else None,
        # megatron-core initialises first because only its init routines set the tensor-parallel attributes
        # of a weight; initialize_weights then redraws every matrix layout-independently.
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
        **tp_comm_overlap,
    )


def build_model_chunks(config: GPTMoEConfig, args: RunConfig) -> List[GPTModel]:
    """This pipeline rank's model chunks, in order: one GPTModel per virtual pipeline stage (one without
    virtual stages), as Megatron-LM's get_model builds them. Chunk i of pipeline rank r holds the layers of
    virtual stage i x PP + r; the first rank's chunk 0 has the embedding, the last rank's last chunk the
    output layer."""
    if args.virtual_pipeline_model_parallel_size is None:
        return [build_model(config, args)]
    return [build_model(config, args, vp_stage) for vp_stage in range(args.virtual_pipeline_model_parallel_size)]


def build_model(config: GPTMoEConfig, args: RunConfig, vp_stage: Optional[int] = None) -> GPTModel:
    """This pipeline stage's GPTModel (its virtual stage ``vp_stage``'s), initialised layout-independently."""
    model = GPTModel(
        config=config,
        transformer_layer_spec=decoder_block_spec(config, args.transformer_impl, vp_stage=vp_stage),
        vocab_size=args.padded_vocab_size,
        max_sequence_length=args.max_position_embeddings,
        pre_process=parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage),
        post_process=parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage),
        share_embeddings_and_output_weights=not args.untie_embeddings_and_output_weights,
        position_embedding_type=args.position_embedding_type,
        rotary_percent=args.rotary_percent,
        rotary_base=args.rotary_base,
        fp16_lm_cross_entropy=args.fp16_lm_cross_entropy,
        vp_stage=vp_stage,
    )
    reduce_experts_over_expert_data_parallel(model, config)
    initialize_weights(model, config, args.seed)
    mask_padded_vocabulary(model, args.tokenizer_vocab_size)
    if config.bf16 or config.fp16:
        # what Megatron-LM's Float16Module does to the parameters: a few (the learned position embedding)
        # are created in fp32 whatever params_dtype says
        model = model.to(config.params_dtype)
    return model


def reduce_experts_over_expert_data_parallel(model: GPTModel, config: TransformerConfig) -> None:
    """Marks the routed experts' parameters as expert-parallel when EP = 1 but ETP differs from TP.

    megatron-core 0.16.1 marks them (``allreduce = False``: DDP reduces their gradients over the expert
    data-parallel group, the optimizer keeps them apart) only when EP > 1. With EP = 1 and ETP != TP the expert
    data-parallel group is not the data-parallel one: with ETP < TP the tensor-parallel ranks each pass their
    own sequence shard through whole experts, with ETP > TP the data-parallel ranks of an expert-TP group hold
    different slices. Reduced as dense parameters, over the data-parallel group, their gradients would miss
    the other shards' tokens or mix different slices.
    """
    if config.expert_model_parallel_size > 1 or config.expert_tensor_parallel_size == config.tensor_model_parallel_size:
        return
    for layer in model.decoder.layers:
        if isinstance(layer.mlp, MoELayer):
            for param in layer.mlp.experts.parameters():
                param.allreduce = False


def mask_padded_vocabulary(model: GPTModel, vocab_size: int) -> None:
    """Gives the padded vocabulary rows (ids >= ``vocab_size``) logits of -inf, on the ranks that hold some.

    A forward hook on the output layer, so that both megatron-core's vocab-parallel cross entropy and
    callers that read the logits see them: exp(-inf) = 0, so those rows add nothing to the softmax and get
    no gradient. Each tensor-parallel rank holds a contiguous slice of the padded vocabulary (or, when the
    layer gathers its output, all of it).
    """
    padded = model.vocab_size
    if not model.post_process or vocab_size >= padded:
        return
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    local = padded // parallel_state.get_tensor_model_parallel_world_size()
    real_in_slice = min(max(vocab_size - tp_rank * local, 0), local)  # real rows at the start of this slice

    def mask(module, inputs, output):
        logits, bias = output
        real = vocab_size if logits.shape[-1] == padded else real_in_slice
        if real == logits.shape[-1]:
            return output
        padding = torch.arange(logits.shape[-1], device=logits.device) >= real
        return logits.masked_fill(padding, float("-inf")), bias

    model.output_layer.register_forward_hook(mask)


# ----------------------------------------------------------------------------------------------------------
# layout-independent initialisation
# ----------------------------------------------------------------------------------------------------------

_LAYER = re.compile(r"decoder\.layers\.(\d+)\.")
_LOCAL_EXPERT = re.compile(r"local_experts\.(\d+)\.")
# --moe-grouped-gemm: Transformer Engine's TEGroupedMLP holds local expert i's matrix as linear_fcN.weight{i}
_GROUPED_EXPERT = re.compile(r"experts\.(linear_fc[12])\.weight(\d+)$")
_OUTPUT_PROJECTIONS = ("linear_proj.weight", "linear_fc2.weight")


def global_parameter_name(model: GPTModel, name: str) -> str:
    """The parameter's name in the one-process model: global layer number and global expert index."""
    if name == "output_layer.weight" and model.share_embeddings_and_output_weights:
        return "embedding.word_embeddings.weight"  # the last stage's copy of the tied embedding
    layer_match = _LAYER.search(name)
    if layer_match is None:
        return name
    layer = model.decoder.layers[int(layer_match.group(1))]
    name = _LAYER.sub(f"decoder.layers.{layer.layer_number - 1}.", name, count=1)
    expert_match = _LOCAL_EXPERT.search(name)
    if expert_match is not None:
        expert = layer.mlp.local_expert_indices[int(expert_match.group(1))]
        name = _LOCAL_EXPERT.sub(f"local_experts.{expert}.", name, count=1)
    grouped_match = _GROUPED_EXPERT.search(name)
    if grouped_match is not None:  # named as SequentialMLP names it: both initialise the same experts
        linear, local = grouped_match.groups()
        expert = layer.mlp.local_expert_indices[int(local)]
        name = _GROUPED_EXPERT.sub(f"experts.local_experts.{expert}.{linear}.weight", name)
    return name


def _partition_dim(name: str, param: torch.nn.Parameter) -> int:
    grouped_match = _GROUPED_EXPERT.search(name)
    if grouped_match is not None:
        # TE marks every grouped weight as split on dim 0; megatron splits fc2 (row parallel) on dim 1
        return 0 if grouped_match.group(1) == "linear_fc1" else 1
    return param.partition_dim


def _tensor_parallel_slice(full: torch.Tensor, dim: int, rank: int, size: int, gated: bool):
    if gated:
        # A gated (SwiGLU) fc1 keeps [gate; up] per rank: each half is sharded on its own.
        return torch.cat([half.chunk(size, dim)[rank] for half in full.chunk(2, dim)], dim)
    return full.chunk(size, dim)[rank]


@torch.no_grad()
def initialize_weights(model: GPTModel, config: TransformerConfig, seed: int) -> None:
    """Draws every matrix from N(0, std) with a generator seeded by (seed, its global name).

    The full (unsharded) tensor is drawn and this rank's tensor-parallel slice kept, so the values are
    the same whatever the TP/PP/EP layout. Output projections use megatron's scaled std
    ``init_method_std / sqrt(2 * num_layers)``. Vectors: biases are zeroed, norm weights keep their ones.
    """
    tp = (parallel_state.get_tensor_model_parallel_rank(), parallel_state.get_tensor_model_parallel_world_size())
    etp = (parallel_state.get_expert_tensor_parallel_rank(), parallel_state.get_expert_tensor_parallel_world_size())
    output_std = config.init_method_std / math.sqrt(2.0 * config.num_layers)
    for name, param in model.named_parameters():
        if param.dim() < 2:
            if name.endswith("bias"):
                param.zero_()
            continue
        global_name = global_parameter_name(model, name)
        generator = torch.Generator().manual_seed(zlib.crc32(f"{seed}:{global_name}".encode()))
        sharded = getattr(param, "tensor_model_parallel", False)
        rank, size = etp if ".experts." in name else tp  # routed experts only: shared experts use TP
        shape = list(param.shape)
        if sharded:
            dim = _partition_dim(name, param)
            shape[dim] *= size
        std = output_std if global_name.endswith(_OUTPUT_PROJECTIONS) else config.init_method_std
        full = torch.randn(shape, generator=generator, dtype=torch.float32) * std
        if sharded:
            gated = config.gated_linear_unit and global_name.endswith("linear_fc1.weight")
            full = _tensor_parallel_slice(full, dim, rank, size, gated)
        param.copy_(full)
