"""How an area declares its flags: an argument group with a category, and on each flag what can be checked
without looking at any other flag (its valid range, whether it needs Transformer Engine).

A flag is declared once, in its area's module, with everything about it::

    g = FlagGroup(parser, "training", RUN)
    g.add("--train-iters", type=int, required=True, valid=at_least(1))
    g.add("--adam-beta2", type=float, default=0.999, valid=between(0.0, 1.0, high_open=True))

:func:`check_flags` applies those declarations to a whole config (through the fields' metadata, see
:func:`field_metadata`); whatever depends on other flags is the area's own validation step.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from dataclasses import dataclass
from typing import Any, Dict, Optional, Sequence, Tuple, Union

from megatron_moe.errors import ConfigError

# What a checkpoint's config means for --load and export, per argument group:
# - ARCHITECTURE fixes the shapes and meaning of the saved tensors; --load refuses a difference;
# - MODEL is what the model computes besides that (router options, epsilons, dropout); export rebuilds it;
# - TOKENIZER is the tokenizer; export rebuilds it;
# - RUN is how this run trains, is laid out, logs and saves.
ARCHITECTURE, MODEL, TOKENIZER, RUN = "architecture", "model", "tokenizer", "run"


@dataclass(frozen=True)
class Bound:
    """A flag's valid values: ``low`` and up (``> low`` when ``low_open``), up to ``high`` when set."""

    low: float
    high: Optional[float] = None
    low_open: bool = False
    high_open: bool = False

    def problem(self, value) -> Optional[str]:
        """Why ``value`` is out of bounds, or None (an unset optional flag is not checked)."""
        if value is None:
            return None
        too_low = value < self.low or (self.low_open and value == self.low)
        too_high = self.high is not None and (value > self.high or (self.high_open and value == self.high))
        if not (too_low or too_high):
            return None
        if self.high is None:
            return f"must be {'>' if self.low_open else '>='} {self.low}, got {value}"
        return (f"must be in {'(' if self.low_open else '['}{self.low}, {self.high}{')' if self.high_open else ']'}, "
                f"got {value}")


def at_least(low) -> Bound:
    return Bound(low)


def above(low) -> Bound:
    return Bound(low, low_open=True)


def between(low, high, high_open: bool = False) -> Bound:
    return Bound(low, high, high_open=high_open)


class FlagGroup:
    """An argument group of one category; :meth:`add` is ``add_argument`` plus the flag's own checks."""

    def __init__(self, parser: argparse.ArgumentParser, title: str, category: str):
        self.group = parser.add_argument_group(title)
        self.group.category = category

    def add(self, *names: str, valid: Union[Bound, Sequence[Bound], None] = None,
            needs_transformer_engine: bool = False, **kwargs) -> argparse.Action:
        """``valid``: the bound(s) its value must be within, checked in order. ``needs_transformer_engine``:
        anything but its default needs ``--transformer-impl transformer_engine``."""
        action = self.group.add_argument(*names, **kwargs)
        action.bounds = (valid,) if isinstance(valid, Bound) else tuple(valid or ())
        action.needs_transformer_engine = needs_transformer_engine
        return action


def flag_actions(parser: argparse.ArgumentParser) -> Dict[str, Tuple[argparse.Action, str]]:
    """dest -> (action, category of its group) for every flag."""
    return {action.dest: (action, group.category) for group in parser._action_groups
            if hasattr(group, "category") for action in group._group_actions}


def field_metadata(action: argparse.Action, category: str) -> Dict[str, Any]:
    """What a RunConfig field records of its flag: its category and its own checks."""
    return {"category": category, "bounds": getattr(action, "bounds", ()),
            "needs_transformer_engine": getattr(action, "needs_transformer_engine", False)}


def check_flags(config) -> None:
    """Every flag within its bounds (a bad value otherwise surfaces as a traceback much later)."""
    for field in dataclasses.fields(config):
        for bound in field.metadata.get("bounds", ()):
            problem = bound.problem(getattr(config, field.name))
            require(problem is None, f"{flag_name(field.name)} {problem}")


def default_of(config, dest: str):
    return config.__dataclass_fields__[dest].default


def given(config, dest: str) -> bool:
    """Whether flag ``dest`` differs from its default."""
    return getattr(config, dest) != default_of(config, dest)


def warn(message: str) -> None:
    """One line on stderr, from the first rank only: a flag taken with Megatron-LM's meaning that a user may
    not expect."""
    if os.environ.get("RANK", "0") == "0":
        print(f"warning: {message}", file=sys.stderr, flush=True)


def require(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


def flag_name(dest: str) -> str:
    return f"--{dest.replace('_', '-')}"
