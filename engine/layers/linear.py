"""Linear layers with the standard tensor-parallel names.

Invariants:
- Weights are stored like ``nn.Linear``: ``(out_features, in_features)``; ``forward`` is ``F.linear``.
- Every parameter carries a ``weight_loader(param, loaded_weight, shard_id=None)``. Loading from a
  checkpoint goes through it, so fusing HF's separate q/k/v (or gate/up) tensors into one matrix,
  and later cutting out this rank's slice, happen in exactly one place.
- Tensor parallelism is not implemented yet: ``tp_size`` is 1 and ``tp_rank`` 0. The hooks are the
  ``tp_dim`` of each layer (0: output rows are split, 1: input columns are split) and ``_shard``,
  which narrows a loaded tensor to this rank's part; RowParallelLinear will all-reduce its output.
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn


class LinearBase(nn.Module):
    """``y = x @ W.T + b`` whose parameters know how to load themselves from a checkpoint."""

    tp_dim: int | None = None  # which weight dim is split across ranks; None means replicated

    def __init__(self, input_size: int, output_size: int, bias: bool = False):
        super().__init__()
        self.input_size = input_size
        self.output_size = output_size
        self.tp_rank, self.tp_size = 0, 1  # TP arrives later; kept here so the hooks read naturally
        self.weight = nn.Parameter(torch.empty(output_size, input_size), requires_grad=False)
        self.weight.weight_loader = self.weight_loader
        if bias:
            self.bias = nn.Parameter(torch.empty(output_size), requires_grad=False)
            self.bias.weight_loader = self.weight_loader
        else:
            self.register_parameter("bias", None)

    def _shard(self, loaded: torch.Tensor, dim: int | None) -> torch.Tensor:
        """This rank's slice of a full (unsharded) checkpoint tensor along ``dim``."""
        if dim is None or self.tp_size == 1 or dim >= loaded.dim():
            return loaded
        size = loaded.shape[dim] // self.tp_size
        return loaded.narrow(dim, self.tp_rank * size, size)

    def weight_loader(self, param: nn.Parameter, loaded_weight: torch.Tensor, shard_id=None) -> None:
        if shard_id is not None:
            raise ValueError(f"{type(self).__name__} has no shards, got shard_id={shard_id!r}")
        _copy_checked(param.data, self._shard(loaded_weight, self.tp_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


class ReplicatedLinear(LinearBase):
    """The full matrix on every rank."""


class ColumnParallelLinear(LinearBase):
    """Output features split across ranks (dim 0 of the weight); each rank keeps its part of y."""

    tp_dim = 0


class RowParallelLinear(LinearBase):
    """Input features split across ranks (dim 1 of the weight); partial outputs are summed.

    With TP the bias is added once after the all-reduce; with tp_size 1 this is a plain linear.
    """

    tp_dim = 1

    def weight_loader(self, param: nn.Parameter, loaded_weight: torch.Tensor, shard_id=None) -> None:
        if shard_id is not None:
            raise ValueError(f"{type(self).__name__} has no shards, got shard_id={shard_id!r}")
        dim = self.tp_dim if param.dim() == 2 else None  # the bias is not split
        _copy_checked(param.data, self._shard(loaded_weight, dim))


class MergedColumnParallelLinear(ColumnParallelLinear):
    """Several column-parallel outputs stacked into one matrix, e.g. gate_proj and up_proj.

    ``shard_id`` is the index into ``output_sizes``; ``None`` loads an already-fused tensor
    (GLM checkpoints store ``gate_up_proj``), which is cut back into its parts so that each part is
    sharded on its own.
    """

    def __init__(self, input_size: int, output_sizes: list[int], bias: bool = False):
        self.output_sizes = list(output_sizes)
        super().__init__(input_size, sum(output_sizes), bias)

    @property
    def shard_ids(self) -> tuple:
        """Shards a checkpoint may fill one by one; all must be loaded."""
        return tuple(range(len(self.output_sizes)))

    def _shard_slices(self) -> list[tuple[int, int]]:
        """(offset, size) of each part inside this rank's fused parameter."""
        sizes = [s // self.tp_size for s in self.output_sizes]
        offsets = [sum(sizes[:i]) for i in range(len(sizes))]
        return list(zip(offsets, sizes))

    def weight_loader(self, param: nn.Parameter, loaded_weight: torch.Tensor, shard_id=None) -> None:
        if shard_id is None:
            parts = loaded_weight.split(self.output_sizes, dim=0)
            for i, part in enumerate(parts):
                self.weight_loader(param, part, i)
            return
        offset, size = self._shard_slices()[shard_id]
        _copy_checked(param.data.narrow(0, offset, size), self._shard(loaded_weight, 0))


class QKVParallelLinear(MergedColumnParallelLinear):
    """q, k and v projections in one matrix: rows ``[q (Hq*D) | k (Hkv*D) | v (Hkv*D)]``.

    ``shard_id`` is ``"q"``, ``"k"`` or ``"v"``.
    """

    _SHARD_INDEX: ClassVar[dict[str, int]] = {"q": 0, "k": 1, "v": 2}
    shard_ids = ("q", "k", "v")

    def __init__(self, hidden_size: int, head_dim: int, num_heads: int, num_kv_heads: int, bias: bool = False):
        self.head_dim = head_dim
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        # With TP each rank will own num_heads / tp_size query heads and num_kv_heads / tp_size kv heads.
        sizes = [num_heads * head_dim, num_kv_heads * head_dim, num_kv_heads * head_dim]
        super().__init__(hidden_size, sizes, bias)

    def weight_loader(self, param: nn.Parameter, loaded_weight: torch.Tensor, shard_id=None) -> None:
        if shard_id is None or isinstance(shard_id, int):
            return super().weight_loader(param, loaded_weight, shard_id)
        if shard_id not in self._SHARD_INDEX:
            raise ValueError(f"QKVParallelLinear shard_id must be 'q', 'k' or 'v', got {shard_id!r}")
        super().weight_loader(param, loaded_weight, self._SHARD_INDEX[shard_id])


def _copy_checked(dst: torch.Tensor, src: torch.Tensor) -> None:
    if dst.shape != src.shape:
        raise ValueError(f"checkpoint tensor has shape {tuple(src.shape)}, parameter expects {tuple(dst.shape)}")
    dst.copy_(src)


def default_weight_loader(param: nn.Parameter, loaded_weight: torch.Tensor, shard_id=None) -> None:
    """For parameters that are never sharded or fused (norm weights)."""
    if shard_id is not None:
        raise ValueError(f"parameter has no shards, got shard_id={shard_id!r}")
    _copy_checked(param.data, loaded_weight)
