"""python tests/scripts/slow_checkpoint_writer.py PID_DIR <pretrain flags>: pretrain_gpt_moe.py's main, with each
write process that megatron-core's checkpoint writer forks (filesystem_async) writing its pid into
PID_DIR/writer.<pid> and then sleeping 300 s before it writes: a save that a test can kill its rank in."""

import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import pretrain_gpt_moe  # noqa: E402
from megatron.core.dist_checkpointing.strategies.filesystem_async import FileSystemWriterAsync  # noqa: E402

if __name__ == "__main__":
    pid_dir = Path(sys.argv.pop(1))
    write = FileSystemWriterAsync.write_preloaded_data

    def slow_write(*args, **kwargs):
        (pid_dir / f"writer.{os.getpid()}").write_text(str(os.getppid()))
        time.sleep(300)
        return write(*args, **kwargs)

    FileSystemWriterAsync.write_preloaded_data = staticmethod(slow_write)
    sys.exit(pretrain_gpt_moe.main())
