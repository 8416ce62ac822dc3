"""Tiny random-weight models of each supported architecture, saved as HF folders.

They borrow the embedded model's tokenizer so the engine can load them like any model; weights
are drawn with a wide init so that greedy argmax is not decided by float noise.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

TINY_ARCHS = ("llama", "qwen2", "qwen3", "glm4", "glm")

_COMMON = dict(
    hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
    max_position_embeddings=512, rms_norm_eps=1e-6, initializer_range=0.1, tie_word_embeddings=False,
)


def tiny_config(arch: str, vocab_size: int):
    from transformers import Glm4Config, GlmConfig, LlamaConfig, Qwen2Config, Qwen3Config

    kw = dict(_COMMON, vocab_size=vocab_size, bos_token_id=1, eos_token_id=2, pad_token_id=None)
    if arch == "llama":
        return LlamaConfig(**kw, rope_theta=10000.0)
    if arch == "qwen2":
        return Qwen2Config(**kw)
    if arch == "qwen3":
        return Qwen3Config(**kw, head_dim=16)
    if arch == "glm4":
        return Glm4Config(**kw, head_dim=16, partial_rotary_factor=0.5, attention_bias=True)
    if arch == "glm":
        return GlmConfig(**kw, head_dim=16, partial_rotary_factor=0.5, attention_bias=True)
    raise ValueError(arch)


# GLM-4.1V's special tokens, in the order the tiny fixture adds them to a borrowed tokenizer.
GLM4V_SPECIAL_TOKENS = (
    "<|begin_of_image|>", "<|end_of_image|>", "<|begin_of_video|>", "<|end_of_video|>", "<|image|>", "<|video|>",
)


def tiny_glm4v_config(vocab_size: int, token_ids: dict[str, int] | None = None):
    """A GLM-4.1V (``Glm4vForConditionalGeneration``) small enough for CPU tests, shaped like the real
    one: interleaved partial M-RoPE (mrope_section sums to rotary_dim / 2), sandwich norms, a vision
    tower with 2x2 merge and temporal patch 2. ``token_ids`` maps GLM4V_SPECIAL_TOKENS to ids
    (default: the last six ids of the vocabulary)."""
    from transformers import Glm4vConfig

    ids = token_ids or {tok: vocab_size - 6 + i for i, tok in enumerate(GLM4V_SPECIAL_TOKENS)}
    text = {
        "vocab_size": vocab_size, "hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 8192, "rms_norm_eps": 1e-5,
        "initializer_range": 0.1, "eos_token_id": 2, "pad_token_id": None,
        "rope_parameters": {
            "rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5, "mrope_section": [2, 3, 3],
        },
    }
    vision = {
        "depth": 2, "hidden_size": 64, "num_heads": 2, "intermediate_size": 96, "out_hidden_size": 128,
        "patch_size": 14, "temporal_patch_size": 2, "spatial_merge_size": 2, "image_size": 56, "rms_norm_eps": 1e-5,
        "initializer_range": 0.1,
    }
    return Glm4vConfig(
        text_config=text, vision_config=vision, architectures=["Glm4vForConditionalGeneration"],
        image_start_token_id=ids["<|begin_of_image|>"], image_end_token_id=ids["<|end_of_image|>"],
        video_start_token_id=ids["<|begin_of_video|>"], video_end_token_id=ids["<|end_of_video|>"],
        image_token_id=ids["<|image|>"], video_token_id=ids["<|video|>"], tie_word_embeddings=False,
    )


def _save(model, tokenizer, out: Path, tokenizer_from: Path) -> None:
    """An HF folder: weights, config, the borrowed tokenizer and its generation config."""
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    gen = Path(tokenizer_from) / "generation_config.json"
    if gen.exists():
        shutil.copy(gen, out / "generation_config.json")


def make_tiny_model(arch: str, out: Path, tokenizer_from: Path, seed: int = 0) -> Path:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_from)
    config = tiny_config(arch, vocab_size=len(tokenizer))
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    _save(model, tokenizer, out, tokenizer_from)
    return out


# GLM-4.1V's chat template, verbatim: zai-org/GLM-4.1V-9B-Thinking's tokenizer (revision 3c1471e5).
GLM4V_CHAT_TEMPLATE = """[gMASK]<sop>
{%- for msg in messages %}
    {%- if msg.role == 'system' %}
<|system|>
{{ msg.content }}
    {%- elif msg.role == 'user' %}
<|user|>{{ '\\n' }}

        {%- if msg.content is string %}
{{ msg.content }}
        {%- else %}
            {%- for item in msg.content %}
                {%- if item.type == 'video' or 'video' in item %}
<|begin_of_video|><|video|><|end_of_video|>
                {%- elif item.type == 'image' or 'image' in item %}
<|begin_of_image|><|image|><|end_of_image|>
                {%- elif item.type == 'text' %}
{{ item.text }}
                {%- endif %}
            {%- endfor %}
        {%- endif %}
    {%- elif msg.role == 'assistant' %}
        {%- if msg.metadata %}
<|assistant|>{{ msg.metadata }}
{{ msg.content }}
        {%- else %}
<|assistant|>
{{ msg.content }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{% if add_generation_prompt %}<|assistant|>
{% endif %}"""

# The template's own special tokens (single ids in GLM's tokenizer), added after GLM4V_SPECIAL_TOKENS.
GLM_CHAT_TOKENS = ("[gMASK]", "<sop>", "<|system|>", "<|user|>", "<|assistant|>")

# The tiny GLM-4.1V's resize cap, size["longest_edge"]: transformers counts the two temporal frames an
# image is repeated into, so an image keeps at most 64 patches of 28x28 pixels = 64 tokens after the merge.
TINY_GLM4V_MAX_PIXELS = 2 * 28 * 28 * 64


def make_tiny_glm4v(out: Path, tokenizer_from: Path, seed: int = 0, terse: bool = False) -> Path:
    """A tiny random-weight GLM-4.1V saved as an HF folder: the borrowed tokenizer of ``tokenizer_from``
    plus GLM's special tokens, GLM-4.1V's chat template, and GLM-4.1V's preprocessor_config.json with a
    small resize cap (TINY_GLM4V_MAX_PIXELS)."""
    from transformers import AutoTokenizer, Glm4vForConditionalGeneration

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_from)
    tokenizer.add_special_tokens({"extra_special_tokens": [*GLM4V_SPECIAL_TOKENS, *GLM_CHAT_TOKENS]})
    tokenizer.chat_template = GLM4V_CHAT_TEMPLATE
    ids = {tok: tokenizer.convert_tokens_to_ids(tok) for tok in GLM4V_SPECIAL_TOKENS}
    config = tiny_glm4v_config(len(tokenizer), ids)
    torch.manual_seed(seed)
    model = Glm4vForConditionalGeneration(config)
    if terse:  # the final norm zeroed: every logit is 0, so greedy answers run 0, 1, 2 (EOS) and stop
        model.model.language_model.norm.weight.data.zero_()
    _save(model, tokenizer, out, tokenizer_from)
    preprocessor = {  # GLM-4.1V-9B-Thinking's, but for longest_edge
        "size": {"shortest_edge": 12544, "longest_edge": TINY_GLM4V_MAX_PIXELS}, "do_rescale": True,
        "patch_size": 14, "temporal_patch_size": 2, "merge_size": 2,
        "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711],
        "image_processor_type": "Glm4vImageProcessor", "processor_class": "Glm4vProcessor",
    }
    (out / "preprocessor_config.json").write_text(json.dumps(preprocessor, indent=2))
    return out


def hf_glm4v_processor(image_processor, tokenizer):
    """transformers' own Glm4vProcessor (the reference for prompts with images), without its video
    processor, which needs torchvision."""
    from transformers import Glm4vProcessor

    class NoVideo(Glm4vProcessor):
        def check_argument_for_proper_class(self, argument_name, argument):
            if argument_name == "video_processor" and argument is None:
                return None
            return super().check_argument_for_proper_class(argument_name, argument)

    return NoVideo(image_processor=image_processor, tokenizer=tokenizer, video_processor=None)
