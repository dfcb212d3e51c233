"""Every flag we share with Megatron-LM has its default, its spellings and (a subset of) its choices, as
Megatron-LM's own parser holds them (tests/megatron_lm/flags_core_v0.16.1.json, written by
tests/megatron_lm/derive_flags.py); each exception is listed here, once, with its reason."""

import argparse
import json
from pathlib import Path

import pytest

from launcher import REPO
from megatron_moe.arguments import build_parser

TABLE = json.loads((Path(__file__).parent / "megatron_lm" / "flags_core_v0.16.1.json").read_text())["flags"]

# Defaults we keep different on purpose: flag -> why (docs/megatron_lm_flags.md lists them for users).
DIFFERENT_DEFAULTS = {
    "--transformer-impl": "Megatron-LM: transformer_engine. Ours: transformer_engine on CUDA, local on CPU, where "
                          "Transformer Engine cannot run",
    "--distributed-backend": "Megatron-LM: nccl. Ours: nccl on CUDA, gloo on CPU, where NCCL cannot run",
}

# Choices of Megatron-LM's we do not offer (argparse names the valid ones): flag -> those choices.
CHOICES_NOT_OFFERED = {
    "--position-embedding-type": {"mrope", "relative", "none"},
    "--transformer-impl": {"inference_optimized"},
    "--moe-router-load-balancing-type": {"global_aux_loss"},
    "--moe-token-dispatcher-type": {"flex"},
    "--tokenizer-type": {"BertWordPieceLowerCase", "BertWordPieceCase", "SentencePieceTokenizer",
                         "GPTSentencePieceTokenizer", "Llama2Tokenizer", "TikTokenizer", "MultimodalTokenizer",
                         "NullMultimodalTokenizer", "SFTTokenizer"},
}

# Flags Megatron-LM lacks: ours.
OUR_FLAGS = {
    "--device", "--moe-router-type", "--log-expert-load", "--no-log-expert-load", "--skip-nan-iterations",
    "--max-consecutive-skipped-iterations", "--max-skipped-iterations", "--no-verify-checkpoint",
    # the routing schemes' own (megatron_moe/moe/*_flags.py)
    "--base-shuffle", "--no-base-shuffle", "--sam-num-groups", "--sam-renormalize-gates",
    "--sam-group-balance-loss-coeff", "--sam-expert-balance-loss-coeff", "--sam-alignment-loss-coeff",
    "--sam-capacity-factor",
}

_BOOLEAN = (argparse._StoreTrueAction, argparse._StoreFalseAction)


def _ours():
    return [action for action in build_parser()._actions if action.option_strings and action.dest != "help"]


def _shared():
    return [action for action in _ours() if action.option_strings[0] in TABLE]


def _flips(kind: str, default) -> bool:
    """Whether giving a boolean flag changes its destination (a store_true flag defaulting to True does not)."""
    return (kind == "store_true") != bool(default)


def _same_default(ours, theirs) -> bool:
    if isinstance(ours, tuple):
        ours = list(ours)
    # a flag we keep as its string (--moe-layer-freq) against Megatron-LM's parsed value
    return ours == theirs or (isinstance(ours, str) and not isinstance(theirs, str) and ours == str(theirs))


def test_our_flags_are_megatron_lms_or_listed_as_ours():
    flags = {flag for action in _ours() for flag in action.option_strings}
    assert flags - set(TABLE) == OUR_FLAGS


@pytest.mark.parametrize("action", _shared(), ids=lambda action: action.option_strings[0])
def test_shared_flag_has_megatron_lms_default_spellings_and_choices(action):
    flag = action.option_strings[0]
    theirs = TABLE[flag]
    assert set(action.option_strings) == {flag, *theirs.get("aliases", ())}, "every Megatron-LM spelling works"
    if isinstance(action, _BOOLEAN):
        assert theirs["kind"] in ("store_true", "store_false") and _flips(theirs["kind"], theirs["default"])
        return
    assert theirs["kind"] == "store"
    assert action.nargs == theirs.get("nargs")
    if action.required:
        assert theirs["default"] is None, "required here, but Megatron-LM has a default"
    elif flag in DIFFERENT_DEFAULTS:
        assert not _same_default(action.default, theirs["default"]), f"{flag}: no longer different; unlist it"
    else:
        assert _same_default(action.default, theirs["default"]), (flag, action.default, theirs["default"])
    if theirs.get("type") in ("int", "float"):
        accepted = {"int": (int, float), "float": (float,)}[theirs["type"]]
        assert action.type in accepted, f"{flag} takes a {theirs['type']} in Megatron-LM"
    if "choices" in theirs:
        ours, megatron = set(map(str, action.choices or ())), set(map(str, theirs["choices"]))
        assert action.choices is not None and ours <= megatron, (flag, ours - megatron)
        assert megatron - ours == CHOICES_NOT_OFFERED.get(flag, set())


def test_the_exception_lists_name_shared_flags():
    shared = {action.option_strings[0] for action in _shared()}
    assert set(DIFFERENT_DEFAULTS) | set(CHOICES_NOT_OFFERED) <= shared


def test_the_documentation_lists_the_different_defaults():
    text = (REPO / "docs" / "megatron_lm_flags.md").read_text()
    assert all(f"`{flag}`" in text for flag in DIFFERENT_DEFAULTS)
