"""Count, on any device (CPU included), the host synchronisations and kernel launches of a piece of code.

On a GPU a step is fast when the host queues kernels ahead of the device and never waits for it. Two
things break that, and both are visible on CPU, where the tests run:

* **host syncs**: operations whose result the host must read before it can go on: a Python value
  (``.item()``, ``bool(t)`` / ``if t``, ``int(t)``, ``float(t)``, ``.tolist()``), a copy to the host
  (``.cpu()``, ``.to('cpu')``, ``.numpy()``), or an output whose *shape* depends on the data
  (``nonzero``/``argwhere``/one-argument ``torch.where``, boolean-mask indexing, ``masked_select``,
  ``unique``, ``repeat_interleave`` without ``output_size``, ``bincount``, ``torch.equal``; not
  ``x[mask] = number``, which ATen runs as ``masked_fill_``);
* **launches**: every aten operation that computes something is about one kernel launch (a few µs of
  host time each on a GPU); views, reshapes and allocations are not counted.

:class:`HostSyncCounter` is a context manager that sees both, through a ``TorchDispatchMode`` (aten
operations, after autograd and Python-level composites are decomposed) and a ``TorchFunctionMode``
(the host copies and ``tolist``, which never reach aten as a sync). Each sync is recorded with the
line of code that caused it and the code it belongs to (``Sync.origin``: ours, megatron-core's, or one of
the CPU-only adaptations of ``megatron_moe/platform.py``, which a GPU run never executes), so a failing bound
says which line syncs::

    with HostSyncCounter() as counter:
        balanced_assignment(scores)
    assert counter.num_syncs <= 4, counter.describe()

Calls nest: an inner counter sees only its own block, an outer one sees everything.

A copy with ``non_blocking=True`` is not counted: the host does not wait for it (on a GPU, from pinned
memory); whatever reads its result later is.
"""

from __future__ import annotations

import collections
import os
import traceback
from dataclasses import dataclass

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ["HostSyncCounter", "Sync", "OURS", "CPU_COMPAT", "MEGATRON_CORE", "OTHER"]

_aten = torch.ops.aten

# aten operations that read a device value on the host, or whose output size depends on the data.
_SYNC_OPS = {
    _aten._local_scalar_dense.default: "read a value on the host (.item(), bool(t), int(t), float(t))",
    _aten.is_nonzero.default: "bool(tensor)",
    _aten.equal.default: "torch.equal",
    _aten.nonzero.default: "nonzero / argwhere / torch.where(cond)",
    _aten.masked_select.default: "masked_select",
    _aten._unique2.default: "unique",
    _aten.unique_dim.default: "unique(dim=...)",
    _aten.unique_consecutive.default: "unique_consecutive",
    _aten.bincount.default: "bincount",
}
# Shape-deciding only when no output size is given.
_REPEAT_INTERLEAVE = {_aten.repeat_interleave.Tensor, _aten.repeat_interleave.self_Tensor}
# Indexing with a boolean mask finds the True entries first.
_INDEX_OPS = {_aten.index.Tensor, _aten.index_put.default, _aten.index_put_.default, _aten._index_put_impl_.default}
# No kernel: views, metadata and allocations.
_FREE_OPS = {
    _aten.empty.memory_format, _aten.empty_like.default, _aten.empty_strided.default, _aten.new_empty.default,
    _aten.new_empty_strided.default, _aten.detach.default, _aten.lift_fresh.default, _aten.alias.default,
}

# Python-level host transfers, seen by the function mode (the dispatch mode sees no sync for them on CPU).
_HOST_METHODS = {
    torch.Tensor.tolist: "Tensor.tolist",
    torch.Tensor.numpy: "Tensor.numpy",
    torch.Tensor.cpu: "Tensor.cpu",
}

_THIS_FILE = os.path.abspath(__file__)
_TORCH_DIR = os.path.dirname(os.path.abspath(torch.__file__))
_PACKAGE_DIR = os.path.dirname(_THIS_FILE)  # megatron_moe/
_REPO_DIR = os.path.dirname(_PACKAGE_DIR)
_PLATFORM_FILE = os.path.join(_PACKAGE_DIR, "platform.py")

# Sync.origin values
OURS = "megatron_moe"
CPU_COMPAT = "megatron_moe/platform.py CPU/gloo adaptation"  # never runs on a GPU
MEGATRON_CORE = "megatron-core"
OTHER = "other"


@dataclass(frozen=True)
class Sync:
    op: str  # what synchronises
    why: str  # the Python-level operation that usually causes it
    where: str  # "file:line in function" of the innermost frame outside torch
    origin: str = OTHER  # whose code ``where`` is: OURS, CPU_COMPAT, MEGATRON_CORE or OTHER
    called_from: str = ""  # CPU_COMPAT only: the first frame outside platform.py (who needed the adaptation)


def _short_path(path: str) -> str:
    """Installed packages from their package directory (also in a virtual environment inside the
    repository, as CI makes it); repository files relative to the repository."""
    marker = os.sep + "site-packages" + os.sep
    if marker in path:
        return path.split(marker, 1)[1]
    if path.startswith(_REPO_DIR + os.sep):
        return os.path.relpath(path, _REPO_DIR)
    return path


def _origin(path: str) -> str:
    if path == _PLATFORM_FILE:
        return CPU_COMPAT
    if path.startswith(_PACKAGE_DIR + os.sep):
        return OURS
    if os.sep + os.path.join("megatron", "core") + os.sep in path:
        return MEGATRON_CORE
    return OTHER


def _user_frames():
    """Frames outside torch, this module and other torch modes, innermost first."""
    for frame in reversed(traceback.extract_stack()[:-3]):
        path = os.path.abspath(frame.filename)
        if (path != _THIS_FILE and not path.startswith(_TORCH_DIR) and "contextlib" not in path
                and frame.name not in ("__torch_function__", "__torch_dispatch__")):
            yield path, f"{_short_path(path)}:{frame.lineno} in {frame.name}"


def _locate():
    """(where, origin, called_from) of the line that asked for the sync."""
    frames = _user_frames()
    path, where = next(frames, ("", "?"))
    origin = _origin(path)
    called_from = ""
    if origin == CPU_COMPAT:
        called_from = next((line for other, line in frames if other != _PLATFORM_FILE), "?")
    return where, origin, called_from


def _has_bool_index(args) -> bool:
    indices = args[1] if len(args) > 1 else ()
    return any(isinstance(index, torch.Tensor) and index.dtype == torch.bool for index in indices or ())


def _is_masked_fill(func, args, kwargs) -> bool:
    """``x[mask] = scalar``: ATen's ``index_put_`` runs it as ``masked_fill_`` (no nonzero, no sync) when the
    only index is one mask on ``x``'s device and the value is a single element on the host (a Python
    number)."""
    if func not in (_aten.index_put_.default, _aten.index_put.default):
        return False
    accumulate = args[3] if len(args) > 3 else kwargs.get("accumulate", False)
    masks = [index for index in args[1] if index is not None]
    value = args[2]
    return (not accumulate and len(masks) == 1 and masks[0].dtype in (torch.bool, torch.uint8)
            and masks[0].device == args[0].device and value.numel() == 1 and value.dim() == 0
            and value.device.type == "cpu")


def _is_view(func) -> bool:
    return any(argument.alias_info is not None and not argument.alias_info.is_write
               for argument in func._schema.returns)


class _Dispatch(TorchDispatchMode):
    def __init__(self, counter: "HostSyncCounter"):
        super().__init__()
        self.counter = counter

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        counter = self.counter
        if func in _SYNC_OPS:
            counter._sync(str(func), _SYNC_OPS[func])
        elif func in _REPEAT_INTERLEAVE and kwargs.get("output_size") is None:
            counter._sync(str(func), "repeat_interleave without output_size")
        elif func in _INDEX_OPS and _has_bool_index(args) and not _is_masked_fill(func, args, kwargs):
            counter._sync(str(func), "boolean-mask indexing")
        if func not in _FREE_OPS and not _is_view(func):
            counter.ops[func.overloadpacket.__name__] += 1
        return func(*args, **kwargs)


class _Function(TorchFunctionMode):
    def __init__(self, counter: "HostSyncCounter"):
        super().__init__()
        self.counter = counter

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _HOST_METHODS:
            self.counter._sync(_HOST_METHODS[func], "copy to the host")
        elif func is torch.Tensor.to and _to_host(args[1:], kwargs) and not kwargs.get("non_blocking"):
            self.counter._sync("Tensor.to", "copy to the host (.to('cpu'))")
        return func(*args, **kwargs)


def _to_host(args, kwargs) -> bool:
    target = kwargs.get("device", args[0] if args else None)
    if isinstance(target, torch.Tensor):
        target = target.device
    # On a CPU run megatron_moe.platform hands out this device object for torch.cuda.current_device():
    # a move there is a move to the GPU on a GPU run, not to the host.
    from megatron_moe.platform import _CPU as current_cuda_device_on_cpu_runs

    if target is current_cuda_device_on_cpu_runs:
        return False
    return isinstance(target, (str, torch.device)) and torch.device(target).type == "cpu"


class HostSyncCounter:
    """Context manager counting host syncs (``syncs``, ``num_syncs``) and launched aten operations
    (``ops``: name -> count, ``num_ops``) of the code run inside it."""

    def __init__(self):
        self.syncs: list[Sync] = []
        self.ops: collections.Counter = collections.Counter()
        self._modes = ()

    @property
    def num_syncs(self) -> int:
        return len(self.syncs)

    @property
    def num_ops(self) -> int:
        return sum(self.ops.values())

    def _sync(self, op: str, why: str) -> None:
        self.syncs.append(Sync(op, why, *_locate()))

    def by_origin(self) -> collections.Counter:
        """Syncs per ``Sync.origin``."""
        return collections.Counter(sync.origin for sync in self.syncs)

    def syncs_of(self, origin: str) -> list:
        return [sync for sync in self.syncs if sync.origin == origin]

    def __enter__(self):
        self._modes = (_Function(self), _Dispatch(self))
        for mode in self._modes:
            mode.__enter__()
        return self

    def __exit__(self, *exc):
        for mode in reversed(self._modes):
            mode.__exit__(*exc)
        return False

    def describe(self) -> str:
        """The totals, then per origin one line per distinct sync site with its count."""
        lines = [f"{self.num_syncs} host syncs, {self.num_ops} launched ops"]
        for origin, total in self.by_origin().most_common():
            lines.append(f" {total} in {origin}:")
            sites = collections.Counter((sync.where, sync.op, sync.why, sync.called_from)
                                        for sync in self.syncs_of(origin))
            lines += [f"  {count} x {op} ({why}) at {where}" + (f" (called from {caller})" if caller else "")
                      for (where, op, why, caller), count in sites.most_common()]
        return "\n".join(lines)
