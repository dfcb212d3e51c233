"""torchrun benchmarks/_train_step_worker.py OUT_DIR WARMUP ITERS <pretrain flags>: times ``train_step``.

One process of ``benchmarks/train_step.py``. It builds the job with ``megatron_moe.training.setup`` and runs
WARMUP + ITERS optimizer steps on mock data with ``train_step``, exactly as ``pretrain`` would, then writes
``OUT_DIR/rank<R>.json``: the wall time of each timed step, this rank's peak memory and the model's shape
as the job resolved it (so the table states what actually ran).
"""

import json
import resource
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

from megatron.core import parallel_state

from megatron_moe import data, metrics
from megatron_moe.training import setup, train_step


MODEL_FACTS = ("num_layers", "hidden_size", "num_attention_heads", "num_experts", "moe_ffn_hidden_size",
               "moe_router_type", "moe_router_topk", "seq_length", "global_batch_size", "micro_batch_size",
               "padded_vocab_size")


def _peak_memory_bytes(is_cuda: bool) -> int:
    """GPU: the caching allocator's peak; CPU: the process's max resident set (ru_maxrss is KiB on Linux)."""
    if is_cuda:
        return torch.cuda.max_memory_allocated()
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def main(out_dir: Path, warmup: int, iters: int, argv) -> None:
    job = setup([*argv, "--train-iters", str(warmup + iters)])
    args, is_cuda = job.args, job.platform.is_cuda
    train_ds, _, _ = data.build_datasets(args, job.tokenizer)
    batches = data.micro_batches(train_ds, args, 0, parallel_state.get_data_parallel_rank())
    if is_cuda:  # what training holds, not setup's transients (full weight tensors drawn before slicing)
        torch.cuda.reset_peak_memory_stats()
    step_seconds = []
    for iteration in range(1, warmup + iters + 1):
        if is_cuda:
            torch.cuda.synchronize()
        dist.barrier()  # every rank starts the step together, so the slowest rank's time is the step's
        start = time.perf_counter()
        train_step(job, batches, iteration)
        if is_cuda:
            torch.cuda.synchronize()
        step_seconds.append(time.perf_counter() - start)
        # as train() does after each step (outside its timing too): reduce and clear megatron's aux-loss tracker
        metrics.moe_aux_losses(args, args.num_layers, job.platform.device)
    rank = dist.get_rank()
    (out_dir / f"rank{rank}.json").write_text(json.dumps({
        "step_seconds": step_seconds[warmup:],
        "peak_memory_bytes": _peak_memory_bytes(is_cuda),
        "backend": job.platform.backend,
        "model": {**{name: getattr(args, name) for name in MODEL_FACTS},
                  "dtype": str(job.config.params_dtype).removeprefix("torch.")},
    }))


if __name__ == "__main__":
    main(Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4:])
