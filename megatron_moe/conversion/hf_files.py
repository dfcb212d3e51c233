"""Hugging Face folder files: sharded safetensors with an index, tokenizer files, and atomic output.

Every output folder is written under a temporary name next to its destination and renamed into place at
the end, so a failure leaves nothing behind and an existing folder is replaced only with ``--overwrite``.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Dict, Iterator, List

import torch

from megatron_moe.conversion.hf_layout import REMOTE_CODE_DIR, ConversionError

SAFE_INDEX = "model.safetensors.index.json"


def refuse_existing(destination: str, overwrite: bool, flag: str) -> None:
    if Path(destination).exists() and not overwrite:
        raise ConversionError(f"{flag} {destination} already exists; pass --overwrite to replace it")


@contextlib.contextmanager
def atomic_directory(destination: str, overwrite: bool, flag: str) -> Iterator[Path]:
    """Yields an empty temporary folder that becomes ``destination`` when the block succeeds."""
    refuse_existing(destination, overwrite, flag)
    target = Path(destination).resolve()
    target.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-", dir=target.parent))
    try:
        yield work
        if target.exists():
            old = target.with_name(f".{target.name}.replaced-{os.getpid()}")
            target.rename(old)
            work.rename(target)
            shutil.rmtree(old)
        else:
            work.rename(target)
    finally:
        if work.exists():
            shutil.rmtree(work)


def _shards(tensors: Dict[str, torch.Tensor], max_bytes: int) -> List[Dict[str, torch.Tensor]]:
    shards: List[Dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, tensor in tensors.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensor
        size += nbytes
    return shards


def write_safetensors(tensors: Dict[str, torch.Tensor], folder: Path, max_shard_bytes: int) -> List[str]:
    """model.safetensors, or model-0000i-of-0000n.safetensors + index when larger than one shard."""
    from safetensors.torch import save_file

    shards = _shards(tensors, max_shard_bytes)
    if len(shards) == 1:
        save_file(shards[0], str(folder / "model.safetensors"), metadata={"format": "pt"})
        return ["model.safetensors"]
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map = {}
    for name, shard in zip(names, shards):
        save_file(shard, str(folder / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, name))
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    write_json(folder / SAFE_INDEX, {"metadata": {"total_size": total}, "weight_map": weight_map})
    return names + [SAFE_INDEX]


def read_safetensors(folder: Path) -> Dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    if (folder / "model.safetensors").is_file():
        return load_file(str(folder / "model.safetensors"))
    if not (folder / SAFE_INDEX).is_file():
        raise ConversionError(f"--hf {folder}: no model.safetensors or {SAFE_INDEX} (only safetensors are read)")
    tensors: Dict[str, torch.Tensor] = {}
    for shard in sorted(set(json.loads((folder / SAFE_INDEX).read_text())["weight_map"].values())):
        if not (folder / shard).is_file():
            raise ConversionError(f"--hf {folder}: shard {shard} named in {SAFE_INDEX} is missing")
        tensors.update(load_file(str(folder / shard)))
    return tensors


def copy_remote_code(folder: Path) -> List[str]:
    """Our modeling code for the routing schemes no transformers class has (config.json's ``auto_map``)."""
    names = sorted(path.name for path in REMOTE_CODE_DIR.glob("*_megatron_moe.py"))
    for name in names:
        shutil.copyfile(REMOTE_CODE_DIR / name, folder / name)
    return names


def write_json(path: Path, value) -> None:
    path.write_text(json.dumps(value, indent=2, sort_keys=True) + "\n")


def write_tokenizer(args, folder: Path, eod: int) -> str:
    """The run's tokenizer as Hugging Face files; returns a sentence saying what was written."""
    kind = args.tokenizer_type
    if kind == "GPT2BPETokenizer":
        shutil.copyfile(args.vocab_file, folder / "vocab.json")
        shutil.copyfile(args.merge_file, folder / "merges.txt")
        token = "<|endoftext|>"
        _write_gpt2_tokenizer_json(folder, token)
        write_json(folder / "tokenizer_config.json", {
            "tokenizer_class": "GPT2TokenizerFast", "bos_token": token, "eos_token": token, "unk_token": token,
            "add_prefix_space": False, "model_max_length": args.max_position_embeddings})
        write_json(folder / "special_tokens_map.json", {"bos_token": token, "eos_token": token, "unk_token": token})
        return "tokenizer: GPT-2 BPE (tokenizer.json, vocab.json, merges.txt)"
    if kind == "HuggingFaceTokenizer":
        source = Path(args.tokenizer_model)
        copied = [p.name for p in source.iterdir() if p.is_file() and p.suffix in (".json", ".txt", ".model")
                  and p.name not in ("config.json", "generation_config.json", SAFE_INDEX)]
        for name in copied:
            shutil.copyfile(source / name, folder / name)
        return f"tokenizer: copied {', '.join(sorted(copied))} from {source}"
    return (f"tokenizer: none written ({kind} has no tokenizer files); token ids are used as they are, "
            f"eos id {eod}")


def _write_gpt2_tokenizer_json(folder: Path, eod_token: str) -> None:
    """tokenizer.json of byte-level GPT-2 BPE (what every transformers version's fast tokenizer reads)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

    tokenizer = Tokenizer(models.BPE.from_file(str(folder / "vocab.json"), str(folder / "merges.txt")))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    tokenizer.add_special_tokens([AddedToken(eod_token, special=True)])
    tokenizer.save(str(folder / "tokenizer.json"))
