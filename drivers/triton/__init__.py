"""Triton kernels for the KV ops of DESIGN.md and the model ops around attention (used by
the cuda driver).

Importing this package imports triton. To run the kernels on the CPU under the
interpreter, TRITON_INTERPRET=1 must be in the environment when these modules are first
imported: triton.jit picks interpreter or compiler at decoration time.
"""
from .attention import paged_attention
from .kv import copy_blocks, store_kv
from .norm import rms_norm, rope, silu_and_mul

__all__ = ["store_kv", "paged_attention", "copy_blocks", "rms_norm", "rope", "silu_and_mul"]
