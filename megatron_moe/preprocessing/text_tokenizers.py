"""Tokenizers for preprocessing, built from local files only: nothing is ever downloaded.

Each gives the same ids, `eod` and `vocab_size` (which picks the token dtype) as the Megatron-LM
tokenizer of the same `--tokenizer-type`:

    GPT2BPETokenizer      encoder.json + vocab.bpe, OpenAI's byte-level BPE. Run by tiktoken when
                          the vocabulary is rank-ordered like the official GPT-2 files (ids equal
                          to Megatron's pure-Python encoder, ~5x faster than the alternative),
                          else by Hugging Face `tokenizers` with the same merges.
    HuggingFaceTokenizer  a local directory (or file) with tokenizer.json; eos from
                          tokenizer_config.json. Special tokens (e.g. BOS) are added as Megatron
                          does: with --legacy-tokenizer or --tokenizer-hf-include-special-tokens.
    NullTokenizer         text is space-separated integer ids; eod = --vocab-size.
    SentencePieceTokenizer, GPTSentencePieceTokenizer, Llama2Tokenizer
                          a local SentencePiece .model file (--tokenizer-model). Megatron-LM 0.16.1
                          tokenizes (tools/preprocess_data.py) and reads datasets (pretrain_gpt.py)
                          with megatron-core's SentencePiece tokenizer for all three: plain
                          SentencePiece ids (no BOS added), eod = eos, pad = the model's pad id,
                          vocab_size = its pieces. The model's vocabulary (`model_vocab_size`, the
                          embedding rows before padding) comes from Megatron-LM's legacy class of
                          the type: SentencePieceTokenizer adds <CLS>, <SEP>, <EOD>, <MASK> and any
                          of pad/bos/eos the model lacks after its pieces; the other two add none.

`encode(texts)` takes a batch so a library can amortise its call overhead.
"""

import json
import os
from typing import List, Optional

from .errors import PreprocessError

SENTENCEPIECE_TYPES = ("SentencePieceTokenizer", "GPTSentencePieceTokenizer", "Llama2Tokenizer")
SUPPORTED_TYPES = ("GPT2BPETokenizer", "HuggingFaceTokenizer", "NullTokenizer", *SENTENCEPIECE_TYPES)
# The GPT-2 pre-tokenizer: contractions, letters, digits, other symbols, whitespace runs.
GPT2_SPLIT_PATTERN = (r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+"""
                      r"""|\s+(?!\S)|\s+""")
GPT2_EOD = "<|endoftext|>"


class TokenizationError(ValueError):
    """A text the tokenizer cannot encode; `position` is its index in the batch."""

    def __init__(self, position: int, message: str):
        super().__init__(message)
        self.position = position


def _gpt2_byte_alphabet():
    """GPT-2 spells each byte as a printable character: printable Latin-1 bytes as themselves,
    the other 68 bytes as chr(256 + n) in byte order. Returns (character -> byte, the bytes in
    the order of their ids in the official vocabulary)."""
    printable = [b for b in range(256) if chr(b).isprintable() and b != ord(" ")]
    others = [b for b in range(256) if b not in printable]
    spelling = {b: chr(b) for b in printable}
    spelling.update({b: chr(256 + n) for n, b in enumerate(others)})
    return {char: b for b, char in spelling.items()}, printable + others


def _read_json(path: str, what: str):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise PreprocessError(f"{what} {path} does not exist") from None
    except ValueError as e:
        raise PreprocessError(f"{what} {path} is not valid JSON: {e}") from None


class GPT2BPETokenizer:
    """OpenAI GPT-2 byte-level BPE (Megatron-LM `_GPT2BPETokenizer`) from local files."""

    ENGINES = ("auto", "tiktoken", "tokenizers")  # auto: tiktoken when it can, else tokenizers

    def __init__(self, vocab_file: str, merge_file: str, engine: str = "auto"):
        if not vocab_file or not merge_file:
            raise PreprocessError("GPT2BPETokenizer needs --vocab-file (encoder.json) and "
                                  "--merge-file (vocab.bpe)")
        self.vocab_file, self.merge_file = vocab_file, merge_file
        encoder = _read_json(vocab_file, "--vocab-file")
        try:
            with open(merge_file, encoding="utf-8") as f:
                # like Megatron: the first line is the "#version" header, the last one is empty
                merges = [tuple(line.split()) for line in f.read().split("\n")[1:-1]]
        except FileNotFoundError:
            raise PreprocessError(f"--merge-file {merge_file} does not exist") from None
        if GPT2_EOD not in encoder:
            raise PreprocessError(f"--vocab-file {vocab_file} has no {GPT2_EOD} token: "
                                  "is it a GPT-2 encoder.json?")
        self.eod = encoder[GPT2_EOD]
        self.vocab_size = len(encoder)
        if engine not in self.ENGINES:
            raise ValueError(f"engine must be one of {self.ENGINES}")
        fast = self._tiktoken(encoder, merges) if engine in ("auto", "tiktoken") else None
        if fast is None and engine == "tiktoken":
            raise PreprocessError("tiktoken cannot run this vocabulary (not installed, or ids "
                                  "not in GPT-2 merge order)")
        self.engine = "tiktoken" if fast else "tokenizers"
        self._encode = fast or self._hf_bpe()

    def _tiktoken(self, encoder: dict, merges: list):
        """tiktoken merges by the rank of the merged token, GPT-2 by the rank of the merge rule:
        the same thing when the ids are bytes-then-merges in order, as in the official files."""
        try:
            import tiktoken
        except ImportError:
            return None
        byte_decoder, byte_order = _gpt2_byte_alphabet()
        # str.translate + latin-1 turns a GPT-2 spelled token into its bytes at C speed; a
        # character outside the alphabet becomes U+FFFF, which latin-1 refuses
        table = {code: "\uffff" for code in range(512)}
        table.update({ord(char): b for char, b in byte_decoder.items()})

        def to_bytes(token):
            return token.translate(table).encode("latin-1")

        try:
            ranks = {to_bytes(token): i for token, i in encoder.items() if token != GPT2_EOD}
            expected = {bytes([b]): rank for rank, b in enumerate(byte_order)}
            for rank, (left, right) in enumerate(merges, start=len(byte_order)):
                expected[to_bytes(left) + to_bytes(right)] = rank
        except ValueError:  # not a byte-level vocabulary (or a merge line without two parts)
            return None
        if ranks != expected:
            return None
        encoding = tiktoken.Encoding("gpt2-local", pat_str=GPT2_SPLIT_PATTERN,
                                     mergeable_ranks=ranks, special_tokens={GPT2_EOD: self.eod})
        # encode_ordinary: "<|endoftext|>" inside a text is plain text, as in Megatron-LM
        return lambda texts: [encoding.encode_ordinary(text) for text in texts]

    def _hf_bpe(self):
        from tokenizers import Tokenizer, models, pre_tokenizers

        try:
            bpe = Tokenizer(models.BPE.from_file(self.vocab_file, self.merge_file))
        except Exception as e:  # the library reports bad files as plain Exception
            raise PreprocessError(f"cannot read the BPE files {self.vocab_file}, "
                                  f"{self.merge_file}: {e}") from None
        bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        return lambda texts: [e.ids for e in bpe.encode_batch(texts, add_special_tokens=False)]

    def encode(self, texts: List[str]) -> List[List[int]]:
        return self._encode(texts)

    def __reduce__(self):  # rebuilt from the files in spawned workers
        return type(self), (self.vocab_file, self.merge_file, self.engine)


class HuggingFaceTokenizer:
    """A `tokenizers` tokenizer.json from a local directory (Megatron `HuggingFaceTokenizer`)."""

    def __init__(self, model_path: str, add_special_tokens: bool):
        if not model_path:
            raise PreprocessError("HuggingFaceTokenizer needs --tokenizer-model DIR (a local "
                                  "directory with tokenizer.json; nothing is downloaded)")
        self.model_path, self.add_special_tokens = model_path, add_special_tokens
        is_directory = os.path.isdir(model_path)
        directory = model_path if is_directory else os.path.dirname(model_path)
        path = os.path.join(model_path, "tokenizer.json") if is_directory else model_path
        if not os.path.isfile(path):
            raise PreprocessError(
                f"--tokenizer-model {model_path}: no tokenizer.json there (a local directory is "
                "required; save one with transformers' tokenizer.save_pretrained(DIR))")
        from tokenizers import Tokenizer

        try:
            self._tokenizer = Tokenizer.from_file(path)
        except Exception as e:  # the library reports parse errors as plain Exception
            raise PreprocessError(f"cannot load {path}: {e}") from None
        self.vocab_size = self._tokenizer.get_vocab_size(with_added_tokens=True)
        eos = self._eos_token(directory)
        self.eod = self._tokenizer.token_to_id(eos) if eos else None

    @staticmethod
    def _eos_token(directory: str) -> Optional[str]:
        for name in ("tokenizer_config.json", "special_tokens_map.json"):
            path = os.path.join(directory, name)
            if os.path.isfile(path):
                eos = _read_json(path, "tokenizer file").get("eos_token")
                if isinstance(eos, dict):  # {"content": "</s>", ...}
                    eos = eos.get("content")
                if eos:
                    return eos
        return None

    def encode(self, texts: List[str]) -> List[List[int]]:
        encodings = self._tokenizer.encode_batch(texts, add_special_tokens=self.add_special_tokens)
        return [e.ids for e in encodings]

    def __reduce__(self):
        return type(self), (self.model_path, self.add_special_tokens)


class NullTokenizer:
    """Texts are space-separated integer ids (Megatron `NullTokenizer`); eod = vocab_size."""

    def __init__(self, vocab_size: Optional[int]):
        if vocab_size is None or vocab_size < 1:
            raise PreprocessError("NullTokenizer needs --vocab-size N (ids are 0..N-1, eod is N)")
        self.eod = vocab_size
        self.vocab_size = vocab_size + 1

    def encode(self, texts: List[str]) -> List[List[int]]:
        batch = []
        for position, text in enumerate(texts):
            try:
                ids = [int(word) for word in text.split(" ")] if text else []
            except ValueError:
                raise TokenizationError(position, "NullTokenizer needs integer ids separated by "
                                        f"single spaces, got {text[:40]!r}") from None
            if ids and not 0 <= min(ids) <= max(ids) < self.eod:
                raise TokenizationError(position, f"NullTokenizer id out of range "
                                        f"0..{self.eod - 1} (--vocab-size {self.eod})")
            batch.append(ids)
        return batch

    def __reduce__(self):
        return type(self), (self.eod,)


class SentencePieceTokenizer:
    """A local SentencePiece model, as Megatron-LM 0.16.1 uses it for the three SentencePiece types (see
    the module docstring): megatron-core's tokenizer for ids, eod and pad; Megatron-LM's legacy class of
    `tokenizer_type` for the model's vocabulary size."""

    # the special tokens Megatron-LM's legacy _SentencePieceTokenizer appends when the model lacks them
    _LEGACY_SPECIAL = ("<CLS>", "<SEP>", "<EOD>", "<MASK>")

    def __init__(self, tokenizer_type: str, model_file: str):
        if not model_file:
            raise PreprocessError(f"{tokenizer_type} needs --tokenizer-model FILE (a local SentencePiece "
                                  ".model file; nothing is downloaded)")
        if not os.path.isfile(model_file):
            raise PreprocessError(f"--tokenizer-model {model_file}: no such file (a local SentencePiece "
                                  ".model file is required; nothing is downloaded)")
        import sentencepiece

        self.tokenizer_type, self.model_file = tokenizer_type, model_file
        self._sp = sentencepiece.SentencePieceProcessor()
        try:
            self._sp.Load(model_file)
        except (OSError, RuntimeError) as e:
            raise PreprocessError(f"--tokenizer-model {model_file} is not a SentencePiece model: {e}") from None
        self.vocab_size = self._sp.get_piece_size()
        self.eod = self._sp.eos_id()
        self.pad = self._sp.pad_id()
        self.model_vocab_size = self.vocab_size + (
            len(self._legacy_additions()) if tokenizer_type == "SentencePieceTokenizer" else 0)

    def _legacy_additions(self) -> List[str]:
        """The tokens Megatron-LM's legacy _SentencePieceTokenizer adds after the model's pieces, in order."""
        pieces = {self._sp.id_to_piece(i) for i in range(self.vocab_size)}
        added = []
        for token in self._LEGACY_SPECIAL + (self._piece(self._sp.pad_id(), "<PAD>"),
                                             self._piece(self._sp.bos_id(), "<BOS>"),
                                             self._piece(self._sp.eos_id(), "<EOS>")):
            if token not in pieces and token not in added:
                added.append(token)
        return added

    def _piece(self, token_id: int, fallback: str) -> str:
        return self._sp.id_to_piece(token_id) if 0 <= token_id < self.vocab_size else fallback

    def encode(self, texts: List[str]) -> List[List[int]]:
        return self._sp.encode_as_ids(list(texts))

    def __reduce__(self):
        return type(self), (self.tokenizer_type, self.model_file)


def build_tokenizer(tokenizer_type: str, vocab_file=None, merge_file=None, tokenizer_model=None,
                    vocab_size=None, add_special_tokens=False):
    """The tokenizer for a Megatron `--tokenizer-type`, or a one-line error for other types."""
    if tokenizer_type in SENTENCEPIECE_TYPES:
        return SentencePieceTokenizer(tokenizer_type, tokenizer_model)
    if tokenizer_type == "GPT2BPETokenizer":
        return GPT2BPETokenizer(vocab_file, merge_file)
    if tokenizer_type == "HuggingFaceTokenizer":
        return HuggingFaceTokenizer(tokenizer_model, add_special_tokens)
    if tokenizer_type == "NullTokenizer":
        return NullTokenizer(vocab_size)
    raise PreprocessError(f"--tokenizer-type {tokenizer_type} is not supported here (supported: "
                          f"{', '.join(SUPPORTED_TYPES)}); use Megatron-LM's "
                          "tools/preprocess_data.py for it")
