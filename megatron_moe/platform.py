"""Device and communication backend: CUDA + NCCL when GPUs are visible, CPU + gloo otherwise.

This module owns every adaptation that megatron-core 0.16.1 needs to run on a CPU. megatron-core assumes
CUDA in many places (``torch.cuda.current_device()`` as a tensor device, ``device="cuda"`` literals, CUDA
streams and events, the CUDA RNG, optimizer asserts on ``'torch.cuda.FloatTensor'``). Each adaptation is a
:class:`CompatPiece` naming the megatron-core call site it covers, with a ``needed`` probe that reads
megatron-core itself, so that ``tests/test_platform.py`` notices when an upgrade makes a piece unnecessary.
Pieces are applied only on CPU (except the Transformer-Engine-absent one, which any machine without TE
needs), and nothing else in the project patches megatron-core.

It also owns what a GPU start needs before any process group exists (:func:`check_start`: the device, NCCL,
Transformer Engine and FP8, each refused in one line), the rendezvous store under torchrun (a per-attempt
prefix, so that ``--max-restarts`` works with the default static rendezvous) and the lifetime of the
processes a rank forks (:func:`children_die_with_this_process`).
"""

from __future__ import annotations

import atexit
import contextlib
import datetime
import importlib
import importlib.util
import inspect
import logging
import os
import re
import threading
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.distributed as dist
from torch.overrides import TorchFunctionMode

from megatron_moe.errors import ConfigError
from megatron_moe.preprocessing.worker_lifetime import die_with_parent  # imported here, never in a forked child


@dataclass(frozen=True)
class Platform:
    """Where this process computes and how it talks to the others."""

    device: torch.device
    backend: str  # "nccl" or "gloo"

    @property
    def is_cuda(self) -> bool:
        return self.device.type == "cuda"


def wants_cuda(requested: Optional[str]) -> bool:
    """Whether ``--device`` (None: whatever is visible) asks for CUDA."""
    return torch.cuda.is_available() if requested is None else requested == "cuda"


def select_platform(requested: Optional[str] = None) -> Platform:
    """CUDA + NCCL if a GPU is visible (or ``requested == "cuda"``), else CPU + gloo."""
    if requested not in (None, "cpu", "cuda"):
        raise ValueError(f"--device must be 'cpu' or 'cuda', got {requested!r}")
    use_cuda = wants_cuda(requested)
    problem = device_problem(requested)
    if problem is not None:
        raise ConfigError(problem)
    if use_cuda:
        local_rank = _local_rank()
        torch.cuda.set_device(local_rank)
        return Platform(torch.device("cuda", local_rank), "nccl")
    return Platform(torch.device("cpu"), "gloo")


def _local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


# ----------------------------------------------------------------------------------------------------------
# start-up checks: one line each, on every rank, before any process group
# ----------------------------------------------------------------------------------------------------------

# Transformer Engine's FP8 rule (transformer_engine/pytorch/fp8.py, check_fp8_support): compute capability
# 9.0 (Hopper) and later; 8.9 (Ada) with CUDA 12.1 or later (and a cuBLASLt TE checks itself); nothing older.
FP8_MIN_CAPABILITY = (8, 9)
FP8_ADA_MIN_CUDA = (12, 1)


def _no_gpu_reason() -> str:
    if torch.version.cuda is None:
        return f"this torch ({torch.__version__}) is a CPU-only build"
    if os.environ.get("CUDA_VISIBLE_DEVICES") == "":
        return "CUDA_VISIBLE_DEVICES is empty"
    return "no CUDA device or driver is visible"


def device_problem(requested: Optional[str]) -> Optional[str]:
    """Why ``--device`` (None: whatever is visible) cannot be used here, or None."""
    if not wants_cuda(requested):
        return None
    if not torch.cuda.is_available():
        return f"--device cuda: torch sees no GPU ({_no_gpu_reason()}); run on a GPU node or pass --device cpu"
    count, local_rank = torch.cuda.device_count(), _local_rank()
    if local_rank >= count:
        return (f"LOCAL_RANK {local_rank} but only {count} GPU{'s' if count != 1 else ''} visible on this node: "
                "give torchrun --nproc-per-node at most the number of GPUs per node")
    return None


def backend_problem(args) -> Optional[str]:
    """Why the communication backend the run would use cannot start here, or None."""
    nccl = args.distributed_backend == "nccl" or (args.distributed_backend is None and wants_cuda(args.device))
    if not nccl:
        return None
    if not torch.cuda.is_available():
        return (f"--distributed-backend nccl needs GPUs, but torch sees none ({_no_gpu_reason()}); "
                "use --distributed-backend gloo --device cpu on this machine")
    if not dist.is_nccl_available():
        return (f"--distributed-backend nccl: this torch ({torch.__version__}) was built without NCCL; "
                "install a CUDA build of torch")
    return None


def transformer_engine_problem(needed_by: str) -> Optional[str]:
    """Why Transformer Engine, which ``needed_by`` (the flags that ask for it) needs, cannot be used, or None."""
    if importlib.util.find_spec("transformer_engine") is None:
        return (f"{needed_by} needs NVIDIA Transformer Engine, which is not installed: pip install '.[gpu]' on a "
                "CUDA machine, or pass --transformer-impl local")
    try:
        importlib.import_module("transformer_engine.pytorch")
    except Exception as error:  # a broken install fails in many ways (ImportError, OSError, RuntimeError)
        first = (str(error).strip().splitlines() or [""])[0]
        return (f"{needed_by} needs NVIDIA Transformer Engine, which is installed but does not import "
                f"({type(error).__name__}: {first}); reinstall it for this torch and CUDA, or pass "
                "--transformer-impl local")
    return None


def require_transformer_engine(needed_by: str = "--transformer-impl transformer_engine") -> None:
    """ConfigError (one line naming ``needed_by`` and the way out) unless Transformer Engine imports."""
    problem = transformer_engine_problem(needed_by)
    if problem is not None:
        raise ConfigError(problem)


def fp8_problem() -> Optional[str]:
    """Why this rank's GPU cannot run FP8 GEMMs (Transformer Engine's rule), or None."""
    capability = tuple(torch.cuda.get_device_capability(_local_rank()))
    name = torch.cuda.get_device_name(_local_rank())
    if capability < FP8_MIN_CAPABILITY:
        return (f"--fp8-format needs a GPU of compute capability {FP8_MIN_CAPABILITY[0]}.{FP8_MIN_CAPABILITY[1]} "
                f"or later (Hopper, Ada); {name} has {capability[0]}.{capability[1]}: leave out --fp8-format")
    cuda = tuple(int(part) for part in (torch.version.cuda or "0.0").split(".")[:2])
    if capability < (9, 0) and cuda < FP8_ADA_MIN_CUDA:
        return (f"--fp8-format on {name} (compute capability {capability[0]}.{capability[1]}) needs CUDA "
                f"{FP8_ADA_MIN_CUDA[0]}.{FP8_ADA_MIN_CUDA[1]} or later; this torch has CUDA {torch.version.cuda}: "
                "install a newer CUDA build of torch, or leave out --fp8-format")
    return None


def check_start(args) -> None:
    """What a GPU run needs, checked on every rank before any process group: the device, the backend,
    Transformer Engine when the spec (the default on CUDA) or --fp8-format asks for it, and FP8 support of
    the GPU. Each a one-line ConfigError naming the flag and the way out."""
    problem = device_problem(args.device) or backend_problem(args)
    if problem is None and args.transformer_impl == "transformer_engine":
        flags = "--transformer-impl transformer_engine (the default on CUDA)"
        problem = transformer_engine_problem(flags + (" with --fp8-format" if args.fp8_format else ""))
    if problem is None and args.fp8_format is not None and wants_cuda(args.device):
        problem = fp8_problem()
    if problem is not None:
        raise ConfigError(problem)


# ----------------------------------------------------------------------------------------------------------
# the process group
# ----------------------------------------------------------------------------------------------------------

def init_distributed(platform: Platform, timeout_minutes: int = 10) -> None:
    """Join the process group ``torchrun`` describes; a plain ``python`` launch becomes a 1-process group."""
    if dist.is_initialized():
        return
    if not platform.is_cuda:
        apply_cpu_compat()
    apply_transformer_engine_absent_compat()
    timeout = datetime.timedelta(minutes=timeout_minutes)
    if "RANK" not in os.environ:
        # A plain launch rendezvouses in memory: no port to collide with, and nothing written to os.environ,
        # which a caller (a tool run in-process, a test) would pass on to the processes it starts.
        rendezvous = dict(store=dist.HashStore(), rank=0, world_size=1)
    else:
        store = _torchrun_attempt_store(timeout)
        rendezvous = {} if store is None else dict(store=store, rank=int(os.environ["RANK"]),
                                                   world_size=int(os.environ["WORLD_SIZE"]))
    dist.init_process_group(
        backend=platform.backend,
        timeout=timeout,
        device_id=platform.device if platform.is_cuda else None,
        **rendezvous,
    )
    atexit.register(shutdown_distributed)


def _torchrun_attempt_store(timeout: datetime.timedelta) -> Optional[dist.Store]:
    """torchrun's agent store seen under a prefix for this attempt (None when torchrun gives no agent store).

    With the agent store (TORCHELASTIC_USE_AGENT_STORE: always with static rendezvous, by default with c10d)
    the store outlives a failed attempt, and torch's own ``env://`` reads it unprefixed: a relaunched worker
    then finds the previous attempt's addresses and cannot connect (pytorch/pytorch#135712). Under the prefix
    ``attempt_<TORCHELASTIC_RESTART_COUNT>`` every attempt starts clean; every rank of an attempt agrees on
    the count where :func:`elastic_restart_problem` finds none.
    """
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), int(os.environ["WORLD_SIZE"]),
                          is_master=False, timeout=timeout)
    problem = elastic_restart_problem(store)
    if problem is not None:
        raise ConfigError(problem)
    return dist.PrefixStore(f"megatron_moe/attempt_{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)


def elastic_restart_problem(agent_store: dist.Store) -> Optional[str]:
    """Why torchrun's restarts could not start this job cleanly, or None.

    Each attempt's ranks meet under the prefix of their restart count (:func:`_torchrun_attempt_store`). The
    count is the same on every node when the rendezvous is static (a node's agent restarts only when its own
    workers failed, and every worker fails once its peers are gone) or when there is one node. With c10d
    rendezvous over several nodes, an agent whose workers were healthy restarts them without counting
    (torch's ``num_nodes_waiting`` path), so the counts, and the prefixes, may differ. Static rendezvous is
    recognised by the rank assignment its agents write into the store the workers share.
    """
    if int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", "0")) == 0 or os.environ.get("GROUP_WORLD_SIZE", "1") == "1":
        return None
    run_id = os.environ.get("TORCHELASTIC_RUN_ID", "")
    if agent_store.check([f"{run_id}/torchelastic/assigned_ranks/0"]):
        return None  # static rendezvous
    return ("torchrun --max-restarts with c10d rendezvous over several nodes needs "
            "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 in torchrun's environment (every attempt then gets a fresh store), "
            "or torchrun's default static rendezvous (--master-addr/--master-port)")


_forker = {"pid": 0, "main_thread": True}  # who is forking: set just before each fork, read in the child


def _note_forker() -> None:
    _forker.update(pid=os.getpid(), main_thread=threading.current_thread() is threading.main_thread())


def _die_with_forker() -> None:
    die_with_parent(_forker["pid"], kernel=_forker["main_thread"])


_children_guarded = False


def children_die_with_this_process() -> None:
    """Every process this one forks from now on dies with it, SIGKILL included (as the preprocessing
    workers do). megatron-core's checkpoint writer forks its write processes (``filesystem_async``); a rank
    killed during a save would otherwise leave them behind, holding memory and the files they write."""
    global _children_guarded
    if not _children_guarded:
        os.register_at_fork(before=_note_forker, after_in_child=_die_with_forker)
        _children_guarded = True


def shutdown_distributed() -> None:
    """Destroy megatron's groups and the default group while the interpreter is still whole.

    A gloo process group left to interpreter finalisation may still hold finished work objects on its C++
    threads; freeing them then needs the GIL, and the process dies with SIGABRT ("terminate called without
    an active exception") after a successful run. NCCL asks for the same call on every normal exit.
    """
    if not dist.is_initialized():
        return
    from megatron.core import parallel_state

    parallel_state.destroy_model_parallel()
    dist.destroy_process_group()


# ----------------------------------------------------------------------------------------------------------
# a failed collective, in one line
# ----------------------------------------------------------------------------------------------------------

# What gloo says when a peer is frozen (the collective's timeout ran out) or dead (its sockets closed).
_GLOO_FAILURES = {"Timed out waiting": "timed out", "Connection closed by peer": "lost its peer",
                  "Connection reset by peer": "lost its peer"}


def _group_name(group) -> str:
    """Which of megatron's process groups ``group`` is (parallel_state's ``_NAME_GROUP``), with its ranks."""
    from megatron.core import parallel_state

    if group is None or group is dist.group.WORLD:
        return f"world group (ranks 0..{dist.get_world_size() - 1})"
    names = [name.strip("_")[: -len("_GROUP")].lower().replace("_", "-") for name, value in vars(parallel_state).items()
             if name.startswith("_") and name.endswith("_GROUP") and value is group]
    return f"{names[0] if names else 'a'} process group (ranks {dist.get_process_group_ranks(group)})"


def communication_failure(error: BaseException) -> Optional[str]:
    """One line naming this rank, the collective, its process group and caller when ``error`` is a
    collective that timed out or lost a peer (a frozen or dead rank); None for any other error."""
    text = str(error)
    what = next((meaning for marker, meaning in _GLOO_FAILURES.items() if marker in text), None)
    if what is None or not dist.is_initialized():
        return None
    collective, group, caller = "a collective", None, "?"
    tb = error.__traceback__
    while tb is not None:  # innermost public torch.distributed call, and the frame that called it
        code = tb.tb_frame.f_code
        if code.co_filename.endswith(os.path.join("torch", "distributed", "distributed_c10d.py")):
            if not code.co_name.startswith("_") and collective == "a collective":
                collective, group = code.co_name, tb.tb_frame.f_locals.get("group")
        elif collective == "a collective" and "megatron" in code.co_filename and code.co_filename != __file__:
            caller = f"{os.path.basename(code.co_filename)}:{tb.tb_lineno} ({code.co_name})"
        tb = tb.tb_next
    waited = re.search(r"Timed out waiting (\d+)ms", text)
    detail = (f"after {int(waited.group(1)) / 60000:g} min (--distributed-timeout-minutes): a rank of that group "
              "is frozen or too slow" if waited else "a rank of that group died")
    peer = re.search(r"peer (\[[^\]]*\]:\d+)", text)
    return (f"rank {dist.get_rank()}: {collective} on the {_group_name(group)} {what}"
            f"{' (peer ' + peer.group(1) + ')' if peer else ''} "
            f"{detail}; called from {caller}")


# ----------------------------------------------------------------------------------------------------------
# megatron-core compatibility pieces
# ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CompatPiece:
    name: str
    call_site: str  # where megatron-core (or torch under it) needs this
    needed: Callable[[], bool]  # reads megatron-core; False once an upgrade makes the piece unnecessary
    apply: Callable[[], None]


def _source(module_name: str, attribute: Optional[str] = None) -> str:
    import importlib

    obj = importlib.import_module(module_name)
    return inspect.getsource(getattr(obj, attribute) if attribute else obj)


def _is_cuda_device(device) -> bool:
    if isinstance(device, int):
        return True  # megatron passes torch.cuda.current_device() (an int ordinal) as a device
    if isinstance(device, str):
        return device.startswith("cuda")
    return isinstance(device, torch.device) and device.type == "cuda"


_CPU = torch.device("cpu")
_CUDA_TENSOR_TYPE_NAMES = {
    "torch.FloatTensor": "torch.cuda.FloatTensor",
    "torch.HalfTensor": "torch.cuda.HalfTensor",
    "torch.BFloat16Tensor": "torch.cuda.BFloat16Tensor",
}


class _CudaAsCpuMode(TorchFunctionMode):
    """Runs megatron-core's CUDA-addressed tensor code on the CPU.

    - ``device="cuda"`` / ``device=<int>`` in factory calls and ``.to()``, and ``.cuda()``: become the CPU
      (e.g. ``transformer/utils.py:get_default_causal_mask``, ``torch.ones(..., device="cuda")``).
    - ``tensor.type()``: reports the CUDA type name, because the optimizers accept only those
      (``optimizer/optimizer.py`` and ``optimizer/distrib_optimizer.py`` main-param setup,
      ``optimizer/clip_grads.py:clip_grad_by_total_norm_fp32``).
    A torch-function mode is not active inside autograd's backward; backward-time CUDA addressing goes
    through ``torch.cuda.current_device()``, which :func:`_patch_cuda_runtime` covers.
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            name = func(*args)
            return _CUDA_TENSOR_TYPE_NAMES.get(name, name)
        if "device" in kwargs and _is_cuda_device(kwargs["device"]):
            kwargs["device"] = _CPU
        if func is torch.Tensor.to:
            args = tuple(_CPU if _is_cuda_device(a) and not isinstance(a, int) else a for a in args)
        return func(*args, **kwargs)


class _NoopStream:
    """Stands in for ``torch.cuda.Stream``/``Event``: the CPU executes in program order."""

    def __init__(self, *args, **kwargs):
        pass

    def __getattr__(self, name):
        # wait_stream, record_event, synchronize, record_stream, ...: chainable no-ops
        return lambda *args, **kwargs: _NOOP_STREAM

    def query(self):
        return True

    def elapsed_time(self, other):
        return 0.0


_NOOP_STREAM = _NoopStream()


def _patch_cuda_runtime() -> None:
    """Maps the ``torch.cuda`` runtime calls megatron-core makes onto the CPU process."""
    cuda = torch.cuda
    cuda.current_device = lambda: _CPU
    cuda.device_count = lambda: 0
    cuda.synchronize = lambda *args, **kwargs: None
    cuda.empty_cache = lambda: None
    cuda.Stream = _NoopStream
    cuda.Event = _NoopStream
    cuda.current_stream = lambda *args, **kwargs: _NOOP_STREAM
    cuda.default_stream = lambda *args, **kwargs: _NOOP_STREAM
    cuda.stream = lambda *args, **kwargs: contextlib.nullcontext()
    cuda.memory_allocated = lambda *args, **kwargs: 0
    cuda.memory_reserved = lambda *args, **kwargs: 0
    cuda.max_memory_allocated = lambda *args, **kwargs: 0
    cuda.memory_stats = lambda *args, **kwargs: {}
    cuda.nvtx.range_push = lambda *args, **kwargs: None
    cuda.nvtx.range_pop = lambda *args, **kwargs: None
    cuda.nvtx.range = lambda *args, **kwargs: contextlib.nullcontext()


class _CpuRngIsTheTrackedRng(logging.Filter):
    """The tracker warns when the CPU RNG moves inside ``fork()``; on CPU the forked RNG is the CPU RNG."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "CPU RNG state changed within GPU RNG context" not in record.getMessage()


def _patch_rng() -> None:
    """The CUDA RNG is the CPU RNG: dropout on CPU draws from it, so the tracker must fork that one."""
    from megatron.core.tensor_parallel import random as tp_random

    logging.getLogger(tp_random.__name__).addFilter(_CpuRngIsTheTrackedRng())

    torch.cuda.get_rng_state = lambda *args, **kwargs: torch.get_rng_state()
    torch.cuda.set_rng_state = lambda state, *args, **kwargs: torch.set_rng_state(state)
    torch.cuda.manual_seed = lambda seed: torch.default_generator.manual_seed(seed)
    tp_random._get_cuda_rng_state = lambda *args, clone=False, **kwargs: torch.get_rng_state()
    tp_random._set_cuda_rng_state = lambda state, *args, **kwargs: torch.set_rng_state(state)


def _patch_all_to_all_split_sizes() -> None:
    """gloo's all_to_all_single takes split sizes only as Python lists."""
    original = dist.all_to_all_single
    if getattr(original, "_split_sizes_as_lists", False):
        return

    def as_list(sizes):
        return sizes if sizes is None or isinstance(sizes, list) else [int(s) for s in sizes]

    def all_to_all_single(output, input, output_split_sizes=None, input_split_sizes=None, **kwargs):
        return original(output, input, as_list(output_split_sizes), as_list(input_split_sizes), **kwargs)

    all_to_all_single._split_sizes_as_lists = True
    dist.all_to_all_single = all_to_all_single


def _patch_uneven_all_gather() -> None:
    """gloo's all_gather needs equal sizes: uneven first dimensions are padded, gathered, then trimmed."""
    original = dist.all_gather
    if getattr(original, "_pads_uneven", False):
        return

    def all_gather(tensor_list, tensor, group=None, async_op=False):
        rows = [t.shape[0] for t in tensor_list]
        if len(set(rows + [tensor.shape[0]])) == 1 or async_op:
            return original(tensor_list, tensor, group=group, async_op=async_op)
        longest = max(rows)
        padded = tensor.new_zeros((longest, *tensor.shape[1:]))
        padded[: tensor.shape[0]] = tensor
        gathered = [tensor.new_empty((longest, *tensor.shape[1:])) for _ in tensor_list]
        original(gathered, padded, group=group)
        for out, full, n in zip(tensor_list, gathered, rows):
            out.copy_(full[:n])

    all_gather._pads_uneven = True
    dist.all_gather = all_gather


def _patch_overlapped_sends_keep_their_memory() -> None:
    """gloo's isend reads the tensor's memory from its own thread after isend returns, and megatron's
    overlapped interleaved schedule frees each pipeline output (``deallocate_output_tensor`` swaps its ``.data``
    for one element) before waiting for its send: gloo then sent whatever reused that memory (corrupted
    activations under load, a heap abort in a reproduction). Each send gets an alias of the tensor, which
    holds the memory until the send's work handle is dropped. NCCL records the memory on its stream instead."""
    from megatron.core.pipeline_parallel import p2p_communication

    original = p2p_communication._p2p_ops
    if getattr(original, "_sends_aliases", False):
        return

    def alias(tensor):
        return None if tensor is None else tensor.detach()

    def p2p_ops(*, tensor_send_prev, tensor_send_next, **kwargs):
        return original(tensor_send_prev=alias(tensor_send_prev), tensor_send_next=alias(tensor_send_next), **kwargs)

    p2p_ops._sends_aliases = True
    p2p_communication._p2p_ops = p2p_ops


def _expert_bias_update_is_compiled() -> bool:
    from megatron.core.transformer.moe.router import TopKRouter

    return hasattr(TopKRouter._apply_expert_bias, "_torchdynamo_orig_callable")


def _run_expert_bias_update_eagerly() -> None:
    """torch.compile on the CPU builds C++ with inductor at the first call (about 11 s per process, and a
    compiler on the machine) for one in-place addition."""
    from megatron.core.transformer.moe.router import TopKRouter

    if _expert_bias_update_is_compiled():
        TopKRouter._apply_expert_bias = TopKRouter._apply_expert_bias._torchdynamo_orig_callable


_cuda_as_cpu_mode: Optional[_CudaAsCpuMode] = None


def _enter_cuda_as_cpu_mode() -> None:
    global _cuda_as_cpu_mode
    if _cuda_as_cpu_mode is None:
        _cuda_as_cpu_mode = _CudaAsCpuMode()
        _cuda_as_cpu_mode.__enter__()


CPU_COMPAT_PIECES = (
    CompatPiece(
        "cuda-device-literals",
        "transformer/utils.py:get_default_causal_mask (device='cuda'), optimizer/clip_grads.py and "
        "optimizer/optimizer.py asserts on param.type() == 'torch.cuda.FloatTensor'",
        lambda: 'device="cuda"' in _source("megatron.core.transformer.utils", "get_default_causal_mask")
        and "torch.cuda.FloatTensor" in _source("megatron.core.optimizer.clip_grads"),
        _enter_cuda_as_cpu_mode,
    ),
    CompatPiece(
        "cuda-runtime",
        "torch.cuda.current_device() as a device in tensor_parallel/mappings.py (also in backward), "
        "distributed/param_and_grad_buffer.py; CUDA streams/events in distributed/, nvtx in utils.py",
        lambda: "torch.cuda.current_device()" in _source("megatron.core.tensor_parallel.mappings")
        and "torch.cuda.current_device()" in _source("megatron.core.distributed.param_and_grad_buffer"),
        _patch_cuda_runtime,
    ),
    CompatPiece(
        "cuda-rng",
        "tensor_parallel/random.py: CudaRNGStatesTracker.add/fork and model_parallel_cuda_manual_seed "
        "use torch.cuda.get_rng_state/manual_seed and the private _get/_set_cuda_rng_state",
        lambda: "torch.cuda.get_rng_state" in _source("megatron.core.tensor_parallel.random"),
        _patch_rng,
    ),
    CompatPiece(
        "all-to-all-split-sizes",
        "tensor_parallel/mappings.py:_AllToAll passes the token dispatcher's numpy/tensor split sizes",
        lambda: "all_to_all_single" in _source("megatron.core.tensor_parallel.mappings")
        and "maybe_move_tensor_to_cpu" in _source("megatron.core.transformer.moe.token_dispatcher"),
        _patch_all_to_all_split_sizes,
    ),
    CompatPiece(
        "uneven-all-gather",
        "tensor_parallel/mappings.py:_gather_along_first_dim with output_split_sizes (the alltoall "
        "token dispatcher under expert tensor parallelism) all-gathers tensors of different lengths",
        lambda: "torch.distributed.all_gather(output_tensor_list"
        in _source("megatron.core.tensor_parallel.mappings", "_gather_along_first_dim"),
        _patch_uneven_all_gather,
    ),
    CompatPiece(
        "overlapped-sends-keep-their-memory",
        "pipeline_parallel/schedules.py: the interleaved schedule with overlap_p2p_comm calls "
        "deallocate_output_tensor on an output whose p2p_communication.py:_p2p_ops isend is not yet waited for",
        lambda: "torch.distributed.isend(" in _source("megatron.core.pipeline_parallel.p2p_communication", "_p2p_ops")
        and "deallocate_output_tensor(output_tensor" in _source("megatron.core.pipeline_parallel.schedules",
                                                                "forward_backward_pipelining_with_interleaving"),
        _patch_overlapped_sends_keep_their_memory,
    ),
    CompatPiece(
        "eager-expert-bias-update",
        "transformer/moe/router.py:TopKRouter._apply_expert_bias (--moe-router-enable-expert-bias) is wrapped by "
        "megatron.core.jit.jit_fuser, which is torch.compile",
        _expert_bias_update_is_compiled,
        _run_expert_bias_update_eagerly,
    ),
)


def _router_gemm_names_te() -> bool:
    from megatron.core.transformer.moe import moe_utils

    return "te_general_gemm(" in inspect.getsource(moe_utils.RouterGatingLinearFunction) and not hasattr(
        moe_utils, "te_general_gemm"
    )


def _define_router_gemm_absent() -> None:
    from megatron.core.transformer.moe import moe_utils

    moe_utils.te_general_gemm = None


TRANSFORMER_ENGINE_ABSENT_PIECE = CompatPiece(
    "router-gemm-without-te",
    "transformer/moe/moe_utils.py:RouterGatingLinearFunction reads te_general_gemm, only defined when "
    "Transformer Engine imports (NameError otherwise)",
    _router_gemm_names_te,
    _define_router_gemm_absent,
)


def apply_cpu_compat() -> None:
    """Applies every CPU piece (idempotent)."""
    for piece in CPU_COMPAT_PIECES:
        piece.apply()


def apply_transformer_engine_absent_compat() -> None:
    if _router_gemm_names_te():
        TRANSFORMER_ENGINE_ABSENT_PIECE.apply()
