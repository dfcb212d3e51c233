"""LayerNorm and RMSNorm that work under sequence parallelism.

megatron-core's local spec uses torch's norms, which refuse ``sequence_parallel``; on GPU clusters apex's or
Transformer Engine's fused norms fill that role. Under sequence parallelism each tensor-parallel rank
normalises its own slice of the sequence with a replicated weight, so the weight's gradient is partial:
marking it ``sequence_parallel`` makes megatron-core's ``finalize_model_grads`` all-reduce it over the
tensor-parallel group.

With ``--apply-layernorm-1p`` (megatron-core's ``layernorm_zero_centered_gamma``) the weight is zero-centred:
it starts at 0 and the norm scales by ``1 + weight``, as Transformer Engine's and apex's norms do.
"""

import torch
from torch import nn

from megatron.core.transformer.transformer_config import TransformerConfig


class _SequenceParallelNorm(nn.Module):
    def __init__(self, config: TransformerConfig, hidden_size: int, eps: float = 1e-5, with_bias: bool = True):
        super().__init__()
        self.eps = eps
        self.zero_centered_gamma = config.layernorm_zero_centered_gamma
        initial = torch.zeros if self.zero_centered_gamma else torch.ones
        self.weight = nn.Parameter(initial(hidden_size, dtype=config.params_dtype))
        self.bias = nn.Parameter(torch.zeros(hidden_size, dtype=config.params_dtype)) if with_bias else None
        for param in self.parameters():
            param.sequence_parallel = config.sequence_parallel

    def scale(self) -> torch.Tensor:
        return self.weight + 1 if self.zero_centered_gamma else self.weight


class LayerNorm(_SequenceParallelNorm):
    def __init__(self, config: TransformerConfig, hidden_size: int, eps: float = 1e-5):
        super().__init__(config, hidden_size, eps, with_bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.layer_norm(x, self.weight.shape, self.scale(), self.bias, self.eps)


class RMSNorm(_SequenceParallelNorm):
    def __init__(self, config: TransformerConfig, hidden_size: int, eps: float = 1e-5):
        super().__init__(config, hidden_size, eps, with_bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.rms_norm(x, self.weight.shape, self.scale(), self.eps)


def norm_class(normalization: str) -> type:
    return {"LayerNorm": LayerNorm, "RMSNorm": RMSNorm}[normalization]
