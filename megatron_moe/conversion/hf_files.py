"""Hugging Face folder files: sharded safetensors with an index, tokenizer files, and atomic output.

Every output folder is written under a temporary name next to its destination and renamed into place at
the end, so a failure leaves nothing behind and an existing folder is replaced only with ``--overwrite``.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import struct
import shutil
import tempfile
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import torch

from megatron_moe.conversion.hf_layout import REMOTE_CODE_DIR, ConversionError

SAFE_INDEX = "model.safetensors.index.json"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


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
    work.chmod(0o777 & ~_umask())  # mkdtemp makes it 0700; the result gets a folder's usual mode
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


_SAFETENSORS_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}
_TORCH_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16, "F64": torch.float64}


class SafetensorsWriter:
    """Writes tensors announced up front (name, shape, dtype) into safetensors shards, one tensor at a
    time, in the announced order: every header is known before any data, so nothing is held back."""

    def __init__(self, folder: Path, layout: Sequence[Tuple[str, Tuple[int, ...], torch.dtype]], max_shard_bytes: int):
        self.folder, self.shards = folder, [[]]
        size = 0
        for name, shape, dtype in layout:
            nbytes = math.prod(shape) * dtype.itemsize
            if self.shards[-1] and size + nbytes > max_shard_bytes:
                self.shards.append([])
                size = 0
            self.shards[-1].append((name, tuple(shape), dtype))
            size += nbytes
        count = len(self.shards)
        self.files = (["model.safetensors"] if count == 1 else
                      [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)])
        self._pending = [(i, entry) for i, shard in enumerate(self.shards) for entry in shard]
        self._open, self._stream = -1, None
        self.total_bytes = sum(math.prod(shape) * dtype.itemsize for _, shape, dtype in layout)

    def _start(self, index: int) -> None:
        self._close()
        header, offset = {"__metadata__": {"format": "pt"}}, 0
        for name, shape, dtype in self.shards[index]:
            end = offset + math.prod(shape) * dtype.itemsize
            header[name] = {"dtype": _SAFETENSORS_DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, end]}
            offset = end
        text = json.dumps(header, separators=(",", ":")).encode()
        text += b" " * (-len(text) % 8)
        self._stream = open(self.folder / self.files[index], "wb")
        self._stream.write(struct.pack("<Q", len(text)) + text)
        self._open = index

    def _close(self) -> None:
        if self._stream is not None:
            self._stream.close()
            self._stream = None

    def write(self, name: str, tensor: torch.Tensor) -> None:
        index, (expected, shape, dtype) = self._pending.pop(0)
        assert name == expected and tuple(tensor.shape) == shape and tensor.dtype == dtype, (name, expected)
        if index != self._open:
            self._start(index)
        self._stream.write(tensor.contiguous().view(-1).view(torch.uint8).numpy().data)

    def finish(self) -> List[str]:
        assert not self._pending, f"{len(self._pending)} announced tensors were not written"
        for index in range(self._open + 1, len(self.shards)):  # shards of zero-size tensors only
            self._start(index)
        self._close()
        if len(self.files) == 1:
            return list(self.files)
        weight_map = {name: self.files[i] for i, shard in enumerate(self.shards) for name, _, _ in shard}
        write_json(self.folder / SAFE_INDEX, {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map})
        return self.files + [SAFE_INDEX]


def read_json(path: Path, what: str) -> dict:
    """A JSON object from ``path``, or ConversionError naming the file and the problem."""
    if not path.is_file():
        raise ConversionError(f"{path}: missing ({what})")
    try:
        value = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as error:
        raise ConversionError(f"{path}: not valid JSON ({error})") from None
    if not isinstance(value, dict):
        raise ConversionError(f"{path}: expected a JSON object, found {type(value).__name__}")
    return value


def safetensors_header(path: Path) -> Dict[str, Tuple[Tuple[int, ...], torch.dtype, int]]:
    """{name: (shape, dtype, offset of its data in the file)} from a safetensors file's header, checked
    against the file's size."""
    size = path.stat().st_size
    with open(path, "rb") as stream:
        head = stream.read(8)
        length = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
        if length < 0 or 8 + length > size:
            raise ConversionError(f"{path}: truncated or not a safetensors file (header of {length} bytes, file of {size})")
        try:
            header = json.loads(stream.read(length))
        except ValueError:
            raise ConversionError(f"{path}: its safetensors header is not valid JSON") from None
    out, end = {}, 0
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        if entry.get("dtype") not in _TORCH_DTYPES:
            raise ConversionError(f"{path}: {name} has dtype {entry.get('dtype')}; floating point F32/BF16/F16/F64 only")
        out[name] = (tuple(entry["shape"]), _TORCH_DTYPES[entry["dtype"]], 8 + length + entry["data_offsets"][0])
        end = max(end, entry["data_offsets"][1])
    if 8 + length + end > size:
        raise ConversionError(f"{path}: truncated ({size} bytes, its header needs {8 + length + end})")
    return out


class HFWeights:
    """The tensors of a Hugging Face folder (model.safetensors, or shards listed by the index), read one at
    a time; every header is read and checked on construction."""

    def __init__(self, folder: Path):
        self.folder = folder
        if (folder / "model.safetensors").is_file():
            files = ["model.safetensors"]
            listed = None
        elif (folder / SAFE_INDEX).is_file():
            weight_map = read_json(folder / SAFE_INDEX, "the shard index").get("weight_map")
            if not isinstance(weight_map, dict):
                raise ConversionError(f"{folder / SAFE_INDEX}: no weight_map object")
            listed, files = weight_map, sorted(set(weight_map.values()))
        else:
            raise ConversionError(f"{folder}: no model.safetensors or {SAFE_INDEX} (only safetensors are read)")
        self.file_of: Dict[str, str] = {}
        self.shapes: Dict[str, Tuple[int, ...]] = {}
        self._data: Dict[str, Tuple[torch.dtype, int]] = {}
        for name in files:
            if not (folder / name).is_file():
                raise ConversionError(f"{folder / name}: missing (named in {SAFE_INDEX})")
            for tensor, (shape, dtype, offset) in safetensors_header(folder / name).items():
                self.file_of[tensor], self.shapes[tensor], self._data[tensor] = name, shape, (dtype, offset)
        for tensor, name in (listed or {}).items():
            if self.file_of.get(tensor) != name:
                raise ConversionError(f"{folder / SAFE_INDEX}: lists {tensor} in {name}, which does not hold it")

    def read(self, name: str, expert: Optional[int] = None) -> torch.Tensor:
        """Tensor ``name`` (its ``expert``-th slice along the first axis), read from its file into fresh
        memory (no memory map stays behind)."""
        dtype, offset = self._data[name]
        shape = self.shapes[name][1:] if expert is not None else self.shapes[name]
        nbytes = math.prod(shape) * dtype.itemsize
        buffer = bytearray(nbytes)
        with open(self.folder / self.file_of[name], "rb") as stream:
            stream.seek(offset + (expert or 0) * nbytes)
            stream.readinto(buffer)
        return torch.frombuffer(buffer, dtype=dtype).reshape(shape) if nbytes else torch.empty(shape, dtype=dtype)


def copy_remote_code(folder: Path) -> List[str]:
    """Our modeling code for the routing schemes no transformers class has (config.json's ``auto_map``)."""
    names = sorted(path.name for path in REMOTE_CODE_DIR.glob("*_megatron_moe.py"))
    for name in names:
        shutil.copyfile(REMOTE_CODE_DIR / name, folder / name)
    return names


def write_json(path: Path, value) -> None:
    path.write_text(json.dumps(value, indent=2, sort_keys=True) + "\n")


def special_token_ids(args, tokenizer) -> Tuple[int, int]:
    """(bos, eos) ids of the run's tokenizer: a Hugging Face tokenizer's own (tokenizer_config.json /
    special_tokens_map.json); the end-of-document id for both otherwise."""
    eos = tokenizer.eod
    if args.tokenizer_type != "HuggingFaceTokenizer":
        return eos, eos
    from tokenizers import Tokenizer

    source = Path(args.tokenizer_model)
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        if (source / name).is_file():
            bos = read_json(source / name, "tokenizer").get("bos_token")
            bos = bos.get("content") if isinstance(bos, dict) else bos
            if bos:
                bos_id = Tokenizer.from_file(str(source / "tokenizer.json")).token_to_id(bos)
                return (eos if bos_id is None else bos_id), eos
    return eos, eos


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "added_tokens.json")


def copy_tokenizer_files(source: Path, folder: Path) -> List[str]:
    names = [name for name in TOKENIZER_FILES if (source / name).is_file()]
    if names:
        folder.mkdir(exist_ok=True)
    for name in names:
        shutil.copyfile(source / name, folder / name)
    return names


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
        return f"tokenizer: copied {', '.join(copy_tokenizer_files(source, folder))} from {source}"
    if kind in ("SentencePieceTokenizer", "GPTSentencePieceTokenizer", "Llama2Tokenizer"):
        shutil.copyfile(args.tokenizer_model, folder / "tokenizer.model")
        return f"tokenizer: copied the SentencePiece model {args.tokenizer_model} as tokenizer.model"
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
