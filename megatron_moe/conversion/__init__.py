"""Checkpoint conversion between megatron-moe and Hugging Face transformers, streaming one tensor at a time.

``hf_layout`` decides the class (through each routing scheme's export hook) and maps names and layouts;
``dist_files`` reads and writes our torch_dist checkpoints without a model; ``hf_files`` reads and writes
safetensors folders; ``hf_export`` and ``hf_import`` put them together. transformers, safetensors and
tokenizers are the optional ``[hf]`` extra.
"""
