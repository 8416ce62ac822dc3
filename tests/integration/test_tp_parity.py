"""Tensor parallelism on CPU (gloo): greedy tokens identical to TP=1 in float32.

Covered: tiny random Llama, Qwen3 (q/k norms), GLM-4 (interleaved partial rotary, qkv bias,
sandwich norms), GLM-4.1V with images, a Llama whose single kv head is replicated on both ranks,
and the embedded SmolLM2 (9 heads, 3 kv heads: TP=3). One model also runs with chunked prefill and forced
preemption, and its logprobs (gathered to rank 0) are compared with TP=1's.
"""

from __future__ import annotations

import random
import shutil

import pytest

from pagoda import LLM, SamplingParams
from tests.tiny_models import tiny_config

MAX_NEW = 16
PROMPT_LENGTHS = (3, 17, 33, 90)


def _prompts(vocab_size: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(100, vocab_size) for _ in range(n)] for n in PROMPT_LENGTHS]


def _greedy(llm: LLM, prompts, **params) -> list:
    sp = SamplingParams(temperature=0.0, max_tokens=MAX_NEW, **params)
    return [o.outputs[0] for o in llm.generate([{"prompt_token_ids": p} for p in prompts], sp, use_tqdm=False)]


def _tp_llm(path, tp: int, **kwargs) -> LLM:
    return LLM(model=str(path), tensor_parallel_size=tp, device="cpu", dtype="float32", **kwargs)


def _compare(path, tp: int, prompts, **kwargs) -> None:
    expected = [c.token_ids for c in _greedy(_tp_llm(path, 1, **kwargs), prompts)]
    assert sum(map(len, expected)) > 2 * MAX_NEW  # not a trivial all-EOS comparison
    llm = _tp_llm(path, tp, **kwargs)
    try:
        assert [c.token_ids for c in _greedy(llm, prompts)] == expected
        llm.engine.kv.check_invariants()
        assert llm.engine.kv.usage() == 0
    finally:
        llm.engine.shutdown()


@pytest.fixture(scope="module")
def tiny_llama_kv1(tmp_path_factory, embedded_path):
    """Llama with num_key_value_heads=1: with 2 ranks the one kv head lives on both."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path_factory.mktemp("tiny_kv1")
    tokenizer = AutoTokenizer.from_pretrained(embedded_path)
    config = tiny_config("llama", vocab_size=len(tokenizer))
    config.num_key_value_heads = 1
    import torch

    torch.manual_seed(1)
    AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(out)
    tokenizer.save_pretrained(out)
    if (embedded_path / "generation_config.json").exists():
        shutil.copy(embedded_path / "generation_config.json", out / "generation_config.json")
    return out


@pytest.mark.parametrize("arch", ["llama", "qwen3", "glm4"])
def test_tiny_tp2_matches_tp1(arch, tiny_models):
    from transformers import AutoConfig

    path = tiny_models[arch]
    _compare(path, 2, _prompts(AutoConfig.from_pretrained(path).vocab_size))


def test_replicated_kv_head_tp2_matches_tp1(tiny_llama_kv1):
    from transformers import AutoConfig

    assert AutoConfig.from_pretrained(tiny_llama_kv1).num_key_value_heads == 1
    _compare(tiny_llama_kv1, 2, _prompts(AutoConfig.from_pretrained(tiny_llama_kv1).vocab_size, seed=1))


def test_tp2_chunked_prefill_and_preemption(tiny_models):
    """Small steps and a pool that forces preemption-recompute: ranks must stay in lockstep."""
    from transformers import AutoConfig

    path = tiny_models["llama"]
    prompts = _prompts(AutoConfig.from_pretrained(path).vocab_size, seed=2)
    num_blocks = -(-(max(map(len, prompts)) + MAX_NEW) // 16) + 1
    kwargs = {"num_blocks": num_blocks, "max_model_len": num_blocks * 16, "max_num_batched_tokens": 16}
    expected = [c.token_ids for c in _greedy(_tp_llm(path, 1, **kwargs), prompts)]
    llm = _tp_llm(path, 2, **kwargs)
    try:
        assert [c.token_ids for c in _greedy(llm, prompts)] == expected
        assert llm.engine.scheduler.num_preemptions > 0
        llm.engine.kv.check_invariants()
    finally:
        llm.engine.shutdown()


def test_tp2_logprobs_match_tp1(tiny_models):
    from transformers import AutoConfig

    path = tiny_models["glm4"]
    prompts = _prompts(AutoConfig.from_pretrained(path).vocab_size, seed=3)[:2]
    ref = _greedy(_tp_llm(path, 1), prompts, logprobs=3)
    llm = _tp_llm(path, 2)
    try:
        got = _greedy(llm, prompts, logprobs=3)
    finally:
        llm.engine.shutdown()
    for a, b in zip(ref, got):
        assert a.token_ids == b.token_ids
        for step_a, step_b in zip(a.logprobs, b.logprobs):
            assert step_a.keys() == step_b.keys()
            for token_id in step_a:
                assert step_a[token_id].logprob == pytest.approx(step_b[token_id].logprob, abs=1e-4)


def test_embedded_smollm2_tp3_matches_tp1(embedded_llm, embedded_path):
    """SmolLM2-135M has 9 query heads and 3 kv heads: 3 ranks is its only TP size > 1."""
    texts = ["What is the capital of France?", "1, 2, 3, 4,", "def fibonacci(n):", "The quick brown fox"]
    tok = embedded_llm.get_tokenizer()
    prompts = [tok(t).input_ids for t in texts]
    expected = [c.token_ids for c in _greedy(embedded_llm, prompts)]
    assert sum(map(len, expected)) > 2 * MAX_NEW
    llm = _tp_llm(embedded_path, 3, max_model_len=2048)
    try:
        assert [c.token_ids for c in _greedy(llm, prompts)] == expected
    finally:
        llm.engine.shutdown()


def test_glm4v_with_images_tp2_matches_tp1(tiny_glm4v):
    """GLM-4.1V over two ranks: each rank gets the images' pixels with the request and runs its own
    copy of the vision tower; chunked prefill (32-token steps) cuts through the images."""
    import numpy as np
    from PIL import Image

    from pagoda.engine.tokenizer import encode_chat

    def prompts(llm: LLM) -> list:
        out = []
        for i, size in enumerate([(300, 200), (120, 400), None]):
            content = [{"type": "image"}, {"type": "text", "text": f"Step {i}?"}] if size else f"Step {i}?"
            ids = encode_chat(llm.get_tokenizer(), [{"role": "user", "content": content}])
            if size is None:
                out.append({"prompt_token_ids": ids})
                continue
            pixels = np.random.default_rng(i).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
            out.append({"prompt_token_ids": ids, "multi_modal_data": {"image": Image.fromarray(pixels)}})
        return out

    def run(tp: int) -> list[list[int]]:
        llm = _tp_llm(tiny_glm4v, tp, max_model_len=1024, max_num_batched_tokens=32)
        try:
            outs = llm.generate(prompts(llm), SamplingParams(temperature=0.0, max_tokens=MAX_NEW), use_tqdm=False)
            llm.engine.kv.check_invariants()
            return [o.outputs[0].token_ids for o in outs]
        finally:
            llm.engine.shutdown()

    expected = run(1)
    assert sum(map(len, expected)) > 2 * MAX_NEW
    assert run(2) == expected
