"""An MoE layer under expert parallelism computes what the one-process layer computes, gradients included."""

import pytest
import torch

from launcher import SCRIPTS, TINY_MOE, torchrun

ONE_LAYER = TINY_MOE + ["--num-layers", "1", "--train-iters", "1"]


def layer_results(tmp_path, nproc: int, flags):
    out = tmp_path / f"layer_{nproc}.pt"
    torchrun(nproc, SCRIPTS / "moe_layer_grads.py", [str(out), "2", *ONE_LAYER, *flags])
    return torch.load(out)


@pytest.mark.parametrize("dispatcher", ["alltoall", "allgather"])
def test_topk_layer_under_ep2_equals_one_process(dispatcher, tmp_path):
    flags = ["--moe-token-dispatcher-type", dispatcher]
    reference = layer_results(tmp_path, 1, flags)
    parallel = layer_results(tmp_path, 2, flags + ["--expert-model-parallel-size", "2"])
    for key in ("output", "input_grad"):
        for rank in (0, 1):
            torch.testing.assert_close(parallel[key][rank], reference[key][rank], rtol=1e-5, atol=1e-6)
    assert sorted(parallel["grads"]) == sorted(reference["grads"])
    assert any("local_experts.3." in name for name in reference["grads"])
    for name, grad in reference["grads"].items():
        assert grad.abs().sum() > 0, f"{name} got no gradient"
        torch.testing.assert_close(parallel["grads"][name], grad, rtol=1e-5, atol=1e-6, msg=name)
