"""The run's tokenizer from its flags (``--tokenizer-type`` and its files), as megatron-core's datasets read
one. It imports nothing of megatron-core: export builds it too, and starts without megatron-core."""

from __future__ import annotations

from typing import Dict

from megatron_moe.errors import ConfigError
from megatron_moe.preprocessing import text_tokenizers


def build_tokenizer(args):
    """Megatron-LM's tokenizer of ``--tokenizer-type``, from local files only (nothing is downloaded).

    Every type comes from our preprocessing tokenizers, which give megatron-core's ids, ``eod`` and
    ``vocab_size`` from the same inputs: megatron-core 0.16.1's GPT2 and Hugging Face tokenizers need the
    ``transformers`` package (and may fetch files), and its NullTokenizer would import all of megatron-core.
    The SentencePiece types also give ``pad`` (the datasets mask it out of the loss, as megatron-core's do)
    and ``model_vocab_size``, the embedding rows before padding (Megatron-LM sizes the model with its legacy
    tokenizer classes, which for SentencePieceTokenizer count added special tokens).
    """
    files = dict(vocab_size=args.vocab_size) if args.tokenizer_type == "NullTokenizer" else \
        dict(vocab_file=args.vocab_file, merge_file=args.merge_file, tokenizer_model=args.tokenizer_model)
    try:
        tokenizer = text_tokenizers.build_tokenizer(args.tokenizer_type, **files)
    except Exception as error:  # missing/corrupt local files: a user error, one line
        raise ConfigError(f"--tokenizer-type {args.tokenizer_type}: {error}") from error
    return DatasetTokenizer(tokenizer, {"class": args.tokenizer_type, **files})


class DatasetTokenizer:
    """A preprocessing tokenizer as megatron-core's GPTDataset / MockGPTDataset read one: ``eod``,
    ``vocab_size`` and ``unique_identifiers`` (what the index caches are named after); everything else
    (``encode``, ``decode``, ``pad``...) is the wrapped tokenizer's. ``model_vocab_size``: the model's
    vocabulary before padding."""

    def __init__(self, tokenizer, unique_identifiers: Dict[str, object]):
        self.tokenizer = tokenizer
        self.eod, self.vocab_size = tokenizer.eod, tokenizer.vocab_size
        self.model_vocab_size = getattr(tokenizer, "model_vocab_size", tokenizer.vocab_size)
        self.unique_identifiers = unique_identifiers

    def __getattr__(self, name: str):
        if name.startswith("__") or name == "tokenizer":  # copy/pickle probe before __init__ ran
            raise AttributeError(name)
        return getattr(self.tokenizer, name)
