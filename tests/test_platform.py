"""The device layer: each megatron-core compatibility piece is still needed, and the call site it covers works.

If a megatron-core upgrade fixes a call site, `needed` turns False and this test fails: delete the piece.
If an upgrade moves or changes a call site so that the piece no longer covers it, `works` turns False.
"""

import json
import subprocess
import sys

import pytest
import torch

from launcher import REPO, SCRIPTS
from megatron_moe import platform


@pytest.fixture(scope="module")
def probe():
    result = subprocess.run([sys.executable, str(SCRIPTS / "compat_probe.py")], cwd=REPO, capture_output=True,
                            text=True, timeout=300, env={"PATH": "", "PYTHONWARNINGS": "ignore"})
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


PIECES = [p.name for p in platform.CPU_COMPAT_PIECES] + [platform.TRANSFORMER_ENGINE_ABSENT_PIECE.name]


@pytest.mark.parametrize("piece", PIECES)
def test_piece_still_needed_by_megatron_core(piece, probe):
    assert probe["needed"][piece], f"megatron-core no longer needs compat piece {piece!r}: remove it"


@pytest.mark.parametrize("piece", PIECES)
def test_piece_covers_its_call_site(piece, probe):
    assert probe["works"][piece]


def test_cpu_platform_without_gpu():
    chosen = platform.select_platform(None)
    assert (chosen.device.type, chosen.backend) == ("cpu", "gloo") or torch.cuda.is_available()
    assert platform.select_platform("cpu") == platform.Platform(torch.device("cpu"), "gloo")


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is visible")
def test_forcing_cuda_without_gpu_is_a_clear_error():
    with pytest.raises(RuntimeError, match="--device cpu"):
        platform.select_platform("cuda")


def test_unknown_device_is_rejected():
    with pytest.raises(ValueError, match="--device"):
        platform.select_platform("tpu")


def test_one_process_group_leaves_the_environment_to_child_processes():
    """A tool run in-process (HF import inside a test, a notebook) joins a one-process group; the processes it
    starts afterwards must not inherit RANK/WORLD_SIZE or a MASTER_PORT that this process's store holds."""
    code = ("import os, torch.distributed as dist\n"
            "from megatron_moe import platform\n"
            "platform.init_distributed(platform.select_platform('cpu'))\n"
            "assert dist.get_world_size() == 1 and dist.get_rank() == 0\n"
            "print(sorted({'RANK', 'WORLD_SIZE', 'LOCAL_RANK', 'MASTER_ADDR', 'MASTER_PORT'} & set(os.environ)))\n")
    env = {"PATH": "", "PYTHONWARNINGS": "ignore", "CUDA_VISIBLE_DEVICES": ""}
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300,
                            env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().splitlines()[-1] == "[]"
