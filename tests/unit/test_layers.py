"""Layers against direct torch computations: rotary, RMSNorm, linear loaders, paged attention."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from pagoda.engine.attention_metadata import group_by_length
from pagoda.engine.layers.activation import SiluAndMul
from pagoda.engine.layers.cpu_gemm import pack_model, pack_weight
from pagoda.engine.layers.attention import PagedAttention, write_kv_cache
from pagoda.engine.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from pagoda.engine.layers.layernorm import RMSNorm
from pagoda.engine.layers.linear import (
    ColumnParallelLinear, MergedColumnParallelLinear, QKVParallelLinear, RowParallelLinear,
)
from pagoda.engine.layers.rotary import RotaryEmbedding, llama3_inv_freq
from tests.unit.paged_helpers import PagedKV, make_metadata

# ---------------------------------------------------------------- rotary


def _rotary_reference(x, positions, rotary_dim, base, neox):
    """Turn each feature pair by position * base^(-2i/rotary_dim), one pair at a time, in float64."""
    out = x.double().clone()
    half = rotary_dim // 2
    for i in range(half):
        a, b = (i, i + half) if neox else (2 * i, 2 * i + 1)
        angle = positions.double()[:, None] * base ** (-2 * i / rotary_dim)  # (T, 1)
        xa, xb = x[..., a].double(), x[..., b].double()
        out[..., a] = xa * angle.cos() - xb * angle.sin()
        out[..., b] = xb * angle.cos() + xa * angle.sin()
    return out


@pytest.mark.parametrize("neox", [True, False])
@pytest.mark.parametrize("rotary_dim", [32, 16])
def test_rotary_matches_pairwise_rotation(neox, rotary_dim):
    torch.manual_seed(0)
    head_dim, base = 32, 10000.0
    rope = RotaryEmbedding(head_dim, rotary_dim, max_position=512, base=base, is_neox_style=neox)
    positions = torch.tensor([0, 1, 7, 100, 511, 3])
    q, k = torch.randn(6, 4, head_dim), torch.randn(6, 2, head_dim)
    q_out, k_out = rope(positions, q, k)
    # float32 angles (as HF computes them) against float64: at position 511 an angle is off by up to
    # ~511 * 1.2e-7 rad, times |x| up to ~4: 2.5e-4 (1e-4 failed 2 runs in 8)
    torch.testing.assert_close(
        q_out.double(), _rotary_reference(q, positions, rotary_dim, base, neox), atol=5e-4, rtol=0
    )
    torch.testing.assert_close(
        k_out.double(), _rotary_reference(k, positions, rotary_dim, base, neox), atol=5e-4, rtol=0
    )
    assert torch.equal(q_out[..., rotary_dim:], q[..., rotary_dim:])  # partial rotary: the rest passes through


def test_rotary_matches_hf_glm_and_llama_layouts():
    """Same numbers as HF's own apply_rotary_pos_emb (Llama: NeoX; GLM: interleaved, partial)."""
    from transformers.models.glm4.modeling_glm4 import apply_rotary_pos_emb as glm_apply
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb as llama_apply

    torch.manual_seed(0)
    positions = torch.arange(9)
    q, k = torch.randn(9, 4, 16), torch.randn(9, 2, 16)
    for rotary_dim, neox, apply in [(16, True, llama_apply), (8, False, glm_apply)]:
        rope = RotaryEmbedding(16, rotary_dim, 64, 10000.0, is_neox_style=neox)
        inv_freq = 1.0 / (10000.0 ** (torch.arange(0, rotary_dim, 2).float() / rotary_dim))
        freqs = positions[:, None].float() * inv_freq  # HF's RotaryEmbedding.forward
        emb = torch.cat((freqs, freqs), dim=-1)[None]  # (1, T, rotary_dim)
        hf_q, hf_k = apply(q.transpose(0, 1)[None], k.transpose(0, 1)[None], emb.cos(), emb.sin())
        q_out, k_out = rope(positions, q, k)
        torch.testing.assert_close(q_out, hf_q[0].transpose(0, 1), atol=1e-6, rtol=0)
        torch.testing.assert_close(k_out, hf_k[0].transpose(0, 1), atol=1e-6, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rotary_of_qkv_views_is_hf_bit_for_bit(dtype):
    """q and k as the models pass them (views split from one qkv projection) rotate to exactly HF's
    numbers in the model's dtype (HF casts cos and sin to it first), and the projection is left as it was."""
    from transformers.models.glm4.modeling_glm4 import apply_rotary_pos_emb as glm_apply
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb as llama_apply

    torch.manual_seed(0)
    positions = torch.tensor([3, 0, 63, 17, 8])
    qkv = torch.randn(5, (4 + 2 + 2) * 16, dtype=dtype)
    q, k, _ = qkv.split([64, 32, 32], dim=-1)
    q, k = q.view(5, 4, 16), k.view(5, 2, 16)
    before = qkv.clone()
    for rotary_dim, neox, apply in [(16, True, llama_apply), (8, False, glm_apply)]:
        rope = RotaryEmbedding(16, rotary_dim, 64, 10000.0, is_neox_style=neox)
        inv_freq = 1.0 / (10000.0 ** (torch.arange(0, rotary_dim, 2).float() / rotary_dim))
        emb = (positions[:, None].float() * inv_freq).repeat(1, 2)[None]  # (1, T, rotary_dim)
        cos, sin = emb.cos().to(dtype), emb.sin().to(dtype)
        hf_q, hf_k = apply(q.transpose(0, 1)[None], k.transpose(0, 1)[None], cos, sin)
        q_out, k_out = rope(positions, q, k)
        assert torch.equal(q_out, hf_q[0].transpose(0, 1)) and torch.equal(k_out, hf_k[0].transpose(0, 1))
    assert torch.equal(qkv, before)


def test_llama3_scaling_matches_transformers():
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    scaling = {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64,
        "rope_theta": 500000.0,
    }
    config = LlamaConfig(hidden_size=256, num_attention_heads=2, max_position_embeddings=512, rope_parameters=scaling)
    hf_inv_freq, _ = ROPE_INIT_FUNCTIONS["llama3"](config)
    base = 1.0 / (500000.0 ** (torch.arange(0, 128, 2, dtype=torch.float32) / 128))
    ours = llama3_inv_freq(base, scaling)
    torch.testing.assert_close(ours, hf_inv_freq, atol=0, rtol=1e-6)
    assert not torch.allclose(ours, base)  # the scaling did something


def test_unsupported_rope_type_is_rejected():
    with pytest.raises(ValueError, match="yarn"):
        RotaryEmbedding(16, 16, 32, 10000.0, rope_scaling={"rope_type": "yarn", "factor": 2.0})


# ---------------------------------------------------------------- norm, activation, linear, embedding


def test_rmsnorm_and_fused_residual():
    torch.manual_seed(0)
    norm = RMSNorm(8, eps=1e-5)
    norm.weight.data = torch.randn(8)
    x, r = torch.randn(5, 8), torch.randn(5, 8)
    expected = norm.weight * x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5)
    torch.testing.assert_close(norm(x), expected)
    out, residual = norm(x, r)
    torch.testing.assert_close(residual, x + r)
    torch.testing.assert_close(out, norm(x + r))


def test_silu_and_mul():
    x = torch.randn(3, 10)
    torch.testing.assert_close(SiluAndMul()(x), torch.nn.functional.silu(x[:, :5]) * x[:, 5:])


def test_qkv_and_merged_loaders_fuse_hf_tensors():
    torch.manual_seed(0)
    qkv = QKVParallelLinear(hidden_size=8, head_dim=4, num_heads=4, num_kv_heads=2, bias=True)
    q, k, v = torch.randn(16, 8), torch.randn(8, 8), torch.randn(8, 8)
    qb, kb, vb = torch.randn(16), torch.randn(8), torch.randn(8)
    for shard, w, b in [("k", k, kb), ("q", q, qb), ("v", v, vb)]:  # any order
        qkv.weight.weight_loader(qkv.weight, w, shard)
        qkv.bias.weight_loader(qkv.bias, b, shard)
    x = torch.randn(3, 8)
    expected = torch.cat([x @ q.T + qb, x @ k.T + kb, x @ v.T + vb], dim=-1)
    torch.testing.assert_close(qkv(x), expected)

    fused = QKVParallelLinear(8, 4, 4, 2)
    fused.weight.weight_loader(fused.weight, torch.cat([q, k, v]))  # already-fused checkpoint tensor
    torch.testing.assert_close(fused.weight.data, torch.cat([q, k, v]))

    gate_up = MergedColumnParallelLinear(8, [6, 6])
    gate, up = torch.randn(6, 8), torch.randn(6, 8)
    gate_up.weight.weight_loader(gate_up.weight, up, 1)
    gate_up.weight.weight_loader(gate_up.weight, gate, 0)
    torch.testing.assert_close(gate_up.weight.data, torch.cat([gate, up]))

    row = RowParallelLinear(6, 8)
    with pytest.raises(ValueError, match="shape"):
        row.weight.weight_loader(row.weight, torch.randn(6, 8))
    with pytest.raises(ValueError, match="shard_id"):
        qkv.weight.weight_loader(qkv.weight, q, "x")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_packed_cpu_weights_compute_the_same_linear(dtype):
    torch.manual_seed(0)
    if pack_weight(torch.randn(4, 4, dtype=dtype)) is None:
        pytest.skip(f"oneDNN cannot pack {dtype} weights on this CPU")
    column, row = ColumnParallelLinear(16, 24, bias=True), RowParallelLinear(24, 16, bias=True)
    emb = VocabParallelEmbedding(40, 16)
    head = ParallelLMHead(40, 16, tie_to=emb)
    model = torch.nn.ModuleList([column, row, emb, head]).to(dtype)
    for p in model.parameters():
        p.data.normal_()
    x = torch.randn(5, 16, dtype=dtype)
    expected = [column(x), row(column(x)), head(x), head.greedy(x)]
    assert pack_model(model) == 3  # the two linears and the head; the embedding itself has no packed form
    tol = dict(atol=1e-4, rtol=1e-5) if dtype == torch.float32 else dict(atol=0.1, rtol=0.02)
    for got, want in zip([column(x), row(column(x)), head(x)], expected):
        torch.testing.assert_close(got, want, **tol)
    assert head.greedy(x).tolist() == expected[3].tolist()
    assert column.weight.numel() == 0 and column.weight.dtype == dtype  # the plain copy is dropped
    assert emb.weight.shape == (40, 16)  # ... but a tied head's stays: the embedding looks rows up
    torch.testing.assert_close(emb(torch.tensor([3])), emb.weight[3:4])
    assert column(torch.randn(2, 3, 16, dtype=dtype)).shape == (2, 3, 24)  # any leading dims


def test_tied_lm_head_shares_the_embedding():
    emb = VocabParallelEmbedding(10, 4)
    head = ParallelLMHead(10, 4, tie_to=emb)
    emb.weight.weight_loader(emb.weight, torch.randn(10, 4))
    h = torch.randn(2, 4)
    torch.testing.assert_close(head(h), h @ emb.weight.T)
    torch.testing.assert_close(emb(torch.tensor([3])), emb.weight[3:4])


# ---------------------------------------------------------------- paged attention


def _dense_reference(q, k, v, scale):
    """q (Lq, Hq, D) are the last Lq of k/v's L tokens; causal; GQA by repeat; float64."""
    lq, hq, _ = q.shape
    l, hkv, _ = k.shape
    k = k.double().repeat_interleave(hq // hkv, dim=1)
    v = v.double().repeat_interleave(hq // hkv, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q.double(), k) * scale  # (Hq, Lq, L)
    query_pos = torch.arange(l - lq, l)[:, None]
    scores = scores.masked_fill(torch.arange(l)[None, :] > query_pos, float("-inf"))
    return torch.einsum("hqk,khd->qhd", scores.softmax(-1), v)  # (Lq, Hq, D)


def _run_case(seqs, num_heads, num_kv_heads, block_size, head_dim=8, empty_cache=False, drop_context_lens=False):
    """seqs: [(context_len, query_len)]. Caches each context first, then runs one step of all queries
    (``drop_context_lens``: with ``context_lens=None``, as the decode graphs pass decode-only steps)."""
    torch.manual_seed(0)
    scale = 1 / math.sqrt(head_dim)
    layer = PagedAttention(num_heads, head_dim, num_kv_heads, scale)
    cache = PagedKV(1, num_kv_heads, head_dim, num_blocks=64, block_size=block_size)
    full = [
        (
            torch.randn(c + q, num_heads, head_dim),
            torch.randn(c + q, num_kv_heads, head_dim),
            torch.randn(c + q, num_kv_heads, head_dim),
        )
        for c, q in seqs
    ]
    # Write each cached context as an earlier step would have.
    with_context = [(str(i), c) for i, (c, _) in enumerate(seqs) if c > 0]
    if with_context:
        _, attn = cache.step(with_context)
        k = torch.cat([full[int(i)][1][:c] for i, c in with_context])
        v = torch.cat([full[int(i)][2][:c] for i, c in with_context])
        write_kv_cache(cache.kv_caches[0], k, v, attn.slot_mapping)
    _, attn = cache.step([(str(i), q) for i, (_, q) in enumerate(seqs)])
    if drop_context_lens:
        attn = dataclasses.replace(attn, context_lens=None)
    q = torch.cat([fq[c:] for (fq, _, _), (c, _) in zip(full, seqs)])
    k = torch.cat([fk[c:] for (_, fk, _), (c, _) in zip(full, seqs)])
    v = torch.cat([fv[c:] for (_, _, fv), (c, _) in zip(full, seqs)])
    kv_cache = torch.empty(0) if empty_cache else cache.kv_caches[0]
    out = layer(q, k, v, kv_cache, attn)  # (T, Hq*D)
    expected = torch.cat([_dense_reference(fq[c:], fk, fv, scale) for (fq, fk, fv), (c, _) in zip(full, seqs)])
    torch.testing.assert_close(out.double(), expected.reshape(out.shape), atol=1e-5, rtol=0)
    if not empty_cache:  # this step's K/V landed at its slots
        torch.testing.assert_close(kv_cache[0].flatten(0, 1)[attn.slot_mapping], k)
        torch.testing.assert_close(kv_cache[1].flatten(0, 1)[attn.slot_mapping], v)


@pytest.mark.parametrize("heads", [(4, 4), (4, 2), (6, 1)], ids=["mha", "gqa", "mqa"])
def test_prefill_ragged_fresh(heads):
    _run_case([(0, 1), (0, 5), (0, 16), (0, 17), (0, 33)], *heads, block_size=4)


@pytest.mark.parametrize("drop_context_lens", [False, True], ids=["context_lens", "no_context_lens"])
@pytest.mark.parametrize("heads", [(4, 4), (4, 2), (6, 1)], ids=["mha", "gqa", "mqa"])
def test_decode_batch_across_block_boundaries(heads, drop_context_lens):
    seqs = [(0, 1), (3, 1), (4, 1), (15, 1), (16, 1), (31, 1)]
    _run_case(seqs, *heads, block_size=4, drop_context_lens=drop_context_lens)


def test_group_by_length_pads_no_row_past_the_ratio():
    lens = [5, 100, 61, 59, 1000, 30, 700]
    groups = group_by_length(lens, ratio=0.6, max_groups=4)
    assert sorted(r for g in groups for r in g) == list(range(len(lens)))
    assert groups == [[4, 6], [1, 2], [3], [5, 0]]  # longest first; 59 < 0.6 * 100 opens a group; 4 at most
    assert group_by_length(lens, ratio=0.6, max_groups=2) == [[4, 6], [1, 2, 3, 5, 0]]  # the last takes the rest
    assert group_by_length([7], 0.6, 4) == [[0]]


@pytest.mark.parametrize("heads", [(4, 2), (6, 1)], ids=["gqa", "mqa"])
def test_decode_batch_of_very_different_lengths(heads):
    # lengths 1..61: the rows go in four length groups, each gathered up to its own longest
    seqs = [(30, 1), (0, 1), (60, 1), (6, 1), (31, 1), (2, 1), (45, 1)]
    _run_case(seqs, *heads, block_size=4)


@pytest.mark.parametrize("block_size", [4, 16])
def test_chunked_prefill_mixed_with_decode(block_size):
    _run_case([(7, 5), (0, 3), (16, 1), (3, 13), (32, 16)], 4, 2, block_size=block_size)


def test_empty_cache_attends_to_fresh_kv():
    _run_case([(0, 6), (0, 1), (0, 9)], 4, 2, block_size=4, empty_cache=True)


def test_context_lens_may_be_none_only_in_decode_only_batches():
    _, attn = make_metadata([[5, 2, 9], [7]], context_lens=[3, 0], query_lens=[2, 1], block_size=2)
    with pytest.raises(ValueError, match=r"context_lens may be None only in decode-only batches.*max_query_len=2"):
        dataclasses.replace(attn, context_lens=None)
    _, decode = make_metadata([[5, 2, 9], [7]], context_lens=[3, 0], query_lens=[1, 1], block_size=2)
    assert dataclasses.replace(decode, context_lens=None).context_lens is None


def test_metadata_helper_follows_the_contract():
    positions, attn = make_metadata([[5, 2, 9], [7]], context_lens=[3, 0], query_lens=[2, 1], block_size=2)
    assert positions.tolist() == [3, 4, 0]
    assert attn.slot_mapping.tolist() == [2 * 2 + 1, 9 * 2 + 0, 7 * 2 + 0]
    assert attn.block_tables.tolist() == [[5, 2, 9], [7, 0, 0]]
    assert attn.query_start_loc.tolist() == [0, 2, 3] and attn.seq_lens_cpu == [5, 1]
