"""Several row-aligned tensors of any dtypes sent as ONE byte row per token in one collective.

A dispatcher that must move, for each token, its hidden state (fp32/bf16/fp16), its gates (fp32) and its
expert ids (integers) would otherwise make one collective per tensor; on a latency-bound network the count
of collectives costs as much as the bytes. A bf16 row cannot hold an fp32 gate or an integer id as a
value, so the rows are packed as raw bytes: each tensor is reinterpreted with ``.view(torch.uint8)``, laid
side by side in one ``uint8 [rows, row_bytes]`` tensor, and read back with ``.view(dtype)``. A collective
only copies bytes, so the round trip is bit-exact for every dtype and value (NaN payloads included).

The autograd Functions carry the gradients of the floating tensors back in the reverse collective:

- :func:`all_to_all` (expert-parallel dispatch): the reverse all-to-all only moves rows, so the gradients
  travel packed as bytes too: one collective per direction;
- :func:`all_gather` (tensor-parallel ranks of an expert sharing what they received): the reverse is a
  reduce-scatter that SUMS the partial gradients; bytes cannot be summed, so each floating tensor's
  gradient is reduce-scattered in its own dtype (tensors of one dtype together).

Integer tensors get no gradient.
"""

from __future__ import annotations

import math
from typing import List, Sequence, Tuple

import torch

from megatron.core import utils
from megatron.core.tensor_parallel.mappings import (
    _gather_along_first_dim,
    _reduce_scatter_along_first_dim,
    all_to_all as _all_to_all_rows,
)


def id_dtype(num_ids: int) -> torch.dtype:
    """The smallest integer dtype that holds ids ``0 .. num_ids - 1`` (the bytes an id costs per row)."""
    return torch.uint8 if num_ids <= 256 else torch.int32


Layout = List[Tuple[torch.dtype, int, int]]  # per tensor: dtype, columns, byte offset in the row


def _layout(tensors: Sequence[torch.Tensor]) -> Tuple[Layout, int]:
    """Byte offsets so that every field reads back as a view: fields in decreasing element size (each then
    starts at a multiple of its own size; sizes are powers of two), the row padded to the largest size."""
    order = sorted(range(len(tensors)), key=lambda i: -tensors[i].element_size())
    layout: Layout = [None] * len(tensors)
    offset = 0
    for i in order:
        columns = math.prod(tensors[i].shape[1:])
        layout[i] = (tensors[i].dtype, columns, offset)
        offset += columns * tensors[i].element_size()
    largest = max(t.element_size() for t in tensors)
    return layout, -(-offset // largest) * largest


def row_bytes(tensors: Sequence[torch.Tensor]) -> int:
    """Bytes of one packed row of ``tensors``."""
    return _layout(tensors)[1]


def pack(tensors: Sequence[torch.Tensor]) -> Tuple[torch.Tensor, Layout]:
    """``uint8 [rows, row_bytes]``: the rows of ``tensors`` (each ``[rows]`` or ``[rows, columns]``) side by
    side as raw bytes, and the layout :func:`unpack` needs."""
    layout, width = _layout(tensors)
    rows = tensors[0].shape[0]
    packed = torch.empty(rows, width, dtype=torch.uint8, device=tensors[0].device)
    for tensor, (dtype, columns, offset) in zip(tensors, layout):
        packed[:, offset : offset + columns * tensor.element_size()].view(dtype).copy_(tensor.reshape(rows, columns))
    used = sum(columns * dtype.itemsize for dtype, columns, _ in layout)
    packed[:, used:].zero_()  # the fields leave no gaps (see _layout): only the row's tail is padding
    return packed, layout


def unpack(packed: torch.Tensor, layout: Layout, shapes: Sequence[torch.Size]) -> List[torch.Tensor]:
    """The tensors :func:`pack` laid out, as views of ``packed`` (``shapes``: each one's shape past dim 0)."""
    rows = packed.shape[0]
    out = []
    for (dtype, columns, offset), shape in zip(layout, shapes):
        out.append(packed[:, offset : offset + columns * dtype.itemsize].view(dtype).view(rows, *shape))
    return out


class _Fields:
    """What a backward needs to know of the packed tensors: which carry gradients, their dtypes and shapes."""

    def __init__(self, tensors):
        self.floating = [t.is_floating_point() for t in tensors]
        self.dtypes = [t.dtype for t in tensors]
        self.shapes = [t.shape[1:] for t in tensors]
        self.device = tensors[0].device

    def gradients(self, grads, rows):
        """The floating tensors' gradients (zeros where autograd passed None) and their shapes."""
        out = [g if g is not None else torch.zeros(rows, *s, dtype=d, device=self.device)
               for g, f, d, s in zip(grads, self.floating, self.dtypes, self.shapes) if f]
        return out, [s for s, f in zip(self.shapes, self.floating) if f]

    def scatter(self, gradients):
        """One entry per packed tensor: its gradient, or None for the integer ones."""
        gradients = iter(gradients)
        return [next(gradients) if f else None for f in self.floating]


class _AllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx, group, output_splits, input_splits, *tensors):
        ctx.group, ctx.output_splits, ctx.input_splits = group, output_splits, input_splits
        ctx.fields = _Fields(tensors)
        packed, layout = pack(tensors)
        received = _all_to_all_rows(group, packed, output_splits, input_splits)
        outputs = unpack(received, layout, ctx.fields.shapes)
        ctx.received = received.shape[0]
        ctx.mark_non_differentiable(*[o for o, f in zip(outputs, ctx.fields.floating) if not f])
        return tuple(outputs)

    @staticmethod
    def backward(ctx, *grads):
        gradients, shapes = ctx.fields.gradients(grads, ctx.received)
        packed, layout = pack(gradients)
        returned = _all_to_all_rows(ctx.group, packed, ctx.input_splits, ctx.output_splits)
        return (None, None, None, *ctx.fields.scatter(unpack(returned, layout, shapes)))


def all_to_all(group, tensors: Sequence[torch.Tensor], output_splits, input_splits) -> Tuple[torch.Tensor, ...]:
    """megatron's ``all_to_all`` of ``tensors`` (rows aligned) in ONE collective each way."""
    return _AllToAll.apply(group, output_splits, input_splits, *tensors)


class _AllGather(torch.autograd.Function):
    @staticmethod
    def forward(ctx, group, split_sizes, *tensors):
        ctx.group, ctx.split_sizes = group, split_sizes
        ctx.fields = _Fields(tensors)
        packed, layout = pack(tensors)
        gathered = _gather_along_first_dim(packed, group, output_split_sizes=split_sizes)
        outputs = unpack(gathered, layout, ctx.fields.shapes)
        ctx.gathered = gathered.shape[0]
        ctx.mark_non_differentiable(*[o for o, f in zip(outputs, ctx.fields.floating) if not f])
        return tuple(outputs)

    @staticmethod
    def backward(ctx, *grads):
        gradients, _ = ctx.fields.gradients(grads, ctx.gathered)
        by_dtype = {}
        for index, gradient in enumerate(gradients):
            by_dtype.setdefault(gradient.dtype, []).append(index)
        summed = [None] * len(gradients)
        for indices in by_dtype.values():
            columns = [gradients[i].reshape(ctx.gathered, math.prod(gradients[i].shape[1:])) for i in indices]
            reduced = _reduce_scatter_along_first_dim(torch.cat(columns, dim=1), ctx.group,
                                                      input_split_sizes=ctx.split_sizes)
            for i, part in zip(indices, reduced.split([c.shape[1] for c in columns], dim=1)):
                summed[i] = part.reshape(reduced.shape[0], *gradients[i].shape[1:])
        return (None, None, *ctx.fields.scatter(summed))


def all_gather(group, tensors: Sequence[torch.Tensor], split_sizes: List[int]) -> Tuple[torch.Tensor, ...]:
    """The rows of ``tensors`` from every rank of ``group`` (``split_sizes[r]`` from rank ``r``, in rank
    order) in ONE all-gather; the backward reduce-scatters the gradients, one collective per dtype."""
    if utils.get_pg_size(group) == 1:
        return tuple(tensors)
    return _AllGather.apply(group, split_sizes, *tensors)
