"""Fused chunk attention: plain PyTorch reference and Triton kernel.

Importing this package never imports Triton; the kernel module imports it
lazily and says what to install when it is missing.
"""
