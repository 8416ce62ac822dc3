"""Linear layers with the standard tensor-parallel names.

Invariants:
- Weights are stored like ``nn.Linear``: ``(out_features, in_features)``; ``forward`` is ``F.linear``.
  Each rank stores only its part: column-parallel layers ``(out / tp, in)``, row-parallel layers
  ``(out, in / tp)``.
- Every parameter carries a ``weight_loader(param, loaded_weight, shard_id=None)`` that receives
  the FULL checkpoint tensor. Fusing HF's separate q/k/v (or gate/up) tensors into one matrix and
  cutting out this rank's slice happen there and nowhere else.
- Column-parallel outputs stay split (the next row-parallel layer consumes them split); a
  row-parallel layer all-reduces its partial sums and adds its bias once, after the reduce, or,
  built with ``reduce_results=False``, returns this rank's partial sum for the caller to reduce
  (the decoders fuse that all-reduce into the next RMSNorm).
- ``tp`` is the layer's ``TPGroup``; None means a single rank (every collective a no-op).
- On CPU the worker packs every weight for oneDNN once loaded (``pack_cpu_weight``, ``cpu_gemm.py``);
  the plain weight is then dropped and ``forward`` reads the packed copy.
- FP8 (``fp8.py``): a layer whose ``weight_scale`` is set holds a float8_e4m3fn weight with one float32
  scale per local output row, and maybe a static ``input_scale``; it gets there by ``quantize_fp8``
  (a loaded float weight) or ``expect_fp8_checkpoint`` (before loading an FP8 checkpoint, whose scales
  load through the same sharding as a bias).
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from pagoda.engine.distributed import SINGLE_RANK, TPGroup
from pagoda.engine.layers.cpu_gemm import pack_weight, packed_linear
from pagoda.engine.layers.fp8 import FP8_DTYPE, Fp8Rows, fp8_linear, quantize_rows


def divide(total: int, parts: int, what: str) -> int:
    if total % parts:
        raise ValueError(f"{what} ({total}) must be divisible by the tensor-parallel size ({parts})")
    return total // parts


class LinearBase(nn.Module):
    """``y = x @ W.T + b`` whose parameters know how to load themselves from a checkpoint.

    ``local_in``/``local_out`` are this rank's parameter sizes; ``input_size``/``output_size`` the
    full (unsharded) ones.
    """

    tp_dim: int | None = None  # which weight dim is split across ranks; None means replicated

    def __init__(
        self,
        input_size: int,
        output_size: int,
        bias: bool = False,
        tp: TPGroup | None = None,
        local_in: int | None = None,
        local_out: int | None = None,
    ):
        super().__init__()
        self.tp = tp or SINGLE_RANK
        self.tp_rank, self.tp_size = self.tp.rank, self.tp.world_size
        self.input_size = input_size
        self.output_size = output_size
        local_in = input_size if local_in is None else local_in
        local_out = output_size if local_out is None else local_out
        self.weight = nn.Parameter(torch.empty(local_out, local_in), requires_grad=False)
        self.weight.weight_loader = self.weight_loader
        if bias:
            self.bias = nn.Parameter(torch.empty(local_out), requires_grad=False)
            self.bias.weight_loader = self.weight_loader
        else:
            self.register_parameter("bias", None)
        self.packed_weight: torch.Tensor | None = None  # oneDNN's copy of the weight, once packed (CPU)
        self.register_parameter("weight_scale", None)  # (local_out,) float32 once the weight is FP8
        self.register_parameter("input_scale", None)  # () float32: a checkpoint's static activation scale

    def _shard(self, loaded: torch.Tensor, dim: int | None) -> torch.Tensor:
        """This rank's equal slice of a full checkpoint tensor along ``dim``."""
        if dim is None or self.tp_size == 1 or dim >= loaded.dim():
            return loaded
        size = loaded.shape[dim] // self.tp_size
        return loaded.narrow(dim, self.tp_rank * size, size)

    def weight_loader(self, param: nn.Parameter, loaded_weight: torch.Tensor, shard_id=None) -> None:
        if shard_id is not None:
            raise ValueError(f"{type(self).__name__} has no shards, got shard_id={shard_id!r}")
        _copy_checked(param.data, self._shard(loaded_weight, self.tp_dim))

    def pack_cpu_weight(self) -> bool:
        """Pack the loaded weight for oneDNN and drop the plain one (no reload afterwards); False
        where it cannot be packed (then nothing changes)."""
        packed = pack_weight(self.weight)
        if packed is None:
            return False
        self.packed_weight = packed
        self.weight.data = self.weight.data.new_empty(0)  # keeps dtype and device for whoever asks the parameters
        return True

    def quantize_fp8(self) -> None:
        """Quantize the loaded weight to FP8 with one scale per output row, in place."""
        weight, scale = quantize_rows(self.weight.data)
        self.weight.data = weight
        self.weight_scale = self._frozen(scale, self.weight_scale_loader)

    def expect_fp8_checkpoint(self, static_input_scale: bool) -> None:
        """Ready the parameters for an FP8 checkpoint: a float8 weight, its ``weight_scale`` (per row or
        per tensor in the file) and, with ``static_input_scale``, the activations' ``input_scale``."""
        weight = self.weight.data
        self.weight.data = torch.empty(weight.shape, dtype=FP8_DTYPE, device=weight.device)
        self.weight_scale = self._frozen(
            torch.empty(weight.shape[0], dtype=torch.float32, device=weight.device), self.weight_scale_loader
        )
        if static_input_scale:  # loaded as the largest of the parts' scales
            self.input_scale = self._frozen(torch.zeros((), device=weight.device), self.input_scale_loader)

    @staticmethod
    def _frozen(data: torch.Tensor, loader) -> nn.Parameter:
        param = nn.Parameter(data, requires_grad=False)
        param.weight_loader = loader
        return param

    def checkpoint_rows(self, shard_id=None) -> int:
        """Output rows of the checkpoint tensor ``shard_id`` names (all ranks' rows)."""
        if shard_id is not None:
            raise ValueError(f"{type(self).__name__} has no shards, got shard_id={shard_id!r}")
        return self.output_size

    def weight_scale_loader(self, param: nn.Parameter, loaded_weight: torch.Tensor, shard_id=None) -> None:
        """A checkpoint's weight scale, one per tensor or one per output row; split like a bias."""
        rows = self.checkpoint_rows(shard_id)
        scale = loaded_weight.float().reshape(-1)
        if scale.numel() == 1:
            scale = scale.expand(rows)
        elif scale.numel() != rows:
            raise ValueError(
                f"weight_scale has {scale.numel()} values, expected 1 (per tensor) or {rows} (per output row); "
                f"block-wise scales are not supported"
            )
        self.weight_loader(param, scale, shard_id)

    def input_scale_loader(self, param: nn.Parameter, loaded_weight: torch.Tensor, shard_id=None) -> None:
        """A checkpoint's static activation scale (one per tensor); a fused layer keeps its parts' largest."""
        self.checkpoint_rows(shard_id)  # a shard this layer has
        if loaded_weight.numel() != 1:
            raise ValueError(f"input_scale must be one value per tensor, got shape {tuple(loaded_weight.shape)}")
        param.data = torch.maximum(param.data, loaded_weight.float().reshape(()).to(param.device))

    def linear(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """``x @ W.T + bias`` on this rank's weight: FP8, packed or plain."""
        if self.weight_scale is not None:
            return fp8_linear(x, self.weight, self.weight_scale, bias, self.input_scale)
        if isinstance(x, Fp8Rows):
            raise TypeError("FP8 activations reached a layer with a float weight (an RMSNorm's fp8_output "
                            "set for a reader that is not an FP8 layer)")
        if self.packed_weight is not None:
            return packed_linear(x, self.packed_weight, bias)
        return F.linear(x, self.weight, bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x, self.bias)


class ColumnParallelLinear(LinearBase):
    """Output features split across ranks (dim 0 of the weight, and the bias); each rank keeps its part of y."""

    tp_dim = 0

    def __init__(self, input_size: int, output_size: int, bias: bool = False, tp: TPGroup | None = None):
        tp = tp or SINGLE_RANK
        local_out = divide(output_size, tp.world_size, "output_size")
        super().__init__(input_size, output_size, bias, tp, local_out=local_out)


class RowParallelLinear(LinearBase):
    """Input features split across ranks (dim 1 of the weight); partial outputs are summed.

    The bias is not split: it is added once, after the all-reduce (adding it on every rank would
    count it tp times). With ``reduce_results=False`` the layer returns this rank's partial sum,
    with the bias added on rank 0 only, and the CALLER must all-reduce it (every rank, same shapes)
    before the output means anything: the decoders hand it to ``RMSNorm(..., partial=True)``.
    """

    tp_dim = 1

    def __init__(
        self,
        input_size: int,
        output_size: int,
        bias: bool = False,
        tp: TPGroup | None = None,
        reduce_results: bool = True,
    ):
        tp = tp or SINGLE_RANK
        local_in = divide(input_size, tp.world_size, "input_size")
        super().__init__(input_size, output_size, bias, tp, local_in=local_in)
        self.reduce_results = reduce_results

    def weight_loader(self, param: nn.Parameter, loaded_weight: torch.Tensor, shard_id=None) -> None:
        if shard_id is not None:
            raise ValueError(f"{type(self).__name__} has no shards, got shard_id={shard_id!r}")
        dim = self.tp_dim if param.dim() == 2 else None  # the bias is not split
        _copy_checked(param.data, self._shard(loaded_weight, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.tp_size == 1:
            return self.linear(x, self.bias)
        if not self.reduce_results:  # (T, out): this rank's partial product; the sum adds the bias once
            return self.linear(x, self.bias if self.tp_rank == 0 else None)
        y = self.tp.all_reduce(self.linear(x, None))  # (T, out): sum of the ranks' partial products
        return y if self.bias is None else y + self.bias


class MergedColumnParallelLinear(ColumnParallelLinear):
    """Several column-parallel outputs stacked into one matrix, e.g. gate_proj and up_proj.

    Each part is split across ranks on its own, so rank r holds ``[part0_r | part1_r | ...]``.
    ``shard_id`` is the index into ``output_sizes``; ``None`` loads an already-fused tensor
    (GLM checkpoints store ``gate_up_proj``), which is cut back into its parts first.
    """

    def __init__(self, input_size: int, output_sizes: list[int], bias: bool = False, tp: TPGroup | None = None):
        tp = tp or SINGLE_RANK
        self.output_sizes = list(output_sizes)  # full sizes of the parts, as in the checkpoint
        local_out = sum(self._local_sizes(tp))
        LinearBase.__init__(self, input_size, sum(output_sizes), bias, tp, local_out=local_out)

    @property
    def shard_ids(self) -> tuple:
        """Shards a checkpoint may fill one by one; all must be loaded."""
        return tuple(range(len(self.output_sizes)))

    def checkpoint_rows(self, shard_id=None) -> int:
        if shard_id is None:
            return self.output_size
        if shard_id not in self.shard_ids:
            raise ValueError(f"{type(self).__name__} shard_id must be one of {self.shard_ids}, got {shard_id!r}")
        return self.output_sizes[self.shard_ids.index(shard_id)]

    def _local_sizes(self, tp: TPGroup) -> list[int]:
        """Sizes of the parts inside this rank's fused parameter."""
        return [divide(s, tp.world_size, "each merged output size") for s in self.output_sizes]

    def _shard_part(self, loaded: torch.Tensor, index: int) -> torch.Tensor:
        """This rank's rows of the full checkpoint part ``index``."""
        return self._shard(loaded, 0)

    def weight_loader(self, param: nn.Parameter, loaded_weight: torch.Tensor, shard_id=None) -> None:
        if shard_id is None:
            for i, part in enumerate(loaded_weight.split(self.output_sizes, dim=0)):
                self.weight_loader(param, part, i)
            return
        sizes = self._local_sizes(self.tp)
        offset = sum(sizes[:shard_id])
        _copy_checked(param.data.narrow(0, offset, sizes[shard_id]), self._shard_part(loaded_weight, shard_id))


class QKVParallelLinear(MergedColumnParallelLinear):
    """q, k and v projections in one matrix: rows ``[q (Hq*D) | k (Hkv*D) | v (Hkv*D)]`` per rank.

    Rank r owns query heads ``[r*Hq/tp, (r+1)*Hq/tp)``. With ``Hkv >= tp`` it owns kv heads
    ``[r*Hkv/tp, (r+1)*Hkv/tp)``; with ``Hkv < tp`` (tp a multiple of Hkv) each kv head is
    replicated on ``tp/Hkv`` ranks and rank r holds the one head its query heads read
    (``r // (tp/Hkv)``, the GQA rule ``h // (Hq/Hkv)`` applied to its first query head).
    ``shard_id`` is ``"q"``, ``"k"`` or ``"v"``.
    """

    _SHARD_INDEX: ClassVar[dict[str, int]] = {"q": 0, "k": 1, "v": 2}
    shard_ids = ("q", "k", "v")

    def __init__(
        self,
        hidden_size: int,
        head_dim: int,
        num_heads: int,
        num_kv_heads: int,
        bias: bool = False,
        tp: TPGroup | None = None,
    ):
        tp = tp or SINGLE_RANK
        check_head_split(num_heads, num_kv_heads, tp.world_size)
        self.head_dim = head_dim
        self.total_num_heads, self.total_num_kv_heads = num_heads, num_kv_heads
        self.num_heads = num_heads // tp.world_size  # per rank
        self.num_kv_heads = max(1, num_kv_heads // tp.world_size)  # per rank
        if num_kv_heads >= tp.world_size:
            self.kv_head_start = tp.rank * self.num_kv_heads
        else:
            self.kv_head_start = tp.rank // (tp.world_size // num_kv_heads)
        sizes = [num_heads * head_dim, num_kv_heads * head_dim, num_kv_heads * head_dim]
        super().__init__(hidden_size, sizes, bias, tp)

    def _local_sizes(self, tp: TPGroup) -> list[int]:
        return [self.num_heads * self.head_dim] + [self.num_kv_heads * self.head_dim] * 2

    def _shard_part(self, loaded: torch.Tensor, index: int) -> torch.Tensor:
        d = self.head_dim
        if index == 0:
            return loaded.narrow(0, self.tp_rank * self.num_heads * d, self.num_heads * d)
        return loaded.narrow(0, self.kv_head_start * d, self.num_kv_heads * d)

    def weight_loader(self, param: nn.Parameter, loaded_weight: torch.Tensor, shard_id=None) -> None:
        if shard_id is None or isinstance(shard_id, int):
            return super().weight_loader(param, loaded_weight, shard_id)
        if shard_id not in self._SHARD_INDEX:
            raise ValueError(f"QKVParallelLinear shard_id must be 'q', 'k' or 'v', got {shard_id!r}")
        super().weight_loader(param, loaded_weight, self._SHARD_INDEX[shard_id])


def check_head_split(num_heads: int, num_kv_heads: int, tp_size: int) -> None:
    """ValueError unless attention heads can be split over ``tp_size`` ranks."""
    if num_heads % tp_size:
        raise ValueError(
            f"num_attention_heads ({num_heads}) must be divisible by tensor_parallel_size ({tp_size})"
        )
    if num_kv_heads % tp_size and tp_size % num_kv_heads:
        raise ValueError(
            f"num_key_value_heads ({num_kv_heads}) must be divisible by tensor_parallel_size ({tp_size}) "
            f"or divide it (then kv heads are replicated)"
        )


def _copy_checked(dst: torch.Tensor, src: torch.Tensor) -> None:
    if dst.shape != src.shape:
        raise ValueError(f"checkpoint tensor has shape {tuple(src.shape)}, parameter expects {tuple(dst.shape)}")
    dst.copy_(src)


def default_weight_loader(param: nn.Parameter, loaded_weight: torch.Tensor, shard_id=None) -> None:
    """For parameters that are never sharded or fused (norm weights)."""
    if shard_id is not None:
        raise ValueError(f"parameter has no shards, got shard_id={shard_id!r}")
    _copy_checked(param.data, loaded_weight)
