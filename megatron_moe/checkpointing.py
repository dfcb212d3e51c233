"""Checkpoints through megatron-core's dist_checkpointing: save, find the latest, load, resume exactly.

Layout of ``--save DIR`` (Megatron-LM's)::

    DIR/iter_0000010/                 one dist_checkpointing directory per saved iteration
    DIR/iter_0000010/run_config.json  the whole run config that wrote it (megatron_moe.run_config; checked
                                      before the model is built)
    DIR/iter_0000010/manifest.json    size and digest of each of its other files (verified before loading)
    DIR/latest_checkpointed_iteration.txt

A save writes into a folder of its own, ``iter_0000010.partial-XXXXXXXXXXXX``; once every rank's shards are
on disk and the manifest is written, rank 0 renames it to ``iter_0000010`` (an older save of that iteration
is moved aside and removed) and only then replaces the tracker, atomically. A crash during a save leaves the
previous checkpoint the one ``--load`` resumes from, and an iteration folder only ever holds one save's
files. One job writes a ``--save`` directory at a time (``.writer.lock``, :mod:`megatron_moe.save_lock`);
the job holding the lock removes the unfinished folders of a job that died during a save. At start every
rank checks that ``--save`` is writable, free of another writer, with room for a checkpoint, and that
``--load`` names a complete checkpoint whose files match the manifest (:func:`check_save_dir`,
:func:`check_save_space`, :func:`megatron_moe.checkpoint_files.check_checkpoint_files`).

A checkpoint holds the model, the optimizer, the LR scheduler, the RNG states of every rank and the number
of consumed samples (the data position). Resume is bit-exact (tests/test_resume.py). Three fixes are needed
for megatron-core 0.16.1's DistributedOptimizer with torch's AdamW (no TE/apex FusedAdam); all are here,
in :func:`_create_missing_adam_state`, :func:`_unshare_adam_steps` and :func:`_load_fully_reshardable`, and
explained there.

Resharding: a checkpoint loads into another TP/PP/EP/DP layout, optimizer state included
(tests/test_convert_checkpoint.py, tests/test_reshard_distributed_optimizer.py). With
``--use-distributed-optimizer`` that needs ``--dist-ckpt-optim-fully-reshardable`` when saving (Megatron-LM's
flag: the ``fully_reshardable`` format, which gathers each optimizer's state over its data-parallel group
into model-shaped tensors); the default ``dp_reshardable`` format only changes the data-parallel size, and
:func:`check_compatible` says so before loading. Tensors are stored under layout-independent names: the save
passes megatron-LM's sharded-state-dict metadata (:data:`SHARDED_METADATA`, ``chained_optim_avoid_prefix``:
with EP > 1 megatron chains a dense and an expert optimizer and would otherwise prefix their keys
``chained_N.``, plus the distributed optimizer's format) and stores it in the checkpoint
(``content_metadata``); the load builds its template with the metadata the checkpoint was written with,
whatever this run's flags, so checkpoints written before it existed (prefixed keys) still resume in their
own layout. What the optimizer keeps outside tensors (param groups, the common Adam step) is regrouped for
this run's chaining of optimizers (:func:`_regroup_optimizer_state`, :func:`_load_fully_reshardable`).
"""

from __future__ import annotations

import os
import queue
import shutil
import tempfile
import time
import uuid
from datetime import datetime
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch
import torch.distributed as dist

from megatron.core import dist_checkpointing, parallel_state, tensor_parallel
from megatron.core.dist_checkpointing.mapping import ShardedObject
from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer
from torch.distributed.checkpoint.api import CheckpointException

from megatron_moe import run_config, save_lock
from megatron_moe.arguments import ARCHITECTURE, RunConfig
from megatron_moe.checkpoint_files import TRACKER, checkpoint_dir, read_tracker, write_manifest
from megatron_moe.console import print_line, print_rank_0
from megatron_moe.errors import ConfigError

# megatron-LM's sharded-state-dict metadata: optimizer keys without the chained_N. prefix (the same in every
# expert-parallel layout), one sharded tensor per expert weight tensor (not one per local expert)
SHARDED_METADATA = {"chained_optim_avoid_prefix": True, "singleton_local_shards": False}
# The DistributedOptimizer formats that save on megatron-core 0.16.1 and load exactly (with the fixes below):
# dp_reshardable (its default) and, with --dist-ckpt-optim-fully-reshardable, fully_reshardable. megatron-core's
# own default, fully_sharded_model_space, fails to save.
DP_RESHARDABLE, FULLY_RESHARDABLE = "dp_reshardable", "fully_reshardable"

# The distributed optimizer's dp_reshardable state can change the data-parallel size, not these (its
# fully_reshardable state, like every other optimizer's, can change them all).
DISTRIBUTED_OPTIMIZER_FIELDS = ("tensor_model_parallel_size", "context_parallel_size",
                                "pipeline_model_parallel_size", "virtual_pipeline_model_parallel_size",
                                "expert_model_parallel_size", "expert_tensor_parallel_size")
# megatron-core's OptimizerParamScheduler settings (its state-dict keys) -> the flags that set them
SCHEDULER_SETTINGS = {
    "max_lr": "--lr", "min_lr": "--min-lr",
    "lr_warmup_steps": "--lr-warmup-iters x --global-batch-size, --lr-warmup-samples or --lr-warmup-fraction",
    "lr_decay_steps": "--lr-decay-iters (default --train-iters) x --global-batch-size, or --lr-decay-samples "
                      "(default --train-samples)",
    "lr_decay_style": "--lr-decay-style", "start_wd": "--start-weight-decay or --weight-decay",
    "end_wd": "--end-weight-decay or --weight-decay",
    "wd_incr_steps": "--train-iters x --global-batch-size, or --train-samples",
    "wd_incr_style": "--weight-decay-incr-style",
}


def find_checkpoint(args: RunConfig) -> Optional[Path]:
    """The iteration directory ``--load`` resumes from; None without --load, or on a job's first launch
    (--load == --save and nothing saved yet). A --load without a tracker is a ConfigError."""
    if not args.load:
        return None
    iteration = read_tracker(args.load)
    if iteration is None:
        if not args.save or Path(args.load).resolve() != Path(args.save).resolve():
            raise ConfigError(f"--load {args.load}: no {TRACKER} there; point --load at a --save directory "
                              "(or leave --load out to start from scratch)")
        if args.exit_on_missing_checkpoint:  # Megatron-LM's: exit (status 0) instead of starting from scratch
            print_rank_0(f"> --load {args.load} holds no checkpoint yet and --exit-on-missing-checkpoint is given: "
                         "exiting")
            dist.barrier()
            raise SystemExit(0)
        return None
    return checkpoint_dir(args.load, iteration)


def check_compatible(saved: RunConfig, args: RunConfig, where: Path) -> None:
    """One-line ConfigError naming every field that differs from the checkpoint's and must not: the
    architecture's (``arguments.ARCHITECTURE``); when the optimizer is loaded, its kind; and the parallel
    sizes when its state is dp_reshardable."""
    checks = [(sorted(RunConfig.names([ARCHITECTURE])), "use the checkpoint's model flags")]
    if loads_optimizer(args):
        checks.append((("use_distributed_optimizer",),
                       "give --use-distributed-optimizer as the checkpoint was saved, or pass --no-load-optim"))
        if saved_sharding_type(saved) == DP_RESHARDABLE:
            checks.append((DISTRIBUTED_OPTIMIZER_FIELDS,
                           "its distributed-optimizer state is dp_reshardable (only the data-parallel size may "
                           "change): resume it in its own layout with --dist-ckpt-optim-fully-reshardable to save "
                           "a fully reshardable one, or pass --no-load-optim"))
    differing, hints = [], []
    for fields, hint in checks:
        found = [f for f in fields if getattr(saved, f) != getattr(args, f)]
        differing += found
        hints += [hint] if found else []
    if differing:
        listed = "; ".join(f"{f} (checkpoint {getattr(saved, f)!r}, now {getattr(args, f)!r})" for f in differing)
        raise ConfigError(f"--load {where} was saved with a different config: {listed}; {'; '.join(hints)}")


def loads_optimizer(args: RunConfig) -> bool:
    return not (args.finetune or args.no_load_optim)


def check_scheduler(saved: Dict[str, object], scheduler, args: RunConfig, where: Path) -> None:
    """Megatron-LM's rule for the LR schedule on resume: a setting that differs from the checkpoint's is a
    one-line ConfigError unless --override-opt_param-scheduler (the flags win) or
    --use-checkpoint-opt_param-scheduler (the checkpoint wins; megatron-core's scheduler applies both)."""
    if args.override_opt_param_scheduler or args.use_checkpoint_opt_param_scheduler:
        return
    differing = [f"{name} (checkpoint {saved[name]!r}, now {getattr(scheduler, name)!r}: {flags})"
                 for name, flags in SCHEDULER_SETTINGS.items()
                 if name in saved and saved[name] != getattr(scheduler, name)]
    if differing:
        raise ConfigError(f"--load {where}: the LR schedule differs from the checkpoint's: {'; '.join(differing)}; "
                          "pass --override-opt_param-scheduler to follow these flags or "
                          "--use-checkpoint-opt_param-scheduler to keep the checkpoint's")


def saved_sharding_type(saved: RunConfig) -> Optional[str]:
    """The distributed optimizer's checkpoint format a run config records (None: another optimizer)."""
    if not saved.use_distributed_optimizer:
        return None
    return FULLY_RESHARDABLE if saved.dist_ckpt_optim_fully_reshardable else DP_RESHARDABLE


# ----------------------------------------------------------------------------------------------------------
# state dict
# ----------------------------------------------------------------------------------------------------------

def _rng_state(platform) -> Dict[str, object]:
    state = {"torch": torch.get_rng_state(), "tracker": tensor_parallel.get_cuda_rng_tracker().get_states()}
    if platform.is_cuda:
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: Dict[str, object], platform) -> None:
    torch.set_rng_state(state["torch"])
    if platform.is_cuda:
        torch.cuda.set_rng_state(state["cuda"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])


def _sub_optimizers(optimizer):
    return getattr(optimizer, "chained_optimizers", [optimizer])


def sharded_metadata(args) -> Dict[str, object]:
    """The sharded-state-dict metadata a checkpoint of this run is written with."""
    if args.use_distributed_optimizer:
        sharding = FULLY_RESHARDABLE if args.dist_ckpt_optim_fully_reshardable else DP_RESHARDABLE
        return {**SHARDED_METADATA, "distrib_optim_sharding_type": sharding}
    return dict(SHARDED_METADATA)


def model_state_keys(num_chunks: int) -> List[str]:
    """Where each model chunk's state lies in the checkpoint's state dict: ``model``, or under virtual pipeline
    stages ``model0``, ``model1``, ... (Megatron-LM's). Only the nesting differs: the tensors inside have the
    same global keys (layer numbers, expert indices) in every layout, so a checkpoint loads into any other."""
    return ["model"] if num_chunks == 1 else [f"model{i}" for i in range(num_chunks)]


def _sharded_state_dict(job, metadata: Optional[dict], is_loading: bool, with_optimizer: bool,
                        with_rng: bool) -> Dict[str, object]:
    state = {key: chunk.module.sharded_state_dict(metadata=metadata)
             for key, chunk in zip(model_state_keys(len(job.model)), job.model)}
    if with_optimizer:
        # the optimizer finds each parameter's sharded tensor by identity, whatever the nesting
        model_state = {key: state[key] for key in model_state_keys(len(job.model))}
        state["optimizer"] = job.optimizer.sharded_state_dict(model_state, is_loading=is_loading, metadata=metadata)
        state["scheduler"] = job.scheduler.state_dict()
    if with_rng:
        rank, world = dist.get_rank(), dist.get_world_size()
        # One object per rank: dropout streams differ between tensor/pipeline ranks.
        state["rng_state"] = ShardedObject("rng_state", _rng_state(job.platform), (world,), (rank,), replica_id=0)
    return state


@torch.no_grad()
def _create_missing_adam_state(optimizer) -> None:
    """Gives every parameter AdamW state (zeros, step 0) so a fresh process can build the load template.

    Without TE/apex, DistributedOptimizer.state_dict() asserts that all params share one ``step`` and finds
    none before the first step; megatron's init_state_fn creates exp_avg/exp_avg_sq but no ``step``.
    """
    for sub in _sub_optimizers(optimizer):
        inner = sub.optimizer
        for group in inner.param_groups:
            for param in group["params"]:
                if not inner.state[param]:
                    inner.state[param] = {"step": torch.tensor(0.0), "exp_avg": torch.zeros_like(param),
                                          "exp_avg_sq": torch.zeros_like(param)}


@torch.no_grad()
def _unshare_adam_steps(optimizer) -> None:
    """Gives every parameter its own ``step`` tensor holding the checkpoint's value.

    DistributedOptimizer.load_state_dict assigns ONE step tensor to every parameter (AdamW's ``step += 1``
    then advances it once per parameter), dp_reshardable's parameter-state copy overwrites it with the
    pre-load value and :func:`_load_fully_reshardable` removes it. The loaded param_groups carry the right
    step; every parameter gets a copy of it.
    """
    for sub in _sub_optimizers(optimizer):
        distributed = isinstance(sub, DistributedOptimizer)
        inner = sub.optimizer
        for group in inner.param_groups:
            for param in group["params"]:
                state = inner.state[param]
                if distributed and "step" in group:
                    state["step"] = torch.tensor(float(group["step"]))
                elif "step" in state:
                    state["step"] = state["step"].detach().clone()


# ----------------------------------------------------------------------------------------------------------
# save / load
# ----------------------------------------------------------------------------------------------------------

# name parts of the folders a save works in (iter_NNNNNNN.partial-XXXXXXXXXXXX, iter_NNNNNNN.replaced-...)
PARTIAL, REPLACED = ".partial-", ".replaced-"


def check_save_dir(args) -> None:
    """``--save`` exists (created if need be), every rank can write a file there, and no other job writes
    there (rank 0 takes its lock, then removes what a job that died during a save left). Collective: every
    rank raises the same one-line ConfigError."""
    if not args.save:
        return
    problem = _unwritable(args.save)
    if problem is None and dist.get_rank() == 0:
        problem = save_lock.take(args.save)
        if problem is None and save_lock.holds(args.save):
            _remove_unfinished_saves(args.save)
    problems: List[Optional[str]] = [problem]
    if dist.get_world_size() > 1:
        problems = [None] * dist.get_world_size()
        dist.all_gather_object(problems, problem)
    found = [p for p in problems if p is not None]
    if found:
        raise ConfigError(found[0])


def _unwritable(save: str) -> Optional[str]:
    try:
        os.makedirs(save, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=save, prefix=".write-probe-") as probe:
            probe.write(b"0")
            probe.flush()
            os.fsync(probe.fileno())
    except OSError as error:
        return f"--save {save}: not writable ({error.strerror or error}); give a directory this job can write"
    return None


def _remove_unfinished_saves(save: str) -> None:
    """Removes the working folders of saves that never finished (their job died): only the lock's holder may,
    as only then is no other job writing them."""
    leftovers = sorted(path for path in Path(save).glob("iter_*") if path.is_dir() and
                       (PARTIAL in path.name or REPLACED in path.name))
    for path in leftovers:
        shutil.rmtree(path)
    if leftovers:
        print(f"> removed {len(leftovers)} unfinished save folder(s) of a job that ended during a save: "
              f"{', '.join(path.name for path in leftovers)}", flush=True)


def checkpoint_bytes(job) -> int:
    """About what one checkpoint of ``job`` takes on disk: each parameter once (not its data-parallel
    replicas) in its dtype, plus the optimizer's fp32 Adam moments and, with --bf16, fp32 main params.
    Collective."""
    per_element_extra = 8 + (4 if job.args.bf16 else 0)
    dense_owner = parallel_state.get_data_parallel_rank(with_context_parallel=True) == 0
    expert_owner = parallel_state.get_expert_data_parallel_rank() == 0
    local = 0
    for param in (param for chunk in job.model for param in chunk.module.parameters()):
        is_expert = not getattr(param, "allreduce", True)  # megatron's mark for expert-parallel parameters
        if (expert_owner if is_expert else dense_owner):
            local += param.numel() * (param.element_size() + per_element_extra)
    total = torch.tensor([local], dtype=torch.float64)
    dist.all_reduce(total)
    return int(total.item() * 1.1)  # a tenth more: metadata, common state, RNG states, file alignment


def check_save_space(save: str, needed: int) -> None:
    """``save`` has ``needed`` bytes free: room for one more checkpoint (the previous one stays until this
    one is complete)."""
    free = shutil.disk_usage(save).free
    if free < needed:
        raise ConfigError(f"--save {save}: {free / 2**20:,.1f} MiB free, a checkpoint of this model needs about "
                          f"{needed / 2**20:,.1f} MiB; free some space or save elsewhere")


def save_checkpoint(job, iteration: int, consumed_samples: int) -> Path:
    """Writes ``--save``/iter_NNNNNNN on every rank into a folder of this save's own, which rank 0 renames into
    place once every rank's shards and the manifest are written; then (rank 0) the tracker. Logged with
    Megatron-LM's lines and its save-checkpoint time across ranks."""
    args = job.args
    began = time.perf_counter()
    print_rank_0(f"[{_now()}] saving checkpoint at iteration {iteration:7d} to {args.save} in torch_dist format")
    directory = checkpoint_dir(args.save, iteration)
    working = [None]
    if dist.get_rank() == 0:
        working[0] = str(directory.with_name(f"{directory.name}{PARTIAL}{uuid.uuid4().hex[:12]}"))
        os.mkdir(working[0])
    dist.broadcast_object_list(working, src=0)
    working = Path(working[0])
    metadata = sharded_metadata(args)
    state = _sharded_state_dict(job, metadata, is_loading=False, with_optimizer=True, with_rng=True)
    state["iteration"] = iteration
    state["consumed_samples"] = consumed_samples
    _keep_write_results_in_process()
    dist_checkpointing.save(state, str(working), content_metadata=metadata)
    if dist.get_rank() == 0:
        run_config.save(args, working)
    dist.barrier()  # every rank's shards are on disk
    write_manifest(working)
    if dist.get_rank() == 0:
        _publish(working, directory)  # only now may the tracker name this iteration
        tracker = Path(args.save) / TRACKER
        tmp = tracker.with_suffix(".tmp")
        tmp.write_text(str(iteration))
        os.replace(tmp, tracker)
    dist.barrier()
    print_rank_0(f"  [{_now()}] successfully saved checkpoint from iteration {iteration:7d} to {args.save} "
                 f"{_ranks_text()}")
    _log_time_across_ranks("save-checkpoint", time.perf_counter() - began, job.platform.device)
    return directory


def _now() -> str:
    return datetime.now().strftime("%Y-%m-%d %H:%M:%S.%f")


def _ranks_text() -> str:
    """Megatron-LM's ``[ t 1/2, p 1/1 ]``: the printing rank's tensor and pipeline rank of their sizes."""
    return (f"[ t {parallel_state.get_tensor_model_parallel_rank() + 1}/"
            f"{parallel_state.get_tensor_model_parallel_world_size()}, "
            f"p {parallel_state.get_pipeline_model_parallel_rank() + 1}/"
            f"{parallel_state.get_pipeline_model_parallel_world_size()} ]")


def _log_time_across_ranks(name: str, seconds: float, device: torch.device) -> None:
    """Megatron-LM's timer line (``timers.log``, its default minmax option), printed by the last rank: the
    fastest and slowest rank's milliseconds. One all-reduce of two numbers, at a save or load only."""
    both = torch.tensor([-seconds * 1000.0, seconds * 1000.0], dtype=torch.float64, device=device)
    dist.all_reduce(both, op=dist.ReduceOp.MAX)
    fastest, slowest = -both[0].item(), both[1].item()
    if dist.get_rank() == dist.get_world_size() - 1:
        print_line(f"(min, max) time across ranks (ms):\n    {(name + ' ').ljust(48, '.')}: "
                   f"({fastest:.2f}, {slowest:.2f})")


def _publish(working: Path, directory: Path) -> None:
    """Renames a finished save's folder to its iteration's name, replacing an older save of it."""
    if not directory.exists():
        os.rename(working, directory)
        return
    replaced = directory.with_name(f"{directory.name}{REPLACED}{uuid.uuid4().hex[:12]}")
    os.rename(directory, replaced)
    os.rename(working, directory)
    shutil.rmtree(replaced)


def _keep_write_results_in_process() -> None:
    """Hands megatron-core's torch_dist writer an in-process queue for its write results.

    Our saves are synchronous: the writer's results never leave this process. Without this, the writer
    starts a multiprocessing Manager server for them (a spawned interpreter: ~3 s per save on CPU), which
    would also outlive a rank killed by SIGKILL (a crashed node, the scheduler), holding the job's stdout open.
    """
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    filesystem_async._results_queue = queue.Queue()


def load_checkpoint(job) -> Tuple[int, int]:
    """Restores ``job.checkpoint``; returns (iteration, consumed samples), (0, 0) when there is none.

    ``--finetune``: model weights only, counting restarts at 0. ``--no-load-optim``: no optimizer or
    scheduler state. ``--no-load-rng``: fresh RNG. The run config was checked when the job was set up;
    the LR schedule is checked here (:func:`check_scheduler`), before any tensor is read. Logged with
    Megatron-LM's lines and its load-checkpoint time across ranks.
    """
    args, directory = job.args, job.checkpoint
    if directory is None:
        return 0, 0
    began = time.perf_counter()
    print_rank_0(f" loading distributed checkpoint from {args.load} at iteration {int(directory.name[len('iter_'):])}")
    iteration, consumed_samples = _load(job, args, directory)
    dist.barrier()
    print_rank_0(f"  successfully loaded checkpoint from {args.load} {_ranks_text()} at iteration {iteration}")
    _log_time_across_ranks("load-checkpoint", time.perf_counter() - began, job.platform.device)
    return iteration, consumed_samples


def _load(job, args: RunConfig, directory: Path) -> Tuple[int, int]:
    load_optimizer = loads_optimizer(args)
    load_rng = not (args.finetune or args.no_load_rng) and job.saved_config.world_size == dist.get_world_size()
    try:
        # written with: None before checkpoints recorded it (keys then carry the chained_N. prefix)
        metadata = dist_checkpointing.load_content_metadata(str(directory))
        if load_optimizer:  # its non-tensor part as saved (param groups, step), see _regroup_optimizer_state
            common = dist_checkpointing.load_common_state_dict(str(directory))
    except (Exception, CheckpointException) as error:  # torch's CheckpointException is no Exception
        raise _damaged(args, directory, error) from error
    if load_optimizer:
        check_scheduler(common["scheduler"], job.scheduler, args, directory)
        _create_missing_adam_state(job.optimizer)
    template = _sharded_state_dict(job, metadata, is_loading=True, with_optimizer=load_optimizer, with_rng=load_rng)
    try:  # only the read: an error of ours building the template or applying the state is no damaged file
        loaded = dist_checkpointing.load(template, str(directory), strict=args.dist_ckpt_strictness)
        if isinstance(loaded, tuple):  # --dist-ckpt-strictness return_*: the mismatching keys come back too
            loaded, missing, unexpected = loaded
            print_rank_0(f"> --load {directory}: {len(missing)} tensors of the model missing from the checkpoint, "
                         f"{len(unexpected)} of the checkpoint not in the model")
    except (Exception, CheckpointException) as error:
        raise _damaged(args, directory, error) from error

    for key, chunk in zip(model_state_keys(len(job.model)), job.model):
        chunk.module.load_state_dict(loaded[key])
    if load_optimizer:
        _load_optimizer_state(job.optimizer, loaded["optimizer"], common["optimizer"], metadata)
        job.scheduler.load_state_dict(loaded["scheduler"])
    if load_rng:
        _set_rng_state(loaded["rng_state"], job.platform)
    if args.finetune:
        return 0, 0
    return int(loaded["iteration"]), int(loaded["consumed_samples"])


def _damaged(args, directory: Path, error: BaseException) -> ConfigError:
    return ConfigError(f"--load {args.load}: cannot read {directory} ({_first_failure(error)}); the "
                       "checkpoint is damaged or incomplete: load another iteration or save it again")


def _first_failure(error: BaseException) -> str:
    """One line naming what went wrong; a CheckpointException holds every rank's (exception, traceback)."""
    failures = getattr(error, "failures", None)
    if failures:
        error = next(iter(failures.values()))[0]
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0]}" if text else type(error).__name__


def _load_optimizer_state(optimizer, loaded, saved, metadata: Optional[dict]) -> None:
    """Restores the optimizer from ``loaded`` (this run's template filled from the checkpoint) and ``saved``
    (the checkpoint's non-tensor optimizer state, in the chaining it was written with)."""
    with torch.no_grad():
        if (metadata or {}).get("distrib_optim_sharding_type") == FULLY_RESHARDABLE:
            _load_fully_reshardable(optimizer, loaded, _chained(saved))
        else:
            optimizer.load_state_dict(_regroup_optimizer_state(loaded, saved, optimizer))
    _unshare_adam_steps(optimizer)


def _chained(state) -> list:
    """The per-optimizer parts of an optimizer state dict: megatron keys a chain's by 0, 1, ..."""
    if state and all(isinstance(key, int) for key in state):
        return [state[key] for key in sorted(state)]
    return [state]


def _current_parts(loaded, count: int) -> list:
    """Each of this run's ``count`` optimizers' part of the loaded dict: where its template put it (the
    saved chain's non-tensor parts may lie beside it)."""
    return [loaded] if count == 1 else [loaded[i] for i in range(count)]


def _load_fully_reshardable(optimizer, loaded, saved_subs: list) -> None:
    """Loads a fully_reshardable DistributedOptimizer checkpoint into any TP/PP/EP/DP layout.

    The tensors (main params, Adam moments) come from this run's template, one ``param_state`` per current
    optimizer. The param groups come from the checkpoint: each current group takes the saved group of
    the same identity (megatron's ``param_group_identifier_keys``: weight-decay and lr multipliers, expert or
    not), or, when the saved chaining has none (EP = 1 saved, EP > 1 now: the expert group), its own with
    the saved Adam step. The step is popped from the per-parameter state before the tensor copy, which
    megatron-core 0.16.1 would otherwise fail on (``KeyError: 'step'``, it only expects tensors to copy);
    :func:`_unshare_adam_steps` puts it back.
    """
    from megatron.core.optimizer.optimizer import param_group_identifier_keys

    def identity(group):
        return tuple(group.get(key) for key in param_group_identifier_keys)

    saved_groups = {identity(g): g for sub in saved_subs for g in sub["optimizer"]["param_groups"]}
    step = next(g["step"] for g in saved_groups.values() if "step" in g)
    current = _sub_optimizers(optimizer)
    for sub, part in zip(current, _current_parts(loaded, len(current))):
        groups = [saved_groups.get(identity(g), {**g, "step": step})
                  for g in sub.state_dict()["optimizer"]["param_groups"]]
        sub.load_state_dict({"optimizer": {"param_groups": groups}})
        for state in sub.optimizer.state.values():
            state.pop("step", None)
        sub.load_parameter_state_from_fully_reshardable(part["param_state"])


def _regroup_optimizer_state(loaded, saved, optimizer):
    """The loaded optimizer state in this run's chaining of optimizers (all formats but fully_reshardable).

    With EP > 1 megatron chains a dense and an expert optimizer; with EP = 1 there is one. Their tensors load
    into this run's template whatever the saved chaining (layout-independent keys), but what the optimizer
    keeps outside tensors (``param_groups``, Adam's ``common_step``) comes back as it was saved. When the
    number of optimizers differs, every current optimizer takes its own param groups (their hyperparameters
    come from this run's flags, the learning rate from the scheduler) and the saved step, which megatron
    keeps equal across chained optimizers. The bf16 optimizer nests torch's state under ``optimizer`` next
    to its fp32 main params (``fp32_from_fp16_params``, loaded like the other tensors).
    """
    current = _sub_optimizers(optimizer)
    saved_subs = _chained(saved)
    if len(saved_subs) == len(current):
        return loaded
    step = _torch_state(saved_subs[0])["state"].get("common_step")
    regrouped = []
    for sub, view in zip(current, _current_parts(loaded, len(current))):
        view = {key: value for key, value in view.items() if not isinstance(key, int)}  # not the saved chain's
        torch_view = _torch_state(view)
        state = {key: value for key, value in torch_view["state"].items() if key != "common_step"}
        if step is not None:
            state["common_step"] = step
        torch_view.update(state=state, param_groups=_torch_state(sub.state_dict())["param_groups"])
        regrouped.append(view)
    return regrouped[0] if len(regrouped) == 1 else dict(enumerate(regrouped))


def _torch_state(optimizer_state: dict) -> dict:
    """The torch optimizer's state dict inside a megatron optimizer's (the bf16 optimizer nests it)."""
    return optimizer_state.get("optimizer", optimizer_state)
