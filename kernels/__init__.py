"""Triton kernels, each with a plain-PyTorch reference of the same signature.

This package imports nothing from ``engine`` or ``chatapp``."""
