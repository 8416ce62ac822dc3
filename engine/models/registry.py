"""HF ``architectures`` name -> model class, and what the KV cache of a model looks like."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from engine.models.glm4 import Glm4ForCausalLM, GlmForCausalLM
from engine.models.llama import LlamaForCausalLM, head_dim_of

_MODELS: dict[str, type[nn.Module]] = {
    "LlamaForCausalLM": LlamaForCausalLM,
    "MistralForCausalLM": LlamaForCausalLM,
    "Qwen2ForCausalLM": LlamaForCausalLM,
    "Qwen3ForCausalLM": LlamaForCausalLM,
    "Glm4ForCausalLM": Glm4ForCausalLM,
    "GlmForCausalLM": GlmForCausalLM,
}

SUPPORTED_ARCHITECTURES = tuple(_MODELS)


@dataclass(frozen=True)
class KVCacheSpec:
    """Per-layer KV cache shape: each layer gets ``(2, num_blocks, block_size, num_kv_heads, head_dim)``."""

    num_layers: int
    num_kv_heads: int
    head_dim: int


def model_class(hf_config) -> type[nn.Module]:
    """The class for the config's first ``architectures`` entry; ValueError naming it if unsupported."""
    archs = getattr(hf_config, "architectures", None) or []
    if not archs:
        raise ValueError(f"config has no 'architectures' entry; supported: {', '.join(SUPPORTED_ARCHITECTURES)}")
    if archs[0] not in _MODELS:
        raise ValueError(f"architecture {archs[0]!r} is not supported; supported: {', '.join(SUPPORTED_ARCHITECTURES)}")
    return _MODELS[archs[0]]


def build_model(hf_config, dtype: torch.dtype, device: torch.device | str) -> nn.Module:
    """An uninitialised model with parameters of ``dtype`` on ``device``; fill it with ``load_weights``."""
    cls = model_class(hf_config)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # parameters are created in dtype directly (no float32 copy of an 8B model)
    try:
        with torch.device(device):
            return cls(hf_config)
    finally:
        torch.set_default_dtype(previous)


def kv_cache_spec(hf_config) -> KVCacheSpec:
    model_class(hf_config)  # same error as build_model for an unsupported architecture
    return KVCacheSpec(
        num_layers=hf_config.num_hidden_layers,
        num_kv_heads=hf_config.num_key_value_heads,
        head_dim=head_dim_of(hf_config),
    )
