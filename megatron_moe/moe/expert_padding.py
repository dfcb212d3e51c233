"""FP8-aligned expert inputs: each local expert's rows padded to a multiple of the FP8 GEMM alignment.

Transformer Engine's FP8 GEMMs need every expert's row count to be a multiple of 16 (32 for MXFP8). Under
``--fp8-format`` our dispatchers (BASE, SAM) hand their experts aligned counts: zero rows with gate 0 after
each expert's rows, taken out of the experts' output again before the combine, so the result and its
gradients are those of the unpadded layer. megatron-core's experts would otherwise pad and unpad each
expert's rows themselves (``SequentialMLP._pad_tensor_for_quantization``, ``TEGroupedMLP``'s
``Fp8Padding``), which is then a no-op. The counts are on the host when the dispatchers pad (they size the
all-to-alls), so padding adds no host sync.
"""

from __future__ import annotations

from typing import List, Tuple

import torch


def alignment(config) -> int:
    """Rows per expert must be a multiple of this: megatron-core's rule for the run's FP8/FP4 recipe, else 1."""
    if not (config.fp8 or getattr(config, "fp4", None)):
        return 1
    from megatron.core.transformer.moe.moe_utils import get_align_size_for_quantization

    return get_align_size_for_quantization(config)


def host_list_on(values: List[int], device: torch.device) -> torch.Tensor:
    """A host list as a long tensor on ``device``, copied without the host waiting for the device."""
    return torch.tensor(values, dtype=torch.long).to(device, non_blocking=True)


class ExpertRowPadding:
    """Pads rows grouped by local expert to ``align`` rows per expert (:meth:`pad`) and takes the padding
    out of the experts' output (:meth:`unpad`); one instance per dispatcher, one pad per forward."""

    def __init__(self, align: int):
        self.align = align
        self.positions = None  # where each real row sits among the padded ones

    def pad(self, rows: torch.Tensor, gates: torch.Tensor, counts: List[int]) -> Tuple[torch.Tensor, torch.Tensor, List[int]]:
        """``rows`` [n, H] and ``gates`` [n], ``counts[e]`` rows of local expert e after those of e - 1 ->
        the same with zero rows (gate 0) after each expert's rows, and the padded counts."""
        padded = [-(-count // self.align) * self.align for count in counts]
        shift, inserted = [], 0  # padding rows before each expert's first row
        for count, padded_count in zip(counts, padded):
            shift.append(inserted)
            inserted += padded_count - count
        device = rows.device
        expert_of_row = torch.arange(len(counts), device=device).repeat_interleave(
            host_list_on(counts, device), output_size=rows.shape[0])
        self.positions = torch.arange(rows.shape[0], device=device) + host_list_on(shift, device)[expert_of_row]
        total = sum(padded)
        padded_rows = rows.new_zeros(total, rows.shape[1]).index_copy(0, self.positions, rows)
        padded_gates = gates.new_zeros(total).index_copy(0, self.positions, gates)
        return padded_rows, padded_gates, padded

    def unpad(self, output: torch.Tensor) -> torch.Tensor:
        """The experts' output rows of the real rows, in their order before :meth:`pad`."""
        return output.index_select(0, self.positions)
