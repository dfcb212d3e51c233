"""The merge_datasets command: every .bin/.idx pair in a directory -> one pair.

Same flags and result as Megatron-LM's tools/merge_datasets.py (pairs merged in sorted prefix
order, as IndexedDatasetBuilder.add_index would), but streamed -- memory does not grow with the
datasets -- and written under temporary names, so a failure leaves no output behind. Unlike
Megatron-LM's tool it refuses an output inside the input directory (a second run would merge the
merged dataset again), and checks the free space before writing anything.
"""

import argparse
import os
import shutil
import sys

from . import scratch
from .dataset_stats import max_token_id
from .errors import PreprocessError, disk_full_error, is_disk_full
from .indexed_writer import IndexedDatasetWriter, commit_all, read_index


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="merge_datasets.py",
        description="Merge the megatron-core .bin/.idx datasets of a directory into one.")
    parser.add_argument("--input", required=True,
                        help="directory holding the .bin/.idx pairs (merged in sorted order)")
    parser.add_argument("--output-prefix", required=True,
                        help="the merged dataset is written to PREFIX.bin and PREFIX.idx")
    parser.add_argument("--multimodal", action="store_true",
                        help="the datasets carry a mode per sequence")
    return parser


def find_prefixes(directory: str) -> list:
    """Sorted dataset prefixes in `directory`; each needs both its .bin and its .idx."""
    if not os.path.isdir(directory):
        raise PreprocessError(f"--input {directory} is not a directory")
    names = {}
    for name in os.listdir(directory):
        stem, ext = os.path.splitext(name)
        if ext in (".bin", ".idx") and os.path.isfile(os.path.join(directory, name)):
            names.setdefault(stem, set()).add(ext)
    for stem, exts in sorted(names.items()):
        if len(exts) == 1:
            missing = ".idx" if ".bin" in exts else ".bin"
            raise PreprocessError(f"{os.path.join(directory, stem)}: {missing} is missing (each "
                                  "dataset needs both its .bin and its .idx)")
    if not names:
        raise PreprocessError(f"--input {directory} holds no .bin/.idx datasets")
    return [os.path.join(directory, stem) for stem in sorted(names)]


def refuse_output_among_inputs(directory: str, output_prefix: str) -> None:
    output_directory = os.path.dirname(os.path.abspath(output_prefix))
    if os.path.isdir(output_directory) and os.path.samefile(output_directory, directory):
        raise PreprocessError(f"--output-prefix {output_prefix} lies in --input {directory}: the merged "
                              "dataset would be merged again by the next run; write it outside "
                              f"{directory}")


def merged_size(prefixes: list) -> int:
    """The merged pair is as big as the inputs together (one index header less per input)."""
    return sum(os.path.getsize(prefix + ext) for prefix in prefixes for ext in (".bin", ".idx"))


def check_free_space(prefixes: list, output_prefix: str) -> None:
    """Fail before writing anything if the merged pair cannot fit."""
    needed = merged_size(prefixes)
    if needed > shutil.disk_usage(os.path.dirname(os.path.abspath(output_prefix))).free:
        raise disk_full_error(output_prefix + ".bin", str(needed))


def merge(prefixes: list, output_prefix: str, multimodal: bool = False) -> IndexedDatasetWriter:
    indexes = []
    for prefix in prefixes:
        indexes.append(read_index(prefix + ".idx", multimodal))
    dtype = indexes[0].dtype
    for prefix, index in zip(prefixes, indexes):
        if index.dtype != dtype:
            raise PreprocessError(f"{prefix} stores {index.dtype.name} tokens but {prefixes[0]} "
                                  f"stores {dtype.name}: datasets of one tokenizer only")
    os.makedirs(os.path.dirname(os.path.abspath(output_prefix)), exist_ok=True)
    scratch.remove_stale(IndexedDatasetWriter.paths_of([output_prefix]), output_prefix)
    check_free_space(prefixes, output_prefix)
    writer = IndexedDatasetWriter(output_prefix, dtype, multimodal)
    try:
        for prefix, index in zip(prefixes, indexes):
            writer.add_part(prefix + ".bin", index.sequence_lengths, index.document_indices[1:],
                            max_token_id(prefix, dtype), index.sequence_modes)
        writer.finish()
        commit_all([writer])
    finally:
        writer.discard()
    return writer


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    prefixes = find_prefixes(args.input)
    refuse_output_among_inputs(args.input, args.output_prefix)
    try:
        writer = merge(prefixes, args.output_prefix, args.multimodal)
    except (ValueError, OSError) as e:  # a .bin shorter than its index says, a full disk...
        if is_disk_full(e):
            path = e.filename or args.output_prefix + ".bin"
            raise disk_full_error(path, str(merged_size(prefixes))) from None
        raise PreprocessError(f"{e}; no output was written") from None
    print(f"merged {len(prefixes)} datasets into {writer.bin_path} and .idx: "
          f"{writer.documents} documents, {writer.sequences} sequences, {writer.tokens} tokens",
          file=sys.stderr)
    return 0
