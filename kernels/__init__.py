"""Triton kernels of the engine, each with a pure-torch reference of the same signature.

The references (``*_ref``) need only torch and are what the engine runs on CPU; the kernels need
triton and run on CUDA, or on CPU tensors under ``TRITON_INTERPRET=1`` (how the tests run here).
"""

from kernels._triton import HAS_TRITON
from kernels.activation import silu_and_mul, silu_and_mul_ref
from kernels.allreduce_rmsnorm import SymmetricWorkspace, all_reduce_rms_norm, all_reduce_rms_norm_ref
from kernels.attention import paged_attention, paged_attention_ref
from kernels.paged_decode import paged_decode, paged_decode_ref
from kernels.paged_prefill import paged_prefill, paged_prefill_ref
from kernels.reshape_and_cache import reshape_and_cache, reshape_and_cache_ref
from kernels.rmsnorm import fused_add_rms_norm, fused_add_rms_norm_ref, rms_norm, rms_norm_ref
from kernels.rotary import apply_rotary, apply_rotary_ref, rotary_cos_sin_cache

__all__ = [
    "HAS_TRITON",
    "SymmetricWorkspace",
    "all_reduce_rms_norm",
    "all_reduce_rms_norm_ref",
    "apply_rotary",
    "apply_rotary_ref",
    "fused_add_rms_norm",
    "fused_add_rms_norm_ref",
    "paged_attention",
    "paged_attention_ref",
    "paged_decode",
    "paged_decode_ref",
    "paged_prefill",
    "paged_prefill_ref",
    "reshape_and_cache",
    "reshape_and_cache_ref",
    "rms_norm",
    "rms_norm_ref",
    "rotary_cos_sin_cache",
    "silu_and_mul",
    "silu_and_mul_ref",
]
