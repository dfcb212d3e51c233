"""Hugging Face config of a megatron-moe model whose routing no transformers class computes (SAM, and the
top-k options listed in megatron-moe's docs/conversion.md).

Written into exported folders by megatron-moe's tools/convert_checkpoint.py, loaded with
``trust_remote_code=True``. Everything but the routing is Qwen2-MoE's config (RMSNorm, RoPE, SwiGLU,
grouped-query attention with optional q/k/v biases, dense layers in ``mlp_only_layers``).
"""

from transformers.models.qwen2_moe.configuration_qwen2_moe import Qwen2MoeConfig


class MegatronMoeConfig(Qwen2MoeConfig):
    """Qwen2-MoE's config plus the routing.

    ``moe_router_type``: ``"topk"`` (megatron-core's top-k router: ``moe_router_score_function`` softmax or
    sigmoid, ``moe_router_pre_softmax``, group-limited with ``moe_router_num_groups`` /
    ``moe_router_group_topk``), ``"base"`` (each token to the expert of largest ``h . c_e``, output scaled by
    ``sigmoid(h . c_e)``) or ``"sam"`` (softmax over the experts, the group of largest summed probability,
    the ``num_experts_per_tok`` most probable experts inside it). ``sam_num_groups``: SAM's contiguous
    expert groups; ``sam_renormalize_gates``: SAM gates divided by their sum (else the raw probabilities).
    ``moe_router_enable_expert_bias``: the sigmoid scores plus a per-expert bias (``mlp.expert_bias``) choose
    the experts (DeepSeek-V3's aux-loss-free balancing); ``moe_router_topk_scaling_factor``: the gates are
    multiplied by it. ``moe_shared_expert_intermediate_size``: the width of a shared expert every token
    passes through (None: none), ``moe_shared_expert_gate``: its output scaled by ``sigmoid(h . g)``.
    ``moe_router_dtype``: ``"fp32"`` computes the router's logits in fp32, None in the model's dtype.
    ``head_dim``: the attention heads' width (Qwen2-MoE's attention reads it; default hidden size / heads).
    ``megatron_moe_flags``: the routing flags that rebuild this model in megatron-moe (its import reads them).
    """

    model_type = "megatron_moe"

    def __init__(self, moe_router_type="base", sam_num_groups=1, sam_renormalize_gates=False,
                 moe_router_score_function="softmax", moe_router_pre_softmax=False, moe_router_num_groups=None,
                 moe_router_group_topk=None, moe_router_dtype=None, moe_router_enable_expert_bias=False,
                 moe_router_topk_scaling_factor=None, moe_shared_expert_intermediate_size=None,
                 moe_shared_expert_gate=False, head_dim=None, megatron_moe_flags=None, **kwargs):
        self.moe_router_type = moe_router_type
        self.moe_router_score_function = moe_router_score_function
        self.moe_router_pre_softmax = moe_router_pre_softmax
        self.moe_router_num_groups = moe_router_num_groups
        self.moe_router_group_topk = moe_router_group_topk
        self.moe_router_dtype = moe_router_dtype
        self.moe_router_enable_expert_bias = moe_router_enable_expert_bias
        self.moe_router_topk_scaling_factor = moe_router_topk_scaling_factor
        self.moe_shared_expert_intermediate_size = moe_shared_expert_intermediate_size
        self.moe_shared_expert_gate = moe_shared_expert_gate
        self.sam_num_groups = sam_num_groups
        self.sam_renormalize_gates = sam_renormalize_gates
        self.megatron_moe_flags = megatron_moe_flags
        super().__init__(**kwargs)
        self.head_dim = head_dim or self.hidden_size // self.num_attention_heads
