"""The engine on one GPU against transformers on the same random bf16 weights.

Run on the device machine: ``python -m pytest -m gpu tests/gpu``. Writes the measured logit
differences to $OUT/gpu_parity.json when $OUT is set.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

MODEL_DIR = Path(os.environ.get("PAGODA_MODEL_DIR", "/tmp/pagoda-models"))
NEW_TOKENS = 32
PROMPT_LENS = (7, 16, 33, 64, 100, 200, 333, 512)


def _prompts(vocab: int) -> list[list[int]]:
    rng = random.Random(0)
    return [[rng.randrange(10, vocab) for _ in range(n)] for n in PROMPT_LENS]


def _hf_reference(path: Path, prompts, dtype=torch.bfloat16):
    """Greedy tokens from generate, and the full-prompt logits, then free the GPU."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, device_map="cuda").eval()
    tokens, logits = [], []
    with torch.no_grad():
        for p in prompts:
            ids = torch.tensor([p], device="cuda")
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS,
                                 min_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0)
            tokens.append(out[0, len(p):].tolist())
            logits.append(model(ids).logits[0].float().cpu())  # (L, V)
    del model
    torch.cuda.empty_cache()
    return tokens, logits


def _our_logits(llm, prompt: list[int]) -> torch.Tensor:
    """Full-prompt logits from our model in one fresh prefill (no KV cache involved)."""
    from engine.worker.worker import _single_sequence_metadata

    worker = llm.engine.executor.worker
    n = len(prompt)
    ids = torch.tensor(prompt, device="cuda")
    empty = [torch.empty(0, device="cuda", dtype=torch.bfloat16)] * worker.spec.num_layers
    with torch.inference_mode():
        hidden = worker.model(ids, torch.arange(n, device="cuda"), empty, _single_sequence_metadata(n, 16, ids.device))
        return worker.model.compute_logits(hidden).float().cpu()  # (L, V)


def _check_shape(shape: str, record: dict, fp32_reference: bool = False, **engine_kwargs) -> None:
    from bench.random_models import make_random_model
    from engine import LLM, SamplingParams

    path = make_random_model(shape, MODEL_DIR / shape)
    from engine.loader import load_hf_config

    prompts = _prompts(load_hf_config(path).vocab_size)
    want_tokens, want_logits = _hf_reference(path, prompts)
    llm = LLM(model=str(path), dtype="bfloat16", device="cuda", max_model_len=1024, gpu_memory_utilization=0.6,
              **engine_kwargs)
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                        SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True), use_tqdm=False)
    same = sum(o.outputs[0].token_ids == w for o, w in zip(outs, want_tokens))
    ours = [_our_logits(llm, p) for p in prompts]
    diffs = [(o - w).abs().max().item() for o, w in zip(ours, want_logits)]
    entry = record[shape + (" eager" if engine_kwargs.get("enforce_eager") else "")] = {
        "same_greedy_prompts": same, "of": len(prompts), "max_logit_diff": max(diffs),
        "max_logit_abs": max(w.abs().max().item() for w in want_logits),
    }
    ours_tokens = [o.outputs[0].token_ids for o in outs]
    del llm
    torch.cuda.empty_cache()
    if fp32_reference:  # how far is each bf16 engine from float32 truth? (bf16 noise vs a real bug)
        ref_tokens, ref_logits = _hf_reference(path, prompts, torch.float32)
        entry["hf_bf16_vs_fp32_max_logit_diff"] = max((w - r).abs().max().item() for w, r in zip(want_logits, ref_logits))
        entry["pagoda_bf16_vs_fp32_max_logit_diff"] = max((o - r).abs().max().item() for o, r in zip(ours, ref_logits))
        entry["hf_bf16_vs_fp32_same_greedy_prompts"] = sum(a == b for a, b in zip(want_tokens, ref_tokens))
        entry["pagoda_bf16_vs_fp32_same_greedy_prompts"] = sum(a == b for a, b in zip(ours_tokens, ref_tokens))
        entry["first_token_same_as_hf_bf16"] = sum(a[0] == b[0] for a, b in zip(ours_tokens, want_tokens))
    assert all(d == d for d in diffs), "NaN logits"
    assert same >= 6, record


@pytest.fixture(scope="module")
def record():
    data: dict = {}
    yield data
    out = os.environ.get("OUT")
    if out:
        Path(out, "gpu_parity.json").write_text(json.dumps(data, indent=2))
    print(json.dumps(data, indent=2))


def test_qwen3_small_matches_hf_with_cuda_graphs(record):
    _check_shape("qwen3-0.6b", record)


def test_qwen3_small_matches_hf_eager(record):
    _check_shape("qwen3-0.6b", record, enforce_eager=True)


def test_llama_8b_shape_matches_hf(record):
    _check_shape("llama-3.1-8b", record, fp32_reference=True)
