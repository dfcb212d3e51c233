"""Pretrain a GPT mixture-of-experts model: ``torchrun --nproc_per_node N pretrain_gpt_moe.py <Megatron flags>``."""

import os
import sys


def _error(error: Exception, status: int) -> int:
    print(f"pretrain_gpt_moe.py: error: {error}", file=sys.stderr)
    return status


def main() -> int:
    from megatron_moe.arguments import parse_args
    from megatron_moe.errors import ConfigError

    try:  # the flags first: their errors come before the seconds that importing megatron-core takes
        args = parse_args(sys.argv[1:], world_size=int(os.environ.get("WORLD_SIZE", "1")))
    except ConfigError as error:
        return _error(error, 2)
    from megatron_moe.platform import communication_failure
    from megatron_moe.training import NonFiniteError, pretrain

    try:
        pretrain(args=args)
    except ConfigError as error:
        return _error(error, 2)
    except NonFiniteError as error:
        return _error(error, 1)
    except RuntimeError as error:
        line = communication_failure(error)
        if line is None:
            raise
        _error(line, 1)
        sys.stdout.flush()
        # Not a normal exit: tearing down process groups whose peer is frozen could wait on it. torchrun
        # ends this job's other ranks when one exits with an error.
        os._exit(1)
    return 0


if __name__ == "__main__":  # the guard matters: dist_checkpointing's async writer spawns processes
    sys.exit(main())
