"""Pretrain a GPT mixture-of-experts model: ``torchrun --nproc_per_node N pretrain_gpt_moe.py <Megatron flags>``."""

import os
import sys


def main() -> int:
    from megatron_moe.arguments import ConfigError
    from megatron_moe.platform import communication_failure
    from megatron_moe.training import NonFiniteError, pretrain

    try:
        pretrain(sys.argv[1:])
    except ConfigError as error:
        print(f"pretrain_gpt_moe.py: error: {error}", file=sys.stderr)
        return 2
    except NonFiniteError as error:
        print(f"pretrain_gpt_moe.py: error: {error}", file=sys.stderr)
        return 1
    except RuntimeError as error:
        line = communication_failure(error)
        if line is None:
            raise
        print(f"pretrain_gpt_moe.py: error: {line}", file=sys.stderr, flush=True)
        sys.stdout.flush()
        # Not a normal exit: tearing down process groups whose peer is frozen could wait on it. torchrun
        # ends this job's other ranks when one exits with an error.
        os._exit(1)
    return 0


if __name__ == "__main__":  # the guard matters: dist_checkpointing's async writer spawns processes
    sys.exit(main())
