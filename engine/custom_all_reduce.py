"""A one-shot all-reduce over CUDA symmetric memory, for messages up to a few MiB.

A decode step of an L-layer model all-reduces 2L + 1 tensors of (batch x hidden) — a few KB each
at small batches — where NCCL's all-reduce is bound by latency (its protocol handshakes), not
bandwidth. Here every rank owns one buffer mapped into every peer's address space
(``torch.distributed._symmetric_memory``: CUDA IPC, no multicast needed), and one kernel
(``torch.ops.symm_mem.one_shot_all_reduce_copy_out``) copies the local tensor into this rank's
buffer, meets the peers at a barrier of per-block signal flags, and sums the world_size buffers
straight into the output. No host involvement, so it is captured in CUDA graphs like any kernel.

Opt-in (``ParallelConfig.custom_all_reduce``). Measured on 2 x H100 (bench/results/allreduce_*,
tp_*): alone in a graph it is 2.6x faster than NCCL at 8 KiB (8.8 vs 22.6 us per call, NCCL's
time there being mostly the gaps between its kernels), and eager it saves ~20 us of host time per
call; but inside a real decode step its kernel (two barriers) takes 9.1 us against NCCL's LL
kernel at 6.6 us. End to end over three runs: batch-1 decode 1-5% slower, batch-64 throughput
(prefill-heavy, eager steps) 1-16% faster.

Limits, checked by ``fits`` (anything else goes to NCCL):
- the buffer's dtype (the model's), contiguous, at most ``max_bytes`` (``MAX_BYTES`` by world size);
- storage offset 0 and a size that is a multiple of 16 bytes: the kernel moves 16-byte vectors
  and requires the same alignment for the local tensor and the buffer;
- world size 2, 4 or 8 (the kernel's specialisations), all on this host with peer access.

Every rank must make the same choice for the same call, which holds because the choice depends
only on the tensor's shape and dtype, equal on every rank.

The same object also owns the workspace of ``pagoda.kernels.allreduce_rmsnorm.all_reduce_rms_norm`` (a second symmetric
receive buffer with per-program flags, kernels/allreduce_rmsnorm.py): a row-parallel layer's
partial sums are pushed to the peers, summed and RMS-normalised in one kernel, instead of an
all-reduce followed by a norm kernel. It takes messages up to ``NORM_MAX_BYTES`` (``fits_norm``).
"""

from __future__ import annotations

import warnings

import torch
import torch.distributed

from pagoda.kernels._triton import HAS_TRITON
from pagoda.kernels.allreduce_rmsnorm import MAX_HIDDEN, NUM_PROGRAMS, SymmetricWorkspace, all_reduce_rms_norm

SUPPORTED_WORLD_SIZES = (2, 4, 8)
# Largest message per world size; above it (long prefills) NCCL's ring is as fast or faster
# (bench/results/allreduce_tp{2,4}_cuda.*, H100): at 2 ranks the two meet at 8 MiB, at 4 ranks the
# one-shot kernel wins at 512 KiB and loses at 4 MiB. 8 ranks is not measured: kept small.
MAX_BYTES = {2: 8 * 2**20, 4: 2**20, 8: 256 * 2**10}
# Largest message of the fused all-reduce + RMSNorm: decode batches up to the default max_num_seqs
# (128 rows of Llama-8B's 4096 bf16). Larger ones (prefill) take all_reduce and then the norm.
NORM_MAX_BYTES = 2**20


def custom_all_reduce_unavailable(world_size: int, device: torch.device) -> str | None:
    """Why the symmetric-memory all-reduce cannot run here, or None when it can."""
    if device.type != "cuda":
        return f"device is {device.type}, not cuda"
    if world_size not in SUPPORTED_WORLD_SIZES:
        return f"world size {world_size} is not one of {SUPPORTED_WORLD_SIZES}"
    if torch.cuda.device_count() < world_size:
        # Ray rank actors see one GPU each; mapping peers' memory across processes that cannot see
        # each other's devices is not what this path was measured on.
        return f"this process sees {torch.cuda.device_count()} GPU(s), fewer than the {world_size} ranks"
    me = device.index if device.index is not None else torch.cuda.current_device()
    blocked = [p for p in range(world_size) if p != me and not torch.cuda.can_device_access_peer(me, p)]
    if blocked:
        return f"GPU {me} has no peer access to GPU(s) {blocked}"
    return None


class SymmMemAllReduce:
    """One rank's handle on the group's symmetric buffers (the one-shot all-reduce's and the fused
    all-reduce + RMSNorm's). Creating it is a collective."""

    def __init__(self, process_group, device: torch.device, dtype: torch.dtype, max_bytes: int | None = None):
        """``max_bytes`` defaults to ``MAX_BYTES`` of the group's size."""
        from torch.distributed import _symmetric_memory as symm_mem

        self.dtype = dtype
        self.group_name = process_group.group_name
        max_bytes = max_bytes or MAX_BYTES[process_group.size()]
        self.max_numel = max_bytes // torch.empty((), dtype=dtype).element_size()
        with warnings.catch_warnings():  # needed on torch 2.11, deprecated (a no-op) later
            warnings.simplefilter("ignore", FutureWarning)
            symm_mem.enable_symm_mem_for_group(self.group_name)
        self.buffer = symm_mem.empty(self.max_numel, dtype=dtype, device=device)  # (max_numel,)
        self.handle = symm_mem.rendezvous(self.buffer, process_group)  # every rank maps every buffer
        self.norm_workspace, self._norm_handles = _norm_workspace(process_group, device, NORM_MAX_BYTES)

    def fits(self, tensor: torch.Tensor) -> bool:
        return (
            tensor.dtype == self.dtype
            and tensor.is_cuda
            and 0 < tensor.numel() <= self.max_numel
            and tensor.is_contiguous()
            and tensor.storage_offset() == 0
            and (tensor.numel() * tensor.element_size()) % 16 == 0
        )

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum over the ranks into a new tensor (``tensor`` is only read)."""
        staging = self.buffer[: tensor.numel()].view(tensor.shape)
        out = torch.empty_like(tensor)
        return torch.ops.symm_mem.one_shot_all_reduce_copy_out(staging, tensor, "sum", self.group_name, out)

    def fits_norm(self, x: torch.Tensor) -> bool:
        """Whether ``all_reduce_rms_norm`` takes x (T, H); depends only on its shape and dtype."""
        return (
            HAS_TRITON
            and x.dtype == self.dtype
            and x.is_cuda
            and x.dim() == 2
            and x.is_contiguous()
            and x.shape[1] <= MAX_HIDDEN
            and 0 < x.shape[0] <= self.norm_workspace.max_rows(x.shape[1], x.dtype)
        )

    def all_reduce_rms_norm(self, x, residual, weight, eps):
        """``TPGroup.all_reduce_rms_norm`` in one kernel (new tensors; x is only read)."""
        return all_reduce_rms_norm(x, residual, weight, eps, self.norm_workspace)


def _norm_workspace(process_group, device: torch.device, max_bytes: int):
    """The fused all-reduce + RMSNorm's symmetric memory for messages up to ``max_bytes``; a
    collective. Returns the workspace and the rendezvous handles (kept alive with it)."""
    from torch.distributed import _symmetric_memory as symm_mem

    world, rank = process_group.size(), process_group.rank()
    data = symm_mem.empty(2 * world * max_bytes, dtype=torch.uint8, device=device)  # (2, W, rows, H) of any dtype
    flags = symm_mem.empty(world, NUM_PROGRAMS, dtype=torch.int32, device=device).zero_()  # (W, G)
    handles = [symm_mem.rendezvous(t, process_group) for t in (data, flags)]
    data_ptrs, flag_ptrs = (
        torch.tensor(_addresses(h, t, world), device=device) for h, t in zip(handles, (data, flags), strict=True)
    )
    counters = torch.zeros(NUM_PROGRAMS, dtype=torch.int32, device=device)
    # Every rank's flags must be zero before any rank's first push into them.
    torch.cuda.synchronize(device)
    torch.distributed.barrier(group=process_group)
    return SymmetricWorkspace(rank, data, data_ptrs, flags, flag_ptrs, counters), handles


def _addresses(handle, tensor: torch.Tensor, world: int) -> list[int]:
    """Where every rank's ``tensor`` is mapped in this process, in rank order."""
    # get_remote_tensor, not get_buffer: symm_mem.empty may carve a tensor out of a larger pooled
    # allocation, and only get_remote_tensor adds the tensor's offset in it to the peer's base.
    addresses = [handle.get_remote_tensor(q, tensor.shape, tensor.dtype).data_ptr() for q in range(world)]
    if addresses[handle.rank] != tensor.data_ptr():
        raise RuntimeError(
            f"symmetric memory maps this rank's buffer at {addresses[handle.rank]:#x}, not at its tensor's "
            f"{tensor.data_ptr():#x}: peers' addresses would be wrong too"
        )
    return addresses
