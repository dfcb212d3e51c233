"""megatron-moe: GPT mixture-of-experts pretraining on megatron-core with BASE and SAM routing.

Importing the package stays light (no torch, no megatron-core): the preprocessing tools import it and must
start in a fraction of a second. ``balanced_assignment`` is loaded on first use.
"""

import warnings

__version__ = "0.1.0"
__all__ = ["balanced_assignment"]

# megatron-core announces each fallback it takes when Apex / Transformer Engine are absent, once per module;
# without them (the CPU path) the fallbacks are the intended code, so the notices are only noise.
for _notice in (r"Apex is not installed", r"Transformer Engine and Apex are not installed",
                r"full scope is deprecated"):
    warnings.filterwarnings("ignore", message=_notice, category=UserWarning)
# megatron-core 0.16.1 still calls torch.distributed's renamed collectives (all_gather_into_tensor, ...)
warnings.filterwarnings("ignore", message=r"`torch\.distributed\.\w+` is deprecated", category=FutureWarning)


def __getattr__(name):
    if name == "balanced_assignment":
        from megatron_moe.moe.balanced_assignment import balanced_assignment

        return balanced_assignment
    raise AttributeError(f"module 'megatron_moe' has no attribute {name!r}")
