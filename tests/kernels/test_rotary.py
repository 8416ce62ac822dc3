"""Rotary embedding in place: NeoX and interleaved styles, full and partial rotary."""

import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed")

from pagoda.kernels.rotary import apply_rotary, apply_rotary_ref, rotary_cos_sin_cache  # noqa: E402
from tests.kernels.paged_inputs import DEVICE, gpu_param, tolerance  # noqa: E402

# (num_tokens, num_heads, num_kv_heads, head_dim, rotary_dim, dtype)
CASES = [
    pytest.param(5, 4, 2, 16, 16, torch.float32, id="full"),
    pytest.param(6, 4, 1, 32, 16, torch.float32, id="partial-half"),
    pytest.param(3, 3, 3, 24, 8, torch.float32, id="partial-odd-heads"),
    pytest.param(4, 2, 2, 16, 16, torch.float16, id="fp16"),
    gpu_param(4096, 32, 8, 128, 128, torch.bfloat16, id="gpu-llama8b"),
    gpu_param(1000, 32, 2, 128, 64, torch.bfloat16, id="gpu-glm4-partial"),
]


@pytest.mark.parametrize("is_neox", [True, False], ids=["neox", "interleaved"])
@pytest.mark.parametrize("num_tokens, num_heads, num_kv_heads, head_dim, rotary_dim, dtype", CASES)
def test_matches_reference(num_tokens, num_heads, num_kv_heads, head_dim, rotary_dim, dtype, is_neox):
    gen = torch.Generator().manual_seed(0)
    width = (num_heads + 2 * num_kv_heads) * head_dim
    # q and k as strided views of one fused QKV output, rotated in place through the views.
    qkv = torch.randn(num_tokens, width, generator=gen).to(dtype).to(DEVICE)
    q = qkv[:, : num_heads * head_dim].view(num_tokens, num_heads, head_dim)
    k = qkv[:, num_heads * head_dim : (num_heads + num_kv_heads) * head_dim].view(num_tokens, num_kv_heads, head_dim)
    v_before = qkv[:, (num_heads + num_kv_heads) * head_dim :].clone()
    positions = torch.randint(0, 200, (num_tokens,), generator=gen).to(DEVICE)
    cache = rotary_cos_sin_cache(rotary_dim, 256, device=DEVICE)

    expected_q, expected_k = apply_rotary_ref(q, k, positions, cache, is_neox)
    apply_rotary(q, k, positions, cache, is_neox)
    torch.testing.assert_close(q, expected_q, **tolerance(dtype))
    torch.testing.assert_close(k, expected_k, **tolerance(dtype))
    assert torch.equal(qkv[:, (num_heads + num_kv_heads) * head_dim :], v_before)


def test_pass_through_dims_and_position_zero_are_unchanged():
    gen = torch.Generator().manual_seed(1)
    q, k = torch.randn(3, 2, 32, generator=gen).to(DEVICE), torch.randn(3, 1, 32, generator=gen).to(DEVICE)
    q_before, k_before = q.clone(), k.clone()
    positions = torch.tensor([0, 5, 9], dtype=torch.int32, device=DEVICE)
    apply_rotary(q, k, positions, rotary_cos_sin_cache(8, 16, device=DEVICE), is_neox=False)
    assert torch.equal(q[..., 8:], q_before[..., 8:]) and torch.equal(k[..., 8:], k_before[..., 8:])
    torch.testing.assert_close(q[0], q_before[0])  # cos 1, sin 0
    assert not torch.allclose(q[1, :, :8], q_before[1, :, :8])


def test_rejects_bad_arguments_naming_them():
    q, k = torch.randn(3, 2, 16, device=DEVICE), torch.randn(3, 1, 16, device=DEVICE)
    positions = torch.arange(3, device=DEVICE)
    cache = rotary_cos_sin_cache(16, 8, device=DEVICE)
    bad = [
        ("k", dict(k=k.half())),
        ("k", dict(k=k[:2])),
        ("positions", dict(positions=positions.float())),
        ("positions", dict(positions=positions[:2])),
        ("rotary_dim", dict(cos_sin_cache=torch.randn(8, 18, device=DEVICE))),
        ("cos_sin_cache", dict(cos_sin_cache=cache[:, None])),
        ("q", dict(q=q.transpose(1, 2))),
    ]
    for name, override in bad:
        with pytest.raises(ValueError, match=rf"^{name}\b"):
            apply_rotary(**{**dict(q=q, k=k, positions=positions, cos_sin_cache=cache), **override})
