"""pretrain_gpt_moe.py as a job: real indexed data and tokenizer files, bad inputs, NaN, SIGTERM, TensorBoard."""

import math
import os
import re
import signal
import subprocess
import sys

import numpy
import pytest

from launcher import ON_FILES, REPO, TINY_MOE, VOCAB, assert_one_line_error, launch, train_losses
from megatron_moe.arguments import ConfigError, parse_args


def test_weighted_blend_of_indexed_datasets_trains(files, tmp_path):
    cache = tmp_path / "cache"
    flags = ON_FILES + files["tokenizer"] + [
        "--data-path", "0.3", files["a"], "0.7", files["b"], "--split", "90,10,0",
        "--data-cache-path", str(cache), "--eval-interval", "2", "--lr", "1e-2"]
    losses = train_losses(1, flags, tmp_path, 6)
    assert len(losses) == 6 and all(numpy.isfinite(losses))
    # uniformly random tokens: nothing to learn; the untrained model is near uniform over the 257 real tokens
    # (the 127 padded rows of the vocabulary take no part in the softmax: ln 384 = 5.95 if they did)
    assert losses[0] == pytest.approx(math.log(VOCAB + 1), abs=0.05)
    assert any(cache.rglob("*.npy")), "the sample index caches go to --data-cache-path"


def test_missing_prefix_is_one_line_error(files):
    result = launch(ON_FILES + files["tokenizer"] + ["--data-path", files["a"], files["a"] + "_nope", "--train-iters", "1"])
    assert_one_line_error(result, "_nope.bin and .idx not found")


def test_empty_dataset_is_one_line_error(files):
    result = launch(ON_FILES + files["tokenizer"] + ["--data-path", files["empty"], "--train-iters", "1"])
    assert_one_line_error(result, files["empty"])


def test_load_from_incompatible_config_names_the_fields(tmp_path):
    ckpt = tmp_path / "ckpt"
    assert launch(TINY_MOE + ["--train-iters", "1", "--save", str(ckpt)]).returncode == 0
    changed = TINY_MOE + ["--train-iters", "2", "--load", str(ckpt), "--num-experts", "8", "--hidden-size", "128"]
    result = launch(changed)
    assert_one_line_error(result, "different config", "hidden_size (checkpoint 64, now 128)",
                          "num_experts (checkpoint 4, now 8)")


def test_resume_with_another_lr_schedule_needs_a_flag_saying_which_wins(tmp_path):
    """Megatron-LM's rule: --train-iters 2 -> 4 (the decay length) is refused unless a flag picks a side."""
    ckpt = tmp_path / "ckpt"
    assert launch(TINY_MOE + ["--train-iters", "2", "--save", str(ckpt)]).returncode == 0
    longer = TINY_MOE + ["--train-iters", "4", "--load", str(ckpt)]
    assert_one_line_error(launch(longer), "the LR schedule differs from the checkpoint's",
                          "lr_decay_steps (checkpoint 16, now 32", "--override-opt_param-scheduler",
                          "--use-checkpoint-opt_param-scheduler")
    learning_rates = {}
    for flag in ("--override-opt_param-scheduler", "--use-checkpoint-opt_param-scheduler"):
        result = launch(longer + [flag])
        assert result.returncode == 0, result.stderr[-3000:]
        line = next(line for line in result.stdout.splitlines() if line.startswith(" iteration        3/"))
        learning_rates[flag] = float(line.split("learning rate:")[1].split("|")[0])
    # linear decay to 0 over 16 samples (the checkpoint's) or 32 (the flags'); 24 samples consumed
    assert learning_rates == {"--override-opt_param-scheduler": 2.5e-4, "--use-checkpoint-opt_param-scheduler": 0.0}


def test_nan_loss_stops_with_iteration_and_rank_or_is_skipped():
    # lr 1e30: the first update makes the weights ~1e30, so the second forward overflows
    diverging = TINY_MOE + ["--train-iters", "3", "--lr", "1e30"]
    stopped = launch(diverging)
    assert stopped.returncode == 1
    assert stopped.stderr.strip().splitlines()[-1].startswith(
        "pretrain_gpt_moe.py: error: iteration 2: a gradient is NaN/Inf on rank 0"), stopped.stderr[-3000:]
    assert "Traceback" not in stopped.stderr

    skipped = launch(diverging + ["--skip-nan-iterations"])
    assert skipped.returncode == 0, skipped.stderr[-3000:]
    for iteration in (2, 3):  # each log line counts its own interval's, as Megatron-LM's
        line = [line for line in skipped.stdout.splitlines() if line.startswith(f" iteration        {iteration}/")][0]
        assert "number of skipped iterations:   1 |" in line and "number of nan iterations:   1 |" in line, line


def test_sigterm_saves_and_exits(tmp_path):
    ckpt = tmp_path / "ckpt"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", CUDA_VISIBLE_DEVICES="")
    process = subprocess.Popen([sys.executable, "pretrain_gpt_moe.py", *TINY_MOE, "--train-iters", "100000",
                                "--save", str(ckpt), "--exit-signal-handler"],
                               cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    for line in process.stdout:
        if line.startswith(" iteration        2/"):
            process.send_signal(signal.SIGTERM)
            break
    rest = process.communicate(timeout=120)[0]
    assert process.returncode == 0
    saved = int((ckpt / "latest_checkpointed_iteration.txt").read_text())
    assert saved >= 2 and (ckpt / f"iter_{saved:07d}" / "common.pt").is_file()
    assert f"SIGTERM: saved iteration {saved}" in rest


@pytest.mark.parametrize("extra, message", [
    (["--save-interval", "5"], "--save-interval needs --save"),
    (["--exit-signal-handler"], "needs --save"),
    (["--split", "a,b"], "--split 'a,b'"),
    (["--data-path", "x"], "--mock-data and --data-path exclude each other"),
    (["--tokenizer-type", "GPT2BPETokenizer"], "needs --vocab-file and --merge-file"),
])
def test_conflicting_flags_are_config_errors(extra, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        parse_args(TINY_MOE + ["--train-iters", "1"] + extra)


def test_tensorboard_scalars_and_expert_load(tmp_path):
    pytest.importorskip("tensorboard", reason="pip install tensorboard to test --tensorboard-dir")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    board = tmp_path / "tb"
    result = launch(TINY_MOE + ["--train-iters", "2", "--tensorboard-dir", str(board)])
    assert result.returncode == 0, result.stderr[-3000:]
    events = EventAccumulator(str(board)).Reload()
    tags = set(events.Tags()["scalars"])
    assert {"lm loss", "load_balancing_loss", "grad-norm", "learning-rate"} <= tags
    fractions = [events.Scalars(f"expert-load/layer_01/expert_{e:03d}_fraction")[-1].value for e in range(4)]
    assert sum(fractions) == pytest.approx(1.0)
    imbalance = events.Scalars("expert-load/layer_01/max_over_mean")[-1].value
    assert imbalance == pytest.approx(max(fractions) * 4, rel=1e-5)
