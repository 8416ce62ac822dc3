"""Convert a Llama-architecture GGUF file into an HF folder, once, and cache it.

The folder holds ``config.json``, ``generation_config.json``, ``model.safetensors`` (float32,
dequantized) and the tokenizer (with its chat template), so everything downstream reads one format.

Cache: ``$PAGODA_CACHE/gguf/<key>/`` (default ``~/.cache/pagoda/gguf/<key>/``), the key hashing the
file's absolute path, size and mtime together with ``CONVERTER_VERSION``. A conversion is written to
a temporary sibling folder and renamed into place, so a concurrent process sees either no folder or
a complete one.

llama.cpp stores each Q and K projection with the rows of every head permuted from HF's
"first half / second half" RoPE layout to interleaved pairs; ``unpermute_qk`` undoes that.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch

CONVERTER_VERSION = 1

_LAYER_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER_RE = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")


def cache_root() -> Path:
    return Path(os.environ.get("PAGODA_CACHE") or Path.home() / ".cache" / "pagoda") / "gguf"


def cache_key(gguf_path: Path) -> str:
    stat = gguf_path.stat()
    ident = f"v{CONVERTER_VERSION}|{gguf_path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}"
    return hashlib.sha256(ident.encode()).hexdigest()[:24]


def convert_gguf(gguf_path: str | Path, root: Path | None = None) -> Path:
    """The HF folder for ``gguf_path``, converting it on first use. Safe to call concurrently."""
    gguf_path = Path(gguf_path).expanduser().resolve()
    if not gguf_path.is_file():
        raise FileNotFoundError(f"GGUF file not found: {gguf_path}")
    root = root or cache_root()
    out = root / cache_key(gguf_path)
    if (out / "config.json").is_file():
        return out
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{out.name}-", dir=root))
    try:
        _write_hf_folder(gguf_path, tmp)
        try:
            os.rename(tmp, out)  # atomic; fails if another process finished first
        except OSError:
            if not (out / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _write_hf_folder(gguf_path: Path, out: Path) -> None:
    from gguf import GGUFReader
    from safetensors.torch import save_file

    reader = GGUFReader(gguf_path)
    meta = _metadata(reader)
    arch = meta.get("general.architecture")
    if arch != "llama":
        raise ValueError(f"GGUF architecture {arch!r} is not supported; only 'llama' GGUF files convert")
    tensor_names = {t.name for t in reader.tensors}
    config = _hf_config(meta, tie_word_embeddings="output.weight" not in tensor_names)
    save_file(_hf_tensors(reader, config), str(out / "model.safetensors"), metadata={"format": "pt"})
    config.save_pretrained(out)
    _write_tokenizer(gguf_path, out, config)


def _metadata(reader) -> dict:
    """Scalar and string GGUF fields (token lists are left to the tokenizer conversion)."""
    meta = {}
    for key, field in reader.fields.items():
        if key.startswith("tokenizer.ggml.") and key.endswith(("tokens", "token_type", "scores", "merges")):
            continue
        meta[key] = field.contents()
    return meta


def _hf_config(meta: dict, tie_word_embeddings: bool):
    from transformers import LlamaConfig

    def get(key, default=None):
        return meta.get(f"llama.{key}", default)

    num_heads = get("attention.head_count")
    hidden_size = get("embedding_length")
    head_dim = get("attention.key_length", hidden_size // num_heads)
    rotary_dim = get("rope.dimension_count", head_dim)
    if rotary_dim != head_dim:
        raise ValueError(
            f"GGUF rope.dimension_count {rotary_dim} != head_dim {head_dim}: partial rotary is not supported"
        )
    scaling = get("rope.scaling.type", "none")
    if scaling not in ("none", None):
        raise ValueError(f"GGUF rope scaling {scaling!r} is not supported yet")
    vocab_size = get("vocab_size") or meta.get("tokenizer.ggml.vocab_size")
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=get("feed_forward_length"),
        num_hidden_layers=get("block_count"),
        num_attention_heads=num_heads,
        num_key_value_heads=get("attention.head_count_kv", num_heads),
        head_dim=head_dim,
        max_position_embeddings=get("context_length"),
        rms_norm_eps=get("attention.layer_norm_rms_epsilon"),
        rope_theta=get("rope.freq_base", 10000.0),
        tie_word_embeddings=tie_word_embeddings,
        bos_token_id=meta.get("tokenizer.ggml.bos_token_id"),
        eos_token_id=meta.get("tokenizer.ggml.eos_token_id"),
        pad_token_id=meta.get("tokenizer.ggml.padding_token_id"),
    )
    config.architectures = ["LlamaForCausalLM"]
    config.dtype = "float32"
    return config


def unpermute_qk(weight: np.ndarray, num_heads: int) -> np.ndarray:
    """Undo llama.cpp's per-head row order (pairs ``(i, i + D/2)`` stored as adjacent rows ``2i, 2i+1``).

    weight (num_heads * D, in) -> same shape, rows back in HF order.
    """
    rows = weight.shape[0]
    half = rows // num_heads // 2
    w = weight.reshape(num_heads, half, 2, *weight.shape[1:])  # GGUF: (head, i, pair)
    return w.swapaxes(1, 2).reshape(weight.shape)  # HF: (head, pair, i)


def _hf_tensors(reader, config) -> dict[str, torch.Tensor]:
    from gguf.quants import dequantize

    tensors = {}
    for t in reader.tensors:
        name = _hf_name(t.name)
        array = dequantize(t.data, t.tensor_type).astype(np.float32, copy=False)
        array = array.reshape([int(n) for n in reversed(t.shape)])  # GGUF lists dims innermost first
        if name.endswith("self_attn.q_proj.weight"):
            array = unpermute_qk(array, config.num_attention_heads)
        elif name.endswith("self_attn.k_proj.weight"):
            array = unpermute_qk(array, config.num_key_value_heads)
        array = np.require(array, requirements=["C", "W"])  # F32 tensors arrive as read-only memmaps
        tensors[name] = torch.from_numpy(array)
    return tensors


def _hf_name(gguf_name: str) -> str:
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    match = _LAYER_RE.fullmatch(gguf_name)
    if match is None or match.group(2) not in _LAYER_NAMES:
        raise ValueError(f"GGUF tensor {gguf_name!r} has no HF Llama equivalent (unsupported GGUF variant)")
    layer, part, kind = match.groups()
    return f"model.layers.{layer}.{_LAYER_NAMES[part]}.{kind}"


def _write_tokenizer(gguf_path: Path, out: Path, config) -> None:
    from transformers import AutoTokenizer, GenerationConfig

    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    if config.eos_token_id is not None and tokenizer.eos_token_id != config.eos_token_id:
        raise ValueError(f"tokenizer eos id {tokenizer.eos_token_id} != GGUF eos id {config.eos_token_id}")
    tokenizer.save_pretrained(out)
    GenerationConfig(
        bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id, pad_token_id=config.pad_token_id
    ).save_pretrained(out)
