"""Megatron-LM's training, logging and speed-only flags in real runs: fp16 loss scaling, what goes to TensorBoard
and W&B (offline), the profiler, garbage collection and data-loader workers, per-token loss normalisation; and
the one info line of each flag that has no effect in a layout."""

import json
import re

import pytest

from launcher import REPO, SCRIPTS, TINY_MOE, flags_without, launch, torchrun, wandb_history
from megatron_moe.arguments import parse_args
from megatron_moe.model import transformer_config_from_args

ITERATIONS = 3
LOGGING = ["--train-iters", str(ITERATIONS), "--log-params-norm", "--log-num-zeros-in-grad",
           "--log-timers-to-tensorboard", "--log-world-size-to-tensorboard", "--log-validation-ppl-to-tensorboard",
           "--manual-gc", "--manual-gc-interval", "1"]


def _log_lines(result):
    assert result.returncode == 0, result.stderr[-3000:]
    return re.findall(r" iteration +\d+/ *\d+ \|.*", result.stdout)


def _values(lines, field):
    return [float(re.search(rf" {field}: +(\S+) \|", line).group(1)) for line in lines]


@pytest.fixture(scope="module")
def logged_runs(tmp_path_factory):
    """The same 3 iterations twice: read by 2 loader workers with the fused cross entropy, TensorBoard, W&B and
    the profiler; and by the training process itself with none of them."""
    root = tmp_path_factory.mktemp("logged")
    full = launch([*TINY_MOE, *LOGGING, "--num-workers", "2", "--cross-entropy-loss-fusion",
                   "--tensorboard-dir", str(root / "tb"), "--wandb-project", "megatron-moe-test",
                   "--wandb-exp-name", "tiny", "--wandb-save-dir", str(root / "wandb"),
                   "--profile", "--use-pytorch-profiler", "--profile-step-start", "1", "--profile-step-end", "2"],
                  timeout=900)
    plain = launch([*TINY_MOE, *LOGGING, "--num-workers", "0"], timeout=900)
    return {"root": root, "full": _log_lines(full), "plain": _log_lines(plain), "stdout": full.stdout}


def test_loader_workers_and_the_fused_cross_entropy_train_the_same_model(logged_runs):
    assert _values(logged_runs["full"], "lm loss") == pytest.approx(_values(logged_runs["plain"], "lm loss"), rel=1e-5)
    assert transformer_config_from_args(parse_args(TINY_MOE + ["--train-iters", "1", "--cross-entropy-loss-fusion"])) \
        .cross_entropy_loss_fusion


def test_the_log_line_has_megatron_lms_optional_fields(logged_runs):
    lines = logged_runs["full"]
    assert len(lines) == ITERATIONS
    assert all(" loss scale: 1.0 |" in line for line in lines)
    norms = _values(lines, "params norm")
    assert all(n > 0 for n in norms) and len(set(norms)) == ITERATIONS  # the parameters change every step
    assert all(z >= 0 for z in _values(lines, "num zeros"))


def test_tensorboard_and_wandb_get_megatron_lms_scalars(logged_runs):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(logged_runs["root"] / "tb")).Reload()
    tags = set(events.Tags()["scalars"])
    assert {"lm loss", "learning-rate", "batch-size", "loss-scale", "grad-norm", "params-norm", "num-zeros",
            "world-size", "iteration-time", "samples vs steps", "validation lm loss", "validation lm loss PPL"} <= tags
    assert [e.step for e in events.Scalars("lm loss")] == list(range(1, ITERATIONS + 1))  # --tensorboard-log-interval 1
    losses = _values(logged_runs["full"], "lm loss")
    rows = [row for row in wandb_history(logged_runs["root"] / "wandb") if "lm loss" in row]
    assert [row["_step"] for row in rows] == list(range(1, ITERATIONS + 1))
    assert [row["lm loss"] for row in rows] == pytest.approx(losses, rel=1e-6)
    assert all({"learning-rate", "grad-norm", "params-norm", "batch-size"} <= set(row) for row in rows)


def test_the_pytorch_profiler_writes_its_trace(logged_runs):
    assert list((logged_runs["root"] / "tb").glob("*.pt.trace.json")), "no trace under --tensorboard-dir"


def test_fp16_overflows_skip_the_iteration_and_lower_the_loss_scale(logged_runs):
    """Dynamic loss scaling as Megatron-LM's: an overflow skips the update (no learning-rate step), counts in
    'number of skipped iterations' and halves the scale (--hysteresis 1); a scale that does not overflow trains
    the fp32 model within fp16's precision."""
    overflowing = _log_lines(launch([*TINY_MOE, "--train-iters", "2", "--fp16", "--initial-loss-scale",
                                     str(2 ** 24), "--hysteresis", "1", "--num-workers", "0"], timeout=900))
    assert _values(overflowing, "loss scale") == [2.0 ** 23, 2.0 ** 22]
    assert _values(overflowing, "number of skipped iterations") == [1, 1]  # the log interval's, as Megatron-LM's
    assert _values(overflowing, "learning rate") == [1e-3, 1e-3]
    training = _log_lines(launch([*TINY_MOE, "--train-iters", "1", "--fp16", "--loss-scale", "4096",
                                  "--num-workers", "0"], timeout=900))
    assert _values(training, "number of skipped iterations") == [0]
    plain = logged_runs["plain"]
    assert _values(training, "lm loss") == pytest.approx(_values(plain, "lm loss")[:1], rel=1e-3)
    assert _values(training, "grad norm") == pytest.approx(_values(plain, "grad norm")[:1], rel=2e-2)


@pytest.mark.parametrize("flags, world_size, infos", [
    (["--moe-grouped-gemm", "--moe-permute-fusion", "--moe-router-fusion", "--attention-backend", "fused"], 1,
     ["--moe-grouped-gemm", "--moe-permute-fusion", "--moe-router-fusion", "--attention-backend"]),
    (["--use-mcore-models", "--tiktoken-pattern", "v2", "--empty-unused-memory-level", "1", "--use-cpu-initialization",
      "--no-async-tensor-model-parallel-allreduce", "--tokenizer-hf-use-fast"], 1,
     ["--use-mcore-models", "--tiktoken-pattern", "--empty-unused-memory-level", "--use-cpu-initialization",
      "--no-async-tensor-model-parallel-allreduce", "--tokenizer-hf-use-fast"]),
    (["--position-embedding-type", "rope", "--no-position-embedding"], 1, ["--no-position-embedding"]),
    (["--tensor-model-parallel-size", "2", "--sequence-parallel", "--disable-bias-linear", "--tp-comm-overlap"], 2,
     ["--tp-comm-overlap"]),
    (["--no-masked-softmax-fusion", "--no-bias-swiglu-fusion", "--no-rope-fusion", "--cross-entropy-loss-fusion"], 1,
     []),  # fusions always off here: what these ask; the fused cross entropy acts
])
def test_a_flag_without_effect_here_says_so_in_one_info_line(flags, world_size, infos, capsys):
    parse_args(TINY_MOE + ["--train-iters", "1", "--device", "cpu", *flags], world_size=world_size)
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("info: ")]
    assert sorted(line.split()[1] for line in lines) == sorted(infos)
    assert all(" has no effect here: " in line for line in lines)


@pytest.mark.parametrize("flags, message", [
    (["--no-position-embedding"], "--no-position-embedding is deprecated"),
    (["--fp8-recipe", "tensorwise"], "--fp8-recipe needs --fp8-format"),
    (["--transformer-impl", "transformer_engine", "--fp8-format", "hybrid", "--fp8-param-gather"],
     "--fp8-param-gather needs --use-distributed-optimizer"),
    (["--fp8-format", "hybrid", "--fp8-amax-history-len", "1024"], "needs --transformer-impl transformer_engine"),
    (["--tp-comm-overlap"], "--tp-comm-overlap needs --sequence-parallel"),
    (["--cross-entropy-fusion-impl", "te", "--cross-entropy-loss-fusion"], "needs --transformer-impl transformer_engine"),
    (["--fp16", "--bf16"], "--bf16 and --fp16 exclude each other"),
    (["--loss-scale", "1024"], "--loss-scale needs --fp16"),
    (["--fp16", "--skip-nan-iterations"], "an overflow already skips the iteration"),
    (["--manual-gc-interval", "5"], "--manual-gc-interval needs --manual-gc"),
    (["--use-pytorch-profiler", "--profile"], "writes its trace to --tensorboard-dir"),
    (["--wandb-project", "p"], "--wandb-project needs --wandb-save-dir DIR or --save DIR"),
    (["--wandb-exp-name", "x"], "--wandb-exp-name needs --wandb-project"),
    (["--decoupled-min-lr", "1e-5"], "--decoupled-min-lr needs --decoupled-lr"),
    (["--start-weight-decay", "0.1"], "--start-weight-decay needs --weight-decay-incr-style linear or cosine"),
])
def test_training_flags_fail_before_anything_is_built(flags, message):
    from megatron_moe.arguments import ConfigError

    with pytest.raises(ConfigError, match=re.escape(message)):
        parse_args(TINY_MOE + ["--train-iters", "1", "--device", "cpu", *flags])


def test_fp8_flags_reach_transformer_engines_config():
    """The FP8 options are Transformer Engine's (refused on the CPU, where the runtime check says so): here the
    config they build, which only a GPU can run."""
    from megatron_moe.arguments import parse_args as parse

    dense = flags_without(TINY_MOE, "--num-experts", "--moe-router-topk", "--moe-aux-loss-coeff",
                          "--moe-token-dispatcher-type")  # megatron-core checks Transformer Engine's version for MoE
    args = parse(dense + ["--train-iters", "1", "--device", "cpu", "--use-distributed-optimizer"]).replace(
        transformer_impl="transformer_engine", fp8_format="hybrid", fp8_recipe="tensorwise", fp8_param_gather=True,
        fp8_amax_history_len=1024, fp8_amax_compute_algo="max", fp8_margin=1, fp8_wgrad=False)
    config = transformer_config_from_args(args)
    assert (config.fp8, config.fp8_recipe, config.fp8_param, config.fp8_amax_history_len,
            config.fp8_amax_compute_algo, config.fp8_margin, config.fp8_wgrad) == \
        ("hybrid", "tensorwise", True, 1024, "max", 1, False)


def test_exit_on_missing_checkpoint_exits_before_training(tmp_path):
    ckpt = tmp_path / "ckpt"
    result = launch([*TINY_MOE, "--train-iters", "1", "--save", str(ckpt), "--load", str(ckpt),
                     "--exit-on-missing-checkpoint"])
    assert result.returncode == 0 and "--exit-on-missing-checkpoint is given: exiting" in result.stdout
    assert " iteration " not in result.stdout


# The KJV demo data (`make data`): GPT-2 tokens with an end-of-document token after each verse, so that with
# --eod-mask-loss the micro batches hold different numbers of tokens that count
KJV_GPT2 = ["--data-path", str(REPO / "data" / "kjv_text_document"), "--split", "98,2,0", "--tokenizer-type",
            "GPT2BPETokenizer", "--vocab-file", str(REPO / "data" / "gpt2-vocab.json"), "--merge-file",
            str(REPO / "data" / "gpt2-merges.txt"), "--eval-iters", "0", "--train-iters", "3"]


def _grad_norms(nproc, flags, tmp_path):
    out = tmp_path / f"grad_norms_{nproc}_{abs(hash(tuple(flags)))}.json"
    torchrun(nproc, SCRIPTS / "train_grad_norms.py", [str(out), *flags])
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def kjv_gpt2():
    if not (REPO / "data" / "kjv_text_document.bin").exists():
        pytest.fail("the KJV demo data is missing: run `make data`")
    return KJV_GPT2


def test_per_token_loss_normalises_over_the_global_batchs_tokens(kjv_gpt2, tmp_path):
    """--calculate-per-token-loss: the gradient of the lm loss summed over the global batch's counted tokens
    over their number, as one micro batch holding the whole global batch computes it; without it, the mean of
    the micro batches' means, which differs where --eod-mask-loss leaves them different token counts."""
    flags = [*flags_without(TINY_MOE, "--mock-data", "--tokenizer-type", "--vocab-size", "--moe-aux-loss-coeff"),
             *kjv_gpt2, "--eod-mask-loss"]
    whole_batch = _grad_norms(1, flags + ["--micro-batch-size", "8"], tmp_path)
    per_token = _grad_norms(2, flags + ["--expert-model-parallel-size", "2", "--calculate-per-token-loss"], tmp_path)
    per_micro_batch = _grad_norms(2, flags + ["--expert-model-parallel-size", "2"], tmp_path)
    assert per_token == pytest.approx(whole_batch, rel=1e-5)
    assert per_micro_batch[0] != pytest.approx(whole_batch[0], rel=1e-4)  # 7e-4 apart in this run


@pytest.mark.parametrize("router", [[], ["--moe-router-type", "sam", "--sam-num-groups", "2",
                                         "--sam-group-balance-loss-coeff", "0.1", "--sam-alignment-loss-coeff", "0.1"]],
                         ids=["topk", "sam"])
def test_per_token_loss_keeps_the_router_losses_weight(router, tmp_path):
    """With every token counted, per-token normalisation trains as the default does: the router's losses (means
    over a micro batch's tokens) are scaled by its tokens, as megatron-core's router scales its own."""
    flags = [*TINY_MOE, *router, "--train-iters", "3", "--eval-iters", "0"]
    default = _grad_norms(1, flags, tmp_path)
    assert _grad_norms(1, flags + ["--calculate-per-token-loss"], tmp_path) == pytest.approx(default, rel=1e-5)


def test_a_log_line_sums_up_its_interval_as_megatron_lms():
    """--log-interval N: the lm loss is the mean over the interval's applied steps, the skipped and NaN
    iterations are the interval's; a line whose steps were all skipped has no lm loss, a skipped step no grad
    norm."""
    from megatron_moe.training import LogInterval, StepResult, log_line

    interval = LogInterval()
    for applied, non_finite in ((True, False), (False, True), (True, False)):
        interval.add(StepResult(None, 1.0 if applied else None, applied, non_finite), num_microbatches=4)
    assert (interval.iterations, interval.microbatches, interval.skipped, interval.nan) == (3, 12, 1, 1)
    assert interval.mean_loss([9.0, 4.0, 7.0, 2.0]) == 3.0  # the last three: 4 and 2 applied
    args = parse_args(TINY_MOE + ["--train-iters", "3", "--device", "cpu"])
    line = log_line(3, args, 10.0, 1e-3, interval.mean_loss([4.0, 7.0, 2.0]), 1.0, interval.skipped, interval.nan)
    assert " lm loss: 3.000000E+00 | loss scale: 1.0 | grad norm: 1.000 |" in line
    assert "number of skipped iterations:   1 | number of nan iterations:   1 |" in line
    all_skipped = log_line(3, args, 10.0, 1e-3, None, None, 3, 0)
    assert " lm loss" not in all_skipped and " grad norm" not in all_skipped
