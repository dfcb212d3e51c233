"""The model's flags: its shape (architecture), sequence length, vocabulary padding, initialisation and dropout."""

from __future__ import annotations

import argparse
from typing import Any, Dict

from megatron_moe.arguments.flags import (ARCHITECTURE, MODEL, FlagGroup, NoEffect, above, at_least, between,
                                          default_of, given, require, warn)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    g = FlagGroup(parser, "model", ARCHITECTURE)
    g.add("--num-layers", type=int, required=True, valid=at_least(1))
    g.add("--hidden-size", type=int, required=True, valid=at_least(1))
    g.add("--ffn-hidden-size", type=int, default=None, valid=at_least(1),
          help="default: 4 x hidden size; with --swiglu int(8 x hidden size / 3 / 64) x 64, as Megatron-LM")
    g.add("--num-attention-heads", type=int, required=True, valid=at_least(1))
    g.add("--group-query-attention", action="store_true",
          help="grouped-query attention with --num-query-groups key/value heads (without it: every head its own)")
    g.add("--num-query-groups", type=int, default=1, valid=at_least(1),
          help="key/value heads with --group-query-attention (ignored without it, as in Megatron-LM)")
    g.add("--kv-channels", type=int, default=None, valid=at_least(1),
          help="width of each attention head (default: hidden size / heads); given, any head count works "
               "(GLM-4.5-Air: 4096 hidden, 96 heads of 128)")
    g.add("--max-position-embeddings", type=int, default=None, valid=at_least(1))
    g.add("--normalization", choices=["LayerNorm", "RMSNorm"], default="LayerNorm")
    g.add("--norm-epsilon", type=float, default=1e-5, valid=at_least(0))
    g.add("--swiglu", action="store_true")
    g.add("--position-embedding-type", choices=["learned_absolute", "rope"], default="learned_absolute")
    g.add("--rotary-base", type=int, default=10000, valid=at_least(1))
    g.add("--rotary-percent", type=float, default=1.0, valid=(between(0.0, 1.0), above(0)))
    g.add("--untie-embeddings-and-output-weights", action="store_true")
    g.add("--disable-bias-linear", action="store_true",
          help="no biases in the linear layers (attention, MLPs and experts); without it they have biases, as in "
               "Megatron-LM, also in MoE models")
    g.add("--add-qkv-bias", action="store_true",
          help="biases on the query/key/value projection only (Qwen2's attention), also in MoE models")
    g.add("--apply-layernorm-1p", action="store_true",
          help="zero-centred norm weights: the norms scale by (1 + weight), the weights start at 0")
    g.add("--qk-layernorm", action="store_true",
          help="normalise each head's queries and keys (--normalization, one weight of head width shared by the "
               "heads) before the rotary embedding: Qwen3's and OLMo-2's per-head q/k norm")

    g = FlagGroup(parser, "model: sequence, vocabulary, initialisation, dropout", MODEL)
    g.add("--seq-length", type=int, required=True, valid=at_least(1))
    g.add("--make-vocab-size-divisible-by", type=int, default=128, valid=at_least(1),
          help="pad the vocabulary to a multiple of this x tensor-parallel size (the padded rows are "
               "masked out of the softmax; a checkpoint keeps its padding when it is loaded)")
    g.add("--init-method-std", type=float, default=0.02, valid=at_least(0))
    g.add("--hidden-dropout", type=float, default=0.1, valid=between(0.0, 1.0))
    g.add("--attention-dropout", type=float, default=0.1, valid=between(0.0, 1.0))
    g.add("--use-cpu-initialization", action="store_true",
          no_effect=NoEffect.never("every weight is drawn on the host anyway, by a generator of its own, the same in "
                                   "every parallel layout"))
    g.add("--no-position-embedding", dest="add_position_embedding", action="store_false",
          no_effect=NoEffect.never("deprecated in Megatron-LM: with --position-embedding-type rope there is no "
                                   "position-embedding table to leave out"),
          help="deprecated in Megatron-LM: accepted with --position-embedding-type rope, refused otherwise")
    g.add("--rope-type", choices=["rope"], default=None, help="rope (standard attention's only kind)")


def validate(c) -> Dict[str, Any]:
    """The model's shape; fills in --ffn-hidden-size and --max-position-embeddings, and sets an ignored
    --num-query-groups back to its default."""
    tp = c.tensor_model_parallel_size
    # megatron-core needs it only to derive the head width
    require(c.kv_channels is not None or c.hidden_size % c.num_attention_heads == 0,
            f"--hidden-size {c.hidden_size} is not divisible by --num-attention-heads {c.num_attention_heads}; "
            "give the head width with --kv-channels")
    filled = {}
    if c.group_query_attention:
        require(c.num_attention_heads % c.num_query_groups == 0 and c.num_query_groups % tp == 0,
                f"--num-query-groups {c.num_query_groups} must divide --num-attention-heads and be "
                f"divisible by --tensor-model-parallel-size {tp}")
    elif given(c, "num_query_groups"):
        # Megatron-LM ignores it: real launch scripts keep running, and the warning says what the model is
        warn(f"--num-query-groups {c.num_query_groups} is ignored without --group-query-attention (as in "
             f"Megatron-LM): every one of the {c.num_attention_heads} attention heads has its own keys and values")
        filled["num_query_groups"] = default_of(c, "num_query_groups")
    # Megatron-LM raises on it: a model without position embeddings (NoPE) is not offered
    require(c.add_position_embedding or c.position_embedding_type == "rope",
            "--no-position-embedding is deprecated (Megatron-LM refuses it without rope): give "
            "--position-embedding-type rope or learned_absolute instead")
    max_positions = c.max_position_embeddings or c.seq_length
    require(c.seq_length <= max_positions or c.position_embedding_type == "rope",
            f"--seq-length {c.seq_length} exceeds --max-position-embeddings {max_positions}")
    return {**filled, "ffn_hidden_size": _ffn_hidden_size(c), "max_position_embeddings": max_positions}


def _ffn_hidden_size(c) -> int:
    if c.ffn_hidden_size is not None:
        return c.ffn_hidden_size
    if not c.swiglu:
        return 4 * c.hidden_size
    # Megatron-LM's: two gated projections of about 8h/3 keep the parameters of a 4h MLP, in multiples of 64
    width = int((4 * c.hidden_size * 2 / 3) / 64) * 64
    require(width > 0, f"--swiglu without --ffn-hidden-size gives Megatron-LM's int(8 x {c.hidden_size} / 3 / 64) "
                       f"x 64 = 0 for --hidden-size {c.hidden_size}; give --ffn-hidden-size")
    return width


CHECKS = (validate,)


def padded_vocab_size(vocab_size: int, args) -> int:
    """Megatron-LM's padding: a multiple of make-vocab-size-divisible-by x tensor-parallel size."""
    multiple = args.make_vocab_size_divisible_by * args.tensor_model_parallel_size
    return -(-vocab_size // multiple) * multiple
