"""Which weights run in FP8, decided once per model: a float checkpoint quantized at load
(``quantization="fp8"``), or an FP8 checkpoint read as it is.

FP8 checkpoints pagoda reads (the ``quantization_config`` of config.json):
- ``compressed-tensors`` (llm-compressor; e.g. RedHatAI's ``*-FP8-dynamic``): 8-bit float weights,
  symmetric, per channel or per tensor; activations 8-bit float, dynamic per token or static per tensor.
- ``fp8`` (AutoFP8, and transformers' ``FP8`` format without blocks): per-tensor weight scales,
  ``activation_scheme`` dynamic or static.
Block-wise scales (``weight_block_size``, DeepSeek-style), weight-only FP8, integer formats and other
methods are refused with the field that says so.

Which layers are FP8 in a checkpoint is read from the checkpoint itself: a linear layer whose
``weight_scale`` is in the file (the config's ``ignore`` lists are then already applied). A float
checkpoint quantized at load gets every linear layer of the decoder in FP8; the LM head, the
embedding and a model's ``unquantized_modules`` (a vision tower) stay in the model's dtype.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from torch import nn

from pagoda.engine.layers.linear import LinearBase


@dataclass(frozen=True)
class Fp8Checkpoint:
    """An FP8 checkpoint's format, as its config states it."""

    method: str  # "compressed-tensors" or "fp8"
    static_activations: bool  # one input_scale per layer in the file, instead of per-token scales at run time


def _fp8_method(quant: dict) -> Fp8Checkpoint:
    """``quant_method: fp8`` (AutoFP8 / transformers FP8)."""
    if quant.get("weight_block_size"):
        raise ValueError(
            f"quantization_config.weight_block_size = {quant['weight_block_size']}: block-wise FP8 scales are "
            f"not supported (per-tensor and per-channel scales are)"
        )
    scheme = quant.get("activation_scheme", "dynamic")
    if scheme not in ("dynamic", "static"):
        raise ValueError(f"quantization_config.activation_scheme must be 'dynamic' or 'static', got {scheme!r}")
    return Fp8Checkpoint("fp8", static_activations=scheme == "static")


def _float8(args: dict | None, where: str) -> dict:
    if not args or args.get("num_bits") != 8 or args.get("type") != "float":
        raise ValueError(f"{where} must be 8-bit float (num_bits 8, type float) for FP8, got {args!r}")
    if args.get("symmetric") is False:
        raise ValueError(f"{where}.symmetric is false: asymmetric FP8 is not supported")
    return args


def _compressed_tensors(quant: dict) -> Fp8Checkpoint:
    """``quant_method: compressed-tensors`` with FP8 weights and activations in every config group."""
    if quant.get("kv_cache_scheme"):
        raise ValueError(
            "quantization_config.kv_cache_scheme: calibrated KV-cache scales are not supported "
            "(kv_cache_dtype='fp8' stores keys and values with scale 1)"
        )
    groups = quant.get("config_groups") or {}
    if not groups:
        raise ValueError("quantization_config.config_groups is empty: nothing says how the weights are stored")
    schemes = set()
    for name, group in groups.items():
        where = f"quantization_config.config_groups.{name}"
        weights = _float8(group.get("weights"), f"{where}.weights")
        if weights.get("strategy") not in ("channel", "tensor"):
            raise ValueError(
                f"{where}.weights.strategy must be 'channel' or 'tensor', got {weights.get('strategy')!r} "
                f"(block and group scales are not supported)"
            )
        if group.get("input_activations") is None:
            raise ValueError(f"{where}.input_activations is missing: weight-only FP8 is not supported")
        acts = _float8(group["input_activations"], f"{where}.input_activations")
        scheme = (acts.get("strategy"), bool(acts.get("dynamic")))
        if scheme not in (("token", True), ("tensor", False)):
            raise ValueError(
                f"{where}.input_activations must be dynamic per token or static per tensor, got strategy "
                f"{acts.get('strategy')!r} with dynamic={acts.get('dynamic')!r}"
            )
        schemes.add(scheme)
    if len(schemes) > 1:
        raise ValueError("quantization_config.config_groups mix activation schemes: one model, one scheme")
    return Fp8Checkpoint("compressed-tensors", static_activations=schemes.pop() == ("tensor", False))


def checkpoint_fp8(hf_config) -> Fp8Checkpoint | None:
    """The FP8 format of a checkpoint's config, None for a float checkpoint; ValueError naming the field
    for a quantized checkpoint pagoda cannot read."""
    quant = getattr(hf_config, "quantization_config", None)
    if quant is None:
        return None
    quant = quant if isinstance(quant, dict) else quant.to_dict()
    method = quant.get("quant_method")
    if method == "fp8":
        return _fp8_method(quant)
    if method == "compressed-tensors":
        return _compressed_tensors(quant)
    raise ValueError(
        f"quantization_config.quant_method {method!r} is not supported; supported: 'fp8' and "
        f"'compressed-tensors' (FP8 weights and activations)"
    )


def quantizable_linears(model: nn.Module) -> Iterable[tuple[str, LinearBase]]:
    """The decoder's linear layers: every ``LinearBase`` outside the model's ``unquantized_modules``."""
    skip = tuple(f"{prefix}." for prefix in getattr(model, "unquantized_modules", ()))
    for name, module in model.named_modules():
        if isinstance(module, LinearBase) and not name.startswith(skip):
            yield name, module


def quantize_model_fp8(model: nn.Module) -> int:
    """Quantize a loaded float model's decoder linears to FP8 in place; returns how many."""
    layers = list(quantizable_linears(model))
    for _, layer in layers:
        layer.quantize_fp8()
    fuse_norm_quantization(model)
    return len(layers)


def fuse_norm_quantization(model: nn.Module) -> int:
    """Let each norm whose one reader is an FP8 layer with per-token scales quantize its output itself
    (``RMSNorm.fp8_output``); returns how many."""
    fused = 0
    for norm, linear in model.norm_fed_linears():
        if linear.weight_scale is not None and linear.input_scale is None:
            norm.fp8_output = True
            fused += 1
    return fused


def expect_fp8_checkpoint(model: nn.Module, checkpoint_names: Iterable[str], fmt: Fp8Checkpoint) -> int:
    """Ready the layers whose ``weight_scale`` the checkpoint holds (``checkpoint_names``: every tensor
    name in it) to load FP8 weights; returns how many. The model routes a checkpoint name to its own
    parameter name with ``parameter_for``."""
    layers = {}
    for name in checkpoint_names:
        if name.endswith(".weight_scale"):
            ours, _ = model.parameter_for(name)
            path = ours.removesuffix(".weight_scale")
            layer = model.get_submodule(path)
            if not isinstance(layer, LinearBase):
                raise ValueError(f"checkpoint tensor {name!r} scales {path!r}, which is not a linear layer")
            layers[path] = layer
    if not layers:
        raise ValueError(f"the checkpoint's config says {fmt.method} FP8, but no tensor in it is a weight_scale")
    for layer in layers.values():
        layer.expect_fp8_checkpoint(fmt.static_activations)
    fuse_norm_quantization(model)
    return len(layers)
