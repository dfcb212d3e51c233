"""Modeling code that ``tools/convert_checkpoint.py export`` copies into Hugging Face folders (``auto_map``)."""
