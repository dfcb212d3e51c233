"""What Megatron-LM's training loop does around the steps besides training, as its flags ask:

- ``--manual-gc``: Python's automatic garbage collector off, a collection at start, every
  ``--manual-gc-interval`` iterations, and before and after each validation (unless ``--no-manual-gc-eval``),
  so that every rank collects at the same time (a collection on one rank stalls the others' collectives);
- ``--empty-unused-memory-level``: the CUDA caching allocator emptied after each step (level 1: after
  Megatron-LM's forward-backward pass, here after the whole step; level 2: after the optimizer step) and after
  each validation step;
- ``--profile``: iterations ``--profile-step-start`` to ``--profile-step-end`` profiled on ``--profile-ranks``,
  with torch's profiler (``--use-pytorch-profiler``: a trace for TensorBoard under ``--tensorboard-dir``) or
  CUDA profiler marks for nsys;
- ``--record-memory-history``: the CUDA allocator's history recorded on the last rank and dumped to
  ``--memory-snapshot-path`` at every log iteration.

Iterations are counted as Megatron-LM counts them: ``before_step(n)`` before the step that makes ``n + 1``
iterations done, ``after_step(n)`` once ``n`` are done.
"""

from __future__ import annotations

import contextlib
import gc
import pickle

import torch
import torch.distributed as dist


class StepExtras:
    def __init__(self, args, device: torch.device):
        self.args = args
        self.cuda = device.type == "cuda"
        self.profiling = args.profile and dist.get_rank() in args.profile_ranks
        self.profiler = self.nvtx = None
        if self.profiling and args.use_pytorch_profiler:
            self.profiler = torch.profiler.profile(
                schedule=torch.profiler.schedule(wait=max(args.profile_step_start - 1, 0),
                                                 warmup=1 if args.profile_step_start > 0 else 0,
                                                 active=args.profile_step_end - args.profile_step_start, repeat=1),
                on_trace_ready=torch.profiler.tensorboard_trace_handler(args.tensorboard_dir),
                record_shapes=True, with_stack=True)
            self.profiler.start()
        self.records_memory = args.record_memory_history and self.cuda and \
            dist.get_rank() == dist.get_world_size() - 1
        if self.records_memory:
            torch.cuda.memory._record_memory_history(True, trace_alloc_max_entries=100000,
                                                     trace_alloc_record_context=True)
        if args.manual_gc:
            gc.disable()
            gc.collect()

    def before_step(self, iteration: int) -> None:
        if not self.profiling:
            return
        if self.profiler is not None:
            self.profiler.step()
        elif self.cuda and iteration == self.args.profile_step_start:
            torch.cuda.check_error(torch.cuda.cudart().cudaProfilerStart())
            self.nvtx = torch.autograd.profiler.emit_nvtx(record_shapes=True)
            self.nvtx.__enter__()

    def after_step(self, iteration: int) -> None:
        self.empty_cache(1)
        self.empty_cache(2)
        if self.profiling and iteration == self.args.profile_step_end:
            self._stop_profiling()
        if self.args.manual_gc and self.args.manual_gc_interval and iteration % self.args.manual_gc_interval == 0:
            gc.collect()

    def empty_cache(self, level: int) -> None:
        if self.cuda and self.args.empty_unused_memory_level >= level:
            torch.cuda.empty_cache()

    def at_log(self) -> None:
        if self.records_memory:
            with open(self.args.memory_snapshot_path, "wb") as f:
                pickle.dump(torch.cuda.memory._snapshot(), f)

    @contextlib.contextmanager
    def validation(self):
        collects = self.args.manual_gc and self.args.manual_gc_eval
        if collects:
            gc.collect()
        yield
        if collects:
            gc.collect(generation=0)  # what validation created

    def finish(self) -> None:
        self._stop_profiling()
        if self.args.manual_gc:
            gc.enable()

    def _stop_profiling(self) -> None:
        if self.profiler is not None:
            self.profiler.stop()
            self.profiler = None
        elif self.nvtx is not None:
            torch.cuda.check_error(torch.cuda.cudart().cudaProfilerStop())
            self.nvtx.__exit__(None, None, None)
            self.nvtx = None
