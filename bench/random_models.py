"""Random-weight models of real shapes, made on the machine that benchmarks them (no downloads).

Speed does not depend on weight values, so an HF folder with random bf16 weights and a stand-in
word-level tokenizer of the right vocabulary size is enough for pagoda and transformers alike.
"""

from __future__ import annotations

from pathlib import Path

import torch

SHAPES = {
    # Llama-3.1-8B: 8.03 B parameters
    "llama-3.1-8b": dict(arch="llama", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                         num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
                         max_position_embeddings=131072, rms_norm_eps=1e-5, tie_word_embeddings=False,
                         rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                          "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                          "original_max_position_embeddings": 8192}),
    # Qwen3-0.6B
    "qwen3-0.6b": dict(arch="qwen3", hidden_size=1024, intermediate_size=3072, num_hidden_layers=28,
                       num_attention_heads=16, num_key_value_heads=8, head_dim=128, vocab_size=151936,
                       max_position_embeddings=40960, rms_norm_eps=1e-6, tie_word_embeddings=True,
                       rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}),
}


def _config(shape: str):
    from transformers import LlamaConfig, Qwen3Config

    kw = dict(SHAPES[shape])
    arch = kw.pop("arch")
    kw.update(bos_token_id=1, eos_token_id=2, pad_token_id=0, initializer_range=0.02)
    return (LlamaConfig if arch == "llama" else Qwen3Config)(**kw)


def _word_tokenizer(vocab_size: int):
    """A whitespace word-level tokenizer over tokens "t0".."t{V-1}" (ids are what matter)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"t{i}": i for i in range(vocab_size)}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="t3"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=core, bos_token="t1", eos_token="t2", pad_token="t0", unk_token="t3")


def make_random_model(shape: str, out: Path, seed: int = 0) -> Path:
    """Write ``out`` (config, bf16 safetensors, tokenizer) once; later calls reuse it."""
    from transformers import AutoModelForCausalLM

    if (out / "config.json").exists():
        return out
    config = _config(shape)
    torch.manual_seed(seed)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    model.generation_config.save_pretrained(out)
    _word_tokenizer(config.vocab_size).save_pretrained(out)
    del model
    if device == "cuda":
        torch.cuda.empty_cache()
    return out
