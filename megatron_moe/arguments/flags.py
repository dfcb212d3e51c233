"""How an area declares its flags: an argument group with a category, and on each flag (or the whole group)
what can be checked of it alone: its valid range, whether it needs Transformer Engine, the flag without
which it would be ignored, and where it has no effect.

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
from typing import Any, Callable, Dict, Optional, Sequence, Tuple, Union

from megatron_moe.arguments.megatron_lm import REFUSED_CHOICES
from megatron_moe.console import print_line
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
        """Why ``value`` is out of bounds, or None (an unset optional flag is not checked; a flag of several
        values is checked value by value)."""
        if value is None:
            return None
        if isinstance(value, (tuple, list)):
            return next(filter(None, map(self.problem, value)), None)
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


# A flag that means nothing without another: (the other's dest, what happens without it)
Requirement = Tuple[str, str]


@dataclass(frozen=True)
class NoEffect:
    """A flag accepted where it cannot act: a speed-only flag in a layout that cannot use it, a logging or
    tokenizer detail this project has no use for. ``acts``: where it does act ("" where it never does);
    ``why``: why it has no effect elsewhere; ``idle_in(config, device)``: whether this run is such a place.
    Given there, the run prints one info line saying why (:func:`note_no_effect`); the table of
    docs/megatron_lm_flags.md shows ``acts`` and ``why``."""

    acts: str
    why: str
    idle_in: Callable[[Any, str], bool]

    @classmethod
    def never(cls, why: str) -> "NoEffect":
        return cls("", why, lambda config, device: True)

    def idle(self, config, device: str) -> Optional[str]:
        """Why the flag has no effect in this run, or None where it acts."""
        return self.why if self.idle_in(config, device) else None


class FlagGroup:
    """An argument group of one category; :meth:`add` is ``add_argument`` plus the flag's own checks.
    ``requires``: every flag of the group but that one needs it (flags added to :attr:`group` directly too)."""

    def __init__(self, parser: argparse.ArgumentParser, title: str, category: str,
                 requires: Optional[Requirement] = None):
        self.group = parser.add_argument_group(title)
        self.group.category = category
        self.group.requires = requires

    def add(self, *names: str, valid: Union[Bound, Sequence[Bound], None] = None,
            needs_transformer_engine: bool = False, requires: Optional[Requirement] = None,
            no_effect: Optional[NoEffect] = None, **kwargs) -> argparse.Action:
        """``valid``: the bound(s) its value must be within, checked in order. ``needs_transformer_engine``:
        anything but its default needs ``--transformer-impl transformer_engine``. ``requires``: anything but
        its default needs that flag set. ``no_effect``: where it is accepted without effect. Megatron-LM's
        choices of the flag that we refuse (``megatron_lm.REFUSED_CHOICES``) are added to ``choices``, so
        that giving one is refused with its reason rather than by argparse."""
        refused = REFUSED_CHOICES.get(names[0], {})
        if refused:
            kwargs["choices"] = [*kwargs["choices"], *refused]
        action = self.group.add_argument(*names, **kwargs)
        action.bounds = (valid,) if isinstance(valid, Bound) else tuple(valid or ())
        action.needs_transformer_engine = needs_transformer_engine
        action.requires = requires
        action.no_effect = no_effect
        return action


def flag_actions(parser: argparse.ArgumentParser) -> Dict[str, Tuple[argparse.Action, argparse._ArgumentGroup]]:
    """dest -> (action, its group) for every flag."""
    return {action.dest: (action, group) for group in parser._action_groups
            if hasattr(group, "category") for action in group._group_actions}


def field_metadata(action: argparse.Action, group: argparse._ArgumentGroup) -> Dict[str, Any]:
    """What a RunConfig field records of its flag: its group's category and its own checks."""
    requires = getattr(action, "requires", None) or group.requires
    flag = action.option_strings[0]
    return {"category": group.category, "flag": flag, "bounds": getattr(action, "bounds", ()),
            # how a given value is spelled: --no-X for a negatable switch turned off
            "off": f"--no-{flag[2:]}" if isinstance(action, argparse.BooleanOptionalAction) else flag,
            "needs_transformer_engine": getattr(action, "needs_transformer_engine", False),
            "requires": requires if requires and requires[0] != action.dest else None,
            "no_effect": getattr(action, "no_effect", None)}


def check_flags(config) -> None:
    """Every flag within its bounds (a bad value otherwise surfaces as a traceback much later), none given
    with a choice of Megatron-LM's that we refuse, and none given that would be ignored."""
    for field in dataclasses.fields(config):
        if "flag" not in field.metadata:
            continue  # a derived value
        value = getattr(config, field.name)
        flag = field.metadata["off" if value is False else "flag"]
        for choice in value if isinstance(value, tuple) else (value,):
            why = REFUSED_CHOICES.get(field.metadata["flag"], {}).get(choice)
            require(why is None, f"{flag} {choice} (Megatron-LM's) is not supported here: {why}")
        for bound in field.metadata["bounds"]:
            problem = bound.problem(value)
            require(problem is None, f"{flag} {problem}")
        requires = field.metadata["requires"]
        if requires and given(config, field.name):
            needed, without = requires
            require(getattr(config, needed), f"{flag} needs {flag_name(needed)} ({without}); give "
                                              f"{flag_name(needed)} or remove {flag}")


def note_no_effect(config, device: str) -> None:
    """One info line (first rank) for each flag given that has no effect in this run, saying why."""
    for field in dataclasses.fields(config):
        no_effect = field.metadata.get("no_effect")
        if no_effect is not None and given(config, field.name):
            why = no_effect.idle(config, device)
            if why is not None:
                flag = field.metadata["off" if getattr(config, field.name) is False else "flag"]
                info(f"{flag} has no effect here: {why}")


def default_of(config, dest: str):
    return config.__dataclass_fields__[dest].default


def given(config, dest: str) -> bool:
    """Whether flag ``dest`` differs from its default."""
    return getattr(config, dest) != default_of(config, dest)


def warn(message: str) -> None:
    """One line on stderr, from the first rank only: a flag taken with Megatron-LM's meaning that a user may
    not expect."""
    if os.environ.get("RANK", "0") == "0":
        print_line(f"warning: {message}", sys.stderr)


def info(message: str) -> None:
    """One line on stdout, from the first rank only."""
    if os.environ.get("RANK", "0") == "0":
        print_line(f"info: {message}")


def require(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


def flag_name(dest: str) -> str:
    return f"--{dest.replace('_', '-')}"
