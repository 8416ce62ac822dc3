"""Our models vs HF transformers on the same random weights, float32 on CPU.

Each tiny model is saved with ``save_pretrained`` and loaded through ``pagoda.engine.loader``; logits must
match HF's forward to 1e-4 for a one-shot prefill, a prefill in chunks through the paged cache
(mixed with another sequence's decode), and decode steps of a two-sequence batch.
"""

from __future__ import annotations

import pytest
import torch

from pagoda.engine.loader import load_model
from pagoda.engine.models.registry import build_model
from tests.unit.paged_helpers import PagedKV

ATOL = 1e-4
_COMMON = {
    "vocab_size": 512,
    "hidden_size": 64,
    "intermediate_size": 96,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 256,
    "rms_norm_eps": 1e-6,
    "initializer_range": 0.1,
    "pad_token_id": 0,  # GLM's default pad id lies outside a 512-token vocabulary
}
LLAMA3_ROPE = {
    "rope_type": "llama3",
    "rope_theta": 500000.0,
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 32,
}


def _config(arch: str):
    from transformers import Glm4Config, GlmConfig, LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

    if arch == "llama":  # SmolLM2-like: tied embeddings; Llama-3.1 RoPE scaling
        return LlamaConfig(**_COMMON, tie_word_embeddings=True, rope_parameters=LLAMA3_ROPE)
    if arch == "mistral":
        return MistralConfig(**_COMMON, sliding_window=None, tie_word_embeddings=False)
    if arch == "qwen2":  # bias on q/k/v
        return Qwen2Config(**_COMMON, tie_word_embeddings=True)
    if arch == "qwen3":  # per-head q/k norm; head_dim not hidden/heads
        return Qwen3Config(**_COMMON, head_dim=32, tie_word_embeddings=False)
    if arch == "glm4":  # interleaved partial RoPE, q/k/v bias, sandwich norms, fused gate_up
        return Glm4Config(**_COMMON, head_dim=16, partial_rotary_factor=0.5, attention_bias=True)
    if arch == "glm":
        return GlmConfig(**_COMMON, head_dim=16, partial_rotary_factor=0.5, attention_bias=True)
    raise ValueError(arch)


ARCHS = ("llama", "mistral", "qwen2", "qwen3", "glm4", "glm")


@pytest.fixture(scope="module", params=ARCHS)
def pair(request, tmp_path_factory):
    """(HF model, our model) on the same random weights."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    hf = AutoModelForCausalLM.from_config(_config(request.param), dtype=torch.float32).eval()
    for name, p in hf.named_parameters():  # random norm weights and biases too, not ones/zeros
        if p.dim() == 1:
            p.data.normal_(1.0 if "norm" in name else 0.0, 0.2)
    path = tmp_path_factory.mktemp(request.param)
    hf.save_pretrained(path)
    return hf, load_model(path, hf.config, torch.float32, "cpu")


def _hf_logits(hf, ids: list[int]) -> torch.Tensor:
    with torch.inference_mode():
        return hf(torch.tensor([ids])).logits[0]  # (L, V)


def _ours(model, cache: PagedKV, ids: torch.Tensor, chunks):
    positions, attn = cache.step(chunks)
    with torch.inference_mode():
        hidden = model(ids, positions, cache.kv_caches, attn)
        return model.compute_logits(hidden)  # (T, V)


def _new_cache(model, block_size=4):
    spec = model.spec  # one rank: the per-rank KV shape is the model's
    return PagedKV(spec.num_layers, spec.num_kv_heads, spec.head_dim, num_blocks=48, block_size=block_size)


def test_prefill_in_one_go(pair):
    hf, ours = pair
    ids = torch.randint(0, 512, (23,), generator=torch.Generator().manual_seed(1))
    logits = _ours(ours, _new_cache(ours), ids, [("a", 23)])
    assert logits.dtype == torch.float32
    diff = (logits - _hf_logits(hf, ids.tolist())).abs().max().item()
    print(f"{ours.spec.architecture} prefill max |logit diff| = {diff:.2e}")
    assert diff < ATOL, diff


def test_chunked_prefill_then_batched_decode(pair):
    """Seq a: prompt 21 in chunks 8 + 13; seq b: prompt 10, then decodes while a's 2nd chunk runs
    (a mixed step); then both decode for 4 steps. Every computed logit row is checked against HF."""
    hf, ours = pair
    gen = torch.Generator().manual_seed(2)
    seqs = {
        "a": torch.randint(0, 512, (21,), generator=gen).tolist(),
        "b": torch.randint(0, 512, (10,), generator=gen).tolist(),
    }
    done = {"a": 0, "b": 0}
    cache = _new_cache(ours)
    steps = [[("a", 8), ("b", 10)], [("b", 1), ("a", 13)]] + [[("a", 1), ("b", 1)]] * 4
    worst = 0.0
    for step in steps:
        for seq_id, n in step:  # decode steps need a next token: extend with HF's greedy choice
            while len(seqs[seq_id]) < done[seq_id] + n:
                seqs[seq_id].append(int(_hf_logits(hf, seqs[seq_id])[-1].argmax()))
        ids = torch.tensor([t for seq_id, n in step for t in seqs[seq_id][done[seq_id] : done[seq_id] + n]])
        logits = _ours(ours, cache, ids, step)
        row = 0
        for seq_id, n in step:
            start = done[seq_id]
            expected = _hf_logits(hf, seqs[seq_id][: start + n])[start:]
            worst = max(worst, (logits[row : row + n] - expected).abs().max().item())
            row += n
            done[seq_id] += n
    print(f"{ours.spec.architecture} chunked+decode max |logit diff| = {worst:.2e}")
    assert worst < ATOL, worst


def test_forward_in_pieces_equals_forward(pair):
    """Decode CUDA graphs are captured as ranges of layers (``forward_layers``) chained through the
    (hidden, residual) carry; on the paged cache the chain must give exactly the one-call forward."""
    _, ours = pair
    ids = torch.randint(0, 512, (9,), generator=torch.Generator().manual_seed(3))
    whole_cache, piece_cache = _new_cache(ours), _new_cache(ours)
    positions, attn = whole_cache.step([("a", 9)])
    piece_positions, piece_attn = piece_cache.step([("a", 9)])
    with torch.inference_mode():
        whole = ours(ids, positions, whole_cache.kv_caches, attn)
        carry = ours.forward_layers(ids, piece_positions, piece_cache.kv_caches, piece_attn, 0, 1, None)
        assert isinstance(carry, tuple) and len(carry) == 2  # (hidden, residual) after a middle range
        pieces = ours.forward_layers(ids, piece_positions, piece_cache.kv_caches, piece_attn, 1, ours.num_layers, carry)
    assert torch.equal(pieces, whole)
    for a, b in zip(whole_cache.kv_caches, piece_cache.kv_caches):
        assert torch.equal(a, b)  # every layer wrote the same K/V


def test_weights_are_checked_by_name(pair):
    hf, ours = pair
    state = hf.state_dict()
    fresh = build_model(hf.config, torch.float32, "cpu")
    with pytest.raises(ValueError, match="missing"):
        fresh.load_weights((n, t) for n, t in state.items() if "k_proj.weight" not in n)
    with pytest.raises(ValueError, match="no parameter"):
        fresh.load_weights([("model.layers.0.self_attn.bogus.weight", torch.zeros(1))])


def test_unsupported_architecture_names_it():
    from transformers import LlamaConfig

    config = LlamaConfig(**_COMMON)
    config.architectures = ["GPT2LMHeadModel"]
    with pytest.raises(ValueError, match="GPT2LMHeadModel.*LlamaForCausalLM"):
        build_model(config, torch.float32, "cpu")
