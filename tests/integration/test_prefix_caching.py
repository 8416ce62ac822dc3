"""Prefix caching: shared prompt prefixes reuse KV blocks, and never change the output."""

from __future__ import annotations

import random

from pagoda import LLM, SamplingParams

BLOCK = 16


def _prompts(seed: int = 1):
    rng = random.Random(seed)
    prefix = [rng.randrange(100, 40000) for _ in range(64)]
    return prefix, [prefix + [rng.randrange(100, 40000) for _ in range(n)] for n in (5, 11, 20)]


def test_second_request_reuses_the_64_token_prefix(embedded_path):
    llm = LLM(model=str(embedded_path), dtype="float32", device="cpu", max_model_len=1024)
    prefix, (first, second, _) = _prompts()
    params = SamplingParams(temperature=0.0, max_tokens=8)
    out_first = llm.generate([first], params, use_tqdm=False)[0]
    queries_before, hits_before = llm.engine.kv.prefix_cache_stats
    out_second = llm.generate([second], params, use_tqdm=False)[0]
    queries_after, hits_after = llm.engine.kv.prefix_cache_stats

    assert out_first.num_cached_tokens == 0
    assert out_second.num_cached_tokens == 64  # four full blocks of the shared prefix
    assert hits_after - hits_before == 64
    assert queries_after - queries_before == len(second)
    llm.engine.kv.check_invariants()
    assert llm.engine.kv.usage() == 0


def test_outputs_identical_with_caching_on_and_off(embedded_path):
    _, prompts = _prompts(seed=2)
    params = SamplingParams(temperature=0.0, max_tokens=16)
    results = []
    for caching in (True, False):
        llm = LLM(model=str(embedded_path), dtype="float32", device="cpu", max_model_len=1024, enable_prefix_caching=caching)
        # run twice so the second pass hits the cache when it is on
        llm.generate(prompts, params, use_tqdm=False)
        results.append([o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)])
        hits = llm.engine.kv.prefix_cache_stats[1]
        assert (hits > 0) == caching
    assert results[0] == results[1]
