"""Random-weight models of real shapes, made on the machine that benchmarks them (no downloads).

Speed does not depend on weight values, so an HF folder with random bf16 weights and a stand-in
word-level tokenizer of the right vocabulary size is enough for pagoda and transformers alike.

Correctness tests need more: with plain random init the next-token distribution of an 8B model is
nearly flat, the top-2 logits sit closer than bf16 noise, and any change of reduction order (a
different kernel, tensor parallelism) flips greedy tokens. A *sharpened* model fixes that while
staying random: after the usual init, (1) token embeddings are made large and the
residual-writing projections (o_proj, down_proj) are scaled so that the context part of the final
residual stream is r times the token's own embedding, and (2) the LM head is the embedding matrix
with its rows permuted. With the final hidden state h = (e + c) normalised, the logit of
``perm[t]`` is about sqrt(d) / sqrt(1 + r^2) standard deviations of the other logits, whose
maximum over V tokens is about sqrt(2 ln V); r is chosen so the first is twice the second
(r ~ 6.5 for the 8B shape). The greedy token is then decisive, while every other logit is decided
by the context (attention over the KV cache, MLPs) — so tests compare logprobs too.
"""

from __future__ import annotations

import gc
import math
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
    # Not a real model: a Qwen3 small enough for CPU replicas (serving-path and replica-scaling runs)
    "qwen3-cpu-tiny": dict(arch="qwen3", hidden_size=256, intermediate_size=768, num_hidden_layers=4,
                           num_attention_heads=4, num_key_value_heads=2, head_dim=64, vocab_size=32000,
                           max_position_embeddings=4096, rms_norm_eps=1e-6, tie_word_embeddings=True,
                           rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}),
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


@torch.no_grad()
def _context_ratio(model, vocab_size: int) -> float:
    """Mean over tokens of |final residual - token embedding| / |token embedding| (before the final norm)."""
    captured = {}
    hook = model.model.norm.register_forward_pre_hook(lambda _m, args: captured.update(x=args[0]))
    ids = torch.randint(10, vocab_size, (1, 64), generator=torch.Generator().manual_seed(0)).to(model.device)
    model(ids)
    hook.remove()
    emb = model.model.embed_tokens.weight[ids[0]].float()  # (L, H)
    context = captured["x"][0].float() - emb
    return (context.norm(dim=-1) / emb.norm(dim=-1)).mean().item()


def target_ratio(hidden_size: int, vocab_size: int) -> float:
    """r such that sqrt(d) / sqrt(1 + r^2) = 2 sqrt(2 ln V) (see the module docstring)."""
    return math.sqrt(max(hidden_size / (8 * math.log(vocab_size)) - 1, 0.25))


@torch.no_grad()
def sharpen_(model, seed: int = 0) -> None:
    """Make greedy decoding decisive (see the module docstring); in place, any size, any device."""
    emb = model.model.embed_tokens.weight
    target_r = target_ratio(*reversed(emb.shape))
    emb.normal_(0.0, 1.0)
    for _ in range(3):  # the ratio responds almost linearly to the output-projection scale
        gamma = target_r / _context_ratio(model, emb.shape[0])
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.mul_(gamma)
            layer.mlp.down_proj.weight.mul_(gamma)
    perm = torch.randperm(emb.shape[0], generator=torch.Generator().manual_seed(seed)).to(emb.device)
    if model.config.tie_word_embeddings:
        raise ValueError("sharpening needs an untied LM head")
    model.lm_head.weight[perm] = emb * 0.02  # row perm[t] is token t's embedding: next(t) = perm[t]


def make_random_model(shape: str, out: Path, seed: int = 0, sharp: bool = False) -> Path:
    """Write ``out`` (config, bf16 safetensors, tokenizer) once; later calls reuse it."""
    from transformers import AutoModelForCausalLM

    if (out / "config.json").exists():
        return out
    config = _config(shape)
    torch.manual_seed(seed)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with torch.device(device):  # random init straight on the GPU, in bf16 (no float32 copy of 8B)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).eval()
    if sharp:
        sharpen_(model, seed)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    model.generation_config.save_pretrained(out)
    _word_tokenizer(config.vocab_size).save_pretrained(out)
    del model
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
    return out


# GLM-4.1V-9B (AutoGLM-Phone-9B's shape): transformers' Glm4vConfig() defaults (text: 40 layers, hidden
# 4096, 32 heads, 2 KV heads, vocab 151552, MLP 13696; vision: depth 24, width 1536, patch 14, temporal
# patch 2, merge 2) plus the rope of the published config.json, which the defaults leave out: partial
# rotary 0.5 with M-RoPE sections [8, 12, 12]. Image special tokens keep the defaults (151339...151344).
GLM4V_SHAPES = {
    "glm-4.1v-9b": {
        "text_config": {"eos_token_id": 2, "pad_token_id": None, "rope_parameters": {
            "rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5, "mrope_section": [8, 12, 12]}},
        "vision_config": {},
    },
    "tiny": None,  # tests.tiny_models.tiny_glm4v_config: CPU smoke runs of bench.vlm
}
TINY_GLM4V_VOCAB = 2048

# zai-org/GLM-4.1V-9B-Thinking's preprocessor_config.json: a 1080x2400 screenshot resizes to 1092x2408
# (2 * 1092 * 2408 pixels over the two temporal frames, under longest_edge) = 3,354 image tokens.
GLM4V_PREPROCESSOR = {
    "size": {"shortest_edge": 12544, "longest_edge": 9633792}, "do_rescale": True,
    "patch_size": 14, "temporal_patch_size": 2, "merge_size": 2,
    "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711],
    "image_processor_type": "Glm4vImageProcessor", "processor_class": "Glm4vProcessor",
}


def glm4v_config(shape: str):
    from transformers import Glm4vConfig

    if shape == "tiny":
        from tests.tiny_models import tiny_glm4v_config

        return tiny_glm4v_config(TINY_GLM4V_VOCAB)
    return Glm4vConfig(architectures=["Glm4vForConditionalGeneration"], tie_word_embeddings=False, **GLM4V_SHAPES[shape])


def make_random_glm4v(shape: str, out: Path, seed: int = 0) -> Path:
    """Write a random GLM-4.1V folder ``out`` once (config, safetensors, word-level tokenizer,
    GLM-4.1V's preprocessor_config.json); later calls reuse it. bf16 on CUDA, float32 on CPU."""
    import json

    from transformers import Glm4vForConditionalGeneration

    if (out / "config.json").exists():
        return out
    config = glm4v_config(shape)
    torch.manual_seed(seed)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    with torch.device(device):  # random init straight on the GPU (no float32 copy of 10 B parameters)
        model = Glm4vForConditionalGeneration._from_config(config, dtype=dtype).eval()
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    model.generation_config.save_pretrained(out)
    _word_tokenizer(config.text_config.vocab_size).save_pretrained(out)
    (out / "preprocessor_config.json").write_text(json.dumps(GLM4V_PREPROCESSOR, indent=2) + "\n")
    del model
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
    return out
