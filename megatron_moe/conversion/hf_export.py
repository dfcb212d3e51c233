"""Export: one of our checkpoints, saved with any TP/PP/EP layout, -> a Hugging Face transformers folder.

Streaming: the run configuration the checkpoint records decides the class (or refuses, naming the flag)
before any weight is read; then each tensor is read from the torch_dist files by its layout-independent
key (one expert's slice at a time), mapped, cast and written into the safetensors shards, whose headers
were written first. No model, optimizer or process group is built: peak memory is about one tensor.
The checkpoint's digests are checked by a second thread while the tensors are converted (hashing and file
reads release the GIL), and the folder appears only if every file matched.
"""

from __future__ import annotations

import argparse
import contextlib
import json
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import List, Optional, Sequence

import torch

from megatron_moe import checkpoint_files, run_config
from megatron_moe.arguments import RunConfig, build_parser
from megatron_moe.conversion import hf_files, hf_layout
from megatron_moe.conversion.dist_files import CheckpointReader
from megatron_moe.conversion.hf_layout import ConversionError
from megatron_moe.tokenizer import build_tokenizer


def latest_checkpoint(load: str) -> Path:
    if not Path(load).is_dir():
        raise ConversionError(f"--load {load} does not exist")
    iteration = checkpoint_files.read_tracker(load)
    if iteration is None:
        raise ConversionError(f"--load {load}: no {checkpoint_files.TRACKER}; point --load at a --save directory")
    directory = checkpoint_files.checkpoint_dir(load, iteration)
    checkpoint_files.check_checkpoint_files(directory, verify=False)  # digests later: after the refusals
    return directory


def with_overrides(saved: RunConfig, overrides: Sequence[str]) -> RunConfig:
    """``saved`` with the training flags given after ``--`` (e.g. another tokenizer's files); only the flags
    given change."""
    parser = build_parser()
    for action in parser._actions:
        action.default, action.required = argparse.SUPPRESS, False
    return saved.replace(**vars(parser.parse_args(list(overrides))))


def export(load: str, output: str, overwrite: bool = False, overrides: Sequence[str] = (),
           max_shard_bytes: int = 5 * 2**30, dtype: Optional[str] = None, verify: bool = True) -> List[str]:
    """Writes the HF folder; returns the lines to print (what was written). ``verify``: check every file of
    the checkpoint against its manifest meanwhile (a damaged shard is named, never exported)."""
    hf_files.refuse_existing(output, overwrite, "--output")
    directory = latest_checkpoint(load)
    args = with_overrides(run_config.load(directory), overrides)
    target = hf_layout.export_target(args)  # refusals come before any weight is read
    with _in_background(checkpoint_files.verify_checkpoint if verify else None, directory) as verification:
        try:
            return _write_folder(directory, args, target, output, overwrite, max_shard_bytes, dtype, verification)
        except ConversionError:
            if verification is not None:
                verification.result()  # a damaged file is the better explanation of a failed read
            raise


@contextlib.contextmanager
def _in_background(check, directory: Path):
    """A future of ``check(directory)`` run by another thread (None without a check); leaving the block
    waits for it, so no thread outlives the export."""
    if check is None:
        yield None
        return
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="verify-checkpoint") as pool:
        yield pool.submit(check, directory)


def _write_folder(directory: Path, args: RunConfig, target, output: str, overwrite: bool, max_shard_bytes: int,
                  dtype: Optional[str], verification: Optional[Future]) -> List[str]:
    tokenizer = build_tokenizer(args)
    vocab = tokenizer.model_vocab_size
    if args.tokenizer_vocab_size is not None and vocab != args.tokenizer_vocab_size:
        raise ConversionError(f"the tokenizer has {vocab} tokens, the checkpoint was trained with "
                              f"{args.tokenizer_vocab_size}; give its tokenizer flags after --")
    bos, eos = hf_files.special_token_ids(args, tokenizer)
    torch_dtype = hf_layout.TORCH_DTYPES[dtype or ("bf16" if args.bf16 else "fp32")]

    reader = CheckpointReader(directory)
    plan = hf_layout.units(args, target) + hf_layout.export_only_units(args, target)
    missing = sorted({unit.key for unit in plan} - set(reader.tensors))
    if missing:
        raise ConversionError(f"{directory} has no tensor {missing[0]} ({len(missing)} missing): not the model "
                              "its run_config.json describes")
    layout = []
    for unit in plan:  # the Hugging Face shapes, from the saved shapes alone
        shape = reader.shape(unit.key)[1:] if unit.expert is not None else reader.shape(unit.key)
        parts = hf_layout.to_hf(unit, torch.empty(shape, device="meta"), args, vocab)
        layout += [(name, tuple(part.shape), torch.float32 if unit.fp32 else torch_dtype)
                   for name, part in zip(unit.hf, parts)]
    zeros = hf_layout.zero_fills(args, target, torch_dtype)
    layout += zeros
    config = hf_layout.hf_config(args, target, vocab, bos, eos, torch_dtype)

    with hf_files.atomic_directory(output, overwrite, "--output") as folder:
        writer = hf_files.SafetensorsWriter(folder, layout, max_shard_bytes)
        for unit in plan:
            for name, part in zip(unit.hf, hf_layout.to_hf(unit, reader.read(unit.key, unit.expert), args, vocab)):
                writer.write(name, part.to(torch.float32 if unit.fp32 else torch_dtype))
        for name, shape, zero_dtype in zeros:
            writer.write(name, torch.zeros(shape, dtype=zero_dtype))
        written = writer.finish()
        hf_files.write_json(folder / "config.json", config)
        hf_files.write_json(folder / "generation_config.json",
                            {"bos_token_id": bos, "eos_token_id": eos, "pad_token_id": eos})
        if target.architecture.remote_code:
            written += hf_files.copy_remote_code(folder)
        tokenizer_line = hf_files.write_tokenizer(args, folder, eos)
        if verification is not None:
            verification.result()  # the folder is kept only if the checkpoint matched its digests
    lines = [f"exported {directory} as {target.architecture.name} ({json.dumps(str(torch_dtype))[1:-1]}) to {output} "
             f"({', '.join(written)})", tokenizer_line]
    if target.architecture.remote_code:
        lines.append("load it with trust_remote_code=True (its modeling code is in the folder)")
    return lines
