"""Writes Megatron-LM's command line as a table: every flag's default, action kind and choices.

It runs Megatron-LM's own ``add_megatron_arguments`` (``megatron/training/arguments.py``) on an argparse
parser, so the table is what Megatron-LM's parser holds, not a reading of its source. Run it against a
checkout of the tag the table is named after:

    git clone https://github.com/NVIDIA/Megatron-LM && git -C Megatron-LM checkout core_v0.16.1
    python tests/megatron_lm/derive_flags.py Megatron-LM tests/megatron_lm/flags_core_v0.16.1.json

Needs torch and Megatron-LM's light dependencies (packaging, numpy, ...); modules that fail to import
(GPU kernels such as triton) are replaced by empty stand-ins, since defining the flags never calls them.
``megatron.training``'s package ``__init__`` (which starts the whole training stack) is skipped.
"""

from __future__ import annotations

import argparse
import enum
import importlib.machinery
import json
import subprocess
import sys
import types
import warnings
from pathlib import Path
from unittest import mock


def _stand_in(name: str) -> None:
    """An empty module for ``name`` (and its parents), whose every attribute is a stand-in too."""
    parts = name.split(".")
    for i in range(1, len(parts) + 1):
        prefix = ".".join(parts[:i])
        if prefix not in sys.modules:
            module = mock.MagicMock(name=prefix)
            module.__path__, module.__name__ = [], prefix
            module.__spec__ = importlib.machinery.ModuleSpec(prefix, None, is_package=True)
            sys.modules[prefix] = module


_OURS = ("megatron.training", "megatron.training.utils")


def megatron_lm_parser(checkout: Path) -> argparse.ArgumentParser:
    sys.path.insert(0, str(checkout))
    training = types.ModuleType("megatron.training")  # its __init__ imports the training stack: skipped
    training.__path__ = [str(checkout / "megatron" / "training")]
    sys.modules["megatron.training"] = training
    utils = types.ModuleType("megatron.training.utils")  # the four helpers arguments.py imports
    for name in ("get_device_arch_version", "update_use_dist_ckpt", "print_rank_0", "warn_rank_0"):
        setattr(utils, name, lambda *args, **kwargs: None)
    sys.modules["megatron.training.utils"] = utils
    stood_in = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        while True:
            try:
                from megatron.training.arguments import add_megatron_arguments
                break
            except ModuleNotFoundError as missing:  # a GPU-only module: an empty stand-in, then again
                if missing.name is None or missing.name.startswith("megatron") or missing.name in stood_in:
                    raise
                stood_in.append(missing.name)
                _stand_in(missing.name)
                for name in [n for n in sys.modules if n.startswith("megatron.") and n not in _OURS]:
                    del sys.modules[name]
        parser = argparse.ArgumentParser(allow_abbrev=False)
        add_megatron_arguments(parser)
    print(f"stand-ins for modules that are not installed: {', '.join(stood_in) or 'none'}", file=sys.stderr)
    return parser


def _kind(action: argparse.Action) -> str:
    kinds = {argparse._StoreAction: "store", argparse._StoreTrueAction: "store_true",
             argparse._StoreFalseAction: "store_false", argparse._StoreConstAction: "store_const",
             argparse._AppendAction: "append", argparse.BooleanOptionalAction: "boolean_optional"}
    return kinds.get(type(action), type(action).__name__)


def _plain(value):
    """A JSON value for a default or a choice: enums by name, callables by name."""
    if isinstance(value, enum.Enum):
        return value.name
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return getattr(value, "__name__", repr(value))


def table(parser: argparse.ArgumentParser) -> dict:
    flags = {}
    for action in parser._actions:
        if not action.option_strings or isinstance(action, argparse._HelpAction):
            continue
        entry = {"dest": action.dest, "kind": _kind(action), "default": _plain(action.default)}
        if action.choices is not None:
            entry["choices"] = _plain(list(action.choices))
        if action.nargs is not None and entry["kind"] in ("store", "append"):
            entry["nargs"] = action.nargs
        if action.type is not None:
            entry["type"] = getattr(action.type, "__name__", repr(action.type))
        if action.required:
            entry["required"] = True
        for flag in action.option_strings:
            flags[flag] = {**entry, "aliases": [f for f in action.option_strings if f != flag]} \
                if len(action.option_strings) > 1 else entry
    return dict(sorted(flags.items()))


def main() -> None:
    cli = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    cli.add_argument("checkout", type=Path, help="a Megatron-LM checkout (git clone ... && git checkout TAG)")
    cli.add_argument("output", type=Path)
    cli.add_argument("--tag", default=None, help="the checkout's tag (default: git describe; give it for an "
                                                 "unpacked archive)")
    args = cli.parse_args()
    tag = args.tag or subprocess.run(["git", "-C", str(args.checkout), "describe", "--tags", "--exact-match"],
                                     capture_output=True, text=True, check=True).stdout.strip()
    parser = megatron_lm_parser(args.checkout)
    import megatron.core

    assert Path(megatron.core.__file__).resolve().is_relative_to(args.checkout.resolve()), megatron.core.__file__
    source = (f"Megatron-LM {tag} (https://github.com/NVIDIA/Megatron-LM): the parser that "
              "megatron/training/arguments.py add_megatron_arguments() builds, read by tests/megatron_lm/derive_flags.py")
    args.output.write_text(json.dumps({"source": source, "flags": table(parser)}, indent=1) + "\n")


if __name__ == "__main__":
    main()
