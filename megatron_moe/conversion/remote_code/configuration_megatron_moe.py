"""Hugging Face config of a megatron-moe model whose routing no transformers class has (BASE, SAM).

Written into exported folders by megatron-moe's tools/convert_checkpoint.py, loaded with
``trust_remote_code=True``. Everything but the routing is Qwen2-MoE's config (RMSNorm, RoPE, SwiGLU,
grouped-query attention without biases, dense layers in ``mlp_only_layers``).
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
    """

    model_type = "megatron_moe"

    def __init__(self, moe_router_type="base", sam_num_groups=1, sam_renormalize_gates=False,
                 moe_router_score_function="softmax", moe_router_pre_softmax=False, moe_router_num_groups=None,
                 moe_router_group_topk=None, **kwargs):
        self.moe_router_type = moe_router_type
        self.moe_router_score_function = moe_router_score_function
        self.moe_router_pre_softmax = moe_router_pre_softmax
        self.moe_router_num_groups = moe_router_num_groups
        self.moe_router_group_topk = moe_router_group_topk
        self.sam_num_groups = sam_num_groups
        self.sam_renormalize_gates = sam_renormalize_gates
        super().__init__(**kwargs)
