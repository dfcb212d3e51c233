"""Every flag of the example launch scripts is accepted: each script runs with a fake torchrun on PATH that
records its command line; the pretrain flags are then parsed and validated for the world size it implies."""

import os
import subprocess

import pytest

from launcher import REPO
from megatron_moe.arguments import parse_args

FAKE_TORCHRUN = '#!/bin/bash\nprintf "%s\\n" "$@" > "$TORCHRUN_ARGS"\n'
SCRIPTS = {"pretrain_gpt_moe_cpu.sh": {}, "pretrain_gpt_moe_h100.sh": {"NNODES": "2", "NODE_RANK": "1"}}


def recorded_command(script, router, tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "torchrun").write_text(FAKE_TORCHRUN)
    (bin_dir / "torchrun").chmod(0o755)
    record = tmp_path / "argv.txt"
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", TORCHRUN_ARGS=str(record), ROUTER=router,
               **SCRIPTS[script])
    subprocess.run(["bash", str(REPO / "examples" / script)], env=env, check=True, capture_output=True)
    return record.read_text().splitlines()


def split_launch(argv):
    """(torchrun options, pretrain flags) of a recorded command line."""
    entry = argv.index("pretrain_gpt_moe.py")
    launcher, flags = argv[:entry], argv[entry + 1:]
    options = dict(zip(launcher[::2], launcher[1::2])) if "--standalone" not in launcher else \
        dict(zip(launcher[1::2], launcher[2::2]))
    return options, flags


@pytest.mark.parametrize("router", ["topk", "base", "sam"])
@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_example_flags_parse(script, router, tmp_path):
    options, flags = split_launch(recorded_command(script, router, tmp_path))
    world_size = int(options.get("--nnodes", "1")) * int(options["--nproc_per_node"])
    args = parse_args(flags, world_size=world_size)
    assert args.moe_router_type == router and args.num_experts is not None
    assert args.data_parallel_size * args.tensor_model_parallel_size == world_size
    if script.endswith("h100.sh"):
        assert world_size == 16 and options["--node_rank"] == "1"
        assert args.bf16 and args.fp8_format == "hybrid" and args.sequence_parallel
        assert args.transformer_impl == "transformer_engine" and args.use_distributed_optimizer
        assert args.overlap_grad_reduce and args.overlap_param_gather and args.distributed_timeout_minutes == 60
        # megatron's kernels and router options where megatron's router and dispatcher run
        topk = router == "topk"
        assert (args.moe_grouped_gemm, args.moe_permute_fusion, args.moe_router_dtype) == (topk, topk, "fp32" if topk else None)
