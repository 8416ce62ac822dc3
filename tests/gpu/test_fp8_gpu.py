"""FP8 on the GPU: the scaled GEMM against its dequantized reference, and an FP8 engine end to end.

Run on the device machine: ``python -m pytest -m gpu tests/gpu/test_fp8_gpu.py`` (needs compute
capability >= 8.9). Accuracy against bf16 on real shapes is bench/fp8_accuracy.py's.
"""

from __future__ import annotations

import gc
import os
from pathlib import Path

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9),
                       reason="needs a CUDA GPU with FP8 (compute capability >= 8.9)"),
]

MODEL_DIR = Path(os.environ.get("PAGODA_MODEL_DIR", "/tmp/pagoda-models"))


@pytest.mark.parametrize("tokens", [1, 7, 256, 2048])
def test_scaled_gemm_matches_the_dequantized_product(tokens):
    from pagoda.engine.layers.fp8 import dequantize, fp8_linear, quantize_activations, quantize_rows

    gen = torch.Generator(device="cuda").manual_seed(tokens)
    x = torch.randn(tokens, 4096, device="cuda", generator=gen).bfloat16()
    w = torch.randn(6144, 4096, device="cuda", generator=gen) * 0.02
    q, scale = quantize_rows(w)
    out = fp8_linear(x, q, scale, None)
    qx, x_scale = quantize_activations(x, None)
    exact = (qx.float() * x_scale) @ dequantize(q, scale, torch.float32).T
    torch.testing.assert_close(out.float(), exact, rtol=2e-2, atol=2e-2)  # bf16 output rounding only


def _engine_run(path, quantization=None, enforce_eager=False, kv_cache_dtype="auto"):
    from pagoda import LLM, SamplingParams

    llm = LLM(model=str(path), dtype="bfloat16", device="cuda", max_model_len=1024, gpu_memory_utilization=0.5,
              quantization=quantization, enforce_eager=enforce_eager, kv_cache_dtype=kv_cache_dtype)
    prompts = [{"prompt_token_ids": list(range(10 + i, 10 + i + n))} for i, n in enumerate((5, 64, 300))]
    outs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True), use_tqdm=False)
    blocks = llm.engine.stats().num_blocks
    llm.engine.shutdown()
    del llm
    gc.collect()
    torch.cuda.empty_cache()
    return [o.outputs[0].token_ids for o in outs], blocks


def test_fp8_engine_graphs_eager_and_fp8_kv_cache():
    """On the sharpened 8B (decisive greedy tokens: a random model's flat logits flip with any change of
    GEMM kernel, and graphs run decode batches padded to their captured size)."""
    from bench.random_models import make_random_model

    path = make_random_model("llama-3.1-8b", MODEL_DIR / "llama-3.1-8b-sharp", sharp=True)
    graphs, fp8_blocks = _engine_run(path, "fp8")
    eager, _ = _engine_run(path, "fp8", enforce_eager=True)
    bf16_tokens, bf16_blocks = _engine_run(path)
    assert graphs == eager  # decode graphs capture the FP8 GEMMs and the activation quantization
    assert fp8_blocks > bf16_blocks  # the weights take half the memory: more of it is KV cache
    fp8_kv_tokens, fp8_kv_blocks = _engine_run(path, kv_cache_dtype="fp8")
    # an FP8 cache: two blocks in the bytes of one, give or take what the two runs' other buffers take (an H100:
    # 20,042 against 2 x 10,022)
    assert fp8_kv_blocks >= 1.99 * bf16_blocks
    assert fp8_kv_tokens == bf16_tokens  # decisive greedy tokens survive keys and values in E4M3
