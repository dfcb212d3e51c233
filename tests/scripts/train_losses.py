"""torchrun tests/scripts/train_losses.py OUT.json <pretrain flags>: trains, writes the per-iteration lm loss."""

import json
import sys

from megatron_moe.training import pretrain

if __name__ == "__main__":
    out, argv = sys.argv[1], sys.argv[2:]
    losses = pretrain(argv)
    if losses:  # the last pipeline stage of each data-parallel rank has them; all are equal
        with open(out, "w") as f:
            json.dump(losses, f)
