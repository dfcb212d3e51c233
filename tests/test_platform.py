"""The device layer: each megatron-core compatibility piece is still needed, and the call site it covers works.

If a megatron-core upgrade fixes a call site, `needed` turns False and this test fails: delete the piece.
If an upgrade moves or changes a call site so that the piece no longer covers it, `works` turns False.
"""

import json
import os
import subprocess
import sys

import pytest
import torch

from launcher import REPO, SCRIPTS, TINY_MOE
from megatron_moe import platform
from megatron_moe.errors import ConfigError


@pytest.fixture(scope="module")
def probe():
    result = subprocess.run([sys.executable, str(SCRIPTS / "compat_probe.py")], cwd=REPO, capture_output=True,
                            text=True, timeout=300,
                            env={"PATH": "", "PYTHONWARNINGS": "ignore", "PYTHONPATH": str(REPO)})
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


PIECES = [p.name for p in platform.CPU_COMPAT_PIECES] + [platform.TRANSFORMER_ENGINE_ABSENT_PIECE.name]


@pytest.mark.parametrize("piece", PIECES)
def test_piece_still_needed_by_megatron_core(piece, probe):
    assert probe["needed"][piece], f"megatron-core no longer needs compat piece {piece!r}: remove it"


@pytest.mark.parametrize("piece", PIECES)
def test_piece_covers_its_call_site(piece, probe):
    assert probe["works"][piece]


def test_platform_follows_the_visible_gpus(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert platform.select_platform(None) == platform.Platform(torch.device("cpu"), "gloo")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", lambda index: None)
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert platform.select_platform(None) == platform.Platform(torch.device("cuda", 1), "nccl")
    assert platform.select_platform("cpu") == platform.Platform(torch.device("cpu"), "gloo")


def test_forcing_cuda_without_gpu_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match="--device cuda: torch sees no GPU .*pass --device cpu"):
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


# --- GPU start-up errors, simulated on the CPU -----------------------------------------------------------

class _Run:
    """The fields of a run config that the start-up check reads."""

    def __init__(self, device=None, distributed_backend=None, transformer_impl="local", fp8_format=None):
        self.device, self.distributed_backend = device, distributed_backend
        self.transformer_impl, self.fp8_format = transformer_impl, fp8_format


@pytest.fixture
def gpu(monkeypatch):
    """A machine with 2 GPUs of compute capability 9.0 (a CUDA 12.8 torch with NCCL), Transformer Engine
    absent; the test changes what it needs."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=None: (9, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index=None: "NVIDIA H100 80GB HBM3")
    monkeypatch.setattr(torch.version, "cuda", "12.8")
    monkeypatch.setattr(torch.distributed, "is_nccl_available", lambda: True)
    monkeypatch.setenv("LOCAL_RANK", "0")
    real_find_spec = platform.importlib.util.find_spec
    monkeypatch.setattr(platform.importlib.util, "find_spec",
                        lambda name, *a: None if name == "transformer_engine" else real_find_spec(name, *a))
    return monkeypatch


def _te_installed(monkeypatch, import_error=None):
    real_find_spec, real_import = platform.importlib.util.find_spec, platform.importlib.import_module

    def find_spec(name, *args):
        return object() if name == "transformer_engine" else real_find_spec(name, *args)

    def import_module(name, *args):
        if name.startswith("transformer_engine"):
            if import_error is not None:
                raise import_error
            return object()
        return real_import(name, *args)

    monkeypatch.setattr(platform.importlib.util, "find_spec", find_spec)
    monkeypatch.setattr(platform.importlib, "import_module", import_module)


def test_cpu_machine_refuses_cuda_and_nccl_in_one_line(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.version, "cuda", None)
    with pytest.raises(ConfigError, match=r"^--device cuda: torch sees no GPU \(this torch .* is a CPU-only build\); "
                                          r"run on a GPU node or pass --device cpu$"):
        platform.check_start(_Run(device="cuda"))
    with pytest.raises(ConfigError, match=r"^--distributed-backend nccl needs GPUs, but torch sees none .*"
                                          r"use --distributed-backend gloo --device cpu"):
        platform.check_start(_Run(distributed_backend="nccl"))
    platform.check_start(_Run())  # the CPU defaults pass
    platform.check_start(_Run(device="cpu", distributed_backend="gloo"))


def test_gpu_machine_without_transformer_engine_names_the_way_out(gpu):
    missing = (r"^--transformer-impl transformer_engine \(the default on CUDA\) needs NVIDIA Transformer Engine, "
               r"which is not installed: .*pass --transformer-impl local$")
    with pytest.raises(ConfigError, match=missing):
        platform.check_start(_Run(transformer_impl="transformer_engine"))
    with pytest.raises(ConfigError, match=r"with --fp8-format needs NVIDIA Transformer Engine, which is not installed"):
        platform.check_start(_Run(transformer_impl="transformer_engine", fp8_format="hybrid"))
    platform.check_start(_Run(transformer_impl="local"))  # the way out works
    # where the default spec first needs TE (a model built without the start-up check)
    from megatron_moe.model import decoder_block_spec

    with pytest.raises(ConfigError, match="--transformer-impl local"):
        decoder_block_spec(None, "transformer_engine")


def test_broken_transformer_engine_is_one_line(gpu):
    _te_installed(gpu, OSError("libcudart.so.13: cannot open shared object file\nmore detail"))
    with pytest.raises(ConfigError, match=r"installed but does not import \(OSError: libcudart.so.13: cannot open "
                                          r"shared object file\); reinstall it"):
        platform.check_start(_Run(transformer_impl="transformer_engine"))


@pytest.mark.parametrize("capability, cuda, refused", [
    ((9, 0), "12.8", None), ((10, 0), "12.8", None), ((8, 9), "12.4", None),
    ((8, 9), "12.0", "needs CUDA 12.1 or later; this torch has CUDA 12.0"),
    ((8, 0), "12.8", "needs a GPU of compute capability 8.9 or later (Hopper, Ada); NVIDIA A100 has 8.0"),
    ((7, 0), "12.8", "compute capability 8.9 or later (Hopper, Ada); NVIDIA A100 has 7.0"),
])
def test_fp8_follows_transformer_engines_rule(gpu, capability, cuda, refused):
    _te_installed(gpu)
    gpu.setattr(torch.cuda, "get_device_capability", lambda index=None: capability)
    gpu.setattr(torch.cuda, "get_device_name", lambda index=None: "NVIDIA A100")
    gpu.setattr(torch.version, "cuda", cuda)
    run = _Run(transformer_impl="transformer_engine", fp8_format="hybrid")
    if refused is None:
        platform.check_start(run)
    else:
        with pytest.raises(ConfigError, match="^--fp8-format ") as error:
            platform.check_start(run)
        assert refused in str(error.value)


def test_more_ranks_than_gpus_and_nccl_less_torch_are_refused(gpu):
    gpu.setenv("LOCAL_RANK", "2")
    with pytest.raises(ConfigError, match="LOCAL_RANK 2 but only 2 GPUs visible on this node"):
        platform.check_start(_Run(transformer_impl="local"))
    gpu.setenv("LOCAL_RANK", "0")
    gpu.setattr(torch.distributed, "is_nccl_available", lambda: False)
    with pytest.raises(ConfigError, match="was built without NCCL"):
        platform.check_start(_Run(transformer_impl="local"))


def test_missing_transformer_engine_stops_the_job_before_any_process_group(tmp_path):
    """pretrain_gpt_moe.py with CUDA's defaults on a (simulated) GPU machine without Transformer Engine: exit 2,
    one line, and no process group was ever created (nor the model built)."""
    code = ("import importlib.util, sys, torch, torch.distributed as dist\n"
            "torch.cuda.is_available = lambda: True\n"
            "torch.cuda.device_count = lambda: 1\n"
            "torch.distributed.is_nccl_available = lambda: True\n"
            "created = []\n"
            "dist.init_process_group = lambda *a, **k: created.append(1)\n"
            "sys.argv = ['pretrain_gpt_moe.py'] + sys.argv[1:]\n"
            "import pretrain_gpt_moe\n"
            "status = pretrain_gpt_moe.main()\n"
            "print('process groups created:', len(created))\n"
            "sys.exit(status)\n")
    flags = [f for f in TINY_MOE if f not in ("--device", "cpu")] + ["--train-iters", "1"]
    env = dict(os.environ, PYTHONWARNINGS="ignore", CUDA_VISIBLE_DEVICES="")
    result = subprocess.run([sys.executable, "-c", code, *flags], cwd=REPO, capture_output=True, text=True,
                            timeout=300, env=env)
    assert result.returncode == 2, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("pretrain_gpt_moe.py: error:")]
    assert len(errors) == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert "--transformer-impl transformer_engine (the default on CUDA) needs NVIDIA Transformer Engine" in errors[0]
    assert "process groups created: 0" in result.stdout
