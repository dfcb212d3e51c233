"""Import: a Hugging Face folder of a class of ``hf_layout.ARCHITECTURES`` (Mixtral, Qwen2-MoE, Qwen3-MoE,
GLM-4.5's Glm4Moe, or one of our remote-code exports) -> one of our checkpoints, to pretrain on with
``--load DIR --finetune`` in any TP/PP/EP layout.

The HF config becomes our model flags (``hf_layout.args_from_hf_config`` refuses what we cannot
represent, naming the field; a part whose tensors are all zero and stay zero in training, such as the
zero shared expert of our Qwen2-MoE exports, is dropped); every header of the folder is checked against
them (missing tensors, shapes, truncated or missing shards) before anything is written. The checkpoint's keys and shapes come
from our model built on the ``meta`` device (no memory); its tensors are then produced one chunk at a
time from the safetensors files and written as a torch_dist checkpoint (model weights only, iteration 0).
"""

from __future__ import annotations

import contextlib
import functools
import tempfile
from pathlib import Path
from typing import Iterator, List, Sequence

import torch

from megatron_moe.conversion import dist_files, hf_files, hf_layout, sentencepiece_json
from megatron_moe.conversion.hf_layout import ConversionError

# the scales of FP8 block-quantized (DeepSeek-V3, GLM-4.5-FP8) and MXFP4 (gpt-oss) releases
_QUANTIZATION_TENSORS = ("_scale_inv", ".weight_scale", "_scales", "_blocks")
_JOB = ["--micro-batch-size", "1", "--train-iters", "1", "--lr", "0", "--mock-data", "--device", "cpu"]
TOKENIZER_DIR = "tokenizer"  # the imported folder's tokenizer files, inside --save


def _gpt2_files(folder: Path) -> bool:
    return (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file()


def tokenizer_flags(folder: Path, tokenizer_dir: Path, vocab_size: int) -> List[str]:
    """GPT-2 BPE files -> GPT2BPETokenizer; tokenizer.json -> HuggingFaceTokenizer (its files are kept in
    ``tokenizer_dir``); no tokenizer files -> token ids as they are."""
    if _gpt2_files(folder):
        return ["--tokenizer-type", "GPT2BPETokenizer", "--vocab-file", str(tokenizer_dir / "vocab.json"),
                "--merge-file", str(tokenizer_dir / "merges.txt")]
    if (folder / "tokenizer.json").is_file():
        return ["--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", str(tokenizer_dir)]
    return ["--tokenizer-type", "NullTokenizer", "--vocab-size", str(vocab_size - 1)]  # NullTokenizer adds eod


@contextlib.contextmanager
def tokenizer_source(folder: Path) -> Iterator[Path]:
    """Where the folder's tokenizer files are read from: the folder itself, or for a SentencePiece
    ``tokenizer.model`` alone a staging copy with the tokenizer.json rebuilt from it (checked id for id)
    and, if the folder has none, a tokenizer_config.json naming the model's bos/eos/unk pieces."""
    model = folder / "tokenizer.model"
    if not model.is_file() or (folder / "tokenizer.json").is_file() or _gpt2_files(folder):
        yield folder
        return
    with tempfile.TemporaryDirectory(prefix="tokenizer-") as staging:
        staging = Path(staging)
        hf_files.copy_tokenizer_files(folder, staging)
        sentencepiece_json.write_tokenizer_json(model, staging / "tokenizer.json")
        if not (staging / "tokenizer_config.json").is_file():
            hf_files.write_json(staging / "tokenizer_config.json", sentencepiece_json.special_tokens(model))
        yield staging


def _flags(config: dict, path: Path, zero) -> List[str]:
    try:
        config["vocab_size"], config["max_position_embeddings"]  # noqa: B018 (read below: checked here)
        return hf_layout.args_from_hf_config(config, zero)
    except KeyError as error:
        raise ConversionError(f"{path}: no {error.args[0]!r}, which the model needs") from None
    except ConversionError as error:
        raise ConversionError(f"{path}: {error}") from None


def _read(weights, located, name: str) -> torch.Tensor:
    stored, expert, half = located[name]
    tensor = weights.read(stored, expert)
    return tensor.chunk(2)[half] if half is not None else tensor


def _meta_template(args):
    """Our one-process model's sharded state dict, built on the meta device: the keys, global shapes and
    chunks ``--load`` reads, and no memory."""
    from megatron.core import parallel_state
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import apply_factories
    from megatron.core.models.gpt import GPTModel

    from megatron_moe.checkpointing import SHARDED_METADATA
    from megatron_moe.model import decoder_block_spec, transformer_config_from_args
    from megatron_moe.platform import init_distributed, select_platform

    init_distributed(select_platform("cpu"))
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel()
    config = transformer_config_from_args(args)
    config.perform_initialization = False
    with torch.device("meta"):
        model = GPTModel(config=config, transformer_layer_spec=decoder_block_spec(config, args.transformer_impl),
                         vocab_size=args.padded_vocab_size, max_sequence_length=args.max_position_embeddings,
                         share_embeddings_and_output_weights=not args.untie_embeddings_and_output_weights,
                         position_embedding_type=args.position_embedding_type, rotary_percent=args.rotary_percent,
                         rotary_base=args.rotary_base)
    state = model.sharded_state_dict(metadata=dict(SHARDED_METADATA))  # megatron adds its groups to it
    apply_factories(state)
    return list(nested_values(state))


def import_hf(hf: str, save: str, overwrite: bool = False, overrides: Sequence[str] = ()) -> List[str]:
    """Writes ``save``/iter_0000000 and the tracker; returns the lines to print."""
    folder = Path(hf)
    if not folder.is_dir():
        raise ConversionError(f"--hf {hf} does not exist")
    with tokenizer_source(folder) as tokenizers_in:
        return _import(folder, tokenizers_in, save, overwrite, overrides)


def _import(folder: Path, tokenizers_in: Path, save: str, overwrite: bool, overrides: Sequence[str]) -> List[str]:
    from megatron.core.dist_checkpointing.mapping import ShardedObject, ShardedTensor

    from megatron_moe import checkpoint_files, checkpointing, run_config
    from megatron_moe.arguments import padded_vocab_size, parse_args
    from megatron_moe.tokenizer import build_tokenizer

    config_path = folder / "config.json"
    config = hf_files.read_json(config_path, "the model config; point --hf at a Hugging Face model folder")
    try:
        arch = hf_layout.architecture(hf_layout.hf_architecture(config))
    except ConversionError as error:
        raise ConversionError(f"{config_path}: {error}") from None

    @functools.lru_cache(maxsize=None)
    def tensors():  # the folder's headers, read at the first question about a tensor
        weights = hf_files.HFWeights(folder)
        quantized = sorted(name for name in weights.shapes if name.endswith(_QUANTIZATION_TENSORS))
        if quantized:
            raise ConversionError(f"{folder}: {quantized[0]} ({len(quantized)} such tensors): the folder stores "
                                  "quantized (FP8 or MXFP4) weights; convert them to bf16 first")
        return weights, hf_layout.hf_locations(arch, weights.shapes)

    def zero(role: str) -> bool:
        weights, located = tensors()
        names = hf_layout.role_names(arch, role, config["num_hidden_layers"])
        return all(not _read(weights, located, name).any() for name in names if name in located)

    flags = _flags(config, config_path, zero)
    weights, located = tensors()
    hf_files.refuse_existing(save, overwrite, "--save")
    final_tokenizer_dir = Path(save).resolve() / TOKENIZER_DIR
    # the tokenizer is read from the folder now, and recorded where its files are kept
    tokenizer = tokenizer_flags(tokenizers_in, final_tokenizer_dir, config["vocab_size"])
    job = _JOB + ["--seq-length", str(config["max_position_embeddings"]), *overrides]
    args = parse_args(flags + tokenizer_flags(tokenizers_in, tokenizers_in, config["vocab_size"]) + job, world_size=1)
    vocab_size = build_tokenizer(args).vocab_size  # from the source folder's files, before anything is written
    if vocab_size > config["vocab_size"]:  # more rows than the tokenizer is usual
        raise ConversionError(f"{config_path}: vocab_size {config['vocab_size']} is smaller than the tokenizer "
                              f"files' {vocab_size} tokens")
    args = args.replace(tokenizer_vocab_size=vocab_size, padded_vocab_size=padded_vocab_size(vocab_size, args))
    # the names follow the folder's class; our router's tensor follows our routing scheme
    target = hf_layout.Target(arch, hf_layout.eval_routing(args))

    template = _meta_template(args)
    units = {(unit.key, unit.expert): unit for unit in hf_layout.units(args, target)}
    experts = {unit.key for unit in units.values() if unit.expert is not None}
    items, sources, shapes = [], {}, {}
    for entry in template:
        if isinstance(entry, ShardedObject):
            items.append(dist_files.object_write_item(entry.unique_key))
            sources[entry.unique_key] = entry
            continue
        assert isinstance(entry, ShardedTensor), type(entry)
        offsets = entry.global_offset
        sizes = (1,) * entry.prepend_axis_num + tuple(entry.local_shape)
        unit = units.get((entry.key, offsets[0] if entry.key in experts else None))
        assert unit is not None, f"our model's {entry.key} has no Hugging Face counterpart"
        items.append(dist_files.tensor_write_item(entry.key, entry.global_shape, offsets, sizes, entry.data.dtype))
        shapes[entry.key] = tuple(entry.global_shape[1:] if unit.expert is not None else entry.global_shape)
    _check_shapes(units.values(), located, weights, args, folder, shapes)

    def read_unit(unit) -> torch.Tensor:
        parts = [_read(weights, located, name) for name in unit.hf]
        return hf_layout.from_hf(unit, parts, args, args.tokenizer_vocab_size, args.padded_vocab_size)

    def produce(item):
        if item.type == dist_files.WriteItemType.BYTE_IO:
            return dist_files.serialised_objects([sources[item.index.fqn].data])
        key, offsets, sizes = item.index.fqn, item.tensor_data.chunk.offsets, item.tensor_data.chunk.sizes
        expert = offsets[0] if key in experts else None
        tensor = read_unit(units[(key, expert)])
        if expert is not None:  # one expert's slice: its own first axis of length 1
            tensor, offsets = tensor.unsqueeze(0), [0, *offsets[1:]]
        for dim, (start, length) in enumerate(zip(offsets, sizes)):
            tensor = tensor.narrow(dim, start, length)
        return tensor.to(item.tensor_data.properties.dtype).contiguous()

    with hf_files.atomic_directory(save, overwrite, "--save") as out:
        kept = hf_files.copy_tokenizer_files(tokenizers_in, out / TOKENIZER_DIR)
        directory = checkpoint_files.checkpoint_dir(str(out), 0)
        common = {"iteration": 0, "consumed_samples": 0, "content_metadata": dict(checkpointing.SHARDED_METADATA)}
        dist_files.write_checkpoint(directory, items, produce, common)
        # the run config names the tokenizer files where they are kept (they exist once the folder is renamed)
        kept_paths = {name: str(final_tokenizer_dir / Path(getattr(args, name)).relative_to(tokenizers_in))
                      for name in ("vocab_file", "merge_file", "tokenizer_model") if getattr(args, name) is not None}
        run_config.save(args.replace(**kept_paths), directory)
        checkpoint_files.write_manifest(directory)  # --load verifies every file against it
        (out / checkpoint_files.TRACKER).write_text("0")
    lines = [f"imported {arch.name} from {folder} to {save} (iteration 0, model weights only)",
             f"tokenizer: kept {', '.join(kept)} in {final_tokenizer_dir}" if kept else "tokenizer: none in the folder",
             "pretrain with: " + " ".join(flags + tokenizer + list(overrides)) + f" --load {save} --finetune"]
    mtp = config.get("num_nextn_predict_layers") or 0
    if mtp:
        layers = config["num_hidden_layers"]
        lines.append(f"dropped the {mtp} multi-token-prediction layer(s) (model.layers.{layers}"
                     f"{f'..{layers + mtp - 1}' if mtp > 1 else ''}.*): they do not compute the model's logits, and "
                     "multi-token prediction is not trained here")
    return lines


def _check_shapes(units, located, weights, args, folder: Path, expected) -> None:
    """Every Hugging Face tensor the model needs is in the folder, with the shapes config.json implies
    (the transforms are run on meta tensors of the header shapes)."""
    for unit in units:
        parts = []
        for name in unit.hf:
            if name not in located:
                raise ConversionError(f"{folder}: tensor {name} is missing (config.json implies it)")
            stored, expert, half = located[name]
            shape = weights.shapes[stored][1:] if expert is not None else weights.shapes[stored]
            meta = torch.empty(shape, device="meta")
            parts.append(meta.chunk(2)[half] if half is not None else meta)
        try:
            joined = hf_layout.from_hf(unit, parts, args, args.tokenizer_vocab_size, args.padded_vocab_size)
        except RuntimeError:
            joined = None
        if joined is None or tuple(joined.shape) != expected[unit.key]:
            shapes = ", ".join(f"{name} {tuple(p.shape)}" for name, p in zip(unit.hf, parts))
            raise ConversionError(f"{folder / weights.file_of[located[unit.hf[0]][0]]}: {shapes} do not fit the "
                                  f"model config.json describes")
