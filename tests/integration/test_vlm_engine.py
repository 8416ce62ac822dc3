"""GLM-4.1V through the whole engine, against transformers on the same weights (CPU, float32).

The reference is transformers' own ``Glm4vProcessor`` (prompt ids, patches) and
``Glm4vForConditionalGeneration.generate`` (greedy), one prompt at a time; pagoda serves the same
prompts as one batch — text-only and image prompts mixed, chunked prefill cutting through an
image, a pool small enough to preempt — and must pick the same 32 tokens with logprobs close to
transformers' log-softmax. Then the prefix cache and the encoder cache: an agent session's step
n+1 reuses step n's text prefix, two different screenshots never share a block, and an image
seen again is not encoded again.
"""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from PIL import Image

from pagoda import LLM, SamplingParams
from tests.tiny_models import hf_glm4v_processor

NUM_TOKENS = 32
SYSTEM = "You are a phone agent. Answer with one action."


def _image(width: int, height: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def _chat(text: str, image: bool) -> list[dict]:
    content = [{"type": "image"}, {"type": "text", "text": text}] if image else text
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": content}]


@pytest.fixture(scope="module")
def hf(tiny_glm4v):
    from transformers import AutoTokenizer, Glm4vForConditionalGeneration

    from pagoda.engine.multimodal.glm4v import load_pil_image_processor

    tokenizer = AutoTokenizer.from_pretrained(tiny_glm4v)
    model = Glm4vForConditionalGeneration.from_pretrained(tiny_glm4v, dtype=torch.float32).eval()
    return model, hf_glm4v_processor(load_pil_image_processor(tiny_glm4v), tokenizer), tokenizer


def _hf_greedy(hf, messages: list[dict], image: Image.Image | None) -> tuple[list[int], list[int], list[float]]:
    """(prompt ids, greedy token ids, their log-probabilities) from transformers."""
    model, processor, tokenizer = hf
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    inputs = processor(text=[text], images=[image] if image is not None else None, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=NUM_TOKENS, do_sample=False, output_scores=True,
                             return_dict_in_generate=True)
    prompt_len = inputs["input_ids"].shape[1]
    tokens = out.sequences[0, prompt_len:].tolist()
    logprobs = [torch.log_softmax(s[0].float(), -1)[t].item() for s, t in zip(out.scores, tokens)]
    return inputs["input_ids"][0].tolist(), tokens, logprobs


def _prompt(llm: LLM, messages: list[dict], image: Image.Image | None) -> dict:
    from pagoda.engine.tokenizer import encode_chat

    ids = encode_chat(llm.get_tokenizer(), messages)
    return {"prompt_token_ids": ids, "multi_modal_data": {"image": image}} if image is not None else ids


_REFERENCE: dict = {}
CASES = [  # (text, image size or None)
    ("Open the settings app.", None),
    ("Where is the search box?", (300, 200)),
    ("Tap the blue button.", (120, 400)),
    ("What app is this?", (224, 224)),
]


@pytest.mark.parametrize(
    "engine_kwargs",
    [
        {},  # whole prompts in one step
        {"max_num_batched_tokens": 24},  # chunked prefill cuts through every image
        {"num_blocks": 20, "block_size": 8, "max_num_batched_tokens": 64, "max_model_len": 160},  # preemption
    ],
    ids=["batch", "chunked", "preempting"],
)
def test_greedy_tokens_match_transformers_in_a_mixed_batch(tiny_glm4v, hf, engine_kwargs):
    llm = LLM(model=str(tiny_glm4v), dtype="float32", device="cpu", **{"max_model_len": 1024, **engine_kwargs})
    images = [_image(*size, seed=i) if size else None for i, (_, size) in enumerate(CASES)]
    messages = [_chat(text, image is not None) for (text, _), image in zip(CASES, images)]
    prompts = [_prompt(llm, m, im) for m, im in zip(messages, images)]
    params = SamplingParams(max_tokens=NUM_TOKENS, temperature=0.0, logprobs=0)
    outputs = llm.generate(prompts, params, use_tqdm=False)
    for case, msgs, image, out in zip(CASES, messages, images, outputs):
        if case not in _REFERENCE:  # the same for every engine setting
            _REFERENCE[case] = _hf_greedy(hf, msgs, image)
        ref_prompt, ref_tokens, ref_logprobs = _REFERENCE[case]
        assert out.prompt_token_ids == ref_prompt, case
        completion = out.outputs[0]
        assert completion.token_ids == ref_tokens, case
        ours = [entry[t].logprob for entry, t in zip(completion.logprobs, completion.token_ids)]
        np.testing.assert_allclose(ours, ref_logprobs, atol=2e-4, err_msg=str(case))
    if "num_blocks" in engine_kwargs:
        assert llm.engine.scheduler.num_preemptions > 0  # the case did exercise recompute
    llm.engine.kv.check_invariants()
    assert llm.engine.kv.usage() == 0


def _runner(llm: LLM):
    return llm.engine.executor.worker.runner


def test_agent_session_reuses_text_prefix_and_never_shares_image_blocks(tiny_glm4v):
    """Open-AutoGLM's loop: each step's request is the history as text plus one new screenshot (the
    previous step's image is dropped). Step n+1 hits step n's cached blocks up to where step n's
    image began; a different screenshot after the same text hits only the text before it."""
    llm = LLM(model=str(tiny_glm4v), dtype="float32", device="cpu", max_model_len=2048, block_size=4)
    tokenizer = llm.get_tokenizer()
    image_id = llm.engine.inputs.mm_processor.image_token_id
    params = SamplingParams(max_tokens=12, temperature=0.0)
    history: list[dict] = [{"role": "system", "content": SYSTEM}]
    previous_ids: list[int] | None = None
    for step in range(5):
        screenshot = _image(160 + 20 * step, 320, seed=100 + step)
        turn = [{"type": "image"}, {"type": "text", "text": f"Step {step}: what next?"}]
        ids = _prompt(llm, [*history, {"role": "user", "content": turn}], screenshot)
        out = llm.generate([ids], params, use_tqdm=False)[0]
        if previous_ids is not None:  # everything before step n's image is shared text
            first_image = previous_ids.index(image_id)
            common = next(i for i, (a, b) in enumerate(zip(previous_ids, out.prompt_token_ids)) if a != b)
            shared_blocks_end = min(first_image, common) // 4 * 4
            assert out.num_cached_tokens >= shared_blocks_end > 0
            assert out.num_cached_tokens <= out.prompt_token_ids.index(image_id)  # never past the new image
        previous_ids = out.prompt_token_ids
        history += [{"role": "user", "content": f"Step {step}: what next?"},  # the image dropped from history
                    {"role": "assistant", "content": tokenizer.decode(out.outputs[0].token_ids)}]
    llm.engine.kv.check_invariants()


def test_same_text_other_screenshot_shares_only_the_text_before_it(tiny_glm4v):
    llm = LLM(model=str(tiny_glm4v), dtype="float32", device="cpu", max_model_len=2048, block_size=4)
    image_id = llm.engine.inputs.mm_processor.image_token_id
    messages = _chat("Where is the search box?", image=True)
    params = SamplingParams(max_tokens=4, temperature=0.0)
    first = llm.generate([_prompt(llm, messages, _image(200, 300, seed=1))], params, use_tqdm=False)[0]
    other = llm.generate([_prompt(llm, messages, _image(200, 300, seed=2))], params, use_tqdm=False)[0]
    again = llm.generate([_prompt(llm, messages, _image(200, 300, seed=1))], params, use_tqdm=False)[0]
    assert first.prompt_token_ids == other.prompt_token_ids  # same size: the same ids, only pixels differ
    image_start = first.prompt_token_ids.index(image_id)
    assert other.num_cached_tokens == image_start // 4 * 4  # text before the image only
    assert again.num_cached_tokens == (len(first.prompt_token_ids) - 1) // 4 * 4  # the whole prompt, image included
    assert again.outputs[0].token_ids == first.outputs[0].token_ids


def test_an_image_seen_again_is_not_encoded_again(tiny_glm4v):
    """The same screenshot under a different question: the KV prefix stops at the text that differs
    before the image, but the vision encoder's output is reused from the encoder cache."""
    llm = LLM(model=str(tiny_glm4v), dtype="float32", device="cpu", max_model_len=2048)
    screenshot = _image(240, 240, seed=7)
    params = SamplingParams(max_tokens=4, temperature=0.0)
    first = _chat("Question one?", image=True)
    first[0]["content"] = "System A."
    second = _chat("Question two?", image=True)
    second[0]["content"] = "System B, which differs before the image."
    llm.generate([_prompt(llm, first, screenshot)], params, use_tqdm=False)
    stats = _runner(llm).encoder_stats
    assert (stats.images_encoded, stats.images_reused) == (1, 0)
    llm.generate([_prompt(llm, second, screenshot)], params, use_tqdm=False)
    assert (stats.images_encoded, stats.images_reused) == (1, 1)
    llm.generate([_prompt(llm, first, _image(240, 240, seed=8))], params, use_tqdm=False)
    assert stats.images_encoded == 2


def test_bad_images_are_rejected_before_anything_is_queued(tiny_glm4v):
    llm = LLM(model=str(tiny_glm4v), dtype="float32", device="cpu", max_model_len=64, limit_images_per_prompt=1)
    ids = _prompt(llm, _chat("hi", image=True), _image(64, 64, seed=0))["prompt_token_ids"]
    bad = [
        ({"prompt_token_ids": ids, "multi_modal_data": {"image": b"not an image"}}, "multi_modal_data.image[0]"),
        ({"prompt_token_ids": ids, "multi_modal_data": {"image": [_image(64, 64, 0)] * 2}}, "limit_images_per_prompt"),
        ({"prompt_token_ids": ids, "multi_modal_data": {"video": b"x"}}, "'video' is not supported"),
        ({"prompt_token_ids": ids}, "gives no image"),  # a placeholder without an image
        ({"prompt_token_ids": ids, "multi_modal_data": {"image": _image(448, 448, 0)}}, "max_model_len (64)"),
    ]
    for prompt, message in bad:
        with pytest.raises(ValueError, match=re.escape(message)):
            llm.generate([prompt], SamplingParams(max_tokens=4), use_tqdm=False)
    assert not llm.engine.has_unfinished_requests()
    assert llm.engine.kv.usage() == 0
