"""Tiny random-weight models of each supported architecture, saved as HF folders.

They borrow the embedded model's tokenizer so the engine can load them like any model; weights
are drawn with a wide init so that greedy argmax is not decided by float noise.
"""

from __future__ import annotations

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


def make_tiny_model(arch: str, out: Path, tokenizer_from: Path, seed: int = 0) -> Path:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_from)
    config = tiny_config(arch, vocab_size=len(tokenizer))
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    gen = Path(tokenizer_from) / "generation_config.json"
    if gen.exists():
        shutil.copy(gen, out / "generation_config.json")
    return out
