"""``run_config.json``: the whole run configuration a checkpoint was written with, and reading it back.

Every ``iter_NNNNNNN/`` directory holds ``run_config.json``: a JSON object with every parser destination
(its validated value, derived defaults filled in), the derived run values of
:data:`megatron_moe.arguments.DERIVED` (``world_size``, ``data_parallel_size``, ``num_microbatches``,
``moe_layer_pattern``, ``tokenizer_vocab_size``, ``padded_vocab_size``) and ``run_config_format``.
:func:`load` is the one way to read it back, as a :class:`~megatron_moe.arguments.RunConfig`; ``--load``,
export and import all go through it.

Older files: a setting the file lacks (a flag added after it was written) takes the flag's default, which
is what the run that wrote it did (a default validation derives from another flag is derived the same way:
the expert tensor-parallel size is the tensor-parallel size). Files written before format 2 (a hand-picked subset of fields, the
routing scheme's flags under ``moe_routing_flags``) are read the same way. Files written before format 3
are read with the meanings their flags had then (:func:`_from_format_2`). A setting this version does not
know is refused: it may change what the model computes.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Dict

from megatron_moe.arguments import RunConfig
from megatron_moe.errors import ConfigError

FILE_NAME = "run_config.json"
FORMAT = 3
_FORMAT_KEY = "run_config_format"


def to_json(config: RunConfig) -> str:
    return json.dumps({_FORMAT_KEY: FORMAT, **config.to_dict()}, indent=1)


def from_json(text: str, source: str = FILE_NAME) -> RunConfig:
    """The RunConfig a run_config.json holds. Raises ConfigError (one line naming ``source``)."""
    try:
        values = json.loads(text)
    except ValueError as error:
        raise ConfigError(f"{source} is not valid JSON ({error}); the checkpoint is damaged") from error
    if not isinstance(values, dict):
        raise ConfigError(f"{source} holds no JSON object; the checkpoint is damaged")
    written = values.pop(_FORMAT_KEY, 1)
    if written < 2:
        values = _from_format_1(values)
    if written < 3:
        values = _from_format_2(values)
    # added later, with a default that validation fills in from another flag: what the writer ran with
    values.setdefault("expert_tensor_parallel_size", values.get("tensor_model_parallel_size", 1))
    known = {f.name for f in dataclasses.fields(RunConfig)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(f"{source} holds settings this version does not know ({', '.join(unknown)}): it was "
                          "written by a newer megatron-moe; use that version")
    return RunConfig(**values)


def _from_format_1(values: Dict[str, Any]) -> Dict[str, Any]:
    """A format-1 run config (a subset of fields) as format-2 values."""
    values = dict(values)
    values.update(values.pop("moe_routing_flags", None) or {})
    sharding = values.pop("distrib_optim_sharding_type", None)
    values["dist_ckpt_optim_fully_reshardable"] = sharding == "fully_reshardable"
    if values.get("moe_layer_pattern") is not None:
        values["moe_layer_freq"] = "[" + ",".join(map(str, values["moe_layer_pattern"])) + "]"
    values.setdefault("seq_length", values.get("max_position_embeddings"))
    if "tokenizer_type" not in values and values.get("tokenizer_vocab_size"):  # written before it was recorded
        values.update(tokenizer_type="NullTokenizer", vocab_size=values["tokenizer_vocab_size"] - 1)  # + eod
    return values


# Defaults format 3 changed to Megatron-LM's: a file written before that lacks the setting ran with these
_FORMAT_2_DEFAULTS = {"eval_interval": 1000, "moe_token_dispatcher_type": "alltoall", "tokenizer_type": "NullTokenizer",
                      "split": "969,30,1"}


def _from_format_2(values: Dict[str, Any]) -> Dict[str, Any]:
    """A format-2 run config as format-3 values: MoE models had no linear biases whatever
    ``--disable-bias-linear`` said, and ``--num-query-groups`` alone meant grouped-query attention."""
    values = {**_FORMAT_2_DEFAULTS, **values}
    if values.get("num_experts") is not None:
        values["disable_bias_linear"] = True
    groups = values.pop("num_query_groups", None)
    if groups is not None:
        values.update(group_query_attention=True, num_query_groups=groups)
    return values


def load(iter_dir) -> RunConfig:
    """The run config checkpoint directory ``iter_dir`` (``.../iter_NNNNNNN``) was written with."""
    path = Path(iter_dir) / FILE_NAME
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as error:
        raise ConfigError(f"cannot read {path} ({type(error).__name__}: {error}); the checkpoint is "
                          "incomplete or damaged") from error
    return from_json(text, str(path))


def save(config: RunConfig, iter_dir) -> Path:
    path = Path(iter_dir) / FILE_NAME
    path.write_text(to_json(config))
    return path
