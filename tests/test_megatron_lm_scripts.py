"""Megatron-LM's own launch scripts run here: its Mixtral 8x7B, GPT-3 175B and Llama-3 8B FP8 examples and the
Mixtral example of megatron-core's MoE README, shrunk (tests/megatron_lm/scripts/: each copy says where it comes
from and lists what was changed: sizes, and pretrain_gpt.py -> pretrain_gpt_moe.py). Each runs as a user runs
it, ``bash SCRIPT ARGS`` from a directory holding pretrain_gpt_moe.py (as Megatron-LM's run from its root),
its torchrun launching 2 CPU processes: two iterations and a validation, or the one-line refusal Megatron-LM
gives too. Flags accepted with no effect here are checked by their info lines."""

import os
import re
import socket
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import pytest

from launcher import REPO

SCRIPTS = REPO / "tests" / "megatron_lm" / "scripts"
KJV_GPT2 = REPO / "data"  # `make data`: the KJV demo corpus in GPT-2 tokens, and GPT-2's vocabulary and merges


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_script(script: Path, args: Sequence[str], work: Path, env: Optional[Dict[str, str]] = None,
               timeout: int = 600) -> subprocess.CompletedProcess:
    """bash SCRIPT ARGS in ``work`` (which gets pretrain_gpt_moe.py), with this environment's torchrun first on
    PATH and a free MASTER_PORT."""
    work.mkdir(exist_ok=True)
    (work / "pretrain_gpt_moe.py").symlink_to(REPO / "pretrain_gpt_moe.py")
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
               MASTER_PORT=str(_free_port()), OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", CUDA_VISIBLE_DEVICES="",
               PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])), **(env or {}))
    return subprocess.run(["bash", str(script), *map(str, args)], cwd=work, env=env, capture_output=True, text=True,
                          timeout=timeout)


def trained(result: subprocess.CompletedProcess, iterations: int = 2) -> List[str]:
    """The log lines of a run that exited 0 after ``iterations`` iterations and a validation."""
    assert result.returncode == 0, f"{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
    lines = re.findall(r"^ iteration +\d+/ +\d+ \|.*$", result.stdout, re.M)
    # a script that ends with `set +x` exits 0 whatever torchrun did: its output says what happened
    assert [int(re.search(r"iteration +(\d+)/", line).group(1)) for line in lines] == list(range(1, iterations + 1)), \
        f"{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
    assert re.search(rf"^ validation loss at iteration {iterations} on validation set \| lm loss value: \S+ \|",
                     result.stdout, re.M), result.stdout[-2000:]
    return lines


def values(lines: List[str], field: str) -> List[float]:
    return [float(re.search(rf" {field}: +(\S+) \|", line).group(1)) for line in lines]


def no_effect_flags(result: subprocess.CompletedProcess) -> List[str]:
    """The flags whose info line says they have no effect here."""
    return sorted(re.findall(r"^info: (--\S+) has no effect here: ", result.stdout, re.M))


def refused(result: subprocess.CompletedProcess) -> str:
    """The one error line every rank of a refused run printed before building anything. (The script's own exit
    status may hide it: the Llama-3 script ends with ``set +x``, so it exits 0 whatever torchrun returned.
    torchrun's failure report gives the processes' status.)"""
    assert re.search(r"^  exitcode  : 2 ", result.stderr, re.M), result.stderr[-3000:]
    lines = {line for line in result.stderr.splitlines() if line.startswith("pretrain_gpt_moe.py: error: ")}
    assert len(lines) == 1, result.stderr[-5000:]
    assert "megatron_moe" not in result.stderr, "a traceback of ours, not a one-line refusal"
    assert "-- arguments --" not in result.stdout and "> training iterations" not in result.stdout
    return lines.pop()


def config_value(result: subprocess.CompletedProcess, name: str) -> str:
    """A value of the configuration printed at start (Megatron-LM's arguments block)."""
    return re.search(rf"^  {name} \.+ (.*)$", result.stdout, re.M).group(1)


@pytest.fixture(scope="module")
def kjv_llama2(kjv_sentencepiece, tmp_path_factory):
    """The whole KJV (31,103 verses) in the Llama-2-style SentencePiece model's tokens: the Mixtral scripts'
    --split 99990,8,2 leaves their validation and test splits a few verses of it."""
    import importlib.util

    from megatron_moe.preprocessing.preprocess import main

    kjv = os.path.join(importlib.util.find_spec("bible").submodule_search_locations[0], "data", "kjv.jsonl")
    prefix = tmp_path_factory.mktemp("kjv_llama2") / "kjv"
    main(["--input", kjv, "--output-prefix", str(prefix), "--tokenizer-type", "Llama2Tokenizer", "--tokenizer-model",
          kjv_sentencepiece["model"], "--append-eod", "--workers", "1"])
    return {"model": kjv_sentencepiece["model"], "data": f"{prefix}_text_document"}


@pytest.fixture(scope="module")
def kjv_gpt2():
    if not (KJV_GPT2 / "kjv_text_document.bin").exists():
        pytest.fail("the KJV demo data is missing: run `make data`")
    return [KJV_GPT2 / "gpt2-vocab.json", KJV_GPT2 / "gpt2-merges.txt", KJV_GPT2 / "kjv_text_document"]


# Flags of the Mixtral scripts that cannot act on the CPU's local spec, or never (Megatron-LM ignores them too).
MIXTRAL_NO_EFFECT = ["--moe-grouped-gemm", "--no-position-embedding", "--use-mcore-models"]
SEQUENCE_PARALLEL_OFF = "warning: --sequence-parallel with --tensor-model-parallel-size 1 is turned off"


def test_mixtral_8x7b(kjv_llama2, tmp_path):
    """EP 2 over data parallelism 2, Llama-2 tokenizer; the --load directory is empty, so training starts anew
    (Megatron-LM's behaviour), and the end saves a checkpoint and TensorBoard scalars under it."""
    checkpoints = tmp_path / "checkpoints"
    result = run_script(SCRIPTS / "train_mixtral_8x7b_distributed.sh",
                        [checkpoints, kjv_llama2["model"], kjv_llama2["data"]], tmp_path / "work")
    lines = trained(result)
    assert "TP=1 CP=1 PP=1 VPP=1 EP=2 ETP=1 DP=2" in result.stdout
    assert all(loss > 0 for loss in values(lines, "lm loss") + values(lines, "load balancing loss"))
    assert values(lines, "learning rate") == [1e-4, 1e-5]  # warmed up after 1 iteration, decayed to --min-lr at 2
    assert no_effect_flags(result) == MIXTRAL_NO_EFFECT
    assert SEQUENCE_PARALLEL_OFF in result.stderr
    assert (config_value(result, "bf16"), config_value(result, "sequence_parallel")) == ("True", "False")
    assert (checkpoints / "latest_checkpointed_iteration.txt").read_text().strip() == "2"
    assert list((checkpoints / "tensorboard").glob("events.out.tfevents.*"))


def test_moe_readme_mixtral_8x7b(kjv_llama2, tmp_path):
    """Virtual pipeline stages: 4 layers as PP 2 x VPP 2 (its pipeline takes both processes: EP 1)."""
    checkpoints = tmp_path / "checkpoints"
    result = run_script(SCRIPTS / "moe_readme_mixtral_8x7b.sh", [checkpoints, kjv_llama2["model"], kjv_llama2["data"]],
                        tmp_path / "work")
    lines = trained(result)
    assert "TP=1 CP=1 PP=2 VPP=2 EP=1 ETP=1 DP=1" in result.stdout
    assert all(loss > 0 for loss in values(lines, "lm loss"))
    assert no_effect_flags(result) == ["--moe-grouped-gemm", "--moe-permute-fusion", "--no-position-embedding"]
    assert SEQUENCE_PARALLEL_OFF in result.stderr
    assert (checkpoints / "latest_checkpointed_iteration.txt").read_text().strip() == "2"


def test_gpt3_175b_is_refused_as_megatron_lm_refuses_it(kjv_gpt2, tmp_path):
    """The example passes --rampup-batch-size with --train-iters, which Megatron-LM 0.16.1 refuses too
    ("expected no batch-size rampup for iteration-based training"): one line, nothing written."""
    checkpoints, tensorboard = tmp_path / "checkpoints", tmp_path / "tensorboard"
    result = run_script(SCRIPTS / "train_gpt3_175b_distributed.sh", [checkpoints, tensorboard, *kjv_gpt2],
                        tmp_path / "work")
    assert "--rampup-batch-size needs sample-based training (--train-samples instead of --train-iters)" in \
        refused(result)
    assert not checkpoints.exists() and not tensorboard.exists()


def test_gpt3_175b_sample_based(kjv_gpt2, tmp_path):
    """The example with the change Megatron-LM needs to run it, made here: sample-based training (--train-samples
    6 and --lr-decay-samples 6 for --train-iters 2 and --lr-decay-iters 2). TP 2, fp16: the batch ramps up from
    2 to 4 samples; dynamic loss scaling starts at 2^32, so both iterations overflow and are skipped, halving the
    scale."""
    shipped = (SCRIPTS / "train_gpt3_175b_distributed.sh").read_text()
    sample_based = shipped.replace("--train-iters 2 ", "--train-samples 6 ").replace("--lr-decay-iters 2 ",
                                                                                     "--lr-decay-samples 6 ")
    assert sample_based.count("-samples 6 ") == 2
    script = tmp_path / "train_gpt3_175b_sample_based.sh"
    script.write_text(sample_based)
    tensorboard = tmp_path / "tensorboard"
    result = run_script(script, [tmp_path / "checkpoints", tensorboard, *kjv_gpt2], tmp_path / "work")
    lines = trained(result)
    assert "TP=2 CP=1 PP=1 VPP=1 EP=1 ETP=2 DP=1" in result.stdout
    assert "> ramping up batch size from 2 to 4" in result.stdout
    assert values(lines, "global batch size") == [2, 4] and values(lines, "consumed samples") == [2, 6]
    assert values(lines, "loss scale") == [2.0 ** 32, 2.0 ** 31]
    assert values(lines, "number of skipped iterations") == [1, 1]  # each log interval's, as Megatron-LM's
    assert no_effect_flags(result) == []
    assert list(tensorboard.glob("events.out.tfevents.*"))


LLAMA3_NO_EFFECT = ["--attention-backend", "--empty-unused-memory-level", "--tiktoken-pattern", "--use-mcore-models"]


def test_llama3_8b_bf16(tmp_path):
    """The script's dtype knob at bf16, mock data: DP 2, sample-based schedule, per-token loss normalisation."""
    checkpoints = tmp_path / "checkpoints"
    result = run_script(SCRIPTS / "train_llama3_8b_h100_fp8.sh", [checkpoints, tmp_path / "tensorboard"],
                        tmp_path / "work", env={"DTYPE": "bf16"})
    lines = trained(result)
    assert "TP=1 CP=1 PP=1 VPP=1 EP=1 ETP=1 DP=2" in result.stdout
    assert values(lines, "consumed samples") == [4, 8]
    assert values(lines, "learning rate") == [1.5e-4, 1e-5]  # warmed up over 4 samples, decayed over 8
    assert no_effect_flags(result) == LLAMA3_NO_EFFECT
    assert SEQUENCE_PARALLEL_OFF in result.stderr
    assert [config_value(result, name) for name in ("bf16", "calculate_per_token_loss", "decoupled_lr", "split")] == \
        ["True", "True", "0.0005", "'99,1,0'"]  # the script passes the split with its quotes, as Megatron-LM reads it
    assert (checkpoints / "latest_checkpointed_iteration.txt").read_text().strip() == "2"


def test_llama3_8b_fp8_is_refused_on_the_cpu(tmp_path):
    """The script as shipped (DTYPE fp8): FP8 needs Transformer Engine on a GPU; one line names the flag."""
    result = run_script(SCRIPTS / "train_llama3_8b_h100_fp8.sh", [tmp_path / "checkpoints", tmp_path / "tensorboard"],
                        tmp_path / "work")
    assert "--fp8-format needs --transformer-impl transformer_engine" in refused(result)

