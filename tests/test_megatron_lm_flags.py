"""Every flag we share with Megatron-LM has its default, its spellings and its choices, as Megatron-LM's own
parser holds them (tests/megatron_lm/flags_core_v0.16.1.json, written by tests/megatron_lm/derive_flags.py);
each exception is listed here, once, with its reason. Every other Megatron-LM flag is in the package's
catalogue (megatron_moe/arguments/megatron_lm.py) and refused in one line, and docs/megatron_lm_flags.md is
the table generated from both."""

import argparse
import json
from pathlib import Path

import pytest

from launcher import REPO, TINY_MOE, assert_one_line_error, launch
from megatron_moe.arguments import ConfigError, build_parser, parse_args
from megatron_moe.arguments.megatron_lm import OURS, REFUSED, REFUSED_CHOICES, is_refused

TABLE = json.loads((Path(__file__).parent / "megatron_lm" / "flags_core_v0.16.1.json").read_text())["flags"]

# Defaults we keep different on purpose: flag -> why (docs/megatron_lm_flags.md lists them for users).
DIFFERENT_DEFAULTS = {
    "--transformer-impl": "Megatron-LM: transformer_engine. Ours: transformer_engine on CUDA, local on CPU, where "
                          "Transformer Engine cannot run",
    "--distributed-backend": "Megatron-LM: nccl. Ours: nccl on CUDA, gloo on CPU, where NCCL cannot run",
}

_BOOLEAN = (argparse._StoreTrueAction, argparse._StoreFalseAction)
_PARSER = build_parser()


def _ours():
    """The flags we declare (not the refused ones the catalogue adds)."""
    return [action for action in _PARSER._actions
            if action.option_strings and action.dest != "help" and not is_refused(action)]


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
    assert flags - set(TABLE) == OURS


def test_every_megatron_lm_flag_is_declared_or_refused_by_the_catalogue():
    declared = {flag for action in _ours() for flag in action.option_strings}
    assert not set(REFUSED) & declared, "declared now: delete these from megatron_moe/arguments/megatron_lm.py"
    assert set(REFUSED) <= set(TABLE), "not Megatron-LM's"
    assert set(TABLE) - declared == set(REFUSED), "neither declared nor in the catalogue (argparse would say " \
                                                   "'unrecognized arguments')"


@pytest.mark.parametrize("flag", sorted(REFUSED))
def test_a_refused_flag_stops_the_parse_with_its_reason(flag):
    with pytest.raises(ConfigError) as refused:
        _PARSER.parse_args([flag, "1"])  # a value or none: refused either way
    assert str(refused.value) == f"{flag} (Megatron-LM's) is not supported here: {REFUSED[flag]}"
    assert "\n" not in str(refused.value)


@pytest.mark.parametrize("flag, choice", [(flag, choice) for flag, choices in REFUSED_CHOICES.items()
                                          for choice in choices])
def test_a_refused_choice_is_refused_with_its_reason(flag, choice):
    with pytest.raises(ConfigError, match=f"^{flag} {choice} \\(Megatron-LM's\\) is not supported here: "):
        parse_args(TINY_MOE + ["--train-iters", "1", flag, str(choice)])


@pytest.mark.parametrize("flags, fragments", [
    (["--multi-latent-attention", "--q-lora-rank", "512"], ["--multi-latent-attention", "MLA", "not implemented"]),
    (["--moe-token-dispatcher-type", "flex"], ["--moe-token-dispatcher-type flex", "DeepEP", "alltoall"]),
    (["--moe-flex-dispatcher-backend", "deepep"], ["--moe-flex-dispatcher-backend", "DeepEP"]),
    (["--ckpt-format", "fsdp_dtensor"], ["--ckpt-format fsdp_dtensor", "torch_dist"]),
    (["--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", "Qwen/Qwen3-30B-A3B"],
     ["--tokenizer-model Qwen/Qwen3-30B-A3B", "Hugging Face model id", "nothing is downloaded", "local directory"]),
])
def test_pretrain_refuses_what_it_cannot_do_in_one_line(flags, fragments):
    assert_one_line_error(launch([*TINY_MOE, "--train-iters", "1", *flags]), *fragments)


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
    if "choices" in theirs:  # Megatron-LM's, those we refuse included (the catalogue adds them)
        assert set(map(str, action.choices or ())) == set(map(str, theirs["choices"]))
        assert set(map(str, REFUSED_CHOICES.get(flag, ()))) < set(map(str, theirs["choices"]))


def test_the_exception_lists_name_shared_flags():
    shared = {action.option_strings[0] for action in _shared()}
    assert set(DIFFERENT_DEFAULTS) | set(REFUSED_CHOICES) <= shared


def test_the_documentation_lists_the_different_defaults():
    text = (REPO / "docs" / "megatron_lm_flags.md").read_text()
    assert all(f"`{flag}`" in text for flag in DIFFERENT_DEFAULTS)


def test_the_documentation_table_is_up_to_date():
    from megatron_lm.flags_table import DOC, document

    text = DOC.read_text()
    if document(text) != text:
        pytest.fail("docs/megatron_lm_flags.md's table of flags is stale: run "
                    "`python tests/megatron_lm/flags_table.py`", pytrace=False)
