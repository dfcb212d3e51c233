"""Sample-based training (--train-samples, --lr-*-samples, --lr-warmup-fraction), the batch-size ramp-up
(--rampup-batch-size) and the WSD schedule, with Megatron-LM's meanings: the iterations, the batch of every
iteration, the consumed samples, the learning-rate schedule, the checkpoints at each batch change and an exact
resume in the middle of the ramp."""

import json
import math
import re

import pytest

from launcher import SCRIPTS, TINY_MOE, checkpoint_at, flags_without, torchrun
from megatron_moe.arguments import ConfigError, parse_args
from megatron_moe.arguments.training import rampup_batch_size, sample_based_iterations

# a tiny MoE whose global batch grows 2, 4, 6, 8 over the first 16 samples on 2 data-parallel ranks
RAMP = flags_without(TINY_MOE, "--lr-warmup-iters", "--micro-batch-size") + [
    "--micro-batch-size", "1", "--train-samples", "40", "--rampup-batch-size", "2", "2", "16",
    "--lr-warmup-samples", "4", "--lr-decay-style", "cosine", "--num-workers", "0"]
RAMP_BATCHES = [2, 2, 2, 4, 4, 6, 8, 8]  # Megatron-LM's calculator at 0, 2, 4, 6, 10, 14, 20, 28 samples


def _megatron_lm_iterations(train_samples, global_batch_size, rampup):
    """Megatron-LM's update_train_iters, run on megatron-core's calculator."""
    from megatron.core.num_microbatches_calculator import RampupBatchsizeNumMicroBatchesCalculator

    calculator = RampupBatchsizeNumMicroBatchesCalculator(global_batch_size, 1, 1, False, 0, *rampup)
    iterations = consumed = 0
    batches = []
    while consumed <= rampup[2] and consumed <= train_samples:
        calculator.update(consumed, consistency_check=False)
        batches.append(calculator.get_current_global_batch_size())
        consumed += batches[-1]
        iterations += 1
    if train_samples > consumed:
        iterations += (train_samples - consumed) // global_batch_size
    return iterations, batches


@pytest.mark.parametrize("train_samples, global_batch_size, rampup", [
    (40, 8, [2, 2, 16]), (100, 16, [4, 4, 37]), (1000, 48, [16, 16, 500]), (20, 8, [2, 2, 100]), (17, 8, [2, 6, 3])])
def test_the_ramp_and_the_iterations_are_megatron_cores(train_samples, global_batch_size, rampup):
    iterations, batches = _megatron_lm_iterations(train_samples, global_batch_size, rampup)
    assert sample_based_iterations(train_samples, global_batch_size, rampup) == iterations
    consumed = 0
    for batch in batches:
        assert rampup_batch_size(consumed, global_batch_size, rampup) == batch
        consumed += batch


@pytest.mark.parametrize("flags, message", [
    (["--train-iters", "4", "--train-samples", "40"], "--train-iters and --train-samples exclude each other"),
    (["--train-iters", "4", "--rampup-batch-size", "2", "2", "16"], "--rampup-batch-size needs sample-based training"),
    (["--train-iters", "4", "--lr-decay-samples", "8"], "with --train-iters give --lr-decay-iters"),
    (["--train-samples", "40", "--lr-warmup-iters", "2"], "with --train-samples give --lr-warmup-samples"),
    (["--train-samples", "40", "--rampup-batch-size", "3", "1", "16"], "the ramp's global batch size 3 is not divisible"),
    (["--train-samples", "40", "--rampup-batch-size", "8", "2", "16"], "nothing to ramp"),
    (["--train-samples", "40", "--rampup-batch-size", "2", "4", "16"], "is not a multiple of the increment 4"),
    (["--train-samples", "40", "--lr-warmup-samples", "40"], "--lr-warmup-samples 40 must be below the decay length 40"),
    (["--train-samples", "40", "--lr-warmup-fraction", "0.1", "--lr-warmup-samples", "2"], "exclude each other"),
    (["--train-iters", "4", "--lr-decay-style", "WSD"], "--lr-decay-style WSD needs --lr-wsd-decay-iters"),
    (["--train-samples", "40", "--lr-decay-style", "WSD", "--lr-wsd-decay-iters", "2"], "needs iteration-based"),
    (["--train-iters", "4", "--lr-wsd-decay-iters", "2"], "--lr-wsd-decay-iters needs --lr-decay-style WSD"),
    (["--train-iters", "4"], None),
])
def test_megatron_lms_rules_fail_before_anything_is_built(flags, message):
    argv = flags_without(TINY_MOE, "--lr-warmup-iters") + flags
    if message is None:
        parse_args(argv)
        return
    with pytest.raises(ConfigError, match=re.escape(message)):
        parse_args(argv, world_size=2)


def _scheduler(flags, world_size=1):
    from megatron_moe.training import scheduler_from_args

    class Optimizer:  # what megatron-core's scheduler reads and writes
        param_groups = [{"lr": 0.0, "weight_decay": 0.0}]

    return scheduler_from_args(parse_args(flags_without(TINY_MOE, "--lr-warmup-iters") + flags, world_size),
                               Optimizer())


def test_sample_based_schedule_is_megatron_lms():
    scheduler = _scheduler(["--train-samples", "1000", "--lr-decay-samples", "800", "--lr-warmup-fraction", "0.25",
                            "--lr-warmup-init", "1e-4", "--weight-decay-incr-style", "linear",
                            "--start-weight-decay", "0.01", "--end-weight-decay", "0.1"])
    assert (scheduler.lr_warmup_steps, scheduler.lr_decay_steps, scheduler.wd_incr_steps) == (200, 800, 1000)
    assert (scheduler.init_lr, scheduler.start_wd, scheduler.end_wd, scheduler.wd_incr_style) == (1e-4, 0.01, 0.1, "linear")
    iterations = _scheduler(["--train-iters", "10", "--lr-decay-iters", "6", "--lr-warmup-iters", "2"])
    assert (iterations.lr_warmup_steps, iterations.lr_decay_steps, iterations.wd_incr_steps) == (16, 48, 80)


def test_wsd_holds_the_rate_then_anneals_to_the_minimum():
    scheduler = _scheduler(["--train-iters", "10", "--lr-decay-style", "WSD", "--lr-wsd-decay-iters", "4",
                            "--lr-wsd-decay-style", "linear", "--min-lr", "1e-4"])
    rates = []
    for _ in range(10):
        scheduler.step(increment=8)
        rates.append(scheduler.get_lr(scheduler.optimizer.param_groups[0]))
    assert rates[:6] == [1e-3] * 6  # stable until the last 4 iterations' worth of samples
    assert rates[6] < 1e-3 and rates[6:] == sorted(rates[6:], reverse=True) and rates[-1] == pytest.approx(1e-4)


def _losses_and_log(tmp_path, name, flags):
    out = tmp_path / f"{name}.json"
    result = torchrun(2, SCRIPTS / "train_losses.py", [str(out), *RAMP, *flags])
    # (another rank's output may share a line)
    lines = re.findall(r" iteration +\d+/ *\d+ \|.*", result.stdout)
    return json.loads(out.read_text()), lines, result.stdout


def _field(lines, name):
    return [int(re.search(rf"{name}: +(\d+)", line).group(1)) for line in lines]


def test_the_batch_ramps_up_as_in_megatron_lm_and_resumes_exactly_mid_ramp(tmp_path):
    ckpt = tmp_path / "ckpt"
    straight, lines, stdout = _losses_and_log(tmp_path, "straight", ["--save", str(ckpt)])
    assert len(straight) == sample_based_iterations(40, 8, [2, 2, 16]) == 8
    assert _field(lines, "global batch size") == RAMP_BATCHES
    consumed = [sum(RAMP_BATCHES[:i + 1]) for i in range(8)]
    assert _field(lines, "consumed samples") == consumed
    assert "ramping up batch size from 2 to 4" in stdout
    # Megatron-LM saves when the number of micro batches changes (before iterations 4, 6, 7) and at the end
    assert sorted(p.name for p in ckpt.glob("iter_*")) == [f"iter_{i:07d}" for i in (3, 5, 6, 8)]
    # the learning rate follows the samples: warmup over 4, cosine decay over 40
    rates = [float(re.search(r"learning rate: (\S+) \|", line).group(1)) for line in lines]
    assert rates[0] == pytest.approx(1e-3 * 2 / 4) and rates[1] == pytest.approx(1e-3)
    assert rates[4] == pytest.approx(0.5 * 1e-3 * (1 + math.cos(math.pi * (consumed[4] - 4) / (40 - 4))), rel=1e-5)

    mid_ramp = checkpoint_at(ckpt, 3, tmp_path / "mid_ramp")  # batch 2 done, 4 next
    resumed, resumed_lines, _ = _losses_and_log(tmp_path, "resumed", ["--load", str(mid_ramp)])
    assert resumed == straight[3:], "resumed mid-ramp, the losses must be the uninterrupted run's"
    assert _field(resumed_lines, "global batch size") == RAMP_BATCHES[3:]
    assert _field(resumed_lines, "consumed samples") == consumed[3:]
