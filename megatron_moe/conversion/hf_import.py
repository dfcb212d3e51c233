"""Import: a Hugging Face Mixtral / Qwen2-MoE folder -> one of our checkpoints, to pretrain on with --load.

The HF config becomes our model flags (``hf_layout.args_from_hf_config`` refuses what we cannot
represent, naming the field); a one-process model is built from them, given the mapped tensors and saved
with ``megatron_moe.checkpointing`` at iteration 0. dist_checkpointing lets any TP/PP/EP layout load it.
"""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path
from typing import List, Sequence

import torch

from megatron_moe.conversion import hf_files, hf_layout
from megatron_moe.conversion.hf_layout import ConversionError

_JOB = ["--micro-batch-size", "1", "--train-iters", "1", "--lr", "0", "--mock-data", "--device", "cpu"]


def read_hf_config(hf: str) -> dict:
    path = Path(hf) / "config.json"
    if not path.is_file():
        raise ConversionError(f"--hf {hf}: no config.json there; point --hf at a Hugging Face model folder")
    return json.loads(path.read_text())


def tokenizer_flags(hf: str, vocab_size: int) -> List[str]:
    """GPT-2 BPE files in the folder become --tokenizer-type GPT2BPETokenizer; otherwise token ids as they are."""
    folder = Path(hf)
    if (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file():
        return ["--tokenizer-type", "GPT2BPETokenizer", "--vocab-file", str(folder / "vocab.json"),
                "--merge-file", str(folder / "merges.txt")]
    return ["--tokenizer-type", "NullTokenizer", "--vocab-size", str(vocab_size - 1)]  # NullTokenizer adds eod


def import_hf(hf: str, save: str, overwrite: bool = False, overrides: Sequence[str] = ()) -> List[str]:
    """Writes ``save``/iter_0000000 and the tracker; returns the lines to print."""
    from megatron_moe import checkpointing
    from megatron_moe.training import setup

    config = read_hf_config(hf)
    flags = hf_layout.args_from_hf_config(config)
    tensors = hf_files.read_safetensors(Path(hf))
    tokenizer = tokenizer_flags(hf, config["vocab_size"])
    with hf_files.atomic_directory(save, overwrite, "--save") as folder:
        with contextlib.redirect_stdout(io.StringIO()):
            job = setup(flags + tokenizer + _JOB + ["--seq-length", str(config["max_position_embeddings"]),
                                                    "--save", str(folder), *overrides])
        args = job.args
        if job.tokenizer.vocab_size != config["vocab_size"]:
            raise ConversionError(f"vocab_size {config['vocab_size']} differs from the tokenizer files' "
                                  f"{job.tokenizer.vocab_size}")
        state = hf_layout.from_hf(tensors, args, args.padded_vocab_size)
        model = job.model.module
        expected = {n for n in model.state_dict() if not n.endswith("_extra_state")}
        missing = sorted(expected - set(state))
        if missing:
            raise ConversionError(f"--hf {hf}: the checkpoint lacks {missing[0]} (and {len(missing) - 1} more)")
        with torch.no_grad():
            for name, param in model.state_dict().items():
                if name in state:
                    if param.shape != state[name].shape:
                        raise ConversionError(f"--hf {hf}: {name} has shape {tuple(state[name].shape)}, "
                                              f"config.json implies {tuple(param.shape)}")
                    param.copy_(state[name])
        checkpointing.save_checkpoint(job, 0, 0)
    return [f"imported {config['architectures'][0]} from {hf} to {save} (iteration 0)",
            "pretrain with: " + " ".join(flags + tokenizer) + f" --load {save} --finetune"]
