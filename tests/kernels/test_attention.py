"""The attention entry point picks the decode kernel for pure decode steps, the unified one otherwise."""

import dataclasses

import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed")

import pagoda.kernels.attention as attention  # noqa: E402
from pagoda.engine.attention_metadata import AttentionMetadata  # noqa: E402
from tests.kernels.paged_inputs import make_paged_batch  # noqa: E402


def _metadata(batch, block_size: int) -> AttentionMetadata:
    query_lens = (batch.query_start_loc[1:] - batch.query_start_loc[:-1]).tolist()
    seq_lens = batch.seq_lens.tolist()
    return AttentionMetadata(
        slot_mapping=batch.slot_mapping,
        query_start_loc=batch.query_start_loc,
        seq_lens=batch.seq_lens,
        context_lens=batch.context_lens,
        block_tables=batch.block_tables,
        query_lens_cpu=query_lens,
        seq_lens_cpu=seq_lens,
        max_query_len=max(query_lens),
        max_seq_len=max(seq_lens),
        block_size=block_size,
    )


@pytest.mark.parametrize(
    "context_lens, query_lens, expected_kernel",
    [([9, 16, 3], [1, 1, 1], "paged_decode"), ([9, 0, 3], [1, 6, 1], "paged_prefill")],
    ids=["decode-only", "mixed"],
)
def test_dispatch_and_result(context_lens, query_lens, expected_kernel, monkeypatch):
    batch = make_paged_batch(context_lens, query_lens, 4, 2, 16, 4)
    meta = _metadata(batch, 4)
    called = []
    for name in ("paged_decode", "paged_prefill"):
        kernel = getattr(attention, name)
        monkeypatch.setattr(attention, name, lambda *a, _k=kernel, _n=name, **kw: called.append(_n) or _k(*a, **kw))
    out = attention.paged_attention(batch.q, batch.kv_cache, meta)
    assert called == [expected_kernel]
    expected = attention.paged_attention_ref(batch.q, batch.kv_cache, meta)
    torch.testing.assert_close(out, expected, atol=1e-4, rtol=1e-4)


def test_decode_only_batch_without_context_lens(monkeypatch):
    """The decode graphs pass ``context_lens=None``: the decode kernel reads seq_lens only."""
    batch = make_paged_batch([9, 16, 3], [1, 1, 1], 4, 2, 16, 4)
    meta = _metadata(batch, 4)
    no_context = dataclasses.replace(meta, context_lens=None)
    monkeypatch.setattr(attention, "paged_prefill", None)  # never reached for a decode-only batch
    out = attention.paged_attention(batch.q, batch.kv_cache, no_context)
    torch.testing.assert_close(out, attention.paged_attention_ref(batch.q, batch.kv_cache, meta), atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="context_lens is None"):
        attention.paged_attention_ref(batch.q, batch.kv_cache, no_context)
