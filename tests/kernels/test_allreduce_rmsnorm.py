"""All-reduce + residual add + RMSNorm over symmetric memory, with W ranks emulated in one process.

The buffers are plain tensors of one device and the address tables hold their ``data_ptr()``s. A
rank's programs wait for the other ranks' pushes, and the interpreter runs one program at a time,
so ranks run from W-1 down to 0 and, before rank r runs, the test writes what ranks < r would have
pushed by then (their rows in r's receive buffer, their flags); ranks > r pushed for real. Once r
has run, the seeded rows are poisoned (NaN), so after the call every receive buffer holds only
what was really pushed, which the test checks. On a GPU the same emulation runs on one device.

Expected values: the kernel must do exactly what ``pagoda.kernels.rmsnorm``'s kernel does to the float32
sum over the ranks in rank order, rounded to the dtype, bitwise on every rank; and be close to the
torch reference. Triton's interpreter (3.9) truncates float32 -> bfloat16 instead of rounding to
nearest even (``cast_impl`` passes no rounding mode), so on CPU the expected bf16 sum is truncated
too; against the torch reference, bf16 is compared within a tolerance there and bitwise on a GPU.
"""

import dataclasses
import threading

import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed")

from pagoda.kernels.allreduce_rmsnorm import (
    NUM_PROGRAMS,
    SymmetricWorkspace,
    all_reduce_rms_norm,
    all_reduce_rms_norm_ref,
)
from pagoda.kernels.rmsnorm import fused_add_rms_norm, rms_norm, rms_norm_ref
from tests.kernels.paged_inputs import DEVICE, gpu_param, tolerance

EPS = 1e-5
TRUNCATES_BF16 = DEVICE == "cpu"  # the interpreter's float32 -> bfloat16 cast


class EmulatedGroup:
    """W ranks' workspaces on one device, and the host's copy of the kernels' epoch.

    ``calls_before``: start as if that many calls had been made (the int32 epoch wraps at 2**31).
    ``peers_ahead``: the seeded flags of ranks < r show the next epoch, as when a peer is already one
    call further (its rows of this call are in place, its flag overwritten).
    """

    def __init__(self, world, programs, capacity_bytes, dtype, calls_before=0, peers_ahead=False):
        self.world, self.programs, self.dtype, self.peers_ahead = world, programs, dtype, peers_ahead
        self.epoch = _int32(calls_before)
        self.data = [torch.empty(capacity_bytes, dtype=torch.uint8, device=DEVICE) for _ in range(world)]
        for data in self.data:
            data.view(dtype).fill_(float("nan"))
        self.flags = [torch.full((world, programs), self.epoch, dtype=torch.int32, device=DEVICE) for _ in range(world)]
        data_ptrs = torch.tensor([d.data_ptr() for d in self.data], device=DEVICE)
        flag_ptrs = torch.tensor([f.data_ptr() for f in self.flags], device=DEVICE)
        self.workspaces = [
            SymmetricWorkspace(r, self.data[r], data_ptrs, self.flags[r], flag_ptrs, self._counters())
            for r in range(world)
        ]

    def _counters(self) -> torch.Tensor:
        return torch.full((self.programs,), self.epoch, dtype=torch.int32, device=DEVICE)

    def received(self, rank: int, hidden: int) -> torch.Tensor:
        """Rank's receive buffer as (2 parities, W sources, max_rows, H): the start of each half."""
        rows = self.workspaces[rank].max_rows(hidden, self.dtype)
        halves = self.data[rank].view(self.dtype).view(2, -1)
        return halves[:, : self.world * rows * hidden].view(2, self.world, rows, hidden)

    def call(self, xs: list[torch.Tensor], residual, weight) -> list:
        """Every rank's all_reduce_rms_norm of its own ``xs[r]``; checks what was pushed where."""
        self.epoch = epoch = _int32(self.epoch + 1)
        num_rows, hidden = xs[0].shape
        parity, active = epoch & 1, min(num_rows, self.programs)  # programs with a row set flags
        outs = [None] * self.world
        for r in reversed(range(self.world)):
            received = self.received(r, hidden)
            for q in range(r):  # what ranks < r push later
                received[parity, q, :num_rows] = xs[q]
            self.flags[r][:r, :active] = _int32(epoch + self.peers_ahead)
            outs[r] = _bounded(all_reduce_rms_norm, xs[r], residual, weight, EPS, self.workspaces[r])
            received[parity, :r, :num_rows] = float("nan")
        for r in range(self.world):
            received = self.received(r, hidden)
            for q in set(range(self.world)) - {r}:
                assert torch.equal(received[parity, q, :num_rows], xs[q]), f"rank {q}'s rows in rank {r}'s buffer"
                assert (self.flags[r][q, :active] == epoch).all(), f"rank {q}'s flags in rank {r}'s buffer"
            assert (self.workspaces[r].counters == epoch).all()  # every program counts every call
        return outs


CALL_TIMEOUT_S = 120.0


def _bounded(fn, *args):
    """``fn(*args)`` (and, on a GPU, its kernels) within CALL_TIMEOUT_S, else a test failure: a kernel
    that waits for a flag nobody sets spins forever, and the suite must not hang with it. The
    spinning call is left behind on a daemon thread."""
    result = {}

    def run():
        try:
            result["out"] = fn(*args)
            if DEVICE == "cuda":
                torch.cuda.synchronize()
        except BaseException as exc:  # noqa: BLE001 - re-raised on the test's thread
            result["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(CALL_TIMEOUT_S)
    if thread.is_alive():
        pytest.fail(f"the kernel did not finish within {CALL_TIMEOUT_S:.0f} s: it waits for a flag that is never set")
    if "error" in result:
        raise result["error"]
    return result["out"]


def _int32(n: int) -> int:
    return (n + 2**31) % 2**32 - 2**31


def _round_like_triton(total: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    if dtype == torch.bfloat16 and TRUNCATES_BF16:
        return (total.view(torch.int32) & -(1 << 16)).view(torch.float32).to(dtype)  # exact: low bits zero
    return total.to(dtype)


def _unfused(xs, residual, weight):
    """pagoda.kernels.rmsnorm's Triton kernel on the rank-order float32 sum, rounded as Triton rounds."""
    total = xs[0].float()
    for x in xs[1:]:
        total = total + x.float()
    summed = _round_like_triton(total, xs[0].dtype)
    return rms_norm(summed, weight, EPS) if residual is None else fused_add_rms_norm(summed, residual, weight, EPS)


def _inputs(world, num_rows, hidden, dtype, gen):
    def rand(*shape):
        return torch.randn(*shape, generator=gen).to(dtype).to(DEVICE)

    return [rand(num_rows, hidden) for _ in range(world)], rand(num_rows, hidden)


# (world, dtype, hidden, residual, rows of each consecutive call, programs G)
CASES = [
    pytest.param(2, torch.float32, 96, True, [1, 7, 3, 10], 4, id="w2-fp32-residual"),
    pytest.param(2, torch.float32, 64, False, [5, 1], 4, id="w2-fp32"),
    pytest.param(2, torch.bfloat16, 96, True, [1, 7, 3, 10], 4, id="w2-bf16-residual"),
    pytest.param(2, torch.bfloat16, 128, False, [4, 9], 4, id="w2-bf16"),
    pytest.param(4, torch.float32, 128, True, [2, 9, 1, 4], 4, id="w4-fp32-residual"),
    pytest.param(4, torch.bfloat16, 256, False, [6, 1, 13], 4, id="w4-bf16"),
    pytest.param(2, torch.float16, 64, True, [3, 5], 4, id="w2-fp16-residual"),
    pytest.param(2, torch.bfloat16, 64, True, [1, 40], NUM_PROGRAMS, id="w2-bf16-default-grid"),
    gpu_param(2, torch.bfloat16, 4096, True, [1, 64, 33, 8], NUM_PROGRAMS, id="gpu-w2-llama8b"),
    gpu_param(8, torch.bfloat16, 8192, True, [1, 100, 7], NUM_PROGRAMS, id="gpu-w8-hidden8192"),
]


@pytest.mark.parametrize("world, dtype, hidden, with_residual, calls, programs", CASES)
def test_every_rank_gets_the_norm_of_the_sum(world, dtype, hidden, with_residual, calls, programs):
    group = EmulatedGroup(world, programs, capacity_bytes=2 * world * max(calls) * hidden * 4, dtype=dtype)
    _check_calls(group, hidden, with_residual, calls)


@pytest.mark.parametrize(
    "calls_before, peers_ahead", [(2**31 - 2, False), (6, True)], ids=["epoch-wraps", "peers-one-call-ahead"]
)
def test_epochs_compare_by_wrapping_difference(calls_before, peers_ahead):
    group = EmulatedGroup(2, 4, 2 * 2 * 6 * 64 * 4, torch.float32, calls_before=calls_before, peers_ahead=peers_ahead)
    _check_calls(group, 64, True, [6, 1, 5])  # epochs 2**31 - 1, -2**31, -2**31 + 1 in the first case


def _check_calls(group: EmulatedGroup, hidden: int, with_residual: bool, calls: list[int]) -> None:
    dtype, world = group.dtype, group.world
    gen = torch.Generator().manual_seed(world * 100 + hidden)
    weight = (1.0 + 0.1 * torch.randn(hidden, generator=gen)).to(dtype).to(DEVICE)
    exact_sum = dtype != torch.bfloat16 or not TRUNCATES_BF16  # Triton rounds the sum as torch does
    for num_rows in calls:  # consecutive epochs: both parities, a different N each time
        xs, residual = _inputs(world, num_rows, hidden, dtype, gen)
        if not with_residual:
            residual = None
        outs = [_as_tuple(o) for o in group.call(xs, residual, weight)]
        expected = _as_tuple(_unfused(xs, residual, weight))
        ref = _as_tuple(all_reduce_rms_norm_ref(xs, residual, weight, EPS))
        for rank, got in enumerate(outs):
            for name, g, e, r in zip(["out", "residual_out"], got, expected, ref):
                assert torch.equal(g, e), f"rank {rank}'s {name} (epoch {group.epoch}, {num_rows} rows)"
                torch.testing.assert_close(g, r, **tolerance(dtype))
            if residual is not None and exact_sum:
                assert torch.equal(got[1], ref[1])  # the residual stream is exact: sum, round, add, round
            assert all(torch.equal(g, o) for g, o in zip(got, outs[0], strict=True))  # bitwise equal on every rank


def _as_tuple(result) -> tuple:
    return result if isinstance(result, tuple) else (result,)


def test_reference_rounds_the_rank_order_float32_sum_once():
    gen = torch.Generator().manual_seed(3)
    xs = [torch.randn(4, 32, generator=gen).bfloat16() for _ in range(3)]
    residual, weight = torch.randn(4, 32, generator=gen).bfloat16(), torch.rand(32, generator=gen).bfloat16()
    summed = ((xs[0].float() + xs[1].float()) + xs[2].float()).bfloat16()
    out, new_residual = all_reduce_rms_norm_ref(xs, residual, weight, EPS)
    assert torch.equal(new_residual, summed + residual)
    assert torch.equal(out, rms_norm_ref(summed + residual, weight, EPS))
    assert torch.equal(all_reduce_rms_norm_ref(xs, None, weight, EPS), rms_norm_ref(summed, weight, EPS))


def test_no_rows_launches_nothing():
    group = EmulatedGroup(2, 4, capacity_bytes=4096, dtype=torch.float32)
    weight = torch.ones(16, device=DEVICE)
    out = all_reduce_rms_norm(torch.empty(0, 16, device=DEVICE), None, weight, EPS, group.workspaces[0])
    assert out.shape == (0, 16)
    assert (group.workspaces[0].counters == 0).all()  # every rank skips alike: the epochs stay in step


def test_rejects_bad_arguments_naming_them():
    ws = EmulatedGroup(2, 4, capacity_bytes=2 * 2 * 3 * 16 * 4, dtype=torch.float32).workspaces[0]  # 3 rows of 16
    x, residual = (torch.randn(3, 16, device=DEVICE) for _ in range(2))
    weight = torch.ones(16, device=DEVICE)
    wide = torch.randn(1, 32768, device=DEVICE)
    cases = [
        (r"^x\b.*dims", {"x": x.view(3, 2, 8)}),
        (r"^x must be contiguous", {"x": torch.randn(16, 3, device=DEVICE).t()}),
        (r"^x\b.*capacity of 3 rows", {"x": torch.randn(4, 16, device=DEVICE), "residual": None}),
        (r"^x's hidden size 32768", {"x": wide, "residual": None, "weight": torch.ones(32768, device=DEVICE)}),
        (r"^weight\b", {"weight": weight.half()}),
        (r"^weight\b", {"weight": weight[:8]}),
        (r"^residual\b", {"residual": residual[:2]}),
        (r"^residual\b", {"residual": residual.double()}),
        (r"^eps\b", {"eps": 0.0}),
    ]
    for pattern, changes in cases:
        args = {"x": x, "residual": residual, "weight": weight, "eps": EPS, "workspace": ws} | changes
        with pytest.raises(ValueError, match=pattern):
            all_reduce_rms_norm(**args)


def test_workspace_rejects_inconsistent_buffers_naming_them():
    ws = EmulatedGroup(2, 4, capacity_bytes=1024, dtype=torch.float32).workspaces[1]
    cases = [
        (r"^world_size\b.*2\.\.8", {"flags": torch.zeros(9, 4, dtype=torch.int32, device=DEVICE)}),
        (r"^world_size\b", {"flags": torch.zeros(1, 4, dtype=torch.int32, device=DEVICE)}),
        (r"^rank 2\b", {"rank": 2}),
        (r"^data\b", {"data": torch.zeros(1000, dtype=torch.uint8, device=DEVICE)}),
        (r"^data_ptrs\b.*addresses", {"data_ptrs": ws.data_ptrs[:1]}),
        (r"^data_ptrs\b.*aligned", {"data_ptrs": ws.data_ptrs + 8}),
        (r"^flag_ptrs\b", {"flag_ptrs": ws.flag_ptrs.int()}),
        (r"^counters\b", {"counters": torch.zeros(5, dtype=torch.int32, device=DEVICE)}),
    ]
    for pattern, changes in cases:
        with pytest.raises(ValueError, match=pattern):
            dataclasses.replace(ws, **changes)
