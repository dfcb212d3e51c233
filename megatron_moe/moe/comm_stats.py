"""Rows and bytes the MoE token dispatchers put on the network, per layer, for every dispatcher.

``RoutedMoELayer`` wraps its ``dispatch`` and ``combine`` steps (the dispatcher's ``token_dispatch`` and
``token_combine``, where all the MoE collectives happen) in :func:`count`. Per layer and forward pass we
add up:

- ``tokens``: tokens the layer routed on this rank;
- ``rows``: rows handed to the dispatch collective (token copies placed; for an all-to-all this includes
  the rows that stay on this rank): SAM 1 per token, megatron's alltoall k per token;
- ``remote_rows``: rows that leave this rank (dispatch and combine);
- ``bytes`` / ``remote_bytes``: the same for every tensor of both collectives (hidden rows, gates,
  routing metadata), dispatch plus combine. A dispatcher that packs its tensors into one byte row per
  token (SAM) states the packed row's size as ``packed_row_bytes``; that is what is counted.

Backward sends the same rows in the opposite direction (the all-to-all's gradient is the reverse
all-to-all), so forward counts describe both. Only the expert-parallel collectives are counted: with
expert TP > 1 megatron's alltoall dispatcher and SAM's add an all-gather (dispatch) and a reduce-scatter (combine)
inside the expert tensor-parallel group (usually within a node) that are not included.

:func:`snapshot_and_reset` sums the counts over all ranks (a collective: every rank calls it) and returns
``{name: float}`` scalars; ``megatron_moe.training`` registers it with ``megatron_moe.metrics`` so the
training log and TensorBoard show it. ``timing = True`` also records wall seconds spent in the collectives (synchronising
the device around them and starting them together on every rank of the tensor x expert parallel group;
used by ``benchmarks/moe_dispatch.py``, off in training).

:func:`collectives` lists the collectives started while it is active (forward and backward, every process
group), for tests that count them.
"""

from __future__ import annotations

import contextlib
import math
import time
from typing import Dict, List, Optional, Tuple

import torch
import torch.distributed as dist
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

from megatron.core import utils

FIELDS = ("tokens", "rows", "remote_rows", "bytes", "remote_bytes", "seconds")
_TOKENS, _ROWS, _REMOTE_ROWS, _BYTES, _REMOTE_BYTES, _SECONDS = range(len(FIELDS))

timing = False
# layer number -> FIELDS, float64 on the host. A count that megatron's dispatcher keeps as a tensor (its split
# sizes on a CPU run) is added as one, never read: counting must not make the host wait.
_counts: Dict[int, torch.Tensor] = {}
_num_layers = 0


def track_layers(num_layers: int) -> None:
    """Called by each MoE layer: the size of the table every rank reduces."""
    global _num_layers
    _num_layers = max(_num_layers, num_layers)


def _row_bytes(tensors) -> int:
    return sum(t[0].numel() * t.element_size() if t.shape[0] else 0 for t in tensors if t is not None)


def _local_rows(dispatcher, splits):
    """Rows of an all-to-all that stay on this rank, as the dispatcher holds them (an int, a numpy or a
    host tensor element; None when the dispatcher does not all-to-all)."""
    if splits is None:
        return None
    return splits[utils.get_pg_rank(dispatcher.ep_group)]


def _sent(dispatcher, step: str, tensors):
    """(rows, remote rows, bytes, remote bytes) one collective of ``dispatcher`` sends."""
    from megatron.core.transformer.moe.token_dispatcher import MoEAllGatherTokenDispatcher

    rows = tensors[0].shape[0]
    row_bytes = getattr(dispatcher, "packed_row_bytes", None) if step == "dispatch" else None
    row_bytes = row_bytes or _row_bytes(tensors)
    if isinstance(dispatcher, MoEAllGatherTokenDispatcher):
        # all-gather (dispatch) / reduce-scatter (combine) over expert TP x EP: each row reaches the other ranks
        others = utils.get_pg_size(dispatcher.tp_ep_group) - 1
        remote = rows * others if step == "dispatch" else rows * others // (others + 1)
    else:
        # all-to-all dispatchers (ours, megatron's alltoall): the combine reverses the dispatch splits
        splits = getattr(dispatcher, "input_splits" if step == "dispatch" else "output_splits", None)
        local = _local_rows(dispatcher, splits)
        remote = 0 if local is None else rows - local
    return rows, remote, rows * row_bytes, remote * row_bytes


@contextlib.contextmanager
def count(layer_number: int, step: str, dispatcher, tensors):
    """Counts what ``dispatcher``'s ``step`` ("dispatch" or "combine") sends; ``tensors`` are its inputs.

    The split sizes of an all-to-all are known only inside the step, so the rows are read afterwards.
    """
    start = None
    if timing:
        _synchronize(tensors[0])
        # a collective's wall time otherwise includes waiting for the slowest rank to arrive
        dist.barrier(group=dispatcher.tp_ep_group)
        start = time.perf_counter()
    yield
    if timing:
        _synchronize(tensors[0])
    row = _counts.setdefault(layer_number, torch.zeros(len(FIELDS), dtype=torch.float64))
    rows, remote, nbytes, remote_bytes = _sent(dispatcher, step, tensors)
    if step == "dispatch":
        row[_TOKENS] += math.prod(dispatcher.hidden_shape[:-1])
        row[_ROWS] += rows
    row[_REMOTE_ROWS] += remote
    row[_BYTES] += nbytes
    row[_REMOTE_BYTES] += remote_bytes
    if start is not None:
        row[_SECONDS] += time.perf_counter() - start


class _CollectiveLog(TorchDispatchMode):
    """Records each c10d collective op that reaches the dispatcher (every backend goes through it)."""

    def __init__(self):
        super().__init__()
        self.calls: List[Tuple[str, torch.dtype]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "c10d" and func.__name__.split(".")[0] != "barrier":
            tensors = [a for a in pytree.tree_leaves((args, kwargs)) if isinstance(a, torch.Tensor)]
            self.calls.append((func.__name__.split(".")[0], tensors[0].dtype if tensors else None))
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def collectives():
    """``with collectives() as calls:`` fills ``calls`` with ``(c10d op name, dtype)`` per collective this
    process starts inside the block, in order (e.g. ``("alltoall_base_", torch.uint8)``); barriers are left
    out. For tests: a dispatch mode slows every tensor operation."""
    log = _CollectiveLog()
    with log:
        yield log.calls


def _synchronize(tensor: torch.Tensor) -> None:
    if tensor.device.type == "cuda":
        torch.cuda.synchronize(tensor.device)


def local_counts() -> Dict[int, Dict[str, float]]:
    """This rank's counts per layer since the last reset (no communication)."""
    return {layer: dict(zip(FIELDS, row.tolist())) for layer, row in sorted(_counts.items())}


def reset() -> None:
    _counts.clear()


def snapshot_and_reset() -> Dict[str, float]:
    """Counts summed over all ranks, as log scalars: per layer ``moe-comm/layer_NN/<field>`` plus totals
    ``moe-comm/rows_per_token`` and ``moe-comm/remote_bytes_per_token``. Collective; resets the counts."""
    num_layers = _num_layers
    if dist.is_initialized():
        # pipeline stages without MoE layers know no layer count: agree on it first
        size = torch.tensor([_num_layers], dtype=torch.float64, device=_device())
        dist.all_reduce(size, op=dist.ReduceOp.MAX)
        num_layers = int(size.item())
    table = torch.zeros(num_layers, len(FIELDS), dtype=torch.float64)
    for layer, row in _counts.items():
        table[layer - 1] = row
    if dist.is_initialized():
        table = table.to(_device(), non_blocking=True)
        dist.all_reduce(table)
    reset()
    rows = table.tolist()
    scalars: Dict[str, float] = {}
    for index, row in enumerate(rows):
        if row[_TOKENS] > 0:
            for field, value in zip(FIELDS, row):
                if field != "seconds" or timing:
                    scalars[f"moe-comm/layer_{index + 1:02d}/{field}"] = value
    totals = [sum(column) for column in zip(*rows)] if rows else [0.0] * len(FIELDS)
    if totals[_TOKENS] > 0:
        scalars["moe-comm/rows_per_token"] = totals[_ROWS] / totals[_TOKENS]
        scalars["moe-comm/remote_bytes_per_token"] = totals[_REMOTE_BYTES] / totals[_TOKENS]
    return scalars


def _device() -> torch.device:
    # NCCL reduces only device tensors; gloo only host ones
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")

