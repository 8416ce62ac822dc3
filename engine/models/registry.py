"""HF ``architectures`` name -> model class, what the KV cache of a model looks like on one rank,
and whether a model can be split over a number of tensor-parallel ranks."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from pagoda.engine.distributed import SINGLE_RANK, TPGroup
from pagoda.engine.layers.linear import check_head_split
from pagoda.engine.models.glm4 import Glm4ForCausalLM, GlmForCausalLM
from pagoda.engine.models.llama import LlamaForCausalLM, head_dim_of

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
    """Per-layer KV cache shape on one rank: each layer gets ``(2, num_blocks, block_size, num_kv_heads, head_dim)``."""

    num_layers: int
    num_kv_heads: int  # this rank's kv heads: Hkv / tp, or 1 when kv heads are replicated (Hkv < tp)
    head_dim: int


def model_class(hf_config) -> type[nn.Module]:
    """The class for the config's first ``architectures`` entry; ValueError naming it if unsupported."""
    archs = getattr(hf_config, "architectures", None) or []
    if not archs:
        raise ValueError(f"config has no 'architectures' entry; supported: {', '.join(SUPPORTED_ARCHITECTURES)}")
    if archs[0] not in _MODELS:
        raise ValueError(f"architecture {archs[0]!r} is not supported; supported: {', '.join(SUPPORTED_ARCHITECTURES)}")
    return _MODELS[archs[0]]


def check_tensor_parallel(hf_config, tp_size: int) -> None:
    """ValueError naming the values unless the model can be split over ``tp_size`` ranks."""
    model_class(hf_config)
    check_head_split(hf_config.num_attention_heads, hf_config.num_key_value_heads, tp_size)
    if hf_config.intermediate_size % tp_size:
        raise ValueError(
            f"intermediate_size ({hf_config.intermediate_size}) must be divisible by tensor_parallel_size ({tp_size})"
        )


def build_model(
    hf_config, dtype: torch.dtype, device: torch.device | str, tp: TPGroup = SINGLE_RANK
) -> nn.Module:
    """An uninitialised model with this rank's parameters of ``dtype`` on ``device``; fill it with
    ``load_weights`` (which cuts each full checkpoint tensor down to this rank's part)."""
    check_tensor_parallel(hf_config, tp.world_size)
    cls = model_class(hf_config)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # parameters are created in dtype directly (no float32 copy of an 8B model)
    try:
        with torch.device(device):
            return cls(hf_config, tp)
    finally:
        torch.set_default_dtype(previous)


def kv_cache_spec(hf_config, tp_size: int = 1) -> KVCacheSpec:
    """The KV cache of one rank out of ``tp_size``."""
    check_tensor_parallel(hf_config, tp_size)  # same error as build_model for an unsupported model
    return KVCacheSpec(
        num_layers=hf_config.num_hidden_layers,
        num_kv_heads=max(1, hf_config.num_key_value_heads // tp_size),
        head_dim=head_dim_of(hf_config),
    )
