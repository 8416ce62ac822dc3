"""HF ``architectures`` name -> model class (imported on first use) and how that family departs from
Llama's reading of the config; what the KV cache of a model looks like on one rank; whether a model
can be split over a number of tensor-parallel ranks.

A model class is a ``CausalLM`` built from the config's ``ModelSpec``: ``ModelSpec.from_hf`` reads
the config once, then the family's overrides below are applied, so every per-family difference is
this table plus the spec's fields. The runner asks a built model what it can take
(``model.uses_mrope``, ``isinstance(model, SupportsImages)``); ``uses_mrope`` and ``supports_images``
answer the same from a config, for the front end, which builds no model."""

from __future__ import annotations

import dataclasses
import importlib
from dataclasses import dataclass
from typing import Any

import torch

from pagoda.engine.distributed import SINGLE_RANK, TPGroup
from pagoda.engine.layers.linear import check_head_split
from pagoda.engine.models.base import CausalLM, SupportsImages
from pagoda.engine.models.spec import ModelSpec

_LLAMA = "pagoda.engine.models.llama:LlamaForCausalLM"
_GLM = "pagoda.engine.models.glm4:GlmForCausalLM"
_GLM4V = "pagoda.engine.models.glm4v:Glm4vForConditionalGeneration"
# GLM: interleaved (partial) RoPE; q/k/v biased when attention_bias, o_proj and the MLP never.
_GLM_TRAITS = {"rope_neox": False, "o_bias": False, "mlp_bias": False}


def _head_dim_from_hidden(spec: ModelSpec) -> int:
    return spec.hidden_size // spec.num_heads  # GLM-4.1V's text attention ignores a config's head_dim


# architecture -> (CausalLM class as "module:Class", ModelSpec fields that differ from Llama's reading:
# a value, or a function of the spec as read)
_MODELS: dict[str, tuple[str, dict[str, Any]]] = {
    "LlamaForCausalLM": (_LLAMA, {}),  # Llama 2/3, SmolLM2
    "MistralForCausalLM": (_LLAMA, {}),
    "Qwen2ForCausalLM": (_LLAMA, {"qkv_bias": True, "o_bias": False}),  # q/k/v always biased, o_proj never
    "Qwen3ForCausalLM": (_LLAMA, {"qk_norm": True}),
    "GlmForCausalLM": (_GLM, _GLM_TRAITS),  # GLM-4-9B-chat-hf
    "Glm4ForCausalLM": (_GLM, {**_GLM_TRAITS, "sandwich_norms": True}),  # GLM-4-0414
    # GLM-4.1V, AutoGLM-Phone-9B: GLM-4's decoder (q/k/v always biased) with M-RoPE, plus a vision tower
    "Glm4vForConditionalGeneration": (
        _GLM4V,
        {**_GLM_TRAITS, "sandwich_norms": True, "qkv_bias": True, "head_dim": _head_dim_from_hidden},
    ),
}

SUPPORTED_ARCHITECTURES = tuple(_MODELS)


@dataclass(frozen=True)
class KVCacheSpec:
    """Per-layer KV cache shape on one rank: each layer gets ``(2, num_blocks, block_size, num_kv_heads, head_dim)``."""

    num_layers: int
    num_kv_heads: int  # this rank's kv heads: Hkv / tp, or 1 when kv heads are replicated (Hkv < tp)
    head_dim: int


def model_spec(hf_config) -> ModelSpec:
    """The config read once into a spec, with its family's differences; ValueError naming an unsupported one."""
    spec = ModelSpec.from_hf(hf_config)
    if spec.architecture not in _MODELS:
        raise ValueError(
            f"architecture {spec.architecture!r} is not supported; supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    traits = _MODELS[spec.architecture][1]
    return dataclasses.replace(spec, **{k: v(spec) if callable(v) else v for k, v in traits.items()})


def model_class(spec: ModelSpec) -> type[CausalLM]:
    """The class registered for the spec's architecture, imported now."""
    module, _, name = _MODELS[spec.architecture][0].partition(":")
    return getattr(importlib.import_module(module), name)


def uses_mrope(hf_config) -> bool:
    """Whether the model takes (3, T) M-RoPE positions for prompts with images (``CausalLM.uses_mrope``)."""
    return model_class(model_spec(hf_config)).uses_mrope


def supports_images(hf_config) -> bool:
    """Whether the model reads images (implements ``SupportsImages``); for a built model: ``isinstance``."""
    return issubclass(model_class(model_spec(hf_config)), SupportsImages)


def check_tensor_parallel(hf_config, tp_size: int) -> ModelSpec:
    """The config's spec; ValueError naming the values unless the model is supported and can be split
    over ``tp_size`` ranks."""
    spec = model_spec(hf_config)
    check_head_split(spec.num_heads, spec.num_kv_heads, tp_size)
    if spec.intermediate_size % tp_size:
        raise ValueError(
            f"intermediate_size ({spec.intermediate_size}) must be divisible by tensor_parallel_size ({tp_size})"
        )
    return spec


def build_model(
    hf_config, dtype: torch.dtype, device: torch.device | str, tp: TPGroup = SINGLE_RANK
) -> CausalLM:
    """An uninitialised model with this rank's parameters of ``dtype`` on ``device``; fill it with
    ``load_weights`` (which cuts each full checkpoint tensor down to this rank's part)."""
    spec = check_tensor_parallel(hf_config, tp.world_size)
    cls = model_class(spec)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # parameters are created in dtype directly (no float32 copy of an 8B model)
    try:
        with torch.device(device):
            return cls(spec, tp)
    finally:
        torch.set_default_dtype(previous)


def kv_cache_spec(hf_config, tp_size: int = 1) -> KVCacheSpec:
    """The KV cache of one rank out of ``tp_size``."""
    spec = check_tensor_parallel(hf_config, tp_size)  # same error as build_model for an unsupported model
    return KVCacheSpec(
        num_layers=spec.num_layers,
        num_kv_heads=max(1, spec.num_kv_heads // tp_size),
        head_dim=spec.head_dim,
    )
