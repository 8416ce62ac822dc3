"""``ModelSpec``: the one place that reads an HF config for the decoder layers.

Every field a layer needs is normalised here once (transformers' attribute names differ between
families and versions: ``head_dim`` may be absent, RoPE lives in ``rope_parameters`` or in
``rope_theta``/``rope_scaling``), and every difference between the Llama-shaped families is a
field, which the registry sets per architecture (``registry.py``). The layers read the spec; none
of them looks at ``model_type`` or an HF attribute.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

_SUPPORTED_ACTS = ("silu",)


@dataclass(frozen=True)
class ModelSpec:
    """A decoder-only transformer as pagoda's layers build it (sizes are the whole model's, not a rank's)."""

    architecture: str  # the HF ``architectures[0]`` name the registry picked the class by
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int  # query heads
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    max_position_embeddings: int
    rope: dict[str, Any]  # rope_theta, rope_type, its scaling keys, partial_rotary_factor
    tie_word_embeddings: bool
    # How a family departs from Llama's reading of the config: set per architecture in registry.py.
    rope_neox: bool = True  # rotate NeoX halves; False: interleaved pairs (2i, 2i+1), as GLM does
    qkv_bias: bool = False  # q/k/v projections carry a bias
    o_bias: bool = False  # the attention output projection carries a bias
    mlp_bias: bool = False
    qk_norm: bool = False  # RMS-normalise each query and key head before RoPE (Qwen3)
    sandwich_norms: bool = False  # RMSNorm on the attention and MLP outputs before each residual add (GLM-4)

    @classmethod
    def from_hf(cls, hf_config) -> ModelSpec:
        """Llama's reading of a transformers config (a family's differences are applied on top by
        the registry); ValueError naming the field for what pagoda cannot run."""
        archs = getattr(hf_config, "architectures", None) or []
        if not archs:
            raise ValueError("config has no 'architectures' entry: it does not say which model it is")
        act = getattr(hf_config, "hidden_act", "silu")
        if act not in _SUPPORTED_ACTS:
            raise ValueError(f"hidden_act {act!r} is not supported (only {', '.join(map(repr, _SUPPORTED_ACTS))})")
        attention_bias = bool(getattr(hf_config, "attention_bias", False))
        return cls(
            architecture=archs[0],
            vocab_size=hf_config.vocab_size,
            hidden_size=hf_config.hidden_size,
            intermediate_size=hf_config.intermediate_size,
            num_layers=hf_config.num_hidden_layers,
            num_heads=hf_config.num_attention_heads,
            num_kv_heads=getattr(hf_config, "num_key_value_heads", None) or hf_config.num_attention_heads,
            head_dim=getattr(hf_config, "head_dim", None) or hf_config.hidden_size // hf_config.num_attention_heads,
            rms_norm_eps=hf_config.rms_norm_eps,
            max_position_embeddings=hf_config.max_position_embeddings,
            rope=rope_parameters(hf_config),
            tie_word_embeddings=bool(getattr(hf_config, "tie_word_embeddings", False)),
            qkv_bias=attention_bias,
            o_bias=attention_bias,
            mlp_bias=bool(getattr(hf_config, "mlp_bias", False)),
        )


def rope_parameters(hf_config) -> dict[str, Any]:
    """The config's RoPE settings as one dict (``rope_theta``, ``rope_type``, scaling keys, and
    ``partial_rotary_factor``), whether it uses transformers 5 ``rope_parameters`` or the older
    ``rope_theta`` / ``rope_scaling`` attributes."""
    params = dict(getattr(hf_config, "rope_parameters", None) or {})
    if "rope_theta" not in params:
        params.update(getattr(hf_config, "rope_scaling", None) or {})
        params["rope_theta"] = getattr(hf_config, "rope_theta", 10000.0)
    params.setdefault("rope_type", params.get("type", "default"))
    params.setdefault("partial_rotary_factor", getattr(hf_config, "partial_rotary_factor", 1.0))
    return params
