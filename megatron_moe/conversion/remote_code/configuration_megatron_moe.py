"""Hugging Face config of a megatron-moe model whose routing no transformers class has (BASE, SAM).

Written into every exported folder by megatron-moe's tools/convert_checkpoint.py, loaded with
``trust_remote_code=True``. Everything but the routing is Qwen2-MoE's config (RMSNorm, RoPE, SwiGLU,
grouped-query attention without biases, dense layers in ``mlp_only_layers``).
"""

from transformers.models.qwen2_moe.configuration_qwen2_moe import Qwen2MoeConfig


class MegatronMoeConfig(Qwen2MoeConfig):
    """Qwen2-MoE's config plus the routing.

    ``moe_router_type``: ``"base"`` (each token to the expert of largest ``h . c_e``, output scaled by
    ``sigmoid(h . c_e)``) or ``"sam"`` (softmax over the experts, the group of largest summed probability,
    the ``num_experts_per_tok`` most probable experts inside it). ``sam_num_groups``: SAM's contiguous
    expert groups; ``sam_renormalize_gates``: SAM gates divided by their sum (else the raw probabilities).
    """

    model_type = "megatron_moe"

    def __init__(self, moe_router_type="base", sam_num_groups=1, sam_renormalize_gates=False, **kwargs):
        self.moe_router_type = moe_router_type
        self.sam_num_groups = sam_num_groups
        self.sam_renormalize_gates = sam_renormalize_gates
        super().__init__(**kwargs)
