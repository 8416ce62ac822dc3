"""Rotary position embedding (RoPE).

Two layouts of the rotated pairs inside a head's first ``rotary_dim`` features:
- NeoX style (``is_neox_style=True``, Llama/Qwen in HF): feature ``i`` pairs with ``i + rotary_dim/2``.
- Interleaved / GPT-J style (GLM): feature ``2i`` pairs with ``2i + 1``.
Pair ``i`` turns by ``position * inv_freq[i]``. Features past ``rotary_dim`` pass through
(partial rotary). The cos/sin cache is float32, ``(max_position, rotary_dim / 2)``, built as
``position * inv_freq`` in float32 like HF so the angles match it bit for bit.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from pagoda.kernels import rotary as triton_rotary
from pagoda.kernels._triton import HAS_TRITON


def default_inv_freq(rotary_dim: int, base: float) -> torch.Tensor:
    return 1.0 / (base ** (torch.arange(0, rotary_dim, 2, dtype=torch.float32) / rotary_dim))  # (rotary_dim/2,)


def llama3_inv_freq(inv_freq: torch.Tensor, scaling: dict) -> torch.Tensor:
    """Llama 3.1 scaling: long wavelengths slowed by ``factor``, short ones kept, a smooth ramp between."""
    factor = scaling["factor"]
    low_freq_factor = scaling["low_freq_factor"]
    high_freq_factor = scaling["high_freq_factor"]
    old_context_len = scaling["original_max_position_embeddings"]
    low_freq_wavelen = old_context_len / low_freq_factor
    high_freq_wavelen = old_context_len / high_freq_factor

    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_context_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


class RotaryEmbedding(nn.Module):
    def __init__(
        self,
        head_dim: int,
        rotary_dim: int,
        max_position: int,
        base: float,
        is_neox_style: bool = True,
        rope_scaling: dict | None = None,
    ):
        super().__init__()
        if rotary_dim > head_dim or rotary_dim % 2:
            raise ValueError(f"rotary_dim must be even and <= head_dim ({head_dim}), got {rotary_dim}")
        self.head_dim = head_dim
        self.rotary_dim = rotary_dim
        self.is_neox_style = is_neox_style
        inv_freq = default_inv_freq(rotary_dim, base)
        positions = torch.arange(max_position, dtype=torch.float32)
        rope_type = (rope_scaling or {}).get("rope_type", "default")
        if rope_type == "llama3":
            inv_freq = llama3_inv_freq(inv_freq, rope_scaling)
        elif rope_type == "linear":
            inv_freq = inv_freq / rope_scaling["factor"]
        elif rope_type != "default":
            raise ValueError(f"rope_type {rope_type!r} is not supported; supported: {SUPPORTED_ROPE_TYPES}")
        freqs = positions[:, None] * inv_freq[None, :]  # (max_position, rotary_dim/2)
        self.register_buffer("cos_cache", freqs.cos(), persistent=False)
        self.register_buffer("sin_cache", freqs.sin(), persistent=False)
        # the Triton kernel's layout: (max_position, rotary_dim) = cat(cos, sin), float32
        self.register_buffer("cos_sin_cache", torch.cat([freqs.cos(), freqs.sin()], dim=-1), persistent=False)

    def _rotate(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        # x: (T, H, D); cos, sin: (T, 1, rotary_dim/2) in x's dtype
        rot, rest = x[..., : self.rotary_dim], x[..., self.rotary_dim :]
        if self.is_neox_style:
            x1, x2 = rot.chunk(2, dim=-1)
            out = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
        else:
            x1, x2 = rot[..., 0::2], rot[..., 1::2]
            out = torch.stack((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).flatten(-2)
        return torch.cat((out, rest), dim=-1) if rest.shape[-1] else out

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """positions (T,); q (T, Hq, D); k (T, Hkv, D) -> rotated q, k of the same shapes."""
        if q.is_cuda and HAS_TRITON:  # rotates in place, one launch for q and k
            return triton_rotary.apply_rotary(q, k, positions, self.cos_sin_cache, self.is_neox_style)
        cos = self.cos_cache[positions].unsqueeze(1).to(q.dtype)  # (T, 1, rotary_dim/2)
        sin = self.sin_cache[positions].unsqueeze(1).to(q.dtype)
        return self._rotate(q, cos, sin), self._rotate(k, cos, sin)


def get_rope(params: dict, head_dim: int, max_position: int, is_neox_style: bool = True) -> RotaryEmbedding:
    """The rotary embedding of a model's RoPE settings (``ModelSpec.rope``: ``rope_theta``, ``rope_type``
    with its scaling keys, ``partial_rotary_factor``)."""
    rotary_dim = int(head_dim * params["partial_rotary_factor"])
    return RotaryEmbedding(
        head_dim=head_dim,
        rotary_dim=rotary_dim,
        max_position=max_position,
        base=params["rope_theta"],
        is_neox_style=is_neox_style,
        rope_scaling=params,
    )
