"""Run in a fresh interpreter: reports which compat pieces megatron-core still needs, then applies them
and exercises each covered call site on the CPU. Prints one JSON object."""

import json
import os
import types

import numpy
import torch
import torch.distributed as dist

from megatron_moe import platform

report = {"needed": {p.name: p.needed() for p in platform.CPU_COMPAT_PIECES}}
report["needed"][platform.TRANSFORMER_ENGINE_ABSENT_PIECE.name] = platform.TRANSFORMER_ENGINE_ABSENT_PIECE.needed()

os.environ.pop("RANK", None)
platform.init_distributed(platform.select_platform("cpu"))
works = report["works"] = {}

from megatron.core.transformer.utils import get_default_causal_mask

works["cuda-device-literals"] = get_default_causal_mask(3).device.type == "cpu"

from megatron.core.optimizer.clip_grads import clip_grad_by_total_norm_fp32

param = torch.nn.Parameter(torch.ones(4))
param.grad = torch.full((4,), 2.0)
clip_grad_by_total_norm_fp32([param], max_norm=1.0, total_norm=4.0)
works["cuda-device-literals"] &= torch.allclose(param.grad, torch.full((4,), 0.5), atol=1e-5)

works["cuda-runtime"] = torch.empty(2, device=torch.cuda.current_device()).device.type == "cpu"
with torch.cuda.stream(torch.cuda.Stream()):
    torch.cuda.current_stream().record_event().synchronize()

from megatron.core import parallel_state, tensor_parallel

parallel_state.initialize_model_parallel()
tensor_parallel.model_parallel_cuda_manual_seed(7)
tracker = tensor_parallel.get_cuda_rng_tracker()
before = torch.get_rng_state()
with tracker.fork():
    first = torch.rand(3)
tensor_parallel.model_parallel_cuda_manual_seed(7)
with tracker.fork():
    again = torch.rand(3)
works["cuda-rng"] = torch.equal(first, again) and torch.equal(torch.get_rng_state(), before)

out = torch.empty(3)
dist.all_to_all_single(out, torch.arange(3.0), numpy.array([3]), torch.tensor([3]))
works["all-to-all-split-sizes"] = torch.equal(out, torch.arange(3.0))

gathered = [torch.empty(2, 2)]
dist.all_gather(gathered, torch.ones(2, 2))
works["uneven-all-gather"] = torch.equal(gathered[0], torch.ones(2, 2))

from megatron.core.transformer.moe import moe_utils

logits = moe_utils.router_gating_linear(torch.ones(2, 4), torch.ones(3, 4), None, torch.float32)
works["router-gemm-without-te"] = logits.shape == (2, 3)

from megatron.core.transformer.moe.router import TopKRouter

counts = torch.zeros(3)
router = types.SimpleNamespace(enable_expert_bias=True, local_tokens_per_expert=counts)
with torch.enable_grad():
    TopKRouter._apply_expert_bias(router, torch.tensor([[True, False, True], [True, False, False]]))
works["eager-expert-bias-update"] = (torch.equal(counts, torch.tensor([2.0, 0.0, 1.0]))
                                     and not platform._expert_bias_update_is_compiled())

from megatron.core.pipeline_parallel import p2p_communication
from megatron.core.pipeline_parallel.schedules import deallocate_output_tensor

output, sent, isend = torch.arange(4096.0) * 2, [], dist.isend
dist.isend = lambda tensor, **kwargs: sent.append(tensor)  # what gloo would read from its thread, later
try:
    p2p_communication._p2p_ops(tensor_send_prev=None, tensor_recv_prev=None, tensor_send_next=output,
                               tensor_recv_next=None, group=dist.group.WORLD, prev_pipeline_rank=0,
                               next_pipeline_rank=0)
finally:
    dist.isend = isend
deallocate_output_tensor(output, deallocate_pipeline_outputs=True)
works["overlapped-sends-keep-their-memory"] = (output.numel() == 1 and len(sent) == 1
                                               and torch.equal(sent[0], torch.arange(4096.0) * 2))

print(json.dumps(report))
