"""Writing K/V into the paged cache by slot mapping."""

import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed")

from pagoda.kernels.reshape_and_cache import reshape_and_cache, reshape_and_cache_ref  # noqa: E402
from tests.kernels.paged_inputs import DEVICE, gpu_param  # noqa: E402

# (num_tokens, num_kv_heads, head_dim, block_size, num_blocks, dtype)
CASES = [
    pytest.param(7, 2, 16, 4, 6, torch.float32, id="small"),
    pytest.param(33, 1, 32, 16, 4, torch.float32, id="mqa-bs16"),
    pytest.param(5, 3, 24, 8, 3, torch.float16, id="odd-heads-headdim24-fp16"),
    gpu_param(4096, 8, 128, 16, 512, torch.bfloat16, id="gpu-llama8b"),
]


def _slots(num_tokens: int, num_slots: int, gen: torch.Generator) -> torch.Tensor:
    """Distinct random slots including both ends of a block, with some tokens padded (-1)."""
    slots = torch.randperm(num_slots, generator=gen)[:num_tokens]
    slots[0], slots[-1] = num_slots - 1, 0
    slots[torch.rand(num_tokens, generator=gen) < 0.2] = -1
    return slots


@pytest.mark.parametrize("slot_dtype", [torch.int64, torch.int32])
@pytest.mark.parametrize("num_tokens, num_kv_heads, head_dim, block_size, num_blocks, dtype", CASES)
def test_matches_reference(num_tokens, num_kv_heads, head_dim, block_size, num_blocks, dtype, slot_dtype):
    gen = torch.Generator().manual_seed(0)
    cache = torch.randn(2, num_blocks, block_size, num_kv_heads, head_dim, generator=gen).to(dtype).to(DEVICE)
    # K and V as slices of one fused (T, (Hq + 2 Hkv) * D) projection, as the model produces them.
    fused = torch.randn(num_tokens, 4 * num_kv_heads * head_dim, generator=gen).to(dtype).to(DEVICE)
    key = fused[:, 2 * num_kv_heads * head_dim : 3 * num_kv_heads * head_dim].view(num_tokens, num_kv_heads, head_dim)
    value = fused[:, 3 * num_kv_heads * head_dim :].view(num_tokens, num_kv_heads, head_dim)
    slots = _slots(num_tokens, num_blocks * block_size, gen).to(slot_dtype).to(DEVICE)

    expected = cache.clone()
    reshape_and_cache_ref(key, value, expected, slots)
    reshape_and_cache(key, value, cache, slots)
    assert torch.equal(cache, expected)  # a pure copy: bit-exact, untouched slots included


def test_all_padding_writes_nothing():
    cache = torch.randn(2, 2, 4, 1, 16, device=DEVICE)
    before = cache.clone()
    kv = torch.randn(3, 1, 16, device=DEVICE)
    reshape_and_cache(kv, kv, cache, torch.full((3,), -1, device=DEVICE))
    assert torch.equal(cache, before)


def test_rejects_bad_arguments_naming_them():
    cache = torch.randn(2, 2, 4, 2, 16, device=DEVICE)
    kv = torch.randn(3, 2, 16, device=DEVICE)
    slots = torch.arange(3, device=DEVICE)
    args = dict(key=kv, value=kv, kv_cache=cache, slot_mapping=slots)
    bad = [
        ("key", dict(key=kv.half())),
        ("key", dict(key=torch.randn(3, 1, 16, device=DEVICE), value=torch.randn(3, 1, 16, device=DEVICE))),
        ("value", dict(value=kv[:2])),
        ("slot_mapping", dict(slot_mapping=slots[:2])),
        ("slot_mapping", dict(slot_mapping=slots.float())),
        ("kv_cache", dict(kv_cache=torch.randn(3, 2, 4, 2, 16, device=DEVICE))),
        ("key", dict(key=[1, 2])),
    ]
    for name, override in bad:
        with pytest.raises(ValueError, match=rf"^{name}\b"):
            reshape_and_cache(**{**args, **override})


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fp8_cache_stores_rounded_saturated_values(dtype):
    gen = torch.Generator().manual_seed(3)
    cache = torch.zeros(2, 4, 8, 2, 32).to(torch.float8_e4m3fn).to(DEVICE)
    key = (torch.randn(9, 2, 32, generator=gen) * torch.logspace(-3, 3, 9)[:, None, None]).to(dtype).to(DEVICE)
    value = (torch.randn(9, 2, 32, generator=gen) * 100).to(dtype).to(DEVICE)  # some beyond 448: saturate
    key[0, 0, :4] = torch.tensor([31.6, -126.3, 1000.0, -1e-6], dtype=dtype)  # carries into the exponent, saturation
    slots = _slots(9, 32, gen).to(DEVICE)
    expected = cache.clone()
    reshape_and_cache_ref(key, value, expected, slots)
    reshape_and_cache(key, value, cache, slots)
    assert torch.equal(cache.view(torch.uint8), expected.view(torch.uint8))
    assert expected.float().abs().max().item() == 448.0 and not expected.float().isnan().any()
