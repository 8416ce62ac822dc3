"""``ModelSpec``: the one place that reads an HF config for the decoder layers.

Every field a layer needs is normalised here once (transformers' attribute names differ between
families and versions: ``head_dim`` may be absent, RoPE lives in ``rope_parameters`` or in
``rope_theta``/``rope_scaling``), and every difference between the Llama-shaped families is a
field, which the registry sets per architecture (``registry.py``). The layers read the spec; none
of them looks at ``model_type`` or an HF attribute.

A vision-language config (GLM-4.1V) nests the decoder's settings in ``text_config``: the spec reads
those (``get_text_config()``), the top level's ``architectures``, ``tie_word_embeddings`` and
``image_token_id``, and the vision tower's settings into a ``VisionSpec``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pagoda.engine.config import text_config

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
    # M-RoPE (GLM-4.1V): rotary frequencies split into sections (temporal, height, width), each turned by
    # its own position row; sums to rotary_dim / 2. None: one position per token.
    mrope_section: tuple[int, ...] | None = None
    image_token_id: int | None = None  # the image placeholder token of a vision-language model
    vision: VisionSpec | None = None  # the vision tower of a vision-language model

    @classmethod
    def from_hf(cls, hf_config) -> ModelSpec:
        """Llama's reading of a transformers config (a family's differences are applied on top by
        the registry); ValueError naming the field for what pagoda cannot run."""
        archs = getattr(hf_config, "architectures", None) or []
        if not archs:
            raise ValueError("config has no 'architectures' entry: it does not say which model it is")
        # the config itself, or a vision-language model's text_config (plain objects stand in for configs in tests)
        text = text_config(hf_config)
        act = getattr(text, "hidden_act", "silu")
        if act not in _SUPPORTED_ACTS:
            raise ValueError(f"hidden_act {act!r} is not supported (only {', '.join(map(repr, _SUPPORTED_ACTS))})")
        attention_bias = bool(getattr(text, "attention_bias", False))
        tie = getattr(hf_config, "tie_word_embeddings", None)
        rope = rope_parameters(text)
        vision_config = getattr(hf_config, "vision_config", None)
        return cls(
            architecture=archs[0],
            vocab_size=text.vocab_size,
            hidden_size=text.hidden_size,
            intermediate_size=text.intermediate_size,
            num_layers=text.num_hidden_layers,
            num_heads=text.num_attention_heads,
            num_kv_heads=getattr(text, "num_key_value_heads", None) or text.num_attention_heads,
            head_dim=getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads,
            rms_norm_eps=text.rms_norm_eps,
            max_position_embeddings=text.max_position_embeddings,
            rope=rope,
            tie_word_embeddings=bool(getattr(text, "tie_word_embeddings", False) if tie is None else tie),
            qkv_bias=attention_bias,
            o_bias=attention_bias,
            mlp_bias=bool(getattr(text, "mlp_bias", False)),
            mrope_section=tuple(rope["mrope_section"]) if rope.get("mrope_section") else None,
            image_token_id=getattr(hf_config, "image_token_id", None),
            vision=None if vision_config is None else VisionSpec.from_hf(vision_config),
        )


@dataclass(frozen=True)
class VisionSpec:
    """GLM-4.1V's vision tower (HF ``Glm4vVisionConfig``), as ``glm4v_vision.py`` builds it."""

    hidden_size: int  # width of the transformer blocks
    depth: int  # transformer blocks
    num_heads: int
    mlp_size: int  # the blocks' SwiGLU width (HF builds it from out_hidden_size)
    out_hidden_size: int  # after the 2x2 downsample: the text model's hidden size
    merger_size: int  # the merger's SwiGLU width (HF: intermediate_size)
    in_channels: int
    patch_size: int
    temporal_patch_size: int
    spatial_merge_size: int  # patches merged per side into one image token
    num_position_embeddings: int  # learned position grid of (image_size / patch_size)**2, interpolated per image
    rms_norm_eps: float
    attention_bias: bool  # qkv bias
    rope_theta: float  # the 2-D (height, width) rotary embedding of the blocks

    @classmethod
    def from_hf(cls, vision_config) -> VisionSpec:
        act = getattr(vision_config, "hidden_act", "silu")
        if act not in _SUPPORTED_ACTS:
            raise ValueError(f"vision_config.hidden_act {act!r} is not supported (only 'silu')")
        rope = getattr(vision_config, "rope_parameters", None) or {}
        return cls(
            hidden_size=vision_config.hidden_size,
            depth=vision_config.depth,
            num_heads=vision_config.num_heads,
            mlp_size=vision_config.out_hidden_size,
            out_hidden_size=vision_config.out_hidden_size,
            merger_size=vision_config.intermediate_size,
            in_channels=vision_config.in_channels,
            patch_size=vision_config.patch_size,
            temporal_patch_size=vision_config.temporal_patch_size,
            spatial_merge_size=vision_config.spatial_merge_size,
            num_position_embeddings=(vision_config.image_size // vision_config.patch_size) ** 2,
            rms_norm_eps=vision_config.rms_norm_eps,
            attention_bias=bool(getattr(vision_config, "attention_bias", False)),
            rope_theta=float(rope.get("rope_theta", 10000.0)),
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
