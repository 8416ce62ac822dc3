"""GLM-4.1V's vision tower (HF ``Glm4vVisionModel``): image patches -> image token embeddings.

An image of t x h x w patches (``grid_thw``) becomes t*h*w / merge**2 rows of the text model's
width: patch embedding (HF's Conv3d over one patch, done here as a linear layer over the flattened
patch), RMSNorm, learned position embeddings bicubically resized to the image's grid, ``depth``
pre-norm transformer blocks with 2-D rotary attention, RMSNorm, a merge of each 2x2 window of
patches (HF's Conv2d, here a linear layer over the window) and the merger MLP.

Invariants:
- The tower is replicated, not split: every tensor-parallel rank holds all of it (plain unsharded
  linear layers) and encodes the same images to the same rows.
- Pixel rows arrive in the processor's order: per image, t frames of h*w patches, each row one patch
  flattened as (C, temporal_patch, patch, patch); within a frame the patches go window by window
  (``merge x merge`` windows in row-major order, the patches of one window consecutive, row-major),
  so merging a window is a reshape of merge**2 consecutive rows.
- Attention is bidirectional within one frame of one image and never crosses frames or images.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from pagoda.engine.layers.activation import SiluAndMul
from pagoda.engine.layers.layernorm import RMSNorm
from pagoda.engine.layers.linear import LinearBase, MergedColumnParallelLinear, _copy_checked, default_weight_loader
from pagoda.engine.models.spec import VisionSpec


def _loadable(module: nn.Module) -> nn.Module:
    """A plain torch module's parameters, frozen and filled by ``default_weight_loader`` (as pagoda's layers are)."""
    for param in module.parameters():
        param.requires_grad_(False)
        param.weight_loader = default_weight_loader
    return module


class ConvAsLinear(LinearBase):
    """A convolution whose stride equals its kernel, applied to one flattened kernel window per row.

    The checkpoint holds the conv weight ``(out, in_channels, *kernel)``; the loader flattens it to
    ``(out, in_channels * prod(kernel))`` for rows laid out channels first (``channels_last=False``,
    the patch embedding's (C, t, p, p) rows) or ``(out, prod(kernel) * in_channels)`` for rows laid
    out channels last (the window merge's (merge, merge, hidden) rows).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel: tuple[int, ...], channels_last: bool):
        numel = in_channels
        for size in kernel:
            numel *= size
        super().__init__(numel, out_channels, bias=True)
        self.conv_shape = (out_channels, in_channels, *kernel)
        self.channels_last = channels_last

    def weight_loader(self, param: nn.Parameter, loaded_weight: torch.Tensor, shard_id=None) -> None:
        if shard_id is not None:
            raise ValueError(f"{type(self).__name__} has no shards, got shard_id={shard_id!r}")
        if loaded_weight.dim() == 1:  # the bias
            return _copy_checked(param.data, loaded_weight)
        if tuple(loaded_weight.shape) != self.conv_shape:
            raise ValueError(f"checkpoint tensor has shape {tuple(loaded_weight.shape)}, expected {self.conv_shape}")
        if self.channels_last:
            loaded_weight = loaded_weight.movedim(1, -1)
        _copy_checked(param.data, loaded_weight.reshape(param.shape))


def patch_coords(grid_thw: Sequence[tuple[int, int, int]], merge: int, device: torch.device) -> torch.Tensor:
    """(sum t*h*w, 2) int64 (row, column) of every patch in the processor's window-by-window order."""
    coords = []
    for t, h, w in grid_thw:
        rows, cols = torch.meshgrid(torch.arange(h, device=device), torch.arange(w, device=device), indexing="ij")
        windows = (h // merge, merge, w // merge, merge)  # window row, row in window, window col, col in window
        rows = rows.reshape(windows).transpose(1, 2).flatten()
        cols = cols.reshape(windows).transpose(1, 2).flatten()
        coords.append(torch.stack([rows, cols], dim=-1).repeat(t, 1))  # (t*h*w, 2)
    return torch.cat(coords)


class VisionEmbeddings(nn.Module):
    """Learned (S, S) position embeddings, resampled bicubically at each patch's centre in its image."""

    def __init__(self, spec: VisionSpec):
        super().__init__()
        self.position_embedding = _loadable(nn.Embedding(spec.num_position_embeddings, spec.hidden_size))
        self.side = int(spec.num_position_embeddings**0.5)

    def forward(self, x: torch.Tensor, coords: torch.Tensor, grid_thw: Sequence[tuple[int, int, int]]) -> torch.Tensor:
        """x (N, E) patch embeddings; coords (N, 2) (row, column) -> x plus each patch's position embedding."""
        weight = self.position_embedding.weight  # (S*S, E)
        table = weight.float().view(self.side, self.side, -1).permute(2, 0, 1).unsqueeze(0)  # (1, E, S, S)
        sizes = torch.tensor([(h, w) for _, h, w in grid_thw], dtype=torch.float32, device=x.device)
        counts = torch.tensor([t * h * w for t, h, w in grid_thw], device=x.device)
        sizes = sizes.repeat_interleave(counts, dim=0)  # (N, 2): each patch's image (h, w)
        centres = (coords + 0.5) / sizes * 2 - 1  # (N, 2) in [-1, 1]: (row, column)
        grid = centres.flip(-1).view(1, -1, 1, 2)  # grid_sample wants (x, y) = (column, row)
        pos = F.grid_sample(table, grid, mode="bicubic", align_corners=False, padding_mode="border")  # (1, E, N, 1)
        return x + pos[0, :, :, 0].T.to(weight.dtype)


class VisionRotary(nn.Module):
    """2-D RoPE over the whole head: a quarter of the frequencies turn by the row, a quarter by the column,
    laid out NeoX style (feature i pairs with i + head_dim/2)."""

    def __init__(self, head_dim: int, theta: float):
        super().__init__()
        half = head_dim // 2
        inv_freq = 1.0 / theta ** (torch.arange(0, half, 2, dtype=torch.float32) / half)  # (head_dim/4,)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, coords: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """coords (N, 2) -> cos, sin (N, 1, head_dim) float32."""
        angles = (coords.float()[..., None] * self.inv_freq).flatten(1)  # (N, head_dim/2): rows' then columns'
        angles = torch.cat([angles, angles], dim=-1).unsqueeze(1)  # (N, 1, head_dim)
        return angles.cos(), angles.sin()


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """NeoX rotation in float32, back in x's dtype; x (N, H, D)."""
    x32 = x.float()
    x1, x2 = x32.chunk(2, dim=-1)
    return (x32 * cos + torch.cat([-x2, x1], dim=-1) * sin).to(x.dtype)


class VisionAttention(nn.Module):
    def __init__(self, spec: VisionSpec):
        super().__init__()
        self.num_heads = spec.num_heads
        self.head_dim = spec.hidden_size // spec.num_heads
        self.qkv = LinearBase(spec.hidden_size, 3 * spec.hidden_size, bias=spec.attention_bias)
        self.proj = LinearBase(spec.hidden_size, spec.hidden_size, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, seq_lens: list[int]) -> torch.Tensor:
        """x (N, E); cos, sin (N, 1, D); ``seq_lens`` split the N rows into frames -> (N, E)."""
        q, k, v = self.qkv(x).view(x.shape[0], 3, self.num_heads, self.head_dim).unbind(1)  # (N, H, D) each
        q, k = _rotate(q, cos, sin), _rotate(k, cos, sin)
        out = []
        # One SDPA call per frame, without a mask, so CUDA bf16 takes the flash kernel.
        for fq, fk, fv in zip(q.split(seq_lens), k.split(seq_lens), v.split(seq_lens), strict=True):
            fq, fk, fv = (t.transpose(0, 1).unsqueeze(0) for t in (fq, fk, fv))  # (1, H, L, D)
            out.append(F.scaled_dot_product_attention(fq, fk, fv)[0].transpose(0, 1).flatten(1))  # (L, E)
        return self.proj(torch.cat(out))


class VisionMLP(nn.Module):
    """SwiGLU: ``down(silu(gate(x)) * up(x))``, gate and up in one matrix."""

    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.gate_up_proj = MergedColumnParallelLinear(hidden_size, [intermediate_size] * 2, bias=False)
        self.down_proj = LinearBase(intermediate_size, hidden_size, bias=False)
        self.act_fn = SiluAndMul()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_up_proj(x)))


class VisionBlock(nn.Module):
    def __init__(self, spec: VisionSpec):
        super().__init__()
        self.norm1 = RMSNorm(spec.hidden_size, eps=spec.rms_norm_eps)
        self.norm2 = RMSNorm(spec.hidden_size, eps=spec.rms_norm_eps)
        self.attn = VisionAttention(spec)
        self.mlp = VisionMLP(spec.hidden_size, spec.mlp_size)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, seq_lens: list[int]) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), cos, sin, seq_lens)
        return x + self.mlp(self.norm2(x))


class PatchMerger(VisionMLP):
    """The merged windows into the text model's embedding space: linear, LayerNorm, GELU, then SwiGLU."""

    def __init__(self, dim: int, intermediate_size: int):
        super().__init__(dim, intermediate_size)
        self.proj = LinearBase(dim, dim, bias=False)
        self.post_projection_norm = _loadable(nn.LayerNorm(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(F.gelu(self.post_projection_norm(self.proj(x))))


class PatchEmbed(nn.Module):
    def __init__(self, spec: VisionSpec):
        super().__init__()
        kernel = (spec.temporal_patch_size, spec.patch_size, spec.patch_size)
        self.proj = ConvAsLinear(spec.in_channels, spec.hidden_size, kernel, channels_last=False)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.proj(pixels.to(self.proj.weight.dtype))  # (N, C*t*p*p) -> (N, E)


class Glm4vVisionModel(nn.Module):
    """Parameter names follow HF's ``model.visual`` (the merger's gate/up fused as elsewhere)."""

    def __init__(self, spec: VisionSpec):
        super().__init__()
        self.spec = spec
        self.merge = spec.spatial_merge_size
        self.patch_embed = PatchEmbed(spec)
        self.post_conv_layernorm = RMSNorm(spec.hidden_size, eps=spec.rms_norm_eps)
        self.embeddings = VisionEmbeddings(spec)
        self.rotary_pos_emb = VisionRotary(spec.hidden_size // spec.num_heads, spec.rope_theta)
        self.blocks = nn.ModuleList([VisionBlock(spec) for _ in range(spec.depth)])
        self.post_layernorm = RMSNorm(spec.hidden_size, eps=spec.rms_norm_eps)
        window = (self.merge, self.merge)
        self.downsample = ConvAsLinear(spec.hidden_size, spec.out_hidden_size, window, channels_last=True)
        self.merger = PatchMerger(spec.out_hidden_size, spec.merger_size)

    def forward(self, pixel_values: torch.Tensor, grid_thw: Sequence[tuple[int, int, int]]) -> list[torch.Tensor]:
        """See ``SupportsImages.encode_images``: (sum t*h*w, C*t*p*p) -> one (t*h*w / merge**2, out) per image."""
        grid_thw = [tuple(int(n) for n in g) for g in grid_thw]
        num_patches = sum(t * h * w for t, h, w in grid_thw)
        if pixel_values.shape[0] != num_patches:
            raise ValueError(f"pixel_values has {pixel_values.shape[0]} rows, grid_thw {grid_thw} needs {num_patches}")
        if any(h % self.merge or w % self.merge for _, h, w in grid_thw):
            raise ValueError(f"every grid's h and w must be multiples of spatial_merge_size {self.merge}: {grid_thw}")
        coords = patch_coords(grid_thw, self.merge, pixel_values.device)  # (N, 2)
        x = self.post_conv_layernorm(self.patch_embed(pixel_values))  # (N, E)
        x = self.embeddings(x, coords, grid_thw)
        cos, sin = self.rotary_pos_emb(coords)
        frames = [h * w for t, h, w in grid_thw for _ in range(t)]
        for block in self.blocks:
            x = block(x, cos, sin, frames)
        x = self.post_layernorm(x)
        x = self.downsample(x.view(-1, self.merge * self.merge * x.shape[-1]))  # (N / merge**2, out)
        x = self.merger(x)
        return list(x.split([t * h * w // self.merge**2 for t, h, w in grid_thw]))
