"""Mixture-of-experts routing: the scheme registry, and the BASE and SAM schemes that plug into it."""
