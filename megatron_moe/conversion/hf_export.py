"""Export: one of our checkpoints, saved with any TP/PP/EP layout, -> a Hugging Face transformers folder.

The checkpoint is loaded into a one-process model built from its run config: megatron-core's
dist_checkpointing reassembles the full tensors whatever layout saved them (the same mechanism that lets
``--load`` change the parallel layout). Names and layouts are then mapped by ``hf_layout``.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
from pathlib import Path
from typing import Dict, List, Sequence

from megatron_moe.conversion import hf_files, hf_layout
from megatron_moe.conversion.hf_layout import ConversionError

# run-config field -> our flag; the export rebuilds the model from these (flags after ``--`` on the
# command line come last and override them)
_FLAGS = {
    "num_layers": "--num-layers", "hidden_size": "--hidden-size", "ffn_hidden_size": "--ffn-hidden-size",
    "num_attention_heads": "--num-attention-heads", "num_query_groups": "--num-query-groups",
    "kv_channels": "--kv-channels", "max_position_embeddings": "--max-position-embeddings",
    "position_embedding_type": "--position-embedding-type", "normalization": "--normalization",
    "num_experts": "--num-experts", "moe_ffn_hidden_size": "--moe-ffn-hidden-size",
    "moe_router_type": "--moe-router-type", "norm_epsilon": "--norm-epsilon", "rotary_base": "--rotary-base",
    "rotary_percent": "--rotary-percent", "moe_router_topk": "--moe-router-topk",
    "moe_router_num_groups": "--moe-router-num-groups", "moe_router_group_topk": "--moe-router-group-topk",
    "moe_router_load_balancing_type": "--moe-router-load-balancing-type", "init_method_std": "--init-method-std",
    "tokenizer_type": "--tokenizer-type", "vocab_file": "--vocab-file", "merge_file": "--merge-file",
    "tokenizer_model": "--tokenizer-model", "vocab_size": "--vocab-size",
}
_SWITCHES = {"swiglu": "--swiglu", "untie_embeddings_and_output_weights": "--untie-embeddings-and-output-weights",
             "disable_bias_linear": "--disable-bias-linear"}
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


def padded_vocab_size(directory: Path) -> int:
    """Rows of the saved embedding: the padded vocabulary whatever padding rule and TP size wrote it."""
    from megatron.core import dist_checkpointing

    try:
        metadata = dist_checkpointing.load_tensors_metadata(str(directory))
        return int(metadata["embedding.word_embeddings.weight"].global_shape[0])
    except Exception as error:
        raise ConversionError(f"cannot read {directory}/metadata.json ({type(error).__name__}: {error}); "
                              "the checkpoint is damaged") from error


def routing_flags(saved: Dict) -> List[str]:
    """The routing scheme's own flags (e.g. --sam-num-groups) as the checkpoint recorded them."""
    from megatron_moe.checkpointing import routing_scheme_actions

    values = saved.get("moe_routing_flags") or {}
    flags: List[str] = []
    for action in routing_scheme_actions(saved.get("moe_router_type") or "topk"):
        value, flag = values.get(action.dest), action.option_strings[0]
        if value is None or action.dest not in values:
            continue
        if isinstance(action, argparse.BooleanOptionalAction):
            flags.append(flag if value else f"--no-{flag[2:]}")
        elif isinstance(action, argparse._StoreTrueAction):
            flags += [flag] if value else []
        else:
            flags += [flag, str(value)]
    return flags


def model_flags(saved: Dict, padded_vocab: int, overrides: Sequence[str]) -> List[str]:
    """Our command line for the model a run config describes, in one process."""
    flags: List[str] = []
    for field, flag in _FLAGS.items():
        if saved.get(field) is not None:
            flags += [flag, str(saved[field])]
    flags += [flag for field, flag in _SWITCHES.items() if saved.get(field)]
    flags += ["--seq-length", str(saved["max_position_embeddings"])]
    if saved.get("moe_layer_pattern") is not None:
        flags += ["--moe-layer-freq", "[" + ",".join(map(str, saved["moe_layer_pattern"])) + "]"]
    if "tokenizer_type" not in saved and saved.get("tokenizer_vocab_size"):  # written before it was recorded
        flags += ["--vocab-size", str(saved["tokenizer_vocab_size"] - 1)]  # NullTokenizer adds eod
    # one process pads the vocabulary to a multiple of this: exactly the saved rows
    flags += ["--make-vocab-size-divisible-by", str(padded_vocab)]
    return flags + routing_flags(saved) + list(overrides)


def load_one_process_job(load: str, overrides: Sequence[str] = ()):
    """(job, checkpoint directory): the checkpoint's model in this single process."""
    from megatron_moe import checkpointing
    from megatron_moe.arguments import ConfigError
    from megatron_moe.training import setup

    directory = latest_checkpoint(load)
    saved = json.loads((directory / checkpointing.RUN_CONFIG).read_text())
    argv = model_flags(saved, padded_vocab_size(directory), overrides) + _JOB + ["--load", load]
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
    vocab, eod = args.tokenizer.vocab_size, args.tokenizer.eod
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
