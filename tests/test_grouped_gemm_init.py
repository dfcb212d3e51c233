"""--moe-grouped-gemm initialises the same experts as megatron's SequentialMLP, whatever the layout.

Transformer Engine is CUDA-only, so the TEGroupedMLP parameters are mimicked: local expert i's matrices are
``experts.linear_fc1.weight{i}`` / ``experts.linear_fc2.weight{i}``, each marked (as TE's GroupedLinear marks
them under expert parallelism) as split on dim 0 with expert tensor parallelism, though megatron splits fc2
on dim 1. Expert-parallel rank 1 of 2, expert-tensor-parallel rank 1 of 2, must hold exactly its slice of
the one-process SequentialMLP experts 2 and 3 (SwiGLU fc1: gate and up halves split separately).
"""

from types import SimpleNamespace

import torch
from torch import nn

from megatron.core import parallel_state
from megatron_moe.model import initialize_weights

HIDDEN, FFN, EXPERTS, LAYERS = 8, 6, 4, 2
CONFIG = SimpleNamespace(init_method_std=0.02, num_layers=LAYERS, gated_linear_unit=True)


def marked(shape, dim):
    param = nn.Parameter(torch.empty(shape))
    param.tensor_model_parallel, param.partition_dim = True, dim
    return param


def model_with(experts, local_expert_indices):
    layer = nn.Module()
    layer.layer_number = 2  # global layer 1: the name carries it
    layer.mlp = nn.Module()
    layer.mlp.local_expert_indices = local_expert_indices
    layer.mlp.experts = experts
    model = nn.Module()
    model.share_embeddings_and_output_weights = False
    model.decoder = nn.Module()
    model.decoder.layers = nn.ModuleList([layer])
    return model


def sequential_one_process():
    experts = nn.Module()
    experts.local_experts = nn.ModuleList()
    for _ in range(EXPERTS):
        expert = nn.Module()
        expert.linear_fc1, expert.linear_fc2 = nn.Module(), nn.Module()
        expert.linear_fc1.weight = marked((2 * FFN, HIDDEN), 0)
        expert.linear_fc2.weight = marked((HIDDEN, FFN), 1)
        experts.local_experts.append(expert)
    return model_with(experts, list(range(EXPERTS)))


def grouped_on_rank_1(etp_size):
    experts = nn.Module()
    experts.linear_fc1, experts.linear_fc2 = nn.Module(), nn.Module()
    for i in range(2):
        experts.linear_fc1.register_parameter(f"weight{i}", marked((2 * FFN // etp_size, HIDDEN), 0))
        experts.linear_fc2.register_parameter(f"weight{i}", marked((HIDDEN, FFN // etp_size), 0))
    return model_with(experts, [2, 3])


def initialized(model, monkeypatch, etp_rank, etp_size):
    for name, value in (("tensor_model_parallel_rank", 0), ("tensor_model_parallel_world_size", 1),
                        ("expert_tensor_parallel_rank", etp_rank),
                        ("expert_tensor_parallel_world_size", etp_size)):
        monkeypatch.setattr(parallel_state, f"get_{name}", lambda value=value: value)
    initialize_weights(model, CONFIG, seed=1234)
    return model


def test_grouped_experts_equal_sequential_experts(monkeypatch):
    reference = initialized(sequential_one_process(), monkeypatch, 0, 1).decoder.layers[0].mlp.experts
    for etp_size in (1, 2):
        rank = etp_size - 1
        grouped = initialized(grouped_on_rank_1(etp_size), monkeypatch, rank, etp_size).decoder.layers[0].mlp.experts
        for local, expert in enumerate((2, 3)):
            fc1 = reference.local_experts[expert].linear_fc1.weight
            gate, up = (half.chunk(etp_size, 0)[rank] for half in fc1.chunk(2, 0))
            assert torch.equal(getattr(grouped.linear_fc1, f"weight{local}"), torch.cat([gate, up]))
            fc2 = reference.local_experts[expert].linear_fc2.weight.chunk(etp_size, 1)[rank]
            assert torch.equal(getattr(grouped.linear_fc2, f"weight{local}"), fc2)
    # fc2 is an output projection: megatron's scaled std, not the input projections' one
    assert reference.local_experts[0].linear_fc2.weight.std() < 0.6 * reference.local_experts[0].linear_fc1.weight.std()
