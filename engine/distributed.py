"""The collectives tensor parallelism needs, behind one small interface.

A ``TPGroup`` is handed explicitly to the model (``build_model(..., tp=group)``) and to the
layers, never looked up from a global. Two implementations:

- ``SingleRankGroup``: TP=1, every collective is the identity, nothing is imported or started.
- ``TorchTPGroup``: k ranks over ``torch.distributed`` — NCCL on CUDA, gloo on CPU — with a
  timeout on every collective (set when the group is created), so a dead or hung peer turns
  into an exception on the survivors instead of a wait forever. On GPUs of one host, small
  all-reduces (up to 8 MiB at 2 ranks, 1 MiB at 4) can go through a symmetric-memory one-shot
  kernel instead of NCCL (opt-in, ``ParallelConfig.custom_all_reduce``;
  engine/custom_all_reduce.py); it has no timeout of its own (a dead peer leaves it spinning), so
  the executor's step deadline is what catches a hung rank. The same opt-in fuses the all-reduce
  of a row-parallel layer's output with the RMSNorm after it (``all_reduce_rms_norm``: one
  symmetric-memory Triton kernel, kernels/allreduce_rmsnorm.py) for decode-sized messages.

Every collective must be called by every rank of the group, in the same order, with tensors of
the same shape; the model code guarantees this because all ranks run the same forward on the
same ``SchedulerOutput``.
"""

from __future__ import annotations

import abc
import datetime
import os
import time
from typing import Any

import torch


class TPGroup(abc.ABC):
    """One rank's view of its tensor-parallel group."""

    rank: int  # 0 .. world_size - 1; rank 0 samples
    world_size: int

    @property
    def is_first(self) -> bool:
        return self.rank == 0

    @abc.abstractmethod
    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum of ``tensor`` over the ranks, same shape; may reuse ``tensor``'s storage."""

    def all_reduce_rms_norm(
        self, x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """RMSNorm (weight (H,), eps) of the sum of ``x`` (T, H) over the ranks; with ``residual``:
        ``s = sum + residual`` and returns ``(norm(s), s)``, like ``RMSNorm.forward``. May reuse x's storage.

        Here: ``all_reduce`` then the norm; a group may fuse the two.
        """
        from pagoda.engine.layers.layernorm import rms_norm  # imported here: the layers import this module

        return rms_norm(self.all_reduce(x), residual, weight, eps)

    @abc.abstractmethod
    def all_gather(self, tensor: torch.Tensor, dim: int = -1) -> torch.Tensor:
        """Every rank's ``tensor`` concatenated along ``dim`` in rank order, on every rank."""

    @abc.abstractmethod
    def gather(self, tensor: torch.Tensor, dim: int = -1, dst: int = 0) -> torch.Tensor | None:
        """Like ``all_gather`` but only rank ``dst`` gets the result; the others get None."""

    @abc.abstractmethod
    def broadcast(self, tensor: torch.Tensor, src: int = 0) -> torch.Tensor:
        """Rank ``src``'s ``tensor`` written into ``tensor`` on every rank (same shape and dtype everywhere)."""

    @abc.abstractmethod
    def broadcast_object(self, obj: Any = None, src: int = 0) -> Any:
        """Rank ``src``'s picklable ``obj`` returned on every rank (others pass anything)."""

    @abc.abstractmethod
    def barrier(self) -> None:
        """Return once every rank got here (or raise after the group's timeout)."""

    def destroy(self) -> None:
        """Release the group; safe to call twice."""


class SingleRankGroup(TPGroup):
    """TP=1: every collective is the identity."""

    rank, world_size = 0, 1

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor

    def all_gather(self, tensor: torch.Tensor, dim: int = -1) -> torch.Tensor:
        return tensor

    def gather(self, tensor: torch.Tensor, dim: int = -1, dst: int = 0) -> torch.Tensor | None:
        return tensor

    def broadcast(self, tensor: torch.Tensor, src: int = 0) -> torch.Tensor:
        return tensor

    def broadcast_object(self, obj: Any = None, src: int = 0) -> Any:
        return obj

    def barrier(self) -> None:
        pass


SINGLE_RANK = SingleRankGroup()


class TorchTPGroup(TPGroup):
    """k ranks over a ``torch.distributed`` process group (this process's default group).

    ``device`` is where collective tensors live: this rank's GPU for NCCL, the CPU for gloo.
    """

    def __init__(self, rank: int, world_size: int, device: torch.device) -> None:
        import torch.distributed as dist

        self._dist = dist
        self.rank, self.world_size, self.device = rank, world_size, device
        self.group = dist.group.WORLD
        self.custom_all_reduce = None  # a SymmMemAllReduce once enabled

    def enable_custom_all_reduce(self, dtype: torch.dtype, max_bytes: int | None = None) -> str | None:
        """Route all-reduces of ``dtype`` up to ``max_bytes`` (default by world size) through symmetric
        memory, and fuse decode-sized ``all_reduce_rms_norm`` calls into one kernel; a collective.

        Returns why not (and changes nothing) when this host cannot, the same answer on every rank
        of one host."""
        from pagoda.engine.custom_all_reduce import SymmMemAllReduce, custom_all_reduce_unavailable

        reason = custom_all_reduce_unavailable(self.world_size, self.device)
        if reason is None:
            self.custom_all_reduce = SymmMemAllReduce(self.group, self.device, dtype, max_bytes)
        return reason

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        fast = self.custom_all_reduce
        if fast is not None and fast.fits(tensor):
            return fast.all_reduce(tensor)
        self._dist.all_reduce(tensor, group=self.group)
        return tensor

    def all_reduce_rms_norm(self, x, residual, weight, eps):
        fast = self.custom_all_reduce
        if fast is not None and fast.fits_norm(x):  # shape and dtype only: every rank chooses alike
            return fast.all_reduce_rms_norm(x, residual, weight, eps)
        return super().all_reduce_rms_norm(x, residual, weight, eps)

    def all_gather(self, tensor: torch.Tensor, dim: int = -1) -> torch.Tensor:
        tensor = tensor.contiguous()
        if self.device.type == "cuda":  # one output tensor: no list of buffers, capturable in a CUDA graph
            out = tensor.new_empty((self.world_size, *tensor.shape))
            self._dist.all_gather_into_tensor(out, tensor, group=self.group)
            parts = out.unbind(0)
        else:
            parts = [torch.empty_like(tensor) for _ in range(self.world_size)]
            self._dist.all_gather(parts, tensor, group=self.group)
        return torch.cat(parts, dim=dim)

    def gather(self, tensor: torch.Tensor, dim: int = -1, dst: int = 0) -> torch.Tensor | None:
        tensor = tensor.contiguous()
        parts = [torch.empty_like(tensor) for _ in range(self.world_size)] if self.rank == dst else None
        self._dist.gather(tensor, parts, dst=dst, group=self.group)
        return torch.cat(parts, dim=dim) if parts is not None else None

    def broadcast(self, tensor: torch.Tensor, src: int = 0) -> torch.Tensor:
        self._dist.broadcast(tensor, src=src, group=self.group)
        return tensor

    def broadcast_object(self, obj: Any = None, src: int = 0) -> Any:
        box = [obj]
        self._dist.broadcast_object_list(box, src=src, group=self.group, device=self.device)
        return box[0]

    def barrier(self) -> None:
        # An all-reduce of one element instead of dist.barrier: the same code path on NCCL and gloo,
        # and it honours the group's timeout.
        self.all_reduce(torch.zeros(1, device=self.device))

    def destroy(self) -> None:
        self.custom_all_reduce = None  # its buffer before the group it was mapped with
        if self._dist.is_initialized():
            self._dist.destroy_process_group()


def backend_for(device: torch.device) -> str:
    return "nccl" if device.type == "cuda" else "gloo"


def init_tp_group(
    rank: int,
    world_size: int,
    store_host: str,
    store_port: int,
    device: torch.device,
    timeout_s: float,
) -> TorchTPGroup:
    """Join the group whose rendezvous ``TCPStore`` listens at ``store_host:store_port``.

    ``timeout_s`` bounds the rendezvous and every later collective. The store is owned by the
    driver (it outlives no rank and holds no port after the driver releases it).
    """
    import torch.distributed as dist

    if device.type == "cpu" and store_host in ("127.0.0.1", "localhost"):
        # gloo otherwise binds to whatever the hostname resolves to, which may not route in a sandbox.
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    timeout = datetime.timedelta(seconds=timeout_s)
    store = dist.TCPStore(store_host, store_port, is_master=False, timeout=timeout)
    kwargs = {"device_id": device} if device.type == "cuda" else {}
    dist.init_process_group(
        backend_for(device), store=store, rank=rank, world_size=world_size, timeout=timeout, **kwargs
    )
    return TorchTPGroup(rank, world_size, device)


class TimedTPGroup(TPGroup):
    """Wraps a group and accumulates the time spent in each kind of collective (for benchmarks).

    On CUDA each call is bracketed by CUDA events on the current stream (read back, with one sync,
    by ``stats``); on CPU by the wall clock. Calls made while a CUDA graph is being captured are
    not timed, so graph replays count nothing: measure with ``enforce_eager``.
    """

    def __init__(self, inner: TPGroup, device: torch.device) -> None:
        self.inner, self.device = inner, device
        self.rank, self.world_size = inner.rank, inner.world_size
        self._cuda = device.type == "cuda"
        self.reset()

    def reset(self) -> None:
        self._pending: list[tuple[str, Any, Any]] = []  # (op, start event, end event) not yet read back
        self._seconds: dict[str, float] = {}
        self._calls: dict[str, int] = {}

    def _timed(self, op: str, fn, *args, **kwargs):
        if self._cuda and torch.cuda.is_current_stream_capturing():
            return fn(*args, **kwargs)
        self._calls[op] = self._calls.get(op, 0) + 1
        if self._cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            out = fn(*args, **kwargs)
            end.record()
            self._pending.append((op, start, end))
            return out
        begin = time.perf_counter()
        out = fn(*args, **kwargs)
        self._seconds[op] = self._seconds.get(op, 0.0) + time.perf_counter() - begin
        return out

    def stats(self) -> dict[str, dict[str, float]]:
        """{op: {"calls": n, "seconds": total}} since the last ``reset``."""
        if self._pending:
            torch.cuda.synchronize(self.device)
            for op, start, end in self._pending:
                self._seconds[op] = self._seconds.get(op, 0.0) + start.elapsed_time(end) / 1000
            self._pending.clear()
        return {op: {"calls": n, "seconds": self._seconds.get(op, 0.0)} for op, n in self._calls.items()}

    def all_reduce(self, tensor):
        return self._timed("all_reduce", self.inner.all_reduce, tensor)

    def all_reduce_rms_norm(self, x, residual, weight, eps):  # counted as an all-reduce, the norm included
        return self._timed("all_reduce", self.inner.all_reduce_rms_norm, x, residual, weight, eps)

    def all_gather(self, tensor, dim=-1):
        return self._timed("all_gather", self.inner.all_gather, tensor, dim)

    def gather(self, tensor, dim=-1, dst=0):
        return self._timed("gather", self.inner.gather, tensor, dim, dst)

    def broadcast(self, tensor, src=0):
        return self._timed("broadcast", self.inner.broadcast, tensor, src)

    def broadcast_object(self, obj=None, src=0):
        return self._timed("broadcast_object", self.inner.broadcast_object, obj, src)

    def barrier(self) -> None:
        self.inner.barrier()

    def destroy(self) -> None:
        self.inner.destroy()
