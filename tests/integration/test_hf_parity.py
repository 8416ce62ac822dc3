"""Greedy tokens identical to HF transformers ``generate`` on the same weights (float32, CPU).

Each model is checked four ways: every prompt alone, all prompts in one continuous batch,
prompts split by chunked prefill (the tiny models), and a KV pool so small that preemption-recompute
is forced.
"""

from __future__ import annotations

import random

import pytest
import torch

from pagoda import LLM, SamplingParams
from tests.tiny_models import TINY_ARCHS

MAX_NEW = 24
PROMPT_LENGTHS = (3, 9, 16, 17, 33, 64, 90, 130)  # around block boundaries (block_size 16)


def _random_prompts(vocab_size: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(100, vocab_size) for _ in range(n)] for n in PROMPT_LENGTHS]


def _hf_greedy(path, prompts: list[list[int]], eos: int | None) -> list[list[int]]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    outs = []
    for ids in prompts:
        x = torch.tensor([ids])
        with torch.no_grad():
            y = model.generate(
                x, attention_mask=torch.ones_like(x), max_new_tokens=MAX_NEW, do_sample=False,
                eos_token_id=eos, pad_token_id=eos if eos is not None else 0,
            )
        outs.append(y[0, len(ids):].tolist())
    return outs


def _ours(llm: LLM, prompts, one_at_a_time: bool = False) -> list[list[int]]:
    params = SamplingParams(temperature=0.0, max_tokens=MAX_NEW)
    if one_at_a_time:
        return [llm.generate([p], params, use_tqdm=False)[0].outputs[0].token_ids for p in prompts]
    return [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]


def _check(path, prompts, chunked: bool = True):
    # the smallest pool that fits the longest request alone: running them together must preempt
    num_blocks = -(-(max(map(len, prompts)) + MAX_NEW) // 16) + 1
    variants = {
        "chunked": dict(max_num_batched_tokens=16),
        "preempted": dict(num_blocks=num_blocks, max_model_len=num_blocks * 16, max_num_batched_tokens=64),
    }
    if not chunked:
        del variants["chunked"]
    alone = LLM(model=str(path), dtype="float32", device="cpu")
    expected = _hf_greedy(path, prompts, alone.engine.eos_token_id)
    assert _ours(alone, prompts, one_at_a_time=True) == expected
    assert _ours(alone, prompts) == expected  # batched: all prompts in one continuous batch
    for name, kwargs in variants.items():
        llm = LLM(model=str(path), dtype="float32", device="cpu", **kwargs)
        assert _ours(llm, prompts) == expected, name
        llm.engine.kv.check_invariants()
        assert llm.engine.kv.usage() == 0
        if name == "preempted":
            assert llm.engine.scheduler.num_preemptions > 0


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_tiny_random_model_matches_hf(arch, tiny_models):
    path = tiny_models[arch]
    from transformers import AutoConfig

    _check(path, _random_prompts(AutoConfig.from_pretrained(path).vocab_size))


def test_embedded_smollm2_matches_hf(embedded_path):
    texts = [
        "What is the capital of France?",
        "Write a haiku about the sea.",
        "1, 2, 3, 4,",
        "The quick brown fox",
        "Explain paged attention in one sentence. " * 3,
        "def fibonacci(n):",
        "Once upon a time, in a land far away, there lived a dragon who " * 4,
        "Translate to French: good morning, how are you today?",
    ]
    from pagoda.engine.tokenizer import load_tokenizer

    tok = load_tokenizer(embedded_path)
    # Chunked prefill is the same code path on every architecture: the tiny models above check it; here
    # it would be the slowest run of the suite's slowest test.
    _check(embedded_path, [tok(t).input_ids for t in texts], chunked=False)
