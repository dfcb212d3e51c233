"""The preprocess_data command: JSONL -> {prefix}_{key}_{document|sentence}.bin/.idx.

Flags and output names are Megatron-LM's tools/preprocess_data.py ones. How it runs:

    main process   cuts the input into line-aligned chunks, keeps at most 2 x --workers of them
                   in flight, and takes results back in input order: it appends each worker's
                   token file to the output (a kernel copy) and writes the small index arrays
    workers        read their chunk, parse JSON, split sentences, tokenize, and write tokens

Memory is bounded by the chunks in flight, never by the corpus. Any failure -- bad input, a
worker error, a worker killed, Ctrl-C, a full disk -- stops the run with a one-line reason and a
non-zero exit, and no output file is created or replaced (see indexed_writer.py). A run killed
outright takes its workers with it (worker_lifetime.py), and the next run removes the temporary
files it left (scratch.py). An input without a single document is an error unless --allow-empty.
"""

import argparse
import math
import multiprocessing
import os
import shutil
import signal
import sys
import tempfile
import time
from collections import deque
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool

from . import scratch
from .encode import EncodeJob, encode_chunk, init_worker
from .errors import DiskFull, PreprocessError, disk_full_error, is_disk_full
from .indexed_writer import IndexedDatasetWriter, commit_all, optimal_dtype
from .jsonl_input import input_bytes, iter_chunks, resolve_inputs
from .sentence_split import SentenceSplitter, available_languages
from .text_tokenizers import SUPPORTED_TYPES, build_tokenizer

# Megatron-LM's --tokenizer-type choices: all are accepted by the parser so that an unsupported one
# gets a clear message instead of an argparse error.
MEGATRON_TOKENIZER_TYPES = [
    "BertWordPieceLowerCase", "BertWordPieceCase", "GPT2BPETokenizer", "SentencePieceTokenizer",
    "GPTSentencePieceTokenizer", "HuggingFaceTokenizer", "Llama2Tokenizer", "TikTokenizer",
    "MultimodalTokenizer", "NullTokenizer", "NullMultimodalTokenizer", "SFTTokenizer",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="preprocess_data.py",
        description="Tokenize JSONL into megatron-core indexed datasets (.bin/.idx). A drop-in "
                    "for Megatron-LM's tools/preprocess_data.py: same flags and outputs, offline.")
    group = parser.add_argument_group("tokenizer")
    group.add_argument("--tokenizer-type", required=True, choices=MEGATRON_TOKENIZER_TYPES,
                       metavar="{" + ",".join(SUPPORTED_TYPES) + "}")
    group.add_argument("--vocab-file", help="GPT2BPETokenizer: encoder.json")
    group.add_argument("--merge-file", help="GPT2BPETokenizer: vocab.bpe")
    group.add_argument("--tokenizer-model",
                       help="HuggingFaceTokenizer: local directory with tokenizer.json; the "
                            "SentencePiece types: a local .model file")
    group.add_argument("--vocab-size", type=int, help="NullTokenizer: ids are 0..N-1, eod is N")
    group.add_argument("--legacy-tokenizer", action="store_true",
                       help="accepted for compatibility; ids are the same either way, except "
                            "that HuggingFaceTokenizer then adds special tokens as Megatron does")
    group.add_argument("--tokenizer-hf-include-special-tokens", action="store_true",
                       help="HuggingFaceTokenizer: add the tokenizer's special tokens (e.g. BOS)")
    group = parser.add_argument_group("input data")
    group.add_argument("--input", required=True,
                       help="a .jsonl or .jsonl.gz file, or a glob pattern of several")
    group.add_argument("--json-keys", nargs="+", default=["text"],
                       help="keys to extract; each gets its own .bin/.idx pair")
    group.add_argument("--split-sentences", action="store_true",
                       help="one sequence per sentence (Punkt, offline), in a single run")
    group.add_argument("--keep-newlines", action="store_true",
                       help="keep the newlines between sentences when splitting")
    group.add_argument("--skip-malformed", action="store_true",
                       help="skip and count lines that are not valid JSON instead of failing")
    group.add_argument("--allow-empty", action="store_true",
                       help="write an empty dataset when the input holds no document with text "
                            "(by default that is an error)")
    group = parser.add_argument_group("tokenization process")
    group.add_argument("--append-eod", action="store_true",
                       help="append the end-of-document token to each document")
    group.add_argument("--lang", default="english",
                       help="sentence-splitting language: " + ", ".join(available_languages()))
    group = parser.add_argument_group("output data")
    group.add_argument("--output-prefix", required=True,
                       help="outputs are {prefix}_{key}_{document|sentence}.bin/.idx")
    group = parser.add_argument_group("runtime")
    group.add_argument("--workers", type=int, default=os.cpu_count(),
                       help="worker processes, i.e. CPU cores to use (default: all)")
    group.add_argument("--partitions", type=int, default=1,
                       help="accepted for compatibility: documents are always processed in "
                            "parallel chunks and written in input order")
    group.add_argument("--keep-sequential-samples", action="store_true",
                       help="accepted for compatibility: input order is always kept")
    group.add_argument("--log-interval", type=int, default=1000,
                       help="print a progress line every this many documents")
    return parser


class Progress:
    """Megatron-style rate lines on stderr, plus the share of the input done when known."""

    def __init__(self, log_interval: int, total_bytes):
        self.start = time.monotonic()
        self.log_interval, self.total_bytes = max(1, log_interval), total_bytes
        self.documents = self.bytes = 0
        self._printed = 0

    def update(self, documents: int, nbytes: int) -> None:
        self.documents += documents
        self.bytes += nbytes
        if self.documents // self.log_interval > self._printed:
            self._printed = self.documents // self.log_interval
            print(self.line(), file=sys.stderr, flush=True)

    def line(self) -> str:
        elapsed = max(time.monotonic() - self.start, 1e-9)
        share = f", {100 * self.bytes / self.total_bytes:.0f}% of input" if self.total_bytes else ""
        return (f"Processed {self.documents} documents ({self.documents / elapsed:.0f} docs/s, "
                f"{self.bytes / elapsed / 2**20:.2f} MB/s){share}.")


class _Location:
    """Turns (chunk, line within chunk) into file:line, from the line counts of earlier chunks."""

    def __init__(self):
        self._lines_before = {}

    def of(self, chunk, line: int) -> str:
        return f"{chunk.path}:{self._lines_before.get(chunk.path, 0) + line + 1}"

    def advance(self, chunk, lines: int) -> None:
        self._lines_before[chunk.path] = self._lines_before.get(chunk.path, 0) + lines


def _raise_sigterm_as_interrupt(signum, frame):
    raise KeyboardInterrupt


def _ordered_results(pool, chunks, in_flight: int):
    """Yield (chunk, result) in input order with at most `in_flight` chunks submitted."""
    pending = deque()

    def died(chunk):
        return PreprocessError(f"a worker process died while encoding {chunk.path} (killed, or "
                               "out of memory?); no output was written")

    def take():
        chunk, future = pending.popleft()
        try:
            return chunk, future.result()
        except BrokenProcessPool:
            raise died(chunk) from None
        except DiskFull:
            raise
        except Exception as e:  # a bug or a library failure inside the worker
            where = f"{chunk.path} bytes {chunk.start}-{chunk.end}" if chunk.data is None \
                else chunk.path
            raise PreprocessError(f"a worker failed on {where}: {type(e).__name__}: {e}") from None

    for chunk in chunks:
        try:
            pending.append((chunk, pool.submit(encode_chunk, chunk)))
        except BrokenProcessPool:  # a worker died: the chunk it had reports it, else this one
            while pending:
                yield take()
            raise died(chunk) from None
        if len(pending) >= in_flight:
            yield take()
    while pending:
        yield take()


def _worker_context():
    # fork: workers inherit the tokenizer built here instead of loading it again
    return multiprocessing.get_context("fork" if sys.platform == "linux" else "spawn")


def run(args) -> None:
    if args.workers < 1:
        raise PreprocessError("--workers must be at least 1")
    paths = resolve_inputs(args.input)
    tokenizer = build_tokenizer(
        args.tokenizer_type, vocab_file=args.vocab_file, merge_file=args.merge_file,
        tokenizer_model=args.tokenizer_model, vocab_size=args.vocab_size,
        add_special_tokens=args.legacy_tokenizer or args.tokenizer_hf_include_special_tokens)
    if args.append_eod and (tokenizer.eod is None or tokenizer.eod < 0):
        raise PreprocessError("--append-eod: this tokenizer has no end-of-document token (set "
                              "eos_token in tokenizer_config.json, train the SentencePiece model "
                              "with an eos piece, or drop --append-eod)")
    splitter = SentenceSplitter(args.lang, args.keep_newlines) if args.split_sentences else None
    level = "sentence" if args.split_sentences else "document"
    keys = tuple(dict.fromkeys(args.json_keys))
    out_dir = os.path.dirname(os.path.abspath(args.output_prefix))
    dtype = optimal_dtype(tokenizer.vocab_size)

    prefixes = {key: f"{args.output_prefix}_{key}_{level}" for key in keys}
    progress = Progress(args.log_interval, input_bytes(paths))
    parts_dir, writers = None, {}
    try:
        os.makedirs(out_dir, exist_ok=True)
        scratch.remove_stale(IndexedDatasetWriter.paths_of(prefixes.values()), args.output_prefix)
        parts_dir = tempfile.mkdtemp(prefix=scratch.parts_dir_prefix(args.output_prefix),
                                     dir=out_dir)
        for key, prefix in prefixes.items():
            writers[key] = IndexedDatasetWriter(prefix, dtype)
        job = EncodeJob(keys, tokenizer, splitter, tokenizer.eod if args.append_eod else None,
                        dtype, parts_dir, args.skip_malformed)
        stats = _encode_all(paths, job, writers, args, progress)
        if not args.allow_empty:
            _refuse_empty(writers, stats, args.input)
        for writer in writers.values():
            writer.finish()
        commit_all(writers.values())
    except (OSError, DiskFull) as e:  # unreadable input, unwritable or full output directory
        if is_disk_full(e):
            path = getattr(e, "path", None) or e.filename or out_dir
            raise disk_full_error(path, _space_needed(e, writers, progress)) from None
        raise PreprocessError(f"{e}; no output was written") from None
    finally:
        for writer in writers.values():
            writer.discard()
        if parts_dir:
            shutil.rmtree(parts_dir, ignore_errors=True)
    _report(stats, writers, dtype)


def _space_needed(error, writers: dict, progress: Progress) -> str:
    """The outputs' whole size, projected from the output bytes per input byte so far."""
    written = sum(writer.bytes_written for writer in writers.values())
    ratio = written / progress.bytes if progress.bytes else getattr(error, "output_per_input", None)
    if ratio is None or progress.total_bytes is None:  # gzip input: its size is known at the end
        return f"more than {written}"
    return f"about {math.ceil(ratio * progress.total_bytes)}"


def _refuse_empty(writers: dict, stats: dict, input_pattern: str) -> None:
    for key, writer in writers.items():
        if writer.documents == 0:
            raise PreprocessError(
                f"--input {input_pattern} holds no document with text in key {key!r} "
                f"({stats['empty'][key]} empty documents, {stats['blank']} blank lines, "
                f"{stats['malformed']} malformed lines); pass --allow-empty to write an empty "
                "dataset anyway")


def _encode_all(paths, job, writers, args, progress: Progress) -> dict:
    location = _Location()
    stats = {"blank": 0, "malformed": 0, "first_malformed": [], "empty": dict.fromkeys(job.keys, 0)}
    pool = ProcessPoolExecutor(args.workers, mp_context=_worker_context(),
                               initializer=init_worker, initargs=(job, os.getpid()))
    try:
        for chunk, result in _ordered_results(pool, iter_chunks(paths), 2 * args.workers):
            if result.error is not None:
                line, message = result.error
                raise PreprocessError(f"{location.of(chunk, line)}: {message}")
            for key, part in result.parts.items():
                writers[key].add_part(part.bin_path, part.sequence_lengths, part.document_ends,
                                      part.max_token_id)
                os.unlink(part.bin_path)
                stats["empty"][key] += part.empty_documents
            stats["blank"] += result.blank_lines
            stats["malformed"] += len(result.malformed_lines)
            room = 5 - len(stats["first_malformed"])  # keep a few locations, not a growing list
            stats["first_malformed"] += [location.of(chunk, n)
                                         for n in result.malformed_lines[:room]]
            location.advance(chunk, result.lines)
            progress.update(result.documents, chunk.end - chunk.start if chunk.data is None
                            else len(chunk.data))
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    stats["summary"] = progress.line()
    return stats


def _report(stats: dict, writers: dict, dtype) -> None:
    print(f"Done. {stats['summary']}", file=sys.stderr)
    for key, writer in writers.items():
        print(f"wrote {writer.bin_path} and .idx: {writer.documents} documents, "
              f"{writer.sequences} sequences, {writer.tokens} tokens ({dtype.name}); "
              f"skipped {stats['empty'][key]} empty documents", file=sys.stderr)
    if stats["blank"]:
        print(f"skipped {stats['blank']} blank lines", file=sys.stderr)
    if stats["malformed"]:
        first = ", ".join(stats["first_malformed"])
        more = ", ..." if stats["malformed"] > len(stats["first_malformed"]) else ""
        print(f"skipped {stats['malformed']} malformed lines (--skip-malformed): {first}{more}",
              file=sys.stderr)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # --workers is the CPU budget
    previous = signal.signal(signal.SIGTERM, _raise_sigterm_as_interrupt)
    try:
        run(args)
    finally:
        signal.signal(signal.SIGTERM, previous)
    return 0
