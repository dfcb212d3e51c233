"""What a run reports besides the lm loss: MoE losses, expert load, extra counters, TensorBoard.

- :func:`moe_aux_losses`: megatron-core's per-layer aux-loss tracker (load-balancing loss, z-loss),
  reduced across ranks, averaged over MoE layers and micro batches, as Megatron-LM logs it.
- :class:`ExpertLoad`: tokens routed to each expert of each layer, counted by a forward hook on every
  router (any routing scheme: the router protocol returns ``(probs, routing_map)``), summed over ranks.
- :func:`register_scalar_source`: a routing scheme (or anything else) adds ``fn() -> {name: float}``;
  it is called on every rank at each log step (it may use collectives) and its scalars go to the log
  line and TensorBoard.
- :func:`scalar_writer`: where the scalars go, on the last rank (the one with the loss): TensorBoard
  (``--tensorboard-dir``) and Weights & Biases (``--wandb-project``, offline unless ``WANDB_MODE`` says
  otherwise: nothing here waits for a login or the network; ``wandb sync`` uploads the run later).
"""

from __future__ import annotations

import math
import os
from typing import Callable, Dict, List, Optional

import torch
import torch.distributed as dist

from megatron.core.transformer.moe import moe_utils

from megatron_moe.errors import ConfigError
from megatron_moe.moe.registry import ROUTING_SCHEMES

ScalarSource = Callable[[], Dict[str, float]]
_SCALAR_SOURCES: List[ScalarSource] = []


def register_scalar_source(source: ScalarSource) -> None:
    """Adds ``source() -> {name: float}`` to what is logged every ``--log-interval`` iterations (once)."""
    if source not in _SCALAR_SOURCES:
        _SCALAR_SOURCES.append(source)


def extra_scalars() -> Dict[str, float]:
    scalars: Dict[str, float] = {}
    for source in _SCALAR_SOURCES:
        scalars.update(source())
    return scalars


def moe_aux_losses(args, num_layers: int, device: torch.device,
                   num_microbatches: Optional[int] = None) -> Dict[str, float]:
    """Mean per MoE layer and micro batch of each loss megatron-core tracked since the last call: the tracker
    sums every training micro batch's, so over a log interval this is the interval's mean, as Megatron-LM logs
    it. ``num_microbatches``: the micro batches since the last call (default: one iteration's).

    Every rank calls this at every log iteration (the reduction is collective) and reads the result on the
    host in one go; the tracker is then cleared.
    """
    if args.num_experts is None:
        return {}
    tracker = moe_utils.get_moe_layer_wise_logging_tracker()
    for name in ROUTING_SCHEMES[args.moe_router_type].tracked_losses(args):
        if name not in tracker:  # a pipeline stage without MoE layers must still join the reduction
            tracker[name] = {"values": torch.zeros(num_layers, device=device), "reduce_group": None,
                             "avg_group": None, "reduce_group_has_dp": False}
    if not tracker:
        return {}
    names = sorted(tracker)
    moe_utils.reduce_aux_losses_tracker_across_ranks(names)
    sums = torch.stack([tracker[name]["values"].float().sum() for name in names]).tolist()
    num_moe_layers = sum(args.moe_layer_pattern)
    num_microbatches = num_microbatches or args.num_microbatches
    losses = {name: total / num_moe_layers / num_microbatches for name, total in zip(names, sums)}
    moe_utils.clear_aux_losses_tracker()
    return losses


class ExpertLoad:
    """Tokens per expert per MoE layer in training forwards since the last :meth:`collect`."""

    def __init__(self, model_chunks, num_layers: int, num_experts: int, device: torch.device):
        """``model_chunks``: this rank's GPTModels (one per virtual pipeline stage); their layer numbers are
        global."""
        self.counts = torch.zeros(num_layers, num_experts, dtype=torch.float64, device=device)
        for chunk in model_chunks:
            for layer in chunk.decoder.layers:
                router = getattr(layer.mlp, "router", None)
                if router is not None:
                    router.register_forward_hook(self._hook(layer.layer_number - 1))

    def _hook(self, layer_index: int):
        def count(module, inputs, output):
            if module.training:
                routing_map = output[1]
                self.counts[layer_index] += routing_map.reshape(-1, routing_map.shape[-1]).sum(0).to(self.counts)
        return count

    def collect(self) -> Dict[int, List[float]]:
        """{layer number (1-based): tokens per expert} over all ranks; resets the counts. Collective."""
        counts = self.counts.clone()
        dist.all_reduce(counts)  # every rank routed distinct tokens (SP and CP slices, DP batches, PP layers)
        self.counts.zero_()
        return {i + 1: row for i, row in enumerate(counts.tolist()) if sum(row) > 0}  # one host read


def params_norm(model_chunks) -> float:
    """The L2 norm of all the parameters of this rank's model chunks (each counted once: tensor-parallel copies and the tied
    embedding's second copy left out), as Megatron-LM's calc_params_l2_norm takes it: dense parameters summed
    over the model-parallel group, expert parameters over the expert-model-parallel one. Collective."""
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import param_is_not_tensor_parallel_duplicate
    from megatron.core.transformer.module import param_is_not_shared

    squares = {True: [], False: []}  # dense (all-reduced over data parallel), expert
    params = [param for chunk in model_chunks for param in chunk.parameters()]
    for param in params:
        if param_is_not_tensor_parallel_duplicate(param) and param_is_not_shared(param):
            squares[getattr(param, "allreduce", True)].append(param.detach().float().square().sum())
    device = params[0].device
    dense, expert = (torch.stack(values).sum() if values else torch.zeros((), device=device)
                     for values in (squares[True], squares[False]))
    dist.all_reduce(dense, group=parallel_state.get_model_parallel_group())
    dist.all_reduce(expert, group=parallel_state.get_expert_tensor_model_pipeline_parallel_group())
    return math.sqrt((dense + expert).item())


def cuda_memory_scalars() -> Dict[str, float]:
    """Megatron-LM's --log-memory-to-tensorboard scalars (CUDA runs only)."""
    stats = torch.cuda.memory_stats()
    return {"mem-reserved-bytes": stats["reserved_bytes.all.current"],
            "mem-allocated-bytes": stats["allocated_bytes.all.current"],
            "mem-max-allocated-bytes": stats["allocated_bytes.all.peak"],
            "mem-allocated-count": stats["allocation.all.current"]}


def load_imbalance(tokens_per_expert: List[float]) -> float:
    """max / mean tokens per expert: 1.0 is perfect balance; num_experts / top-k is total collapse."""
    mean = sum(tokens_per_expert) / len(tokens_per_expert)
    return max(tokens_per_expert) / mean if mean > 0 else math.nan


class ScalarWriter:
    """TensorBoard's SummaryWriter and a W&B run behind one ``add_scalar(name, value, step)``."""

    def __init__(self, tensorboard=None, wandb_run=None):
        self.tensorboard, self.wandb_run = tensorboard, wandb_run

    def add_scalar(self, name: str, value: float, step: int) -> None:
        if self.tensorboard is not None:
            self.tensorboard.add_scalar(name, value, step)
        if self.wandb_run is not None:
            self.wandb_run.log({name: value}, step=step)

    def close(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()
        if self.wandb_run is not None:
            self.wandb_run.finish()


def scalar_writer(args) -> Optional[ScalarWriter]:
    """Where the scalars go, on the last rank (the one that has the loss); None elsewhere or without
    --tensorboard-dir and --wandb-project."""
    if dist.get_rank() != dist.get_world_size() - 1 or not (args.tensorboard_dir or args.wandb_project):
        return None
    tensorboard = open_summary_writer(args.tensorboard_dir, args.tensorboard_queue_size) if args.tensorboard_dir else None
    return ScalarWriter(tensorboard, open_wandb_run(args) if args.wandb_project else None)


def open_summary_writer(directory: str, max_queue: int = 1000):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as error:
        raise ConfigError("--tensorboard-dir needs the tensorboard package: pip install tensorboard "
                          "(or leave the flag out)") from error
    return SummaryWriter(log_dir=directory, max_queue=max_queue)


def open_wandb_run(args):
    """Megatron-LM's W&B run (project, name, entity, the whole config; files under --wandb-save-dir, default
    --save/wandb), offline unless WANDB_MODE is set: a cluster node without network or login never waits."""
    try:
        import wandb
    except ImportError as error:
        raise ConfigError("--wandb-project needs the wandb package: pip install wandb (or leave the flag out)") \
            from error
    directory = args.wandb_save_dir or os.path.join(args.save, "wandb")
    os.makedirs(directory, exist_ok=True)
    return wandb.init(dir=directory, project=args.wandb_project, name=args.wandb_exp_name, entity=args.wandb_entity,
                      config=args.to_dict(), mode=os.environ.get("WANDB_MODE", "offline"),
                      settings=wandb.Settings(silent=True, console="off", disable_git=True))


def write_scalars(writer, iteration: int, scalars: Dict[str, Optional[float]]) -> None:
    if writer is None:
        return
    for name, value in scalars.items():
        if value is not None:
            writer.add_scalar(name, value, iteration)


def write_expert_load(writer, iteration: int, load: Dict[int, List[float]]) -> None:
    """Per layer: the imbalance (max/mean), the (token, expert) assignments the routing maps held (below
    tokens x top-k when a capacity drops some) and every expert's share of them."""
    if writer is None:
        return
    for layer, tokens in load.items():
        total = sum(tokens)
        writer.add_scalar(f"expert-load/layer_{layer:02d}/assignments", total, iteration)
        writer.add_scalar(f"expert-load/layer_{layer:02d}/max_over_mean", load_imbalance(tokens), iteration)
        for expert, count in enumerate(tokens):
            writer.add_scalar(f"expert-load/layer_{layer:02d}/expert_{expert:03d}_fraction", count / total,
                              iteration)
