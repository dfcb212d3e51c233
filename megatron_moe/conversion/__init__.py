"""Checkpoint conversion between megatron-moe and Hugging Face transformers.

``hf_layout`` maps parameter names and tensor layouts (no transformers import); ``hf_export`` and
``hf_import`` read and write the folders. transformers and safetensors are the optional ``[hf]`` extra.
"""
