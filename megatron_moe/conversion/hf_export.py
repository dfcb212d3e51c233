"""Export: one of our checkpoints, saved with any TP/PP/EP layout, -> a Hugging Face transformers folder.

The checkpoint is loaded into a one-process model built from its run config: megatron-core's
dist_checkpointing reassembles the full tensors whatever layout saved them (the same mechanism that lets
``--load`` change the parallel layout). Names and layouts are then mapped by ``hf_layout``.
"""

from __future__ import annotations

import contextlib
import io
from pathlib import Path
from typing import List, Sequence

from megatron_moe.arguments import ARCHITECTURE, MODEL, TOKENIZER, RunConfig
from megatron_moe.conversion import hf_files, hf_layout
from megatron_moe.conversion.hf_layout import ConversionError
from megatron_moe.errors import ConfigError

# a one-process job that never trains: these only satisfy the parser (routing-loss coefficients are 0:
# base refuses any, and they do not change what the model computes)
_JOB = ["--micro-batch-size", "1", "--train-iters", "1", "--lr", "0", "--mock-data", "--device", "cpu",
        "--hidden-dropout", "0", "--attention-dropout", "0", "--moe-aux-loss-coeff", "0",
        "--finetune", "--no-load-optim", "--no-load-rng"]


def latest_checkpoint(load: str) -> Path:
    from megatron_moe import checkpointing

    if not Path(load).is_dir():
        raise ConversionError(f"--load {load} does not exist")
    iteration = checkpointing.read_tracker(load)
    if iteration is None:
        raise ConversionError(f"--load {load}: no {checkpointing.TRACKER}; point --load at a --save directory")
    directory = checkpointing.checkpoint_dir(load, iteration)
    if not (directory / checkpointing.RUN_CONFIG).is_file() or not (directory / "metadata.json").is_file():
        raise ConversionError(f"--load {load}: {directory} is incomplete (no {checkpointing.RUN_CONFIG} or "
                              "metadata.json); was the save interrupted?")
    return directory


def model_flags(saved: RunConfig, overrides: Sequence[str]) -> List[str]:
    """Our command line for the model a run config describes (architecture, model and tokenizer flags)."""
    return saved.flags((ARCHITECTURE, MODEL, TOKENIZER)) + list(overrides)


def load_one_process_job(load: str, overrides: Sequence[str] = ()):
    """(job, checkpoint directory): the checkpoint's model in this single process."""
    from megatron_moe import checkpointing, run_config
    from megatron_moe.training import setup

    directory = latest_checkpoint(load)
    argv = model_flags(run_config.load(directory), overrides) + _JOB + ["--load", load]
    with contextlib.redirect_stdout(io.StringIO()):  # setup prints every argument
        try:
            job = setup(argv)
            checkpointing.load_checkpoint(job)
        except ConfigError:
            raise
        except Exception as error:  # a truncated or corrupt shard, a shape that does not fit
            raise ConversionError(f"--load {load}: cannot read {directory}: {str(error).splitlines()[0]}") from error
    return job, directory


def export(load: str, output: str, overwrite: bool = False, overrides: Sequence[str] = (),
           max_shard_bytes: int = 5 * 2**30) -> List[str]:
    """Writes the HF folder; returns the lines to print (what was written)."""
    hf_files.refuse_existing(output, overwrite, "--output")  # before the minutes a large model takes to load
    job, directory = load_one_process_job(load, overrides)
    args = job.args
    hf_layout.check_exportable(args)
    vocab, eod = job.tokenizer.vocab_size, job.tokenizer.eod
    state = {name: t for name, t in job.model.module.state_dict().items() if not name.endswith("_extra_state")}
    tensors = hf_layout.to_hf(state, args, vocab)
    config = hf_layout.hf_config(args, vocab, eod)
    with hf_files.atomic_directory(output, overwrite, "--output") as folder:
        hf_files.write_json(folder / "config.json", config)
        hf_files.write_json(folder / "generation_config.json",
                            {"bos_token_id": eod, "eos_token_id": eod, "pad_token_id": eod})
        written = hf_files.write_safetensors(tensors, folder, max_shard_bytes)
        if "auto_map" in config:
            written += hf_files.copy_remote_code(folder)
        tokenizer = hf_files.write_tokenizer(args, folder, eod)
    lines = [f"exported {directory} as {config['architectures'][0]} to {output} ({', '.join(written)})", tokenizer]
    if "auto_map" in config:
        lines.append("load it with trust_remote_code=True (its modeling code is in the folder)")
    return lines
