"""The engine on one GPU against transformers on the same random bf16 weights.

Run on the device machine: ``python -m pytest -m gpu tests/gpu``. Writes the measured logit
differences to $OUT/gpu_parity.json when $OUT is set.
"""

from __future__ import annotations

import gc
import json
import os
from pathlib import Path

import pytest
import torch

from bench.prompt_logits import NEW_TOKENS
from bench.prompt_logits import prompts as _prompts

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

MODEL_DIR = Path(os.environ.get("PAGODA_MODEL_DIR", "/tmp/pagoda-models"))
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


def _compare(shape: str, fp32_reference: bool = False, sharp: bool = False, **engine_kwargs) -> dict:
    """Greedy tokens and full-prompt logits of pagoda vs transformers (bf16), optionally both vs float32."""
    from bench.prompt_logits import greedy_and_logits
    from bench.random_models import make_random_model
    from pagoda.engine.loader import load_hf_config

    path = make_random_model(shape, MODEL_DIR / (shape + ("-sharp" if sharp else "")), sharp=sharp)
    prompts = _prompts(load_hf_config(path).vocab_size)
    want_tokens, want_logits = _hf_reference(path, prompts)
    ours_tokens, ours = greedy_and_logits(path, prompts, **engine_kwargs)
    entry = {
        "same_greedy_prompts": sum(a == b for a, b in zip(ours_tokens, want_tokens)), "of": len(prompts),
        "first_token_same": sum(a[0] == b[0] for a, b in zip(ours_tokens, want_tokens)),
        "max_logit_diff": max((o - w).abs().max().item() for o, w in zip(ours, want_logits)),
        "max_logit_abs": max(w.abs().max().item() for w in want_logits),
    }
    if fp32_reference:  # how far is each bf16 engine from float32 truth? (bf16 noise vs a real bug)
        ref_tokens, ref_logits = _hf_reference(path, prompts, torch.float32)
        entry["hf_bf16_vs_fp32_max_logit_diff"] = max((w - r).abs().max().item()
                                                      for w, r in zip(want_logits, ref_logits))
        entry["pagoda_bf16_vs_fp32_max_logit_diff"] = max((o - r).abs().max().item() for o, r in zip(ours, ref_logits))
        entry["hf_bf16_vs_fp32_same_greedy_prompts"] = sum(a == b for a, b in zip(want_tokens, ref_tokens))
        entry["pagoda_bf16_vs_fp32_same_greedy_prompts"] = sum(a == b for a, b in zip(ours_tokens, ref_tokens))
    assert entry["max_logit_diff"] == entry["max_logit_diff"], "NaN logits"
    return entry


class _Record(dict):
    """Results so far, written to $OUT/gpu_parity.json after every test (a cut-off run keeps them)."""

    def __setitem__(self, key, value) -> None:
        super().__setitem__(key, value)
        out = os.environ.get("OUT")
        if out:
            Path(out, "gpu_parity.json").write_text(json.dumps(self, indent=2))
        print(key, json.dumps(value))


@pytest.fixture(scope="module")
def record():
    return _Record()


def test_qwen3_small_close_to_hf_with_cuda_graphs(record):
    entry = record["qwen3-0.6b"] = _compare("qwen3-0.6b")
    assert entry["max_logit_diff"] < 0.1 * entry["max_logit_abs"], entry


def test_qwen3_small_close_to_hf_eager(record):
    entry = record["qwen3-0.6b eager"] = _compare("qwen3-0.6b", enforce_eager=True)
    assert entry["max_logit_diff"] < 0.1 * entry["max_logit_abs"], entry


def test_llama_8b_numerics_as_close_to_fp32_as_hf_bf16(record):
    """Plain random weights: greedy is decided by bf16 noise (the top-2 logits of a flat
    distribution), so compare distances to float32 truth instead: ours must be no worse than HF's."""
    entry = record["llama-3.1-8b plain"] = _compare("llama-3.1-8b", fp32_reference=True)
    assert entry["pagoda_bf16_vs_fp32_max_logit_diff"] <= 1.5 * entry["hf_bf16_vs_fp32_max_logit_diff"] + 0.05, entry


def test_llama_8b_sharp_same_greedy_tokens_as_hf(record):
    """Sharpened random weights (bench.random_models.sharpen_): greedy is decisive, so tokens must match."""
    entry = record["llama-3.1-8b sharp"] = _compare("llama-3.1-8b", sharp=True)
    assert entry["same_greedy_prompts"] >= 6, entry


def test_one_token_prompt_chunk_beside_decodes_with_cuda_graphs():
    """A step where every request computes one token can still hold a chunk in the middle of a
    prompt (3 decodes take 3 of a 4-token budget, the 4th request gets 1 prompt token per step).
    Such a step replays a decode graph, and the mid-prompt row must sample nothing: greedy tokens
    equal an eager engine's on the same steps."""
    from bench.random_models import make_random_model
    from pagoda.engine.llm_engine import LLMEngine
    from pagoda.engine.loader import load_hf_config
    from pagoda.engine.output_processor import OutputKind
    from pagoda.engine.sampling_params import SamplingParams

    path = make_random_model("qwen3-0.6b", MODEL_DIR / "qwen3-0.6b")
    vocab = load_hf_config(path).vocab_size
    prompts = _prompts(vocab)
    short, long = prompts[:3], prompts[5]  # 7, 16, 33 tokens; then 200 tokens
    params = SamplingParams(temperature=0.0, max_tokens=48, ignore_eos=True)

    def run(eager: bool) -> tuple[dict, int]:
        engine = LLMEngine.from_kwargs(model=str(path), dtype="bfloat16", device="cuda", max_model_len=512,
                                       max_num_batched_tokens=4, max_num_seqs=4, enforce_eager=eager,
                                       gpu_memory_utilization=0.5, enable_prefix_caching=False,
                                       async_scheduling=False)  # the loop below runs the steps itself
        for i, p in enumerate(short):
            engine.add_request(f"s{i}", {"prompt_token_ids": p}, params, output_kind=OutputKind.FINAL)
        while engine.scheduler.num_waiting or any(r.num_output_tokens == 0 for r in engine.scheduler.running):
            engine.step()  # until the three short prompts decode
        engine.add_request("long", {"prompt_token_ids": long}, params, output_kind=OutputKind.FINAL)
        tokens, mid_prompt_steps = {}, 0
        while engine.has_unfinished_requests():  # LLMEngine.step, with the scheduled batch in view
            scheduled = engine.scheduler.schedule()
            one_each = all(n == 1 for n in scheduled.num_scheduled_tokens.values())
            request = engine.scheduler.requests.get("long")
            mid_prompt_steps += bool(one_each and request is not None and "long" in scheduled.num_scheduled_tokens
                                     and request.num_computed_tokens < request.num_prompt_tokens)
            result = engine.executor.execute_model(scheduled)
            outputs = engine._emit(engine.scheduler.update_from_output(scheduled, result))
            tokens.update({o.request_id: o.outputs[0].token_ids for o in outputs if o.finished})
        engine.shutdown()
        del engine
        gc.collect()
        torch.cuda.empty_cache()
        return tokens, mid_prompt_steps

    graph_tokens, mid_prompt_steps = run(eager=False)
    eager_tokens, _ = run(eager=True)
    assert mid_prompt_steps > 0, "the scenario never scheduled a one-token chunk in the middle of a prompt"
    assert graph_tokens == eager_tokens
    assert sorted(graph_tokens) == ["long", "s0", "s1", "s2"]
    assert all(len(t) == 48 for t in graph_tokens.values())


def test_async_scheduling_gives_the_same_tokens_with_cuda_graphs(record):
    """Async scheduling replays each decode graph before the previous step's ids reached the host
    (the graph gathers them on the device): same tokens as synchronous steps, for plain greedy
    requests (which run ahead) beside sampled and logprob ones (which make the runner wait)."""
    from bench.random_models import make_random_model
    from pagoda import LLM, SamplingParams
    from pagoda.engine.loader import load_hf_config

    path = make_random_model("qwen3-0.6b", MODEL_DIR / "qwen3-0.6b")
    prompts = [{"prompt_token_ids": p} for p in _prompts(load_hf_config(path).vocab_size)]
    greedy = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True)
    mixed = [greedy] * 6 + [
        SamplingParams(temperature=0.9, seed=5, max_tokens=NEW_TOKENS, ignore_eos=True),
        SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True, logprobs=2),
    ]

    def run(async_scheduling: bool) -> list[list[int]]:
        llm = LLM(model=str(path), dtype="bfloat16", device="cuda", max_model_len=1024, max_num_seqs=8,
                  gpu_memory_utilization=0.5, async_scheduling=async_scheduling)
        try:  # all greedy (every decode step runs ahead), then mixed (none does)
            outs = llm.generate(prompts, greedy, use_tqdm=False) + llm.generate(prompts, mixed, use_tqdm=False)
            return [o.outputs[0].token_ids for o in outs]
        finally:
            llm.engine.shutdown()
            del llm
            gc.collect()
            torch.cuda.empty_cache()

    sync, pipelined = run(False), run(True)
    same = sum(a == b for a, b in zip(sync, pipelined))
    record["async scheduling vs sync, qwen3-0.6b graphs"] = {"same_prompts": same, "of": len(sync)}
    assert same == len(sync)


def test_every_step_reports_its_device_time():
    """Each step's ``device_seconds`` (what the SLO controller fits its step model to): measured for every
    non-empty step, async or not, including prompt chunks that sample nothing; the steps run one after another
    on one stream, so their spans add up to no more than the wall time."""
    import time

    from bench.random_models import make_random_model
    from pagoda.engine.llm_engine import LLMEngine
    from pagoda.engine.loader import load_hf_config
    from pagoda.engine.sampling_params import SamplingParams

    path = make_random_model("qwen3-0.6b", MODEL_DIR / "qwen3-0.6b")
    prompts = _prompts(load_hf_config(path).vocab_size)
    params = SamplingParams(temperature=0.0, max_tokens=32, ignore_eos=True)
    for async_scheduling in (True, False):
        engine = LLMEngine.from_kwargs(model=str(path), dtype="bfloat16", device="cuda", max_model_len=1024,
                                       max_num_batched_tokens=64, max_num_seqs=8, gpu_memory_utilization=0.5,
                                       async_scheduling=async_scheduling)  # 64: the long prompts are chunked
        seen = []
        step_done = engine.scheduler.step_done
        engine.scheduler.step_done = lambda out, s, dev: (seen.append((out.total_num_scheduled_tokens, s, dev)),
                                                          step_done(out, s, dev))
        for i, p in enumerate(prompts):
            engine.add_request(str(i), {"prompt_token_ids": p}, params)
        started = time.perf_counter()
        while engine.has_unfinished_requests():
            engine.step()
        wall = time.perf_counter() - started
        engine.shutdown()
        del engine
        gc.collect()
        torch.cuda.empty_cache()
        steps = [(n, s, dev) for n, s, dev in seen if n]
        assert steps and all(dev is not None and 0 < dev < 1 for _, _, dev in steps), steps
        assert any(n > 8 for n, _, _ in steps), "no step carried a prompt chunk"
        assert sum(dev for _, _, dev in steps) <= wall, (async_scheduling, wall, steps)
