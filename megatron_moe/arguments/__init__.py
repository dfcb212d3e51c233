"""Command line: Megatron-LM's flag names and meanings, validated into one frozen :class:`RunConfig`.

A Megatron-LM launch script should need only its script name changed. Flags we add are few:
``--device``, ``--moe-router-type`` and the options of each routing scheme (``megatron_moe.moe.scheme_flags``),
a few run controls (:data:`megatron_moe.arguments.megatron_lm.OURS`). Megatron-LM's flags that we do not
implement are refused in one line with the reason (:mod:`megatron_moe.arguments.megatron_lm`).

Each area's flags live in one module with their bounds and their validation (:data:`AREAS`: model, MoE,
parallelism, recomputation, training, data, logging, checkpoints, runtime); a new flag is one edit there.
A flag is declared with :class:`~megatron_moe.arguments.flags.FlagGroup`, which records its category and
what can be checked of it alone (its bounds, whether it needs Transformer Engine). This module builds the
parser from the areas and the :class:`RunConfig` from the parser.

:func:`parse_args` returns a :class:`RunConfig`: a frozen dataclass with one field per parser destination
(generated from the parser, so a new flag is a field by construction) plus the derived run values declared
in :data:`DERIVED`. Validation never mutates the parsed namespace: after the flags' own checks, each area's
``CHECKS`` run in the order of :data:`AREAS`; each checks the config so far and returns the values it fills
in (defaults that depend on other flags, derived sizes). Every invalid combination is one
:class:`ConfigError` line naming the offender and the fix.

This package imports neither megatron-core nor the routing schemes' models (nor torch, until the runtime
area's check needs the device), so argument errors appear before the seconds those imports take.

What a checkpoint's config means for ``--load`` and export is a category per argument group (a field's
``metadata["category"]``, see :mod:`megatron_moe.arguments.flags`): :data:`ARCHITECTURE`, :data:`MODEL`,
:data:`TOKENIZER` or :data:`RUN`.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
from typing import Any, Dict, FrozenSet, Iterable, List, Optional, Tuple

from megatron_moe.arguments import checkpoints, data, logs, model, moe, parallel, recompute, runtime, training
from megatron_moe.arguments.flags import (ARCHITECTURE, MODEL, RUN, TOKENIZER, check_flags, field_metadata,
                                          flag_actions)
from megatron_moe.arguments.megatron_lm import add_refused_flags
from megatron_moe.arguments.model import padded_vocab_size
from megatron_moe.arguments.moe import moe_layer_pattern
from megatron_moe.arguments.runtime import ATTENTION_BACKENDS
from megatron_moe.errors import ConfigError

__all__ = ["ARCHITECTURE", "MODEL", "TOKENIZER", "RUN", "ATTENTION_BACKENDS", "DERIVED", "ConfigError", "RunConfig",
           "build_parser", "parse_args", "validate_args", "padded_vocab_size", "moe_layer_pattern"]

# The areas, in the order their flags are listed and their checks run: a check may use what an earlier
# area filled in (the data-parallel size, --ffn-hidden-size); the runtime area imports torch, so it is last.
AREAS = (parallel, model, moe, recompute, training, data, logs, checkpoints, runtime)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pretrain_gpt_moe.py", description="Pretrain a GPT mixture-of-experts model.", allow_abbrev=False
    )
    for area in AREAS:
        area.add_arguments(parser)
    add_refused_flags(parser)  # last: the catalogue's flags the areas do not declare
    return parser


@functools.lru_cache(maxsize=None)
def _default_parser() -> argparse.ArgumentParser:
    return build_parser()


# Derived run values (not flags): name -> (category, type). parse_args is given the world size, validation fills
# in the others but the vocabulary, which setup fills in once the tokenizer is built (the padded size is the
# checkpoint's on --load).
DERIVED: Dict[str, Tuple[str, Any]] = {
    "world_size": (RUN, Optional[int]),
    "data_parallel_size": (RUN, Optional[int]),
    "virtual_pipeline_model_parallel_size": (RUN, Optional[int]),  # model chunks per pipeline rank, None: one
    "num_microbatches": (RUN, Optional[int]),
    "moe_layer_pattern": (ARCHITECTURE, Optional[Tuple[int, ...]]),  # 1 per MoE layer, 0 per dense one
    "tokenizer_vocab_size": (ARCHITECTURE, Optional[int]),
    "padded_vocab_size": (RUN, Optional[int]),
}


def _frozen(value):
    """Lists (nargs flags, JSON arrays) as tuples, so that a RunConfig cannot change."""
    return tuple(_frozen(v) for v in value) if isinstance(value, (list, tuple)) else value


def _field_type(action: argparse.Action):
    if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction, argparse.BooleanOptionalAction)):
        return bool
    kind = action.type or str
    return Optional[Tuple[kind, ...]] if action.nargs in ("*", "+") else Optional[kind]


class _RunConfigMethods:
    """What every RunConfig can do; its fields are generated from the parser below."""

    def replace(self, **changes) -> "RunConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> Dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    @classmethod
    def names(cls, categories: Iterable[str]) -> FrozenSet[str]:
        """The fields of these categories."""
        wanted = set(categories)
        return frozenset(f.name for f in dataclasses.fields(cls) if f.metadata["category"] in wanted)

    def flags(self, categories: Iterable[str]) -> List[str]:
        """The command line that gives these categories' flags their values here (defaults left out)."""
        names, argv = self.names(categories), []
        for action, _ in flag_actions(_default_parser()).values():
            value = getattr(self, action.dest)
            if action.dest not in names or value == _frozen(action.default):
                continue
            flag = action.option_strings[0]
            if isinstance(action, argparse.BooleanOptionalAction):
                argv.append(flag if value else f"--no-{flag[2:]}")
            elif isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
                argv.append(flag)
            elif action.nargs in ("*", "+"):  # a list of one is kept as its value (Megatron-LM's rule)
                argv += [flag, *map(str, value if isinstance(value, tuple) else (value,))]
            else:
                argv += [flag, str(value)]
        return argv

    def __post_init__(self):
        for f in dataclasses.fields(self):
            object.__setattr__(self, f.name, _frozen(getattr(self, f.name)))


def _run_config_class(parser: argparse.ArgumentParser) -> type:
    fields = [(dest, _field_type(action), dataclasses.field(default=_frozen(action.default),
                                                            metadata=field_metadata(action, group)))
              for dest, (action, group) in flag_actions(parser).items()]
    fields += [(name, kind, dataclasses.field(default=None, metadata={"category": category}))
               for name, (category, kind) in DERIVED.items()]
    return dataclasses.make_dataclass("RunConfig", fields, bases=(_RunConfigMethods,), frozen=True,
                                      namespace={"__module__": __name__})


RunConfig = _run_config_class(_default_parser())
RunConfig.__doc__ = """One run's whole configuration, validated: every flag (its parser destination, derived defaults
filled in) and the DERIVED run values. Frozen; ``replace(**changes)`` gives a changed copy. A checkpoint saves
it whole as run_config.json; ``megatron_moe.run_config.load(iter_dir)`` reads it back."""


def parse_args(argv: Optional[List[str]] = None, world_size: int = 1) -> RunConfig:
    """Parses and validates: the run's RunConfig. Raises ConfigError (argparse itself exits 2 on a bad flag)."""
    return validate_args(build_parser().parse_args(argv), world_size)


def validate_args(args: argparse.Namespace, world_size: int) -> RunConfig:
    """The RunConfig these parsed flags describe on ``world_size`` processes; ``args`` is left as parsed."""
    config = RunConfig(**vars(args), world_size=world_size)
    check_flags(config)
    for area in AREAS:
        for check in area.CHECKS:
            filled = check(config)
            if filled:
                config = config.replace(**filled)
    return config
