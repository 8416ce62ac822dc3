"""Token bitmasks (engine/structured/grammar.py) against a torch reference, on CPU: random masks of
every density, packed here from a bool (R, V) matrix that the reference applies directly, so the
check does not share the bit order with the code under test. Mask row j is for logits row rows[j]. Other float dtypes, vocabularies that
are not a multiple of 32, masks wider than the logits, row subsets and strided logits included.
"""

from __future__ import annotations

import pytest
import torch

from pagoda.engine.structured.grammar import allocate_bitmask, apply_bitmask, bitmask_width


def pack(allowed: torch.Tensor) -> torch.Tensor:
    """(B, 32 * W) bool -> (B, W) int32: bit t % 32 of word t // 32 set when token t is allowed."""
    b, n = allowed.shape
    words = (allowed.view(b, n // 32, 32).long() << torch.arange(32)).sum(-1)  # (B, W) in [0, 2^32)
    return (words - (words >= 2**31).long() * 2**32).to(torch.int32)  # two's complement: bit 31 is the sign


def reference(logits: torch.Tensor, allowed: torch.Tensor, rows) -> torch.Tensor:
    """``allowed`` (R, >= V) bool: row j for logits row rows[j] (every row in order when rows is None)."""
    out = logits.clone()
    for j, r in enumerate(range(logits.shape[0]) if rows is None else rows):
        out[r] = out[r].masked_fill(~allowed[j, : logits.shape[1]], float("-inf"))
    return out


def random_allowed(batch: int, width: int, density: float, gen: torch.Generator) -> torch.Tensor:
    """(batch, 32 * width) bool. Rows alternate between scattered bits and whole words allowed or
    banned together (a grammar's masks are mostly of the second kind: runs of similar tokens)."""
    scattered = torch.rand(batch, width * 32, generator=gen) < density
    words = (torch.rand(batch, width, 1, generator=gen) < density).expand(batch, width, 32).reshape(batch, -1)
    return torch.where((torch.arange(batch) % 2 == 0).unsqueeze(1), scattered, words)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("vocab", [49152, 1000, 37])
@pytest.mark.parametrize("density", [0.001, 0.5, 0.999])
@pytest.mark.parametrize("rows", [None, [1, 3], [4, 0, 2]])
def test_apply_bitmask_matches_the_reference(dtype, vocab, density, rows):
    gen = torch.Generator().manual_seed(vocab + int(density * 1000))
    width = bitmask_width(vocab) + 2  # wider than needed: the words past the vocabulary are ignored
    allowed = random_allowed(5 if rows is None else len(rows), width, density, gen)  # one mask row per row
    logits = (torch.randn(5, vocab, generator=gen) * 4).to(dtype)
    logits[0, :3] = torch.tensor([float("-inf"), float("inf"), 0.0])
    expected = reference(logits, allowed, rows)
    apply_bitmask(logits, pack(allowed), rows)
    assert torch.equal(logits, expected)


def test_apply_bitmask_writes_through_strided_logits():
    gen = torch.Generator().manual_seed(1)
    allowed = random_allowed(2, bitmask_width(4000), 0.3, gen)
    storage = torch.randn(4000, 3, generator=gen)
    logits = storage.t()  # (3, 4000), not contiguous: the mask must land in ``storage``
    expected = reference(logits, allowed, [0, 2])
    apply_bitmask(logits, pack(allowed), [0, 2])
    assert torch.equal(storage.t(), expected)


def test_apply_bitmask_with_no_rows_changes_nothing():
    logits = torch.randn(2, 64)
    before = logits.clone()
    apply_bitmask(logits, torch.zeros(0, 2, dtype=torch.int32), [])
    assert torch.equal(logits, before)


def test_apply_bitmask_refuses_a_mask_of_other_rows():
    with pytest.raises(ValueError, match="does not fit 2 rows"):
        apply_bitmask(torch.randn(3, 64), torch.zeros(3, 2, dtype=torch.int32), [0, 2])


def test_allocate_bitmask_allows_every_token():
    bitmask = allocate_bitmask(3, 1000)
    assert bitmask.shape == (3, 32) and bitmask.dtype == torch.int32
    assert (bitmask == -1).all()
    logits = torch.randn(3, 1000)
    before = logits.clone()
    apply_bitmask(logits, bitmask)
    assert torch.equal(logits, before)
    bitmask[1].zero_()  # writable, and rows are independent
    apply_bitmask(logits, bitmask)
    assert torch.isneginf(logits[1]).all() and torch.equal(logits[[0, 2]], before[[0, 2]])


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [None, [1, 3], [4, 0, 2]])
def test_apply_bitmask_on_the_gpu_matches_the_reference(dtype, rows):
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    gen = torch.Generator().manual_seed(7)
    vocab = 151936
    allowed = random_allowed(5 if rows is None else len(rows), bitmask_width(vocab), 0.01, gen)
    logits = (torch.randn(5, vocab, generator=gen) * 4).to(dtype)
    expected = reference(logits, allowed, rows)
    on_gpu = logits.cuda()
    apply_bitmask(on_gpu, pack(allowed).pin_memory(), rows)  # copied to the device, spread to its rows
    assert torch.equal(on_gpu.cpu(), expected)
