"""Full-prompt logits from a running ``LLM``, through the engine's own paged path (GPU checks)."""

from __future__ import annotations

import torch


def prompt_logits(llm, prompt: list[int]) -> torch.Tensor:
    """(L, V) float32 logits of every prompt position, in one prefill through the real paged path
    (the engine's Triton kernels and KV cache; call it when no request holds blocks)."""
    from pagoda.engine.attention_metadata import AttentionMetadata

    worker = llm.engine.executor.worker
    n, bs = len(prompt), llm.engine.config.cache.block_size
    dev = torch.device("cuda")
    i32 = dict(dtype=torch.int32, device=dev)
    meta = AttentionMetadata(
        slot_mapping=torch.arange(n, device=dev), query_start_loc=torch.tensor([0, n], **i32),
        seq_lens=torch.tensor([n], **i32), context_lens=torch.tensor([0], **i32),
        block_tables=torch.arange(-(-n // bs), **i32)[None], query_lens_cpu=[n], seq_lens_cpu=[n],
        max_query_len=n, max_seq_len=n, block_size=bs,
    )
    ids = torch.tensor(prompt, device=dev)
    with torch.inference_mode():
        hidden = worker.model(ids, torch.arange(n, device=dev), worker.runner.kv_caches, meta)
        return worker.model.compute_logits(hidden).float().cpu()
