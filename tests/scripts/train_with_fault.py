"""torchrun tests/scripts/train_with_fault.py OUT_PREFIX <pretrain flags>: pretrain_gpt_moe.py's main (same exit
statuses and error lines), with a fault injected and what happened recorded.

Fault (first torchrun attempt only, so a relaunched job runs clean): environment FAULT_SIGNAL (STOP freezes
the rank, KILL crashes it), FAULT_RANK (global rank) and FAULT_AFTER (iteration). Every rank writes
OUT_PREFIX.<rank>.<attempt>.json after each iteration: its lm losses, the wall-clock time each iteration ended
and, at the end, the sum of each parameter.
"""

import json
import os
import signal
import sys
import time
from pathlib import Path

import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import pretrain_gpt_moe  # noqa: E402
from megatron_moe import training  # noqa: E402


def main() -> int:
    prefix = sys.argv.pop(1)
    attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    fault = os.environ.get("FAULT_SIGNAL") if attempt == 0 else None
    record = {"losses": [], "iteration_end_times": {}}

    def write(rank):
        with open(f"{prefix}.{rank}.{attempt}.json", "w") as f:
            json.dump(record, f)

    def after_iteration(iteration, losses):
        record["losses"] = list(losses)
        record["iteration_end_times"][iteration] = time.time()
        write(dist.get_rank())
        if fault and dist.get_rank() == int(os.environ["FAULT_RANK"]) and iteration == int(os.environ["FAULT_AFTER"]):
            os.kill(os.getpid(), getattr(signal, f"SIG{fault}"))

    def pretrain(argv=None, args=None):
        job = training.setup(argv, args)
        losses = training.train(job, after_iteration)
        record["parameter_sums"] = {name: p.double().sum().item() for name, p in job.model[0].module.named_parameters()}
        write(dist.get_rank())
        return losses

    training.pretrain = pretrain
    return pretrain_gpt_moe.main()


if __name__ == "__main__":
    sys.exit(main())
