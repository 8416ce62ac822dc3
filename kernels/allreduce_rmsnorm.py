"""All-reduce fused with the residual add and RMSNorm that follow a row-parallel layer, over
symmetric memory: one kernel instead of an all-reduce and a norm.

A tensor-parallel decode step reduces the partial sums of every o_proj and down_proj, each a few KiB
at small batches, and then normalises them. Here each rank pushes its partial rows straight into
every peer's receive buffer, raises one flag per peer, waits for the peers' flags, and sums and
normalises in the same program. Nothing runs on the host, so the kernel is captured in CUDA graphs.

Memory (``SymmetricWorkspace``; the same layout on every rank, every rank's buffers mapped into
every rank's address space):
- ``data``, per rank: two halves (parities) of ``(W source ranks, max_rows, H)`` elements of x's
  dtype each. Rank r stores its rows into ``[parity, r]`` of each peer's and reads the peers' rows
  from its own. The halves are fixed in bytes, so calls of another H or dtype never overlap across
  parities.
- ``flags``, per rank: int32 ``(W source ranks, G programs)``; peer q's program p sets ``[q, p]``
  to the epoch (call number) whose rows it has pushed.
- ``counters``, local: int32 ``(G,)``, the calls made so far, one copy per program. Every program
  advances its own each call, rows or not, so they all stay equal; parity = epoch & 1.
Program p of the fixed grid of G owns rows p, p + G, ... (< N).

Why this is safe without host synchronisation:
- A rank is at most one call ahead of any peer: when it starts call k+2, every peer has finished
  call k. Its call k+1 finished only after its program 0 (which always has a row) saw every
  peer's flag of call k+1, and a peer pushes in call k+1 only after its call k finished (kernels
  of one stream run in order). So while a peer may still read half ``k & 1`` of its buffer, this
  rank writes only into half ``(k+1) & 1``: double buffering by parity is enough. A peer one call
  ahead may already have overwritten its flag with epoch + 1, hence the wait tests
  ``flag - epoch >= 0`` as an int32 difference (which also survives the epoch wrapping at 2**31).
- Memory order: a barrier, then one thread per program (Triton runs a scalar atomic on one
  thread) sets each peer's flag with release semantics at system scope, so the whole program's
  stores into the peers precede it; the wait is an acquire at system scope followed by a
  barrier, so the program's loads of its receive buffer come after the peers' stores.
- The epoch lives on the device, so CUDA graph replays advance it: nothing is baked into the graph.
- N = 0 launches nothing (on every rank alike, shapes being equal), so no call goes without
  program 0's wait.
- Every rank must make the same calls with the same N, in the same order, and the G programs
  must be resident at once (G is small next to the number of SMs): a program spins until the
  same program on each peer has pushed. A dead peer leaves it spinning (no timeout).

Numerics: the sum is taken in float32 over the ranks in rank order 0..W-1 (this rank's partial
from x, the peers' from the receive buffer) and rounded to x's dtype; then exactly the arithmetic
of ``pagoda.kernels.rmsnorm``. The same order on every rank makes the outputs bitwise equal on all ranks.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pagoda.kernels._triton import next_power_of_2, require_triton, tl, triton
from pagoda.kernels._validate import FLOAT_DTYPES, check_same_device, check_tensor
from pagoda.kernels.rmsnorm import check_norm_params, fused_add_rms_norm_ref, rms_norm_ref

# One program holds a row's fp32 sum in registers: at 16384 and 16 warps ptxas (sm_90) reports no
# spills even at 8 ranks (105 registers). Every model served here has H <= 8192.
MAX_HIDDEN = 16384
WORLD_SIZES = range(2, 9)
NUM_PROGRAMS = 32  # G: enough rows in flight for decode batches, few enough to be resident together


@triton.jit
def _all_reduce_rms_norm_kernel(
    x_ptr,  # (N, H) this rank's partial sum
    residual_ptr,  # (N, H), read when HAS_RESIDUAL
    weight_ptr,  # (H,)
    out_ptr,  # (N, H)
    residual_out_ptr,  # (N, H), sum + residual, written when HAS_RESIDUAL
    data_ptr,  # this rank's receive buffer in x's dtype: 2 halves of (W, max_rows, H)
    data_ptrs,  # (W,) int64: every rank's receive buffer as mapped here
    flags_ptr,  # (W, G) int32: this rank's flags
    flag_ptrs,  # (W,) int64: every rank's flags as mapped here
    counters_ptr,  # (G,) int32: calls so far
    rank,
    num_rows,
    hidden,
    half,  # elements of x's dtype in each half of a receive buffer
    max_rows,
    eps,
    WORLD: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    p = tl.program_id(0)
    num_programs = tl.num_programs(0)
    epoch = tl.load(counters_ptr + p) + 1
    tl.store(counters_ptr + p, epoch)
    if p < num_rows:  # rows p, p + G, ...
        dtype = x_ptr.dtype.element_ty
        cols = tl.arange(0, BLOCK_N)
        mask = cols < hidden
        parity = epoch & 1
        # 1. Push this rank's rows into slot [parity, rank] of every peer's buffer.
        for row in range(p, num_rows, num_programs):
            x = tl.load(x_ptr + row * hidden + cols, mask=mask)
            slot = parity * half + (rank * max_rows + row) * hidden
            for q in tl.static_range(WORLD):
                if q != rank:
                    # 16-byte aligned (the workspace checks): lets the stores be vectorised
                    peer_data = tl.multiple_of(tl.load(data_ptrs + q).to(tl.pointer_type(dtype)), 16)
                    tl.store(peer_data + slot + cols, x, mask=mask)
        # 2. Signal: once every thread of the program has stored (barrier), set this program's flag
        #    in each peer, releasing those stores to the whole system.
        tl.debug_barrier()
        for q in tl.static_range(WORLD):
            if q != rank:
                peer_flags = tl.load(flag_ptrs + q).to(tl.pointer_type(tl.int32))
                tl.atomic_xchg(peer_flags + rank * num_programs + p, epoch, sem="release", scope="sys")
        # 3. Wait (acquire) until each peer's same program has pushed this epoch (or the next).
        for q in tl.static_range(WORLD):
            if q != rank:
                while (tl.atomic_add(flags_ptr + q * num_programs + p, 0, sem="acquire", scope="sys") - epoch) < 0:
                    pass
        tl.debug_barrier()
        # 4. Sum in rank order, round, then kernels.rmsnorm's arithmetic.
        w = tl.load(weight_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        for row in range(p, num_rows, num_programs):
            offs = row * hidden + cols
            for q in tl.static_range(WORLD):
                if q == rank:
                    part = tl.load(x_ptr + offs, mask=mask, other=0.0)
                else:
                    slot = parity * half + (q * max_rows + row) * hidden
                    part = tl.load(data_ptr + slot + cols, mask=mask, other=0.0)
                if q == 0:
                    acc = part.to(tl.float32)
                else:
                    acc += part.to(tl.float32)
            s = acc.to(dtype)
            if HAS_RESIDUAL:
                r = tl.load(residual_ptr + offs, mask=mask, other=0.0)
                s = (s.to(tl.float32) + r.to(tl.float32)).to(dtype)
                tl.store(residual_out_ptr + offs, s, mask=mask)
            sf = s.to(tl.float32)
            rstd = tl.rsqrt(tl.sum(sf * sf, axis=0) / hidden + eps)
            normed = (sf * rstd).to(dtype).to(tl.float32)
            tl.store(out_ptr + offs, (normed * w).to(dtype), mask=mask)


@dataclass(frozen=True)
class SymmetricWorkspace:
    """One rank's handles on the memory ``all_reduce_rms_norm`` works in.

    Every rank of the group holds one with the same shapes, and the address tables list the same
    buffers in rank order on every rank (each as mapped into this process). Flags and counters
    must be zero before the first call on any rank, and the group must not use the workspace for
    anything else. (The engine builds it from torch symmetric memory; the tests from CPU tensors.)
    """

    rank: int
    data: torch.Tensor  # (bytes,) uint8: this rank's receive buffer
    data_ptrs: torch.Tensor  # (W,) int64: address of every rank's ``data``
    flags: torch.Tensor  # (W, G) int32: this rank's flags, [q, p] = last epoch peer q's program p pushed
    flag_ptrs: torch.Tensor  # (W,) int64: address of every rank's ``flags``
    counters: torch.Tensor  # (G,) int32, local: calls made so far

    def __post_init__(self):
        check_tensor("flags", self.flags, ndim=2, dtypes=(torch.int32,))
        world, programs = self.flags.shape
        if world not in WORLD_SIZES:
            raise ValueError(f"world_size (flags.shape[0]) is {world}, expected {WORLD_SIZES[0]}..{WORLD_SIZES[-1]}")
        if not 0 <= self.rank < world:
            raise ValueError(f"rank {self.rank} is outside 0..{world - 1}")
        check_tensor("data", self.data, ndim=1, dtypes=(torch.uint8,))
        if not 0 < self.data.numel() < 2**31 or self.data.numel() % 32:
            # The kernel indexes in int32; each half must start 16-byte aligned.
            raise ValueError(f"data has {self.data.numel()} bytes, expected a multiple of 32 below 2**31")
        for name in ("data_ptrs", "flag_ptrs"):
            if check_tensor(name, getattr(self, name), ndim=1, dtypes=(torch.int64,)).shape[0] != world:
                raise ValueError(f"{name} has {getattr(self, name).shape[0]} addresses, expected world_size {world}")
        if check_tensor("counters", self.counters, ndim=1, dtypes=(torch.int32,)).shape[0] != programs:
            raise ValueError(f"counters has {self.counters.shape[0]} entries, expected flags.shape[1] = {programs}")
        if any(address % 16 for address in self.data_ptrs.tolist()):  # once, at set-up
            raise ValueError("data_ptrs must hold 16-byte aligned addresses (the kernel stores 16-byte vectors)")
        check_same_device(
            data=self.data, data_ptrs=self.data_ptrs, flags=self.flags, flag_ptrs=self.flag_ptrs, counters=self.counters
        )

    @property
    def world_size(self) -> int:
        return self.flags.shape[0]

    @property
    def num_programs(self) -> int:
        return self.flags.shape[1]

    def max_rows(self, hidden: int, dtype: torch.dtype) -> int:
        """Rows of ``hidden`` elements of ``dtype`` one call can reduce: ``(W, rows, H)`` in half of ``data``."""
        row_bytes = hidden * torch.empty((), dtype=dtype).element_size()
        return self.data.numel() // 2 // (self.world_size * row_bytes)


def _check_args(x, residual, weight, eps, workspace: SymmetricWorkspace) -> None:
    check_tensor("x", x, ndim=2, dtypes=FLOAT_DTYPES)
    if not x.is_contiguous():
        raise ValueError(f"x must be contiguous, got strides {x.stride()}")
    num_rows, hidden = x.shape
    check_norm_params(weight, eps, x.dtype, hidden, MAX_HIDDEN)
    if residual is not None:
        check_tensor("residual", residual, dtypes=FLOAT_DTYPES)
        if residual.shape != x.shape or residual.dtype != x.dtype:
            raise ValueError(
                f"residual {tuple(residual.shape)} {residual.dtype} must match x {tuple(x.shape)} {x.dtype}"
            )
        if not residual.is_contiguous():
            raise ValueError(f"residual must be contiguous, got strides {residual.stride()}")
        check_same_device(x=x, residual=residual)
    check_same_device(x=x, weight=weight, workspace=workspace.data)
    capacity = workspace.max_rows(hidden, x.dtype)
    if num_rows > capacity:
        raise ValueError(f"x has {num_rows} rows, over the workspace's capacity of {capacity} rows of this size")


def all_reduce_rms_norm(
    x: torch.Tensor,
    residual: torch.Tensor | None,
    weight: torch.Tensor,
    eps: float,
    workspace: SymmetricWorkspace,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """A collective: every rank calls it with its partial sum ``x`` (N, H), contiguous.

    Returns ``rms_norm(sum)`` where sum is the all-reduce of x rounded to x's dtype; with
    ``residual`` (N, H), ``(rms_norm(s), s)`` with ``s = sum + residual``. New tensors, bitwise
    equal on every rank. N may not exceed ``workspace.max_rows(H, x.dtype)``.
    """
    require_triton()
    _check_args(x, residual, weight, eps, workspace)
    out = torch.empty_like(x)
    res_out = torch.empty_like(x) if residual is not None else out
    block_n = next_power_of_2(x.shape[1])
    if x.shape[0] > 0:
        ws = workspace
        _all_reduce_rms_norm_kernel[(ws.num_programs,)](
            x, x if residual is None else residual, weight, out, res_out,
            ws.data.view(x.dtype), ws.data_ptrs, ws.flags, ws.flag_ptrs, ws.counters,
            ws.rank, x.shape[0], x.shape[1], ws.data.numel() // 2 // x.element_size(),
            ws.max_rows(x.shape[1], x.dtype), eps,
            WORLD=ws.world_size, HAS_RESIDUAL=residual is not None, BLOCK_N=block_n,
            num_warps=min(16, max(1, block_n // 512)),
        )  # fmt: skip
    return out if residual is None else (out, res_out)


def all_reduce_rms_norm_ref(
    partials: list[torch.Tensor], residual: torch.Tensor | None, weight: torch.Tensor, eps: float
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Torch reference given every rank's partial sum: the float32 sum in rank order, rounded to the
    partials' dtype, then ``rms_norm_ref`` (or ``fused_add_rms_norm_ref`` with ``residual``)."""
    total = partials[0].float()
    for part in partials[1:]:
        total = total + part.float()
    summed = total.to(partials[0].dtype)
    if residual is None:
        return rms_norm_ref(summed, weight, eps)
    return fused_add_rms_norm_ref(summed, residual, weight, eps)
