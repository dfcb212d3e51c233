"""The NaN/Inf check of a training step (megatron_moe.step_guard): one check on the grad norm megatron-core
computes, found before the update, naming the iteration and the rank that had it."""

import json
from pathlib import Path

import pytest
import torch

from launcher import SCRIPTS, TINY_MOE, torchrun
from megatron_moe.step_guard import poison_if_non_finite

EP2 = TINY_MOE + ["--expert-model-parallel-size", "2", "--train-iters", "3"]
_MOE_FLAGS = {"--num-experts", "--moe-router-topk", "--moe-aux-loss-coeff", "--moe-token-dispatcher-type"}
# a dense model has one optimizer, whose step computes no grad norm without clipping (a chained one always does)
DENSE = [flag for i, flag in enumerate(TINY_MOE) if flag not in _MOE_FLAGS and TINY_MOE[i - 1] not in _MOE_FLAGS]


def test_poison_keeps_finite_gradients_bit_exact_and_makes_a_non_finite_loss_poison_every_gradient():
    weight = torch.randn(5, generator=torch.Generator().manual_seed(0), requires_grad=True)
    (weight.square().sum() * 0.3).backward()
    plain = weight.grad.clone()
    weight.grad = None
    loss = weight.square().sum() * 0.3
    guarded = poison_if_non_finite(loss)
    assert torch.equal(guarded, loss)
    guarded.backward()
    assert torch.equal(weight.grad, plain)
    weight.grad = None
    poison_if_non_finite(weight.sum() + float("inf")).backward()  # +inf loss, gradient 1 without the poison
    assert torch.isnan(weight.grad).all()


def run_with_nan(tmp_path, kind, flags=(), model=EP2):
    prefix = tmp_path / "sums"
    result = torchrun(2, SCRIPTS / "train_with_nan.py", [str(prefix), *model, *flags], check=False,
                      env=dict(NAN_RANK="1", NAN_ITERATION="2", NAN_KIND=kind))
    sums = [json.loads(Path(f"{prefix}.{rank}.json").read_text()) for rank in (0, 1)]
    return result, sums


def test_an_inf_loss_with_finite_gradients_on_one_rank_stops_before_the_update_naming_it(tmp_path):
    result, sums = run_with_nan(tmp_path, "loss")
    assert result.returncode != 0
    # every rank stops with the same line (torchrun ends the other rank when the first one exits, possibly
    # before it prints), then torchrun reports the failed workers
    errors = [line for line in result.stderr.splitlines() if "pretrain_gpt_moe.py: error:" in line]
    assert 1 <= len(errors) <= 2 and len(set(errors)) == 1, result.stderr[-3000:]
    assert errors[0].endswith("pretrain_gpt_moe.py: error: iteration 2: lm loss is inf on rank 1; lower --lr, "
                                 "check the data, or pass --skip-nan-iterations to skip such steps")
    assert all(list(rank_sums) == ["1"] for rank_sums in sums)  # iteration 2 never finished


@pytest.mark.parametrize("kind, flags, model", [
    ("loss", [], EP2), ("grad", [], EP2),
    ("grad", ["--clip-grad", "0"], DENSE + ["--train-iters", "3"]),  # no norm from the step: the guard asks for one
])
def test_skip_nan_iterations_skips_exactly_that_update(kind, flags, model, tmp_path):
    result, sums = run_with_nan(tmp_path, kind, ["--skip-nan-iterations", *flags], model)
    assert result.returncode == 0, result.stderr[-3000:]
    skipped = [line for line in result.stdout.splitlines() if line.startswith(" iteration        2/")][0]
    # Megatron-LM's line for an interval of skipped steps: no lm loss, no grad norm, the interval's counts
    assert "number of skipped iterations:   1 |" in skipped and "number of nan iterations:   1 |" in skipped, skipped
    assert " lm loss:" not in skipped and " grad norm:" not in skipped, skipped
    for rank_sums in sums:
        assert rank_sums["2"] == rank_sums["1"] != rank_sums["3"]
