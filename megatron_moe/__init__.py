"""megatron-moe: GPT mixture-of-experts pretraining on megatron-core with BASE and SAM routing."""

import warnings

__version__ = "0.1.0"

# megatron-core announces each fallback it takes when Apex / Transformer Engine are absent, once per module;
# without them (the CPU path) the fallbacks are the intended code, so the notices are only noise.
for _notice in (r"Apex is not installed", r"Transformer Engine and Apex are not installed",
                r"full scope is deprecated"):
    warnings.filterwarnings("ignore", message=_notice, category=UserWarning)
# megatron-core 0.16.1 still calls torch.distributed's renamed collectives (all_gather_into_tensor, ...)
warnings.filterwarnings("ignore", message=r"`torch\.distributed\.\w+` is deprecated", category=FutureWarning)
