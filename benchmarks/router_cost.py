#!/usr/bin/env python3
"""What one router call costs a GPU step, counted on the CPU: host syncs and launched aten ops.

    python benchmarks/router_cost.py [--tokens 512] [--experts 16] [--hidden 64]

One process, one call of each routing scheme's router on the same random hidden states (as the MoE layer
calls it once per layer and micro batch), counted by ``megatron_moe.host_sync.HostSyncCounter``: host syncs
(a GPU step would wait for the device there) and launched aten ops (views and allocations excluded: each
costs a GPU kernel launch, about 5 us eager). Training mode (forward with its losses, then backward) and
evaluation mode (forward) are counted apart. The dispatcher is not included (docs/host_syncs.md counts whole
training steps). Routers:

- ``topk``: megatron-core's TopKRouter, softmax top-2 with the load-balancing aux loss;
- ``group-limited``: the same with ``--moe-router-num-groups 4 --moe-router-group-topk 1``;
- ``base``: BASE (the balanced assignment in training, greedy argmax at evaluation), top-1;
- ``sam``: SAM, k = 2 inside one of 4 groups, its three losses.
"""

from __future__ import annotations

import argparse
import warnings
from typing import Dict, List

ROUTERS: Dict[str, List[str]] = {
    "topk": ["--moe-router-topk", "2", "--moe-aux-loss-coeff", "0.01"],
    "group-limited": ["--moe-router-topk", "2", "--moe-aux-loss-coeff", "0.01", "--moe-router-num-groups", "4",
                      "--moe-router-group-topk", "1"],
    "base": ["--moe-router-type", "base", "--moe-router-topk", "1"],
    "sam": ["--moe-router-type", "sam", "--moe-router-topk", "2", "--sam-num-groups", "4"],
}


def flags(router: str, experts: int, hidden: int) -> List[str]:
    return ["--num-layers", "1", "--hidden-size", str(hidden), "--num-attention-heads", "4", "--seq-length", "64",
            "--swiglu", "--disable-bias-linear", "--normalization", "RMSNorm", "--num-experts", str(experts),
            "--micro-batch-size", "1", "--train-iters", "1", "--lr", "1e-3", "--mock-data", "--tokenizer-type",
            "NullTokenizer", "--vocab-size", "1000", "--device", "cpu", *ROUTERS[router]]


def count(router: str, tokens: int, experts: int, hidden: int) -> Dict[str, tuple]:
    """(syncs, ops) of one training call (forward + backward) and one evaluation call."""
    import torch
    from megatron.core.transformer.moe.moe_utils import get_default_pg_collection

    from megatron_moe.arguments import parse_args
    from megatron_moe.host_sync import HostSyncCounter
    from megatron_moe.model import transformer_config_from_args
    from megatron_moe.moe.registry import ROUTING_SCHEMES

    args = parse_args(flags(router, experts, hidden))
    config = transformer_config_from_args(args.replace(padded_vocab_size=1024))
    layer = ROUTING_SCHEMES[args.moe_router_type].router(config=config, pg_collection=get_default_pg_collection())
    layer.set_layer_number(1)
    torch.manual_seed(0)
    states = torch.randn(tokens // 2, 2, hidden, requires_grad=True)
    layer.train()
    layer(states)  # the first call initialises what later calls reuse
    with HostSyncCounter() as training:
        probs, _ = layer(states)
        probs.sum().backward()
    layer.eval()
    with torch.no_grad(), HostSyncCounter() as evaluation:
        layer(states)
    return {"training": (training.num_syncs, training.num_ops), "evaluation": (evaluation.num_syncs, evaluation.num_ops)}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--experts", type=int, default=16)
    parser.add_argument("--hidden", type=int, default=64)
    args = parser.parse_args(argv)
    warnings.simplefilter("ignore")
    from megatron.core import parallel_state

    from megatron_moe.platform import init_distributed, select_platform

    init_distributed(select_platform("cpu"))
    parallel_state.initialize_model_parallel()
    print(f"one router call, {args.tokens} tokens, {args.experts} experts, hidden {args.hidden}, one process (CPU)\n")
    print("| router | training: host syncs | training: launched ops (fwd+bwd) | evaluation: host syncs | "
          "evaluation: launched ops |")
    print("|---|---|---|---|---|")
    for router in ROUTERS:
        counts = count(router, args.tokens, args.experts, args.hidden)
        (train_syncs, train_ops), (eval_syncs, eval_ops) = counts["training"], counts["evaluation"]
        print(f"| {router} | {train_syncs} | {train_ops} | {eval_syncs} | {eval_ops} |")


if __name__ == "__main__":
    main()
