"""megatron-moe: GPT mixture-of-experts pretraining on megatron-core with BASE and SAM routing."""

__version__ = "0.1.0"
