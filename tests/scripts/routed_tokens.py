"""torchrun tests/scripts/routed_tokens.py OUT.json <pretrain flags>: trains; writes the lm losses and, for
every training forward of every router, the tokens it routed to each expert (after any capacity dropping)."""

import json
import sys

from megatron_moe.training import setup, train

if __name__ == "__main__":
    out, argv = sys.argv[1], sys.argv[2:]
    job = setup(argv)
    routed = []

    def record(router, inputs, output):
        if router.training:
            routing_map = output[1]
            routed.append(routing_map.reshape(-1, routing_map.shape[-1]).sum(0).tolist())

    for layer in job.model[0].module.decoder.layers:
        layer.mlp.router.register_forward_hook(record)
    losses = train(job)
    with open(out, "w") as f:
        json.dump({"losses": losses, "tokens_per_expert": routed}, f)
