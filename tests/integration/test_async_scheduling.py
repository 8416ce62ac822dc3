"""Async scheduling (step n+1 scheduled and launched before step n's tokens reach the host) gives
exactly the tokens of synchronous steps, and leaks nothing.

Mixed batches on purpose: plain greedy requests (whose ids stay on the device between steps),
sampled ones with a seed, penalties and logprobs (which make the runner finish the previous step
first), n > 1, stop strings, EOS, chunked prefill, preemption, aborts. TP=1 runs the embedded
model in-process; TP=2 runs a tiny Llama on two gloo ranks. Left at its default, async scheduling is on
only where steps run apart from the engine's thread (TP ranks, a CUDA device), not on one CPU rank.
"""

from __future__ import annotations

import random

import pytest

from pagoda import LLM, SamplingParams
from pagoda.engine.llm_engine import LLMEngine

MIXED = [
    SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True),
    SamplingParams(temperature=0.0, max_tokens=7),
    SamplingParams(temperature=0.8, seed=3, max_tokens=16, n=2),
    SamplingParams(temperature=0.0, max_tokens=20, repetition_penalty=1.3),
    SamplingParams(temperature=0.0, max_tokens=12, logprobs=2),
    SamplingParams(temperature=0.0, max_tokens=30, stop=[" the"]),
]


def _prompts(vocab_size: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(100, vocab_size) for _ in range(n)] for n in (3, 17, 40, 9, 25, 60)]


def _generate(llm: LLM, prompts) -> list[list[tuple]]:
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], MIXED, use_tqdm=False)
    return [[(c.token_ids, c.finish_reason, c.text) for c in o.outputs] for o in outputs]


def _check_clean(engine: LLMEngine) -> None:
    engine.kv.check_invariants()
    assert engine.kv.usage() == 0
    assert not engine.has_unfinished_requests()
    worker = getattr(engine.executor, "worker", None)
    if worker is not None:  # in-process: no step is left pending (requests are dropped at the next step)
        assert not worker.runner._unresolved


@pytest.mark.parametrize("engine_kwargs", [
    {},
    {"num_blocks": 12, "block_size": 8, "max_num_batched_tokens": 32, "max_model_len": 96},  # chunks, preemption
])
def test_tp1_async_scheduling_matches_sync(embedded_path, engine_kwargs):
    prompts = _prompts(4000, seed=1)
    results = {}
    for async_scheduling in (False, True):
        llm = LLM(model=str(embedded_path), async_scheduling=async_scheduling, max_num_seqs=4, **engine_kwargs)
        results[async_scheduling] = _generate(llm, prompts)
        _check_clean(llm.engine)
        if engine_kwargs:
            assert llm.engine.scheduler.num_preemptions > 0
    assert results[True] == results[False]
    assert sum(len(c[0]) for o in results[True] for c in o) > 100


def test_async_step_returns_tokens_one_step_late_and_aborts_cleanly(embedded_path):
    engine = LLMEngine.from_kwargs(model=str(embedded_path), async_scheduling=True)
    params = SamplingParams(temperature=0.0, max_tokens=50, ignore_eos=True)
    engine.add_request("a", {"prompt_token_ids": [100, 200, 300]}, params)
    engine.add_request("b", {"prompt_token_ids": [400, 500]}, params)
    assert engine.step() == []  # the prefill is in flight; its first tokens come with the next step
    first = engine.step()
    assert sorted(o.request_id for o in first) == ["a", "b"]
    assert all(len(o.outputs[0].token_ids) == 1 for o in first)
    for _ in range(3):
        engine.step()
    engine.abort_request("a")  # while a step holding it is in flight
    seen_a = False
    while engine.has_unfinished_requests():
        for output in engine.step():
            seen_a |= output.request_id == "a"
            if output.request_id == "b" and output.finished:
                assert len(output.outputs[0].token_ids) == 50
    assert not seen_a
    _check_clean(engine)


def test_default_is_synchronous_on_one_cpu_rank(embedded_path):
    """A CPU forward runs when it is submitted, so async scheduling would only hold each step's tokens back
    by one forward: left at None it is off on one CPU rank, and the prefill's own step hands on the first token."""
    engine = LLMEngine.from_kwargs(model=str(embedded_path))
    assert engine.config.scheduler.async_scheduling is False and not engine.executor.overlaps_host
    engine.add_request("a", {"prompt_token_ids": [100, 200, 300]}, SamplingParams(temperature=0.0, max_tokens=5))
    assert [(o.request_id, len(o.new_token_ids)) for o in engine.step_core()] == [("a", 1)]
    while engine.has_unfinished_requests():
        engine.step_core()
    _check_clean(engine)


def test_tp2_async_scheduling_matches_sync(tiny_models):
    from transformers import AutoConfig

    path = tiny_models["llama"]
    prompts = _prompts(AutoConfig.from_pretrained(path).vocab_size, seed=4)
    kwargs = dict(model=str(path), device="cpu", dtype="float32", max_num_seqs=4, num_blocks=14, block_size=8,
                  max_num_batched_tokens=32, max_model_len=104)
    reference = _generate(LLM(**kwargs), prompts)
    llm = LLM(tensor_parallel_size=2, **kwargs)  # the ranks compute in their own processes: async by default
    try:
        assert llm.engine.config.scheduler.async_scheduling is True
        assert _generate(llm, prompts) == reference
        assert llm.engine.scheduler.num_preemptions > 0
        _check_clean(llm.engine)
    finally:
        llm.engine.shutdown()
