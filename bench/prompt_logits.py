"""What the GPU checks compare: greedy tokens and full-prompt logits from a running ``LLM``, through
the engine's own paged path, on a fixed set of prompts (7 to 512 tokens, 1,265 positions)."""

from __future__ import annotations

import gc
import random
from pathlib import Path

import torch

NEW_TOKENS = 32
PROMPT_LENS = (7, 16, 33, 64, 100, 200, 333, 512)


def prompts(vocab: int) -> list[list[int]]:
    """The checks' prompts: random token ids (seeded) of ``PROMPT_LENS`` lengths."""
    rng = random.Random(0)
    return [[rng.randrange(10, vocab) for _ in range(n)] for n in PROMPT_LENS]


def prompt_logits(llm, prompt: list[int]) -> torch.Tensor:
    """(L, V) float32 logits of every prompt position, in one prefill through the real paged path
    (the engine's Triton kernels and KV cache; call it when no request holds blocks)."""
    from pagoda.engine.attention_metadata import AttentionMetadata

    worker = llm.engine.executor.worker
    n, bs = len(prompt), llm.engine.config.cache.block_size
    dev = torch.device("cuda")
    i32 = {"dtype": torch.int32, "device": dev}
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


def greedy_and_logits(path: Path, batch: list[list[int]], **engine_kwargs) -> tuple[list[list[int]], list[torch.Tensor]]:
    """``NEW_TOKENS`` greedy tokens and the full-prompt logits of every prompt from a bf16 ``LLM`` on
    ``path`` (``engine_kwargs`` on top), then the engine's memory back for whatever runs next."""
    from pagoda import LLM, SamplingParams

    llm = LLM(model=str(path), dtype="bfloat16", device="cuda", max_model_len=1024, gpu_memory_utilization=0.6,
              **engine_kwargs)
    outs = llm.generate([{"prompt_token_ids": p} for p in batch],
                        SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True), use_tqdm=False)
    logits = [prompt_logits(llm, p) for p in batch]
    tokens = [o.outputs[0].token_ids for o in outs]
    llm.engine.shutdown()
    del llm
    gc.collect()  # the engine's objects refer to each other: free its weights and KV cache before the next one
    torch.cuda.empty_cache()
    return tokens, logits
