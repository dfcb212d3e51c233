"""torchrun tests/scripts/train_and_kill.py OUT.json KILL_AFTER <pretrain flags>

Trains; after every iteration writes this run's lm losses (full precision) to OUT.json. With KILL_AFTER > 0,
every rank SIGKILLs itself after that iteration: no final save, no clean shutdown, as a crashed node.
"""

import json
import os
import signal
import sys

from megatron_moe.training import setup, train


def main() -> None:
    out, kill_after, argv = sys.argv[1], int(sys.argv[2]), sys.argv[3:]

    def after_iteration(iteration, losses):
        if losses:  # the last pipeline stage of each data-parallel rank has them; all are equal
            with open(out, "w") as f:
                json.dump(losses, f)
        if iteration == kill_after:
            os.kill(os.getpid(), signal.SIGKILL)

    train(setup(argv), after_iteration)


if __name__ == "__main__":
    main()
