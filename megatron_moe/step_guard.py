"""The NaN/Inf check of a training step, without a host sync of its own.

megatron-core's optimizer step computes the global gradient norm (for clipping) and reads it on the host
(``clip_grads.get_grad_norm_fp32``: one ``.item()``, all-reduced over the model-parallel ranks, and the
same on every data-parallel replica because the gradients were reduced first). A gradient is NaN/Inf on
some rank exactly when that norm is (or its sum of squares overflows fp32, which the failure report tells
apart). So the check reads nothing new: :class:`NonFiniteGuard` looks at the norm the step already holds on
the host, between the norm and the update, and makes the step skip the update when it is not finite.

The loss joins the same check through :func:`poison_if_non_finite`: a non-finite loss multiplies the
backward by NaN (and by exactly 1 otherwise), so every gradient, and the norm, become NaN.

Only on the failure path (rare) does each rank look at its own loss and gradients, to name the rank that
had the NaN/Inf: :func:`locate_non_finite` (collective).
"""

from __future__ import annotations

import math
from typing import List, Optional

import torch
import torch.distributed as dist


def poison_if_non_finite(loss: torch.Tensor) -> torch.Tensor:
    """``loss`` times 1, or times NaN when it is not finite: the gradients it back-propagates are the same
    bits when it is finite, and all NaN otherwise."""
    factor = torch.where(torch.isfinite(loss.detach()), 1.0, math.nan).to(loss.dtype)
    return loss * factor


class NonFiniteGuard:
    """Wraps a megatron-core optimizer (MixedPrecision, FP32, Chained, Distributed) so that its ``step()``
    skips the update when the grad norm it computed is not finite; :attr:`non_finite` then says so.

    megatron-core's ``step()`` is prepare_grads -> grad norm (``clip_grad_norm`` or, chained,
    ``get_grad_norm``) -> clip -> ``step_with_ready_grads``; the guard records the norm from the first two
    and decides in the last, before the update. Without clipping (``--clip-grad 0``) the step computes no
    norm, so the guard asks for one (megatron-core's ``get_grad_norm``, one host read).
    """

    def __init__(self, optimizer):
        self.grad_norm: Optional[float] = None
        self.non_finite = False
        for name in ("get_grad_norm", "clip_grad_norm"):
            setattr(optimizer, name, self._recording(getattr(optimizer, name)))
        self._get_grad_norm = optimizer.get_grad_norm
        self._step_with_ready_grads = optimizer.step_with_ready_grads
        optimizer.step_with_ready_grads = self._step_unless_non_finite

    def _recording(self, compute_norm):
        def norm(*args, **kwargs):
            self.grad_norm = compute_norm(*args, **kwargs)
            return self.grad_norm
        return norm

    def before_step(self) -> None:
        self.grad_norm, self.non_finite = None, False

    def _step_unless_non_finite(self) -> bool:
        if self.grad_norm is None:
            self._get_grad_norm()
        if not math.isfinite(self.grad_norm):
            self.non_finite = True
            return False
        return self._step_with_ready_grads()


def locate_non_finite(local_losses: List[torch.Tensor], model_chunks, grad_norm: Optional[float]) -> str:
    """What was not finite and on which rank, the same line on every rank (collective: all ranks call it).

    ``local_losses``: this rank's micro-batch losses of the step (empty off the last pipeline stage);
    ``model_chunks``: the DDP-wrapped model chunks, whose reduced gradients (``main_grad``) are checked.
    """
    loss = torch.stack(local_losses).mean() if local_losses else None
    loss_value = None if loss is None or torch.isfinite(loss) else loss.item()
    grads = [p.main_grad for chunk in model_chunks for p in chunk.module.parameters()
             if getattr(p, "main_grad", None) is not None]
    grads_finite = bool(torch.stack([torch.isfinite(g).all() for g in grads]).all()) if grads else True
    verdicts: List[tuple] = [None] * dist.get_world_size()
    dist.all_gather_object(verdicts, (loss_value, grads_finite))
    for rank, (value, _) in enumerate(verdicts):
        if value is not None:
            return f"lm loss is {value} on rank {rank}"
    for rank, (_, finite) in enumerate(verdicts):
        if not finite:
            return f"a gradient is NaN/Inf on rank {rank}"
    return f"the grad norm is {grad_norm} though every gradient is finite (its sum of squares overflowed)"
