"""The global batch of each training iteration: constant, or growing with ``--rampup-batch-size``.

megatron-core's micro-batch calculator decides it from the samples consumed so far, as in Megatron-LM's
training loop: before each iteration the calculator is updated with the consumed samples, the iteration runs
that many micro batches, the consumed samples grow by the batch it ran, and the learning-rate schedule steps by
it. The data iterator simply continues (``data.micro_batches``), so a resumed run (which restores the consumed
samples) is on the same ramp at the same place. Validation always uses the full ``--global-batch-size``.
"""

from __future__ import annotations

from megatron.core.num_microbatches_calculator import (ConstantNumMicroBatchesCalculator,
                                                       RampupBatchsizeNumMicroBatchesCalculator)


class GlobalBatches:
    """This run's micro-batch calculator (its own, not megatron-core's global one)."""

    def __init__(self, args, rank: int):
        common = dict(global_batch_size=args.global_batch_size, micro_batch_size=args.micro_batch_size,
                      data_parallel_size=args.data_parallel_size, decrease_batch_size_if_needed=False, rank=rank)
        if args.rampup_batch_size is None:
            self._calculator = ConstantNumMicroBatchesCalculator(**common)
        else:
            start, increment, samples = args.rampup_batch_size
            self._calculator = RampupBatchsizeNumMicroBatchesCalculator(
                **common, start_global_batch_size=start, batch_size_increment=increment, ramup_samples=samples)

    def update(self, consumed_samples: int) -> bool:
        """Sets the batch for the iteration after ``consumed_samples`` samples; True when it changed."""
        before = self.global_batch_size
        self._calculator.update(consumed_samples, consistency_check=True)
        return self.global_batch_size != before

    @property
    def global_batch_size(self) -> int:
        return self._calculator.get_current_global_batch_size()

    @property
    def num_microbatches(self) -> int:
        return self._calculator.get()
