"""The model flags of the MoE families people pretrain (Qwen3-MoE, DeepSeek-V3-style routing as in GLM-4.5), with
Megatron-LM's names and meanings: they parse, reach megatron-core's TransformerConfig and our layer spec, and
what megatron-core cannot do with them is one line before anything is built. Training with them (parity
across layouts, the expert bias through checkpoints, resharding and export) is tested in
tests/test_convert_checkpoint.py; recomputing the shared experts here."""

import re

import pytest

from launcher import TINY_MOE, train_losses
from megatron_moe.arguments import ConfigError, moe_layer_pattern, parse_args
from megatron_moe.model import decoder_block_spec, transformer_config_from_args
from megatron_moe.norms import LayerNorm, RMSNorm

REQUIRED = TINY_MOE + ["--train-iters", "1"]
SIGMOID = ["--moe-router-score-function", "sigmoid"]
BASE = ["--moe-router-type", "base", "--moe-router-topk", "1", "--moe-aux-loss-coeff", "0"]


def args_with(*flags):
    return parse_args(REQUIRED + list(flags), world_size=1)


@pytest.mark.parametrize("flags, message", [
    (["--moe-router-bias-update-rate", "1e-2"], "--moe-router-bias-update-rate needs --moe-router-enable-expert-bias"),
    (["--moe-router-enable-expert-bias"], "--moe-router-enable-expert-bias needs --moe-router-score-function sigmoid"),
    (SIGMOID + ["--moe-router-enable-expert-bias", "--moe-router-load-balancing-type", "sinkhorn",
                "--moe-aux-loss-coeff", "0"],
     "--moe-router-enable-expert-bias does not work with --moe-router-load-balancing-type sinkhorn"),
    (["--moe-router-topk-scaling-factor", "0"], "--moe-router-topk-scaling-factor must be > 0"),
    (BASE + ["--moe-router-topk-scaling-factor", "2"],
     "--moe-router-topk-scaling-factor does not apply to --moe-router-type base"),
    (["--moe-router-type", "sam"] + SIGMOID + ["--moe-router-enable-expert-bias"],
     "--moe-router-score-function does not apply to --moe-router-type sam"),
    (["--moe-router-load-balancing-type", "aux_loss", "seq_aux_loss", "--moe-aux-loss-coeff", "1e-2"],
     "--moe-router-load-balancing-type aux_loss seq_aux_loss needs one --moe-aux-loss-coeff per type"),
    (["--moe-router-load-balancing-type", "aux_loss", "sinkhorn", "--moe-aux-loss-coeff", "1e-2", "0"],
     "sinkhorn is a routing, not a loss: give it alone"),
    (["--moe-router-load-balancing-type", "aux_loss", "seq_aux_loss", "--moe-aux-loss-coeff", "1e-2", "-1"],
     "--moe-aux-loss-coeff must be >= 0, got -1.0"),
    (["--moe-layer-freq", "[__import__('os').getpid()]"], "only lists, integers, + and * are allowed"),
    (["--moe-layer-freq", "[1]*10**9"], "only lists, integers, + and * are allowed, not 10**9"),
    (["--moe-layer-freq", "[1]*4000000000"], "makes a list longer than the 4 layers"),
    (["--moe-layer-freq", "([0]*1+[1]*2)"], "must hold 4 entries of 0 or 1, got ([0]*1+[1]*2) = [0, 1, 1]"),
    (["--moe-layer-freq", "[[1]]*4"], "must hold 4 entries of 0 or 1"),
    (["--num-attention-heads", "6"], "--hidden-size 64 is not divisible by --num-attention-heads 6; give the head "
                                     "width with --kv-channels"),
    (["--recompute-granularity", "selective", "--recompute-modules", "shared_experts"],
     "--recompute-modules shared_experts needs shared experts (--moe-shared-expert-intermediate-size)"),
])
def test_refused_in_one_line(flags, message):
    with pytest.raises(ConfigError, match=re.escape(message)) as error:
        args_with(*flags)
    assert "\n" not in str(error.value)


def test_moe_layer_frequency_takes_megatron_lms_list_expressions():
    assert moe_layer_pattern(args_with("--moe-layer-freq", "([0]*1+[1]*3)")) == [0, 1, 1, 1]
    assert moe_layer_pattern(args_with("--moe-layer-freq", "[1, 0] * 2")) == [1, 0, 1, 0]
    assert moe_layer_pattern(args_with("--moe-layer-freq", "2*[0]+[1]*(1+1)")) == [0, 0, 1, 1]
    config = transformer_config_from_args(args_with("--moe-layer-freq", "([0]*1+[1]*3)"))
    assert config.moe_layer_freq == [0, 1, 1, 1]


def test_glm_4_5_air_attention_shape_parses():
    """4096 hidden, 96 query heads of 128 over 8 key/value groups: megatron-core needs the head width only."""
    args = args_with("--hidden-size", "4096", "--num-attention-heads", "96", "--kv-channels", "128",
                     "--group-query-attention", "--num-query-groups", "8", "--ffn-hidden-size", "10944",
                     "--moe-ffn-hidden-size", "1408")
    config = transformer_config_from_args(args)
    assert (config.kv_channels, config.num_attention_heads, config.num_query_groups) == (128, 96, 8)


def test_deepseek_v3_router_flags_reach_megatron_core():
    args = args_with(*SIGMOID, "--moe-router-enable-expert-bias", "--moe-router-bias-update-rate", "1e-2",
                     "--moe-router-topk-scaling-factor", "2.5", "--moe-router-dtype", "fp32",
                     "--moe-router-load-balancing-type", "seq_aux_loss", "--moe-aux-loss-coeff", "1e-4")
    config = transformer_config_from_args(args)
    assert config.moe_router_enable_expert_bias and config.moe_router_bias_update_rate == 1e-2
    assert config.moe_router_topk_scaling_factor == 2.5
    assert (config.moe_router_load_balancing_type, config.moe_aux_loss_coeff) == ("seq_aux_loss", 1e-4)
    default = transformer_config_from_args(args_with())
    assert not default.moe_router_enable_expert_bias and default.moe_router_topk_scaling_factor is None
    assert default.moe_router_bias_update_rate == 1e-3  # DeepSeek-V3's, Megatron-LM's default


def test_several_load_balancing_losses_are_megatron_core_lists():
    args = args_with("--moe-router-load-balancing-type", "aux_loss", "seq_aux_loss", "--moe-aux-loss-coeff", "1e-2",
                     "1e-3")
    assert args.moe_router_load_balancing_type == ("aux_loss", "seq_aux_loss")
    assert args.moe_aux_loss_coeff == (1e-2, 1e-3)
    config = transformer_config_from_args(args)
    assert config.moe_router_load_balancing_type == ["aux_loss", "seq_aux_loss"]
    assert config.moe_aux_loss_coeff == [1e-2, 1e-3]
    from megatron_moe.moe.registry import ROUTING_SCHEMES

    assert ROUTING_SCHEMES["topk"].tracked_losses(args) == ["load_balancing_loss", "seq_load_balancing_loss"]
    one = args_with("--moe-router-load-balancing-type", "seq_aux_loss", "--moe-aux-loss-coeff", "1e-2")
    assert (one.moe_router_load_balancing_type, one.moe_aux_loss_coeff) == ("seq_aux_loss", 1e-2)  # a list of one
    assert args.flags(["model"])[args.flags(["model"]).index("--moe-aux-loss-coeff") + 1:][:2] == ["0.01", "0.001"]


@pytest.mark.parametrize("normalization, norm", [("RMSNorm", RMSNorm), ("LayerNorm", LayerNorm)])
def test_qk_layernorm_is_our_norm_of_head_width(normalization, norm):
    """On the local spec, megatron-core's q/k norms would be torch's (no sequence parallelism): ours, per
    --normalization, whose weight gradients megatron-core sums over the tensor-parallel ranks."""
    config = transformer_config_from_args(args_with("--qk-layernorm", "--normalization", normalization))
    assert config.qk_layernorm
    for layer in decoder_block_spec(config, "local", pp_rank=0).layer_specs:
        attention = layer.submodules.self_attention.submodules
        assert attention.q_layernorm is norm and attention.k_layernorm is norm
    from megatron.core.transformer.identity_op import IdentityOp

    plain = decoder_block_spec(transformer_config_from_args(args_with()), "local", pp_rank=0).layer_specs[0]
    assert plain.submodules.self_attention.submodules.q_layernorm is IdentityOp


def test_recomputing_the_shared_experts_trains_the_same(tmp_path):
    """megatron-core checkpoints the shared expert (--recompute-modules shared_experts): same losses."""
    flags = TINY_MOE + ["--moe-shared-expert-intermediate-size", "128"]
    plain = train_losses(1, flags, tmp_path, train_iters=2)
    recomputed = train_losses(1, flags + ["--recompute-granularity", "selective", "--recompute-modules",
                                          "shared_experts", "core_attn"], tmp_path, train_iters=2)
    assert recomputed == plain
