"""A SentencePiece ``tokenizer.model`` as a ``tokenizer.json``, checked id for id against SentencePiece.

Our ``HuggingFaceTokenizer`` reads ``tokenizer.json`` (the `tokenizers` library); many released folders
(Llama-2 and Mixtral era) ship only the SentencePiece model. The model proto says everything the
encoding does: the pieces and scores (Unigram) or their merge order (BPE), byte fallback, the
normalisation rules (NFKC charsmap, whitespace handling, the dummy ``▁`` prefix). Those are rebuilt
with `tokenizers` building blocks, then the result must encode a set of probe strings (every piece of
the vocabulary and some awkward text) exactly as SentencePiece does, and decode them the same: a
tokenizer that differs in one id is refused, never used.
"""

from __future__ import annotations

from pathlib import Path
from typing import List, Tuple

from megatron_moe.conversion.hf_layout import ConversionError

_UNIGRAM, _BPE = 1, 2
_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED, _BYTE = 1, 2, 3, 4, 6
_SPACE = "\u2581"
# text that exercises the normalisation: leading, repeated and trailing spaces, newlines and tabs, accents
# and compatibility characters (NFKC), scripts absent from most vocabularies (byte fallback or unknown)
_PROBE_TEXT = ["In the beginning God created the heaven and the earth.", " leading space", "two  spaces  ",
               "new\nline\n\n", "tab\there", "héllo wörld ﬁne ① Ｆｕｌｌ", "中文 日本語 한국어 ☃ 🙂", "12345 3.14",
               "end ", "   ", ""]


def _model_proto(path: Path):
    try:
        from sentencepiece import sentencepiece_model_pb2
    except ImportError:
        raise ConversionError(f"{path}: reading a SentencePiece model needs the sentencepiece package "
                              "(pip install sentencepiece)") from None
    proto = sentencepiece_model_pb2.ModelProto()
    try:
        proto.ParseFromString(path.read_bytes())
    except Exception as error:  # protobuf's DecodeError, or anything a damaged file makes it raise
        raise ConversionError(f"{path}: not a SentencePiece model ({error})") from None
    if not proto.pieces:
        raise ConversionError(f"{path}: not a SentencePiece model (no pieces)")
    return proto


def _bpe_merges(pieces) -> List[Tuple[str, str]]:
    """SentencePiece BPE applies the highest-scoring piece whose two halves are present first; its pieces
    are stored best first, so the merge ranks follow the piece order."""
    ids = {piece.piece: index for index, piece in enumerate(pieces) if piece.type == _NORMAL}
    merges = []
    for merged, rank in ids.items():
        splits = [(merged[:cut], merged[cut:]) for cut in range(1, len(merged))
                  if merged[:cut] in ids and merged[cut:] in ids]
        merges += [(rank, ids[left], ids[right], left, right) for left, right in splits]
    return [(left, right) for *_, left, right in sorted(merges)]


def build(path: Path):
    """The `tokenizers.Tokenizer` equivalent of the SentencePiece model at ``path``."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers

    proto = _model_proto(path)
    pieces, trainer, rules = proto.pieces, proto.trainer_spec, proto.normalizer_spec
    if trainer.model_type == _UNIGRAM:
        model = models.Unigram([(p.piece, p.score) for p in pieces], unk_id=trainer.unk_id,
                               byte_fallback=trainer.byte_fallback)
    elif trainer.model_type == _BPE:
        model = models.BPE({p.piece: i for i, p in enumerate(pieces)}, _bpe_merges(pieces),
                           unk_token=pieces[trainer.unk_id].piece, fuse_unk=True, byte_fallback=trainer.byte_fallback)
    else:
        raise ConversionError(f"{path}: a SentencePiece {'word' if trainer.model_type == 3 else 'char'} model; "
                              "only Unigram and BPE models convert")
    tokenizer = Tokenizer(model)
    steps = [normalizers.Precompiled(rules.precompiled_charsmap)] if rules.precompiled_charsmap else []
    if rules.remove_extra_whitespaces:
        steps += [normalizers.Strip(), normalizers.Replace(Regex(" {2,}"), " ")]
    if rules.add_dummy_prefix:
        steps.append(normalizers.Prepend(_SPACE))
    tokenizer.normalizer = normalizers.Sequence(steps + [normalizers.Replace(" ", _SPACE)])
    unprefix = [decoders.Strip(content=" ", left=1, right=0)] if rules.add_dummy_prefix else []
    unknown = decoders.Replace(pieces[trainer.unk_id].piece, trainer.unk_surface)  # SentencePiece prints " ⁇ "
    tokenizer.decoder = decoders.Sequence([unknown, decoders.Replace(_SPACE, " "), decoders.ByteFallback(),
                                           decoders.Fuse()] + unprefix)
    # user-defined symbols are matched in raw text by SentencePiece too; control pieces (<s>, </s>) are not
    tokenizer.add_tokens([AddedToken(p.piece, normalized=False) for p in pieces if p.type == _USER_DEFINED])
    return tokenizer


def write_tokenizer_json(model_path: Path, destination: Path) -> None:
    """Writes ``destination`` (a tokenizer.json) after checking it encodes and decodes the probe strings
    exactly as SentencePiece does; refuses in one line otherwise."""
    import sentencepiece

    tokenizer = build(model_path)
    reference = sentencepiece.SentencePieceProcessor(model_file=str(model_path))
    plain = [i for i in range(reference.GetPieceSize())
             if not (reference.IsControl(i) or reference.IsUnknown(i) or reference.IsByte(i))]
    probes = _PROBE_TEXT + [reference.IdToPiece(i).replace(_SPACE, " ") for i in plain]
    expected = reference.encode(probes)
    encoded = [encoding.ids for encoding in tokenizer.encode_batch(probes, add_special_tokens=False)]
    for text, ours, theirs in zip(probes, encoded, expected):
        if ours != theirs:
            raise ConversionError(f"{model_path}: rebuilt as tokenizer.json it encodes {text!r} as {ours}, "
                                  f"SentencePiece as {theirs}; save a tokenizer.json beside it to import the folder")
        if tokenizer.decode(ours, skip_special_tokens=False) != reference.decode(theirs):
            raise ConversionError(f"{model_path}: rebuilt as tokenizer.json it decodes {theirs} differently from "
                                  "SentencePiece; save a tokenizer.json beside it to import the folder")
    tokenizer.save(str(destination))


def special_tokens(model_path: Path) -> dict:
    """The model's bos/eos/unk pieces as tokenizer_config.json names them (those the model defines)."""
    proto = _model_proto(model_path)
    trainer = proto.trainer_spec
    ids = {"bos_token": trainer.bos_id, "eos_token": trainer.eos_id, "unk_token": trainer.unk_id}
    return {name: proto.pieces[index].piece for name, index in ids.items() if 0 <= index < len(proto.pieces)}
