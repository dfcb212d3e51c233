"""Megatron-LM flags parse to the right config; layouts that cannot work fail with one line, before building."""

import importlib.util
import os
import re
import subprocess
import sys

import pytest

from launcher import REPO, TINY_MOE
from megatron_moe.arguments import ConfigError, moe_layer_pattern, parse_args
from megatron_moe.arguments.runtime import ATTENTION_BACKENDS, NVTE_ATTENTION_VALUES, NVTE_ATTENTION_VARIABLES
from megatron_moe.model import transformer_config_from_args

REQUIRED = TINY_MOE + ["--train-iters", "1"]


def args_with(*flags, world_size=1):
    return parse_args(REQUIRED + list(flags), world_size=world_size)


@pytest.mark.parametrize(
    "flags, world_size, message",
    [
        (["--tensor-model-parallel-size", "3"], 4, "world size 4 is not divisible by tensor x context x pipeline"),
        (["--pipeline-model-parallel-size", "3"], 3, "--num-layers 4 is not divisible by --pipeline-model-parallel-size 3"),
        (["--expert-model-parallel-size", "3"], 3, "--num-experts 4 is not divisible by --expert-model-parallel-size 3"),
        (["--expert-model-parallel-size", "2", "--tensor-model-parallel-size", "2", "--sequence-parallel"], 2,
         "world size 2 is not divisible by expert-tensor x expert-model x pipeline parallel = 2 x 2 x 1"),
        # expert tensor parallelism (megatron-core: world size divisible by ETP x EP x PP)
        (["--expert-model-parallel-size", "2", "--expert-tensor-parallel-size", "2"], 2,
         "world size 2 is not divisible by expert-tensor x expert-model x pipeline parallel = 2 x 2 x 1"),
        (["--expert-tensor-parallel-size", "0"], 1, "--expert-tensor-parallel-size must be >= 1"),
        # virtual pipeline stages (Megatron-LM's interleaved-schedule rules)
        (["--pipeline-model-parallel-size", "2", "--num-layers-per-virtual-pipeline-stage", "1",
          "--num-virtual-stages-per-pipeline-rank", "2"], 2,
         "give one of --num-layers-per-virtual-pipeline-stage and --num-virtual-stages-per-pipeline-rank"),
        (["--pipeline-model-parallel-size", "2", "--num-layers-per-virtual-pipeline-stage", "3"], 2,
         "--num-layers-per-virtual-pipeline-stage 3 must divide the 2 layers of a pipeline stage"),
        (["--pipeline-model-parallel-size", "2", "--num-virtual-stages-per-pipeline-rank", "4"], 2,
         "--num-virtual-stages-per-pipeline-rank 4 must divide the 2 layers of a pipeline stage"),
        (["--num-layers-per-virtual-pipeline-stage", "2"], 1,
         "virtual pipeline stages need --pipeline-model-parallel-size > 1, got 1"),
        (["--pipeline-model-parallel-size", "2", "--num-virtual-stages-per-pipeline-rank", "2",
          "--no-overlap-p2p-communication"], 2,
         "virtual pipeline stages need --pipeline-model-parallel-size > 2 with --no-overlap-p2p-communication"),
        (["--pipeline-model-parallel-size", "2", "--num-virtual-stages-per-pipeline-rank", "2",
          "--global-batch-size", "6"], 2, "3 micro batches per step (global batch / (micro batch x data "
                                          "parallel)) is not a multiple"),
        # uneven pipeline stages
        (["--decoder-first-pipeline-num-layers", "1"], 1,
         "--decoder-first-pipeline-num-layers needs --pipeline-model-parallel-size > 1"),
        (["--pipeline-model-parallel-size", "2", "--decoder-first-pipeline-num-layers", "1",
          "--account-for-loss-in-pipeline-split"], 2,
         "--decoder-first-pipeline-num-layers and --account-for-loss-in-pipeline-split exclude each other"),
        (["--pipeline-model-parallel-size", "2", "--decoder-first-pipeline-num-layers", "1",
          "--decoder-last-pipeline-num-layers", "2"], 2,
         "--num-layers 4 less the first/last pipeline stage's layers leaves 1 for 0 other stages"),
        (["--pipeline-model-parallel-size", "2", "--account-for-embedding-in-pipeline-split"], 2,
         "--num-layers 4 + 1 (the embedding/loss counted as layers) is not divisible by "
         "--pipeline-model-parallel-size 2"),
        (["--pipeline-model-parallel-size", "2", "--decoder-first-pipeline-num-layers", "1",
          "--num-virtual-stages-per-pipeline-rank", "3"], 2,
         "--num-virtual-stages-per-pipeline-rank 3 must divide the 1 layers of the first pipeline stage"),
        (["--pipeline-model-parallel-size", "2", "--decoder-first-pipeline-num-layers", "2",
          "--num-layers-per-virtual-pipeline-stage", "1"], 2,
         "with --decoder-first/last-pipeline-num-layers give --num-virtual-stages-per-pipeline-rank"),
        (["--tensor-model-parallel-size", "2"], 2, "needs --sequence-parallel"),
        (["--moe-router-topk", "5"], 1, "--moe-router-topk 5 must be between 1 and --num-experts 4"),
        (["--global-batch-size", "6"], 4, "--global-batch-size 6 is not divisible"),
        (["--num-attention-heads", "3"], 1, "not divisible by --num-attention-heads 3"),
        (["--moe-layer-freq", "[1,0]"], 1, "must hold 4 entries"),
        (["--fp8-format", "hybrid"], 1, "--fp8-format needs --transformer-impl transformer_engine"),
        (["--lr-warmup-iters", "1"], 1, "--lr-warmup-iters 1 must be below the decay length 1"),
        # data-parallel reduction and gathering
        (["--overlap-param-gather", "--overlap-grad-reduce"], 1, "--overlap-param-gather needs --use-distributed-optimizer"),
        (["--overlap-param-gather", "--use-distributed-optimizer"], 1, "--overlap-param-gather needs --overlap-grad-reduce"),
        (["--ddp-bucket-size", "1000"], 1, "--ddp-bucket-size needs --overlap-grad-reduce"),
        (["--overlap-grad-reduce", "--ddp-bucket-size", "0"], 1, "--ddp-bucket-size must be >= 1"),
        (["--grad-reduce-in-bf16"], 1, "--grad-reduce-in-bf16 needs --bf16"),
        (["--bf16", "--grad-reduce-in-bf16", "--accumulate-allreduce-grads-in-fp32"], 1,
         "--grad-reduce-in-bf16 and --accumulate-allreduce-grads-in-fp32 exclude each other"),
        # activation recomputation
        (["--recompute-granularity", "full"], 1, "--recompute-granularity full needs --recompute-method"),
        (["--recompute-granularity", "full", "--recompute-method", "block"], 1,
         "needs --recompute-num-layers between 1 and the 4 layers of a pipeline stage, got None"),
        (["--recompute-granularity", "full", "--recompute-method", "uniform", "--recompute-num-layers", "3",
          "--pipeline-model-parallel-size", "2"], 2, "between 1 and the 2 layers of a pipeline stage, got 3"),
        (["--recompute-granularity", "full", "--recompute-method", "uniform", "--recompute-num-layers", "3"], 1,
         "--recompute-method uniform recomputes groups of --recompute-num-layers 3 layers, which must divide the "
         "layers of every pipeline stage (4;"),
        (["--recompute-granularity", "full", "--recompute-method", "uniform", "--recompute-num-layers", "2",
          "--pipeline-model-parallel-size", "2", "--num-layers-per-virtual-pipeline-stage", "1"], 2,
         "between 1 and the 1 layers of a pipeline stage, got 2"),
        (["--recompute-granularity", "full", "--recompute-method", "uniform", "--recompute-num-layers", "2",
          "--pipeline-model-parallel-size", "2", "--decoder-first-pipeline-num-layers", "1"], 2,
         "which must divide the layers of every pipeline stage (1, 3;"),
        (["--recompute-granularity", "selective", "--recompute-method", "uniform"], 1,
         "--recompute-method and --recompute-num-layers need --recompute-granularity full"),
        (["--recompute-method", "uniform"], 1, "--recompute-method needs --recompute-granularity"),
        (["--recompute-modules", "moe"], 1, "--recompute-modules needs --recompute-granularity"),
        (["--recompute-granularity", "full", "--recompute-method", "uniform", "--recompute-num-layers", "1",
          "--recompute-modules", "moe"], 1, "--recompute-modules needs --recompute-granularity selective"),
        (["--recompute-granularity", "selective", "--recompute-modules", "moe_act"], 1,
         "--recompute-modules moe_act needs --moe-grouped-gemm"),
        (["--recompute-granularity", "selective", "--recompute-modules", "shared_experts"], 1,
         "--recompute-modules shared_experts needs shared experts"),
        pytest.param(["--recompute-granularity", "selective", "--recompute-modules", "layernorm"], 1,
                     "--recompute-modules layernorm needs Transformer Engine installed",
                     marks=pytest.mark.skipif(importlib.util.find_spec("transformer_engine") is not None,
                                              reason="Transformer Engine is installed")),
        (["--moe-layer-recompute", "--recompute-granularity", "full", "--recompute-method", "uniform",
          "--recompute-num-layers", "1"], 1, "--moe-layer-recompute is selective recomputation; it contradicts"),
        # topk router options
        (["--moe-z-loss-coeff", "-1"], 1, "--moe-z-loss-coeff must be >= 0"),
        (["--moe-expert-capacity-factor", "0"], 1, "--moe-expert-capacity-factor must be > 0"),
        (["--moe-pad-expert-input-to-capacity"], 1, "--moe-pad-expert-input-to-capacity needs --moe-expert-capacity-factor"),
        (["--moe-token-drop-policy", "position"], 1, "--moe-token-drop-policy needs --moe-expert-capacity-factor"),
        (["--moe-expert-capacity-factor", "1", "--moe-router-load-balancing-type", "sinkhorn"], 1,
         "--moe-expert-capacity-factor does not work with --moe-router-load-balancing-type sinkhorn"),
        # ... which the other routing schemes do not have
        (["--moe-router-type", "base", "--moe-router-topk", "1", "--moe-aux-loss-coeff", "0",
          "--moe-expert-capacity-factor", "1"], 1, "--moe-expert-capacity-factor does not apply to --moe-router-type base"),
        (["--moe-router-type", "base", "--moe-router-topk", "1", "--moe-aux-loss-coeff", "0",
          "--moe-z-loss-coeff", "1e-3"], 1, "--moe-z-loss-coeff does not apply to --moe-router-type base"),
        (["--moe-router-type", "sam", "--moe-z-loss-coeff", "1e-3"], 1,
         "--moe-z-loss-coeff does not apply to --moe-router-type sam"),
        (["--moe-router-type", "sam", "--moe-expert-capacity-factor", "1"], 1,
         "--moe-expert-capacity-factor does not apply to --moe-router-type sam: SAM caps each group with --sam-capacity-factor"),
        (["--moe-router-type", "sam", "--moe-router-score-function", "sigmoid"], 1,
         "--moe-router-score-function does not apply to --moe-router-type sam"),
        (["--moe-router-type", "sam", "--moe-router-dtype", "fp64"], 1,
         "--moe-router-dtype fp64 does not apply to --moe-router-type sam"),
        (["--moe-router-type", "sam", "--transformer-impl", "transformer_engine", "--moe-permute-fusion"], 1,
         "--moe-permute-fusion does not apply to --moe-router-type sam"),
        # runtime
        (["--distributed-backend", "nccl"], 1, "--distributed-backend nccl needs the cuda device"),
        (["--distributed-timeout-minutes", "0"], 1, "--distributed-timeout-minutes must be > 0"),
        (["--transformer-impl", "transformer_engine", "--use-flash-attn", "--attention-backend", "fused"], 1,
         "--use-flash-attn means --attention-backend flash; it contradicts --attention-backend fused"),
        (["--transformer-impl", "transformer_engine", "--attention-backend", "local"], 1,
         "--attention-backend local needs --transformer-impl local"),
        (["--ckpt-format", "torch"], 1, "--ckpt-format torch (Megatron-LM's) is not supported here: checkpoints are"),
    ],
)
def test_impossible_layouts_are_one_line_errors(flags, world_size, message):
    with pytest.raises(ConfigError, match=re.escape(message)) as error:
        args_with(*flags, world_size=world_size)
    assert "\n" not in str(error.value)


def test_derived_sizes():
    args = args_with("--tensor-model-parallel-size", "2", "--sequence-parallel", "--expert-model-parallel-size", "2",
                     world_size=8)
    assert (args.data_parallel_size, args.num_microbatches) == (4, 1)
    assert args.moe_ffn_hidden_size == args.ffn_hidden_size == 256
    assert args.expert_tensor_parallel_size == 2  # Megatron-LM's default: the tensor-parallel size
    assert args.virtual_pipeline_model_parallel_size is None


@pytest.mark.parametrize("flags, world_size, etp, vpp", [
    # expert tensor parallelism below, equal to and above TP (MoE parallel folding)
    (["--tensor-model-parallel-size", "2", "--sequence-parallel", "--expert-model-parallel-size", "2",
      "--expert-tensor-parallel-size", "1"], 4, 1, None),
    (["--expert-model-parallel-size", "2", "--expert-tensor-parallel-size", "2"], 4, 2, None),
    # 4 layers on 2 pipeline ranks: 2 chunks of 1 layer; 1 chunk per rank is no interleaving (Megatron-LM)
    (["--pipeline-model-parallel-size", "2", "--num-layers-per-virtual-pipeline-stage", "1"], 2, 1, 2),
    (["--pipeline-model-parallel-size", "2", "--num-virtual-stages-per-pipeline-rank", "2"], 2, 1, 2),
    (["--pipeline-model-parallel-size", "2", "--num-layers-per-virtual-pipeline-stage", "2"], 2, 1, None),
    (["--pipeline-model-parallel-size", "2", "--num-virtual-stages-per-pipeline-rank", "1"], 2, 1, None),
])
def test_expert_tensor_and_virtual_pipeline_sizes(flags, world_size, etp, vpp):
    args = args_with(*flags, world_size=world_size)
    assert (args.expert_tensor_parallel_size, args.virtual_pipeline_model_parallel_size) == (etp, vpp)
    config = transformer_config_from_args(args)
    assert (config.expert_tensor_parallel_size, config.virtual_pipeline_model_parallel_size) == (etp, vpp)


@pytest.mark.parametrize("flags, world_size, chunks", [
    # the embedding and the loss count as a layer each: 4 + 2 over 3 stages
    (["--pipeline-model-parallel-size", "3", "--account-for-embedding-in-pipeline-split",
      "--account-for-loss-in-pipeline-split"], 3, [(1, 0), (2, 1), (1, 3)]),
    (["--pipeline-model-parallel-size", "2", "--decoder-last-pipeline-num-layers", "1"], 2, [(3, 0), (1, 3)]),
    # 8 layers, 2 on the first stage, 2 chunks per rank: virtual stages (rank 0, 1, 0, 1) hold 1, 3, 1, 3
    (["--pipeline-model-parallel-size", "2", "--num-layers", "8", "--moe-layer-freq", "1",
      "--decoder-first-pipeline-num-layers", "2", "--num-virtual-stages-per-pipeline-rank", "2"], 2,
     [(1, 0), (3, 1), (1, 4), (3, 5)]),
])
def test_uneven_pipeline_stages_reach_megatron_core(flags, world_size, chunks):
    """(layers, first global layer) of each model chunk, in the order of the virtual stages."""
    from megatron.core.transformer.transformer_block import get_num_layers_to_build
    from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

    args = args_with(*flags, world_size=world_size)
    config = transformer_config_from_args(args)
    vpp, pp = args.virtual_pipeline_model_parallel_size, args.pipeline_model_parallel_size
    stages = [(rank, vp_stage) for vp_stage in (range(vpp) if vpp else [None]) for rank in range(pp)]
    assert [(get_num_layers_to_build(config, vp_stage=vp_stage, pp_rank=rank),
             get_transformer_layer_offset(config, vp_stage=vp_stage, pp_rank=rank))
            for rank, vp_stage in stages] == chunks


def test_moe_layer_frequency_forms():
    assert moe_layer_pattern(args_with("--moe-layer-freq", "2")) == [1, 0, 1, 0]
    assert moe_layer_pattern(args_with("--moe-layer-freq", "[0,1,1,1]")) == [0, 1, 1, 1]


def test_config_carries_megatron_moe_requirements():
    config = transformer_config_from_args(args_with("--moe-router-topk", "1"))
    assert config.moe_router_pre_softmax  # megatron's top-1 routing requires it
    assert config.num_moe_experts == 4 and config.moe_router_type == "topk"


def _without(flags, name):
    """``flags`` without flag ``name`` (and its value, unless it is a switch)."""
    i = flags.index(name)
    return flags[:i] + flags[i + (1 if i + 1 == len(flags) or flags[i + 1].startswith("--") else 2):]


@pytest.mark.parametrize("hidden, swiglu, ffn", [(64, True, 128), (100, True, 256), (4096, True, 10880),
                                                 (64, False, 256)])
def test_ffn_hidden_size_defaults_to_megatron_lms(hidden, swiglu, ffn):
    """Megatron-LM: 4h, or with --swiglu int(8h/3/64) x 64 (about the parameters of a 4h MLP)."""
    flags = _without(REQUIRED, "--ffn-hidden-size") + ["--hidden-size", str(hidden)]
    assert parse_args(flags if swiglu else _without(flags, "--swiglu")).ffn_hidden_size == ffn


def test_swiglu_width_of_zero_is_refused():
    with pytest.raises(ConfigError, match=re.escape("int(8 x 16 / 3 / 64) x 64 = 0 for --hidden-size 16; give "
                                                    "--ffn-hidden-size")):
        parse_args(_without(REQUIRED, "--ffn-hidden-size") + ["--hidden-size", "16"])


def test_query_groups_need_group_query_attention(capsys):
    """Megatron-LM ignores --num-query-groups without --group-query-attention: full multi-head attention;
    here a warning says so."""
    mha = args_with("--num-query-groups", "2")
    assert "warning: --num-query-groups 2 is ignored without --group-query-attention" in capsys.readouterr().err
    assert (mha.group_query_attention, mha.num_query_groups) == (False, 1)
    assert transformer_config_from_args(mha).num_query_groups == 4
    gqa = args_with("--group-query-attention", "--num-query-groups", "2")
    assert transformer_config_from_args(gqa).num_query_groups == 2 and not capsys.readouterr().err
    assert transformer_config_from_args(args_with("--group-query-attention")).num_query_groups == 1
    with pytest.raises(ConfigError, match="--num-query-groups 3 must divide --num-attention-heads"):
        args_with("--group-query-attention", "--num-query-groups", "3")


def _dense():
    """REQUIRED without its MoE flags."""
    flags = REQUIRED
    for moe_flag in [flag for flag in REQUIRED if flag.startswith(("--num-experts", "--moe-"))]:
        flags = _without(flags, moe_flag)
    return flags


@pytest.mark.parametrize("flags", [["--moe-router-topk", "4"], ["--moe-aux-loss-coeff", "0.01"],
                                   ["--moe-router-type", "sam"], ["--sam-num-groups", "2"], ["--no-base-shuffle"],
                                   ["--moe-layer-freq", "2"], ["--moe-grouped-gemm"], ["--moe-layer-recompute"],
                                   ["--expert-tensor-parallel-size", "1"]],
                         ids=lambda flags: flags[0])
def test_moe_flags_on_a_dense_model_are_refused(flags):
    parse_args(_dense())
    with pytest.raises(ConfigError, match=re.escape(f"{flags[0]} needs --num-experts (without it the model is "
                                                    f"dense and the flag would be ignored); give --num-experts or "
                                                    f"remove {flags[0]}")):
        parse_args(_dense() + flags)


def test_tokenizer_type_defaults_to_pretrain_gpts_gpt2_bpe(tmp_path):
    """Megatron-LM's pretrain_gpt.py defaults --tokenizer-type to GPT2BPETokenizer (its args_defaults), as the
    gpt3 example relies on: it passes only --vocab-file and --merge-file."""
    without = _without(_without(REQUIRED, "--tokenizer-type"), "--vocab-size")
    with pytest.raises(ConfigError, match=r"^--tokenizer-type GPT2BPETokenizer \(pretrain_gpt.py's default when "
                                          r"--tokenizer-type is not given\) needs --vocab-file and --merge-file"):
        parse_args(without)
    files = ["--vocab-file", str(REPO / "data" / "gpt2-vocab.json"), "--merge-file", str(REPO / "data" / "gpt2-merges.txt")]
    assert parse_args(without + files).tokenizer_type == "GPT2BPETokenizer"


def test_split_defaults_to_megatron_lms_legacy_value_with_data_files(capsys):
    on_files = _without(REQUIRED, "--mock-data") + ["--data-path", "corpus_text_document"]
    assert parse_args(on_files).split == "969,30,1"
    assert "warning: --data-path without --split: using Megatron-LM's legacy default 969,30,1" in capsys.readouterr().err
    assert parse_args(on_files + ["--split", "98,2,0"]).split == "98,2,0" and not capsys.readouterr().err
    assert args_with().split is None  # mock data: megatron-core draws every split alike


def test_moe_models_keep_their_linear_biases_unless_disabled():
    biased = parse_args(_without(REQUIRED, "--disable-bias-linear"))
    assert transformer_config_from_args(biased).add_bias_linear
    assert not transformer_config_from_args(args_with()).add_bias_linear  # TINY_MOE: --disable-bias-linear


@pytest.mark.parametrize("flags, world_size, message", [
    (["--tensor-model-parallel-size", "2", "--sequence-parallel"], 2,
     "MoE layers with linear biases need --expert-tensor-parallel-size 1 (megatron-core), got 2 (its default is "
     "--tensor-model-parallel-size)"),
    (["--expert-model-parallel-size", "2", "--expert-tensor-parallel-size", "2"], 4,
     "MoE layers with linear biases need --expert-tensor-parallel-size 1"),
    (["--moe-shared-expert-intermediate-size", "64"], 1, "--moe-shared-expert-intermediate-size needs "
                                                         "--disable-bias-linear"),
])
def test_biased_experts_megatron_core_cannot_build_are_refused(flags, world_size, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        parse_args(_without(REQUIRED, "--disable-bias-linear") + flags, world_size=world_size)


def test_data_parallel_flags_reach_megatron_ddp_config():
    from megatron_moe.training import ddp_config_from_args

    plain = ddp_config_from_args(args_with())
    assert (plain.overlap_grad_reduce, plain.overlap_param_gather, plain.bucket_size) == (False, False, None)
    assert plain.grad_reduce_in_fp32 and not plain.use_distributed_optimizer
    overlapped = ddp_config_from_args(args_with("--use-distributed-optimizer", "--overlap-grad-reduce",
                                                "--overlap-param-gather", "--ddp-bucket-size", "5000"))
    assert (overlapped.overlap_grad_reduce, overlapped.overlap_param_gather, overlapped.bucket_size) == (True, True, 5000)
    assert overlapped.use_distributed_optimizer
    # Megatron-LM: bf16 gradients are accumulated and reduced in fp32 unless --grad-reduce-in-bf16
    assert ddp_config_from_args(args_with("--bf16")).grad_reduce_in_fp32
    assert ddp_config_from_args(args_with("--bf16", "--accumulate-allreduce-grads-in-fp32")).grad_reduce_in_fp32
    assert not ddp_config_from_args(args_with("--bf16", "--grad-reduce-in-bf16")).grad_reduce_in_fp32


def test_recompute_flags_reach_transformer_config():
    full = transformer_config_from_args(args_with("--recompute-granularity", "full", "--recompute-method", "block",
                                                  "--recompute-num-layers", "2"))
    assert (full.recompute_granularity, full.recompute_method, full.recompute_num_layers) == ("full", "block", 2)
    selective = transformer_config_from_args(args_with("--recompute-granularity", "selective", "--recompute-modules",
                                                       "moe", "core_attn"))
    assert (selective.recompute_granularity, selective.recompute_modules) == ("selective", ["moe", "core_attn"])
    # deprecated Megatron-LM spellings
    moe_layer = transformer_config_from_args(args_with("--moe-layer-recompute"))
    assert (moe_layer.recompute_granularity, moe_layer.recompute_modules) == ("selective", ["core_attn", "moe"])
    assert args_with("--recompute-activations").recompute_granularity == "selective"
    assert transformer_config_from_args(args_with()).recompute_granularity is None


def test_router_flags_reach_transformer_config():
    config = transformer_config_from_args(args_with(
        "--moe-z-loss-coeff", "1e-3", "--moe-router-dtype", "fp32", "--moe-router-score-function", "sigmoid",
        "--moe-router-pre-softmax", "--moe-expert-capacity-factor", "1.5", "--moe-token-drop-policy", "position",
        "--moe-pad-expert-input-to-capacity"))
    assert (config.moe_z_loss_coeff, config.moe_router_dtype, config.moe_router_score_function) == (1e-3, "fp32", "sigmoid")
    assert (config.moe_expert_capacity_factor, config.moe_token_drop_policy) == (1.5, "position")
    assert config.moe_pad_expert_input_to_capacity and config.moe_router_pre_softmax
    default = transformer_config_from_args(args_with())
    assert not default.moe_router_pre_softmax and default.moe_expert_capacity_factor is None
    assert default.moe_z_loss_coeff is None and default.moe_router_dtype is None
    assert not transformer_config_from_args(args_with("--moe-router-topk", "1", "--moe-router-score-function",
                                                      "sigmoid")).moe_router_pre_softmax
    assert args_with("--moe-z-loss-coeff", "0").moe_z_loss_coeff is None  # off (megatron logs z-loss / coeff)
    sam = args_with("--moe-router-type", "sam", "--moe-router-dtype", "fp32")  # its router GEMM honours it
    assert transformer_config_from_args(sam).moe_router_dtype == "fp32"


def test_runtime_flags():
    from megatron.core.transformer.enums import AttnBackend

    assert transformer_config_from_args(args_with("--attention-backend", "unfused")).attention_backend == AttnBackend.unfused
    assert transformer_config_from_args(args_with()).attention_backend == AttnBackend.auto
    assert args_with("--transformer-impl", "transformer_engine", "--use-flash-attn").attention_backend == "flash"
    args = args_with("--distributed-backend", "gloo", "--distributed-timeout-minutes", "30", "--log-throughput",
                     "--ckpt-format", "torch_dist")
    assert (args.distributed_backend, args.distributed_timeout_minutes) == ("gloo", 30)


def test_attention_environment_that_contradicts_the_backend_is_refused(monkeypatch):
    """A shell's NVTE_FLASH_ATTN=1 with --attention-backend fused fails at parsing, in one line, instead of in
    megatron-core's model constructor on every rank."""
    monkeypatch.setenv("NVTE_FLASH_ATTN", "1")
    with pytest.raises(ConfigError, match=re.escape("the environment sets NVTE_FLASH_ATTN=1, which contradicts "
                                                    "--attention-backend fused (NVTE_FLASH_ATTN=0)")):
        args_with("--attention-backend", "fused")
    assert args_with("--attention-backend", "flash").attention_backend == "flash"


@pytest.mark.parametrize("backend", ATTENTION_BACKENDS)
def test_attention_environment_table_is_megatron_cores(monkeypatch, backend):
    """The values the check accepts are those megatron-core's model sets and asserts."""
    from types import SimpleNamespace

    from megatron.core.models.common.language_module.language_module import LanguageModule
    from megatron.core.transformer.enums import AttnBackend

    expected = dict(zip(NVTE_ATTENTION_VARIABLES, map(str, NVTE_ATTENTION_VALUES[backend])))
    for name, value in expected.items():
        monkeypatch.setenv(name, value)
    args_with("--attention-backend", backend)
    model = SimpleNamespace(config=SimpleNamespace(attention_backend=AttnBackend[backend]))
    LanguageModule._set_attention_backend(model)
    assert {name: os.environ[name] for name in NVTE_ATTENTION_VARIABLES} == expected


def test_unknown_flag_is_named():
    result = subprocess.run([sys.executable, "pretrain_gpt_moe.py", *REQUIRED, "--moe-router-typo", "x"],
                            cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "unrecognized arguments: --moe-router-typo x" in result.stderr


def test_bad_layout_fails_before_building_anything():
    result = subprocess.run([sys.executable, "pretrain_gpt_moe.py", *REQUIRED, "--expert-model-parallel-size", "3"],
                            cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith(
        "pretrain_gpt_moe.py: error: world size 1 is not divisible by expert-tensor x expert-model x pipeline "
        "parallel = 1 x 3 x 1")
    assert "Traceback" not in result.stderr and "iteration" not in result.stdout
