"""Rotary position embedding (RoPE).

Two layouts of the rotated pairs inside a head's first ``rotary_dim`` features:
- NeoX style (``is_neox_style=True``, Llama/Qwen in HF): feature ``i`` pairs with ``i + rotary_dim/2``.
- Interleaved / GPT-J style (GLM): feature ``2i`` pairs with ``2i + 1``.
Pair ``i`` turns by ``position * inv_freq[i]``. Features past ``rotary_dim`` pass through
(partial rotary). The cos/sin cache is float32, ``(max_position, rotary_dim)`` (cos of every pair, then
sin), built as ``position * inv_freq`` in float32 like HF so the angles match it bit for bit.

Off CUDA a layer rotates q and k with a handful of whole-tensor ops: one lookup in a table of each
position's (cos, -sin, sin) in the model's dtype, then per tensor ``x * cos + swap(x) * (-sin, sin)``.
Elementwise these are the products and sums of HF's ``rotate_half`` formula (negation is exact), so the
numbers are identical, at about a third of the ops: on the embedded model (2 CPU cores, bfloat16) a
layer's rotation of 12 decode tokens takes ~50 us instead of ~95, of a 2048-token prefill chunk ~1.5 ms
instead of ~5.

M-RoPE (``MRotaryEmbedding``, GLM-4.1V and Qwen2-VL): each token has three positions (temporal,
height, width) and the rotary_dim / 2 frequencies are split into consecutive sections, one per
position row: frequency ``j`` in section ``s`` turns by ``positions[s] * inv_freq[j]``. Text tokens
have three equal positions, which is plain RoPE.
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
        # (max_position, rotary_dim) = cat(cos, sin), float32: the Triton kernel's layout, read by both paths
        self.register_buffer("cos_sin_cache", torch.cat([freqs.cos(), freqs.sin()], dim=-1), persistent=False)
        # the pair axis of a head's rotary features: NeoX pairs are the two halves, GLM's are neighbours
        self.pair_dim = -2 if is_neox_style else -1
        self.pair_shape = (2, rotary_dim // 2) if is_neox_style else (rotary_dim // 2, 2)
        self._pair_tables: dict[torch.dtype, torch.Tensor] = {}  # the torch path's pair_table(cos_sin_cache)

    def pair_table(self, cos_sin: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """cos_sin (N, rotary_dim) float32 -> (N, 1, 3, rd/2) NeoX or (N, 1, rd/2, 3) GLM, in ``dtype``: each
        pair's cos, -sin, sin along the pair axis, ready to broadcast over heads."""
        cos, sin = cos_sin.to(dtype).chunk(2, dim=-1)  # (N, rd/2) each
        return torch.stack((cos, -sin, sin), dim=self.pair_dim).unsqueeze(1)

    def _positions_table(self, positions: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """``pair_table`` rows of ``positions`` (T,), from a whole table made once per dtype."""
        table = self._pair_tables.get(dtype)
        if table is None or table.device != self.cos_sin_cache.device:
            table = self._pair_tables[dtype] = self.pair_table(self.cos_sin_cache, dtype)
        return table.index_select(0, positions)

    def _rotate_qk(self, q: torch.Tensor, k: torch.Tensor, table: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """q (T, Hq, D), k (T, Hkv, D); table: ``pair_table`` rows (T, ...) in q's dtype."""
        cos, signed_sin = table.split([1, 2], dim=self.pair_dim)  # (T, 1, 1, rd/2), (T, 1, 2, rd/2) for NeoX
        return self._rotate(q, cos, signed_sin), self._rotate(k, cos, signed_sin)

    def _rotate(self, x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
        """Pair (a, b) of x (T, H, D) becomes (a cos - b sin, b cos + a sin): ``x * cos + swap(x) * (-sin, sin)``."""
        partial = self.rotary_dim < self.head_dim
        pairs = (x[..., : self.rotary_dim] if partial else x).unflatten(-1, self.pair_shape)  # (T, H, 2, rd/2) NeoX
        out = pairs * cos
        out += pairs.flip(self.pair_dim).mul_(signed_sin)
        out = out.flatten(-2)  # (T, H, rotary_dim)
        return torch.cat((out, x[..., self.rotary_dim :]), dim=-1) if partial else out

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """positions (T,); q (T, Hq, D); k (T, Hkv, D) -> rotated q, k of the same shapes."""
        if q.is_cuda and HAS_TRITON:  # rotates in place, one launch for q and k
            return triton_rotary.apply_rotary(q, k, positions, self.cos_sin_cache, self.is_neox_style)
        return self._rotate_qk(q, k, self._positions_table(positions, q.dtype))


class MRotaryEmbedding(RotaryEmbedding):
    """RoPE over three position rows; ``mrope_section`` sizes the frequency sections (sums to rotary_dim / 2)."""

    def __init__(
        self,
        head_dim: int,
        rotary_dim: int,
        max_position: int,
        base: float,
        is_neox_style: bool,
        rope_scaling: dict | None,
        mrope_section: tuple[int, ...],
    ):
        super().__init__(head_dim, rotary_dim, max_position, base, is_neox_style, rope_scaling)
        if sum(mrope_section) != rotary_dim // 2:
            raise ValueError(f"mrope_section {list(mrope_section)} must sum to rotary_dim / 2 = {rotary_dim // 2}")
        self.num_sections = len(mrope_section)
        section = torch.repeat_interleave(torch.arange(self.num_sections), torch.tensor(mrope_section))
        # for each column of cos_sin_cache (cos then sin of every frequency): the position row it reads
        self.register_buffer("column_section", torch.cat([section, section]), persistent=False)  # (rotary_dim,)
        self.register_buffer("columns", torch.arange(rotary_dim), persistent=False)

    def cos_sin_table(self, positions: torch.Tensor) -> torch.Tensor:
        """positions (S, T), one row per section -> (T, rotary_dim) float32: each token's cos ‖ sin,
        each frequency taken at its section's position."""
        rows = positions[self.column_section].T.contiguous()  # (T, rotary_dim): the position each column reads
        return self.cos_sin_cache[rows, self.columns]  # contiguous like rows, as the Triton kernel needs

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """positions (S, T), or (T,) for S equal rows; q (T, Hq, D); k (T, Hkv, D) -> rotated q, k."""
        if positions.dim() == 1:
            return super().forward(positions, q, k)
        if positions.shape[0] != self.num_sections:
            raise ValueError(f"M-RoPE positions must have {self.num_sections} rows, got shape {tuple(positions.shape)}")
        table = self.cos_sin_table(positions)  # (T, rotary_dim)
        if q.is_cuda and HAS_TRITON:  # the kernel reads row positions[t] of its cache: here row t of the table
            token_rows = torch.arange(table.shape[0], device=q.device)
            return triton_rotary.apply_rotary(q, k, token_rows, table, self.is_neox_style)
        return self._rotate_qk(q, k, self.pair_table(table, q.dtype))


def get_rope(params: dict, head_dim: int, max_position: int, is_neox_style: bool = True) -> RotaryEmbedding:
    """The rotary embedding of a model's RoPE settings (``ModelSpec.rope``: ``rope_theta``, ``rope_type``
    with its scaling keys, ``partial_rotary_factor``, and ``mrope_section`` for M-RoPE)."""
    rotary_dim = int(head_dim * params["partial_rotary_factor"])
    args = (head_dim, rotary_dim, max_position, params["rope_theta"], is_neox_style, params)
    if params.get("mrope_section"):
        return MRotaryEmbedding(*args, mrope_section=tuple(params["mrope_section"]))
    return RotaryEmbedding(*args)
