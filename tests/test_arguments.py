"""Megatron-LM flags parse to the right config; layouts that cannot work fail with one line, before building."""

import subprocess
import sys

import pytest

from launcher import REPO, TINY_MOE
from megatron_moe.arguments import ConfigError, moe_layer_pattern, parse_args, transformer_config_from_args

REQUIRED = TINY_MOE + ["--train-iters", "1"]


def args_with(*flags, world_size=1):
    return parse_args(REQUIRED + list(flags), world_size=world_size)


@pytest.mark.parametrize(
    "flags, world_size, message",
    [
        (["--tensor-model-parallel-size", "3"], 4, "not divisible by tensor x pipeline"),
        (["--pipeline-model-parallel-size", "3"], 3, "--num-layers 4 is not divisible by --pipeline-model-parallel-size 3"),
        (["--expert-model-parallel-size", "3"], 3, "--num-experts 4 is not divisible by --expert-model-parallel-size 3"),
        (["--expert-model-parallel-size", "2", "--tensor-model-parallel-size", "2", "--sequence-parallel"], 2,
         "must divide the data-parallel size"),
        (["--tensor-model-parallel-size", "2"], 2, "needs --sequence-parallel"),
        (["--moe-router-topk", "5"], 1, "--moe-router-topk 5 must be between 1 and --num-experts 4"),
        (["--global-batch-size", "6"], 4, "--global-batch-size 6 is not divisible"),
        (["--num-attention-heads", "3"], 1, "not divisible by --num-attention-heads 3"),
        (["--moe-layer-freq", "[1,0]"], 1, "must hold 4 entries"),
        (["--fp8-format", "hybrid"], 1, "--fp8-format needs --transformer-impl transformer_engine"),
        (["--lr-warmup-iters", "1"], 1, "--lr-warmup-iters 1 must be below the decay length 1"),
    ],
)
def test_impossible_layouts_are_one_line_errors(flags, world_size, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("+", r"\+")) as error:
        args_with(*flags, world_size=world_size)
    assert "\n" not in str(error.value)


def test_derived_sizes():
    args = args_with("--tensor-model-parallel-size", "2", "--sequence-parallel", "--expert-model-parallel-size", "2",
                     world_size=8)
    assert (args.data_parallel_size, args.num_microbatches) == (4, 1)
    assert args.moe_ffn_hidden_size == args.ffn_hidden_size == 256


def test_moe_layer_frequency_forms():
    assert moe_layer_pattern(args_with("--moe-layer-freq", "2")) == [1, 0, 1, 0]
    assert moe_layer_pattern(args_with("--moe-layer-freq", "[0,1,1,1]")) == [0, 1, 1, 1]


def test_config_carries_megatron_moe_requirements():
    config = transformer_config_from_args(args_with("--moe-router-topk", "1"))
    assert config.moe_router_pre_softmax  # megatron's top-1 routing requires it
    assert not config.add_bias_linear  # SequentialMLP experts fail in autograd with biases
    assert config.num_moe_experts == 4 and config.moe_router_type == "topk"


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
        "pretrain_gpt_moe.py: error: --expert-model-parallel-size 3 must divide the data-parallel size 1")
    assert "Traceback" not in result.stderr and "iteration" not in result.stdout
