"""FP8 linear layers (engine/layers/fp8.py) and FP8 models (engine/quantization.py), on CPU.

torch's CPU ``_scaled_mm`` computes what cuBLASLt does on the GPU (the GPU tests run the same checks
there), so the numerics, the sharding of scales and the checkpoint formats are all checked here.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from pagoda.engine.layers.fp8 import FP8_MAX, dequantize, fp8_linear, quantize_activations, quantize_rows
from pagoda.engine.layers.linear import ColumnParallelLinear, QKVParallelLinear, RowParallelLinear
from pagoda.engine.loader import load_model
from pagoda.engine.quantization import checkpoint_fp8, quantizable_linears
from tests.unit.paged_helpers import PagedKV


def _relative_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    return ((got.float() - expected.float()).norm() / expected.float().norm()).item()


def test_quantize_rows_is_per_output_channel():
    w = torch.randn(48, 64) * torch.logspace(-2, 2, 48).unsqueeze(1)  # rows of very different sizes
    q, scale = quantize_rows(w)
    assert q.dtype == torch.float8_e4m3fn and scale.shape == (48,)
    torch.testing.assert_close(q.float().abs().amax(dim=1), torch.full((48,), FP8_MAX))  # every row uses the range
    assert _relative_error(dequantize(q, scale, torch.float32), w) < 0.03


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fp8_linear_is_the_gemm_of_the_dequantized_operands(dtype):
    gen = torch.Generator().manual_seed(0)
    x = (torch.randn(7, 64, generator=gen) * 3).to(dtype)
    w, bias = torch.randn(32, 64, generator=gen), torch.randn(32, generator=gen).to(dtype)
    q, scale = quantize_rows(w)
    out = fp8_linear(x, q, scale, bias)
    assert out.dtype == dtype and out.shape == (7, 32)
    qx, x_scale = quantize_activations(x, None)
    exact = (qx.float() * x_scale) @ dequantize(q, scale, torch.float32).T + bias.float()
    torch.testing.assert_close(out.float(), exact, rtol=1e-2 if dtype == torch.bfloat16 else 1e-5, atol=1e-2)
    assert _relative_error(out, x.float() @ w.T + bias.float()) < 0.05  # and close to the float product


def test_static_input_scale_is_used_as_given():
    x = torch.randn(5, 32) * 10
    q, scale = quantize_activations(x, torch.tensor(0.01))
    assert torch.equal(scale, torch.full((5, 1), 0.01))
    assert q.float().abs().max() == FP8_MAX  # |x| / 0.01 (up to ~3,000) saturates at 448


def _loaded(layer_cls, *args, **kwargs):
    layer = layer_cls(*args, **kwargs)
    layer.weight.data.normal_()
    return layer


@pytest.mark.parametrize("make", [
    lambda: _loaded(ColumnParallelLinear, 64, 48, bias=True),
    lambda: _loaded(RowParallelLinear, 64, 48),
    lambda: _loaded(QKVParallelLinear, 64, 16, 4, 2),
], ids=["column", "row", "qkv"])
def test_quantized_layer_stays_close_to_the_float_layer(make):
    layer = make()
    if layer.bias is not None:
        layer.bias.data.normal_()
    x = torch.randn(6, 64)
    expected = layer(x)
    layer.quantize_fp8()
    assert layer.weight.dtype == torch.float8_e4m3fn and layer.weight_scale.shape == (layer.weight.shape[0],)
    assert _relative_error(layer(x), expected) < 0.05


def test_checkpoint_scales_load_per_part_of_a_fused_layer():
    layer = QKVParallelLinear(64, 16, 4, 2)  # q: 64 rows, k and v: 32 each
    layer.expect_fp8_checkpoint(static_input_scale=True)
    for shard, rows, value in (("q", 64, 0.5), ("k", 32, 0.25), ("v", 32, 2.0)):
        layer.weight.weight_loader(layer.weight, torch.zeros(rows, 64).to(torch.float8_e4m3fn), shard)
        layer.weight_scale.weight_loader(layer.weight_scale, torch.tensor(value), shard)  # per tensor
        layer.input_scale.weight_loader(layer.input_scale, torch.tensor(value / 10), shard)
    assert layer.weight_scale.tolist() == [0.5] * 64 + [0.25] * 32 + [2.0] * 32
    assert layer.input_scale.item() == pytest.approx(0.2)  # the largest part's
    with pytest.raises(ValueError, match="expected 1 \\(per tensor\\) or 64 \\(per output row\\)"):
        layer.weight_scale.weight_loader(layer.weight_scale, torch.ones(64, 2), "q")


# ---- whole models: a float checkpoint quantized at load, and FP8 checkpoints in both formats ----

def _tiny_qwen3(path):
    from transformers import AutoModelForCausalLM, Qwen3Config

    config = Qwen3Config(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=256,
                         tie_word_embeddings=False, initializer_range=0.1)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(path)
    return path


def _quantized_projection(name: str) -> bool:
    return ".layers." in name and name.endswith("proj.weight")


def _write_fp8_checkpoint(src, dst, method: str, static: bool):
    """src's float checkpoint as an FP8 one: compressed-tensors per channel, or AutoFP8's per tensor."""
    dst.mkdir()
    tensors = {}
    for name, tensor in load_file(str(src / "model.safetensors")).items():
        if not _quantized_projection(name):
            tensors[name] = tensor
            continue
        if method == "compressed-tensors":
            q, scale = quantize_rows(tensor)
            scale = scale.unsqueeze(1)  # (out, 1), as llm-compressor stores it
        else:
            scale = tensor.abs().max().float() / FP8_MAX
            q = (tensor / scale).to(torch.float8_e4m3fn)
        tensors[name], tensors[name + "_scale"] = q, scale
        if static:
            tensors[name.removesuffix("weight") + "input_scale"] = torch.tensor([0.05])
    save_file(tensors, str(dst / "model.safetensors"))
    config = json.loads((src / "config.json").read_text())
    acts = {"num_bits": 8, "type": "float", "symmetric": True, "dynamic": not static,
            "strategy": "tensor" if static else "token"}
    config["quantization_config"] = (
        {"quant_method": "compressed-tensors", "format": "float-quantized", "ignore": ["lm_head"],
         "config_groups": {"group_0": {"targets": ["Linear"], "input_activations": acts, "weights": {
             "num_bits": 8, "type": "float", "symmetric": True, "dynamic": False, "strategy": "channel"}}}}
        if method == "compressed-tensors" else
        {"quant_method": "fp8", "activation_scheme": "static" if static else "dynamic"}
    )
    (dst / "config.json").write_text(json.dumps(config))
    return dst


def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    spec = model.spec
    cache = PagedKV(spec.num_layers, spec.num_kv_heads, spec.head_dim, num_blocks=16, block_size=4)
    positions, attn = cache.step([("a", len(ids))])
    with torch.inference_mode():
        return model.compute_logits(model(ids, positions, cache.kv_caches, attn))


@pytest.fixture(scope="module")
def float_checkpoint(tmp_path_factory):
    path = _tiny_qwen3(tmp_path_factory.mktemp("qwen3"))
    from transformers import AutoConfig

    return path, AutoConfig.from_pretrained(path)


IDS = torch.randint(0, 512, (20,), generator=torch.Generator().manual_seed(1))


def test_quantization_fp8_quantizes_every_decoder_linear(float_checkpoint):
    path, config = float_checkpoint
    float_model = load_model(path, config, torch.float32, "cpu")
    fp8_model = load_model(path, config, torch.float32, "cpu", quantization="fp8")
    linears = dict(quantizable_linears(fp8_model))
    assert len(linears) == 2 * 4  # qkv, o, gate_up, down per layer
    assert all(layer.weight.dtype == torch.float8_e4m3fn for layer in linears.values())
    assert fp8_model.lm_head.weight.dtype == torch.float32  # the head stays in the model's dtype
    reference, logits = _logits(float_model, IDS), _logits(fp8_model, IDS)
    # ~3% per GEMM, compounded over a random model's 8 (its near-flat logits make top-1 agreement
    # meaningless here: bench/fp8_accuracy.py measures that on real shapes)
    assert 0 < _relative_error(logits, reference) < 0.2


def test_pre_norms_quantize_for_their_fp8_reader_with_the_same_logits(float_checkpoint):
    """Each layer's two pre-norms hand their FP8 reader quantized rows; turned off, the layers quantize
    the same rows themselves: identical logits."""
    path, config = float_checkpoint
    model = load_model(path, config, torch.float32, "cpu", quantization="fp8")
    norms = [norm for norm, _ in model.norm_fed_linears()]
    assert len(norms) == 2 * 2 and all(norm.fp8_output for norm in norms)
    fused = _logits(model, IDS)
    for norm in norms:
        norm.fp8_output = False
    assert torch.equal(fused, _logits(model, IDS))


def test_per_channel_checkpoint_loads_the_weights_online_quantization_makes(float_checkpoint, tmp_path):
    path, config = float_checkpoint
    fp8_path = _write_fp8_checkpoint(path, tmp_path / "fp8", "compressed-tensors", static=False)
    from transformers import AutoConfig

    fp8_config = AutoConfig.from_pretrained(fp8_path)
    assert checkpoint_fp8(fp8_config).static_activations is False
    loaded = load_model(fp8_path, fp8_config, torch.float32, "cpu")
    online = load_model(path, config, torch.float32, "cpu", quantization="fp8")
    for (name, a), (_, b) in zip(quantizable_linears(loaded), quantizable_linears(online), strict=True):
        assert torch.equal(a.weight.view(torch.uint8), b.weight.view(torch.uint8)), name
        assert torch.equal(a.weight_scale, b.weight_scale), name
    assert all(norm.fp8_output for norm, _ in loaded.norm_fed_linears())
    assert torch.equal(_logits(loaded, IDS), _logits(online, IDS))


@pytest.mark.parametrize("method", ["compressed-tensors", "fp8"])
def test_static_activation_checkpoint_runs_with_its_input_scales(float_checkpoint, tmp_path, method):
    path, config = float_checkpoint
    fp8_path = _write_fp8_checkpoint(path, tmp_path / "fp8", method, static=True)
    from transformers import AutoConfig

    model = load_model(fp8_path, AutoConfig.from_pretrained(fp8_path), torch.float32, "cpu")
    layer = model.model.layers[0].self_attn.qkv_proj
    assert layer.input_scale.item() == pytest.approx(0.05)
    assert not any(norm.fp8_output for norm, _ in model.norm_fed_linears())  # static scales: the layers quantize
    if method == "fp8":  # per-tensor scales: q, k and v rows each carry their own tensor's scale
        assert len(set(layer.weight_scale.tolist())) == 3
    reference = _logits(load_model(path, config, torch.float32, "cpu"), IDS)
    assert _relative_error(_logits(model, IDS), reference) < 0.25


class _Config:
    def __init__(self, quant):
        self.quantization_config = quant


@pytest.mark.parametrize("quant, message", [
    ({"quant_method": "gptq", "bits": 4}, "quant_method 'gptq' is not supported"),
    ({"quant_method": "fp8", "weight_block_size": [128, 128]}, "weight_block_size = \\[128, 128\\]"),
    ({"quant_method": "fp8", "activation_scheme": "smooth"}, "activation_scheme must be 'dynamic' or 'static'"),
    ({"quant_method": "compressed-tensors", "config_groups": {"g": {"weights": {
        "num_bits": 8, "type": "float", "strategy": "channel"}}}}, "input_activations is missing: weight-only"),
    ({"quant_method": "compressed-tensors", "config_groups": {"g": {"weights": {
        "num_bits": 4, "type": "int", "strategy": "group"}}}}, "weights must be 8-bit float"),
    ({"quant_method": "compressed-tensors", "config_groups": {"g": {
        "weights": {"num_bits": 8, "type": "float", "strategy": "block"},
        "input_activations": {"num_bits": 8, "type": "float", "strategy": "token", "dynamic": True}}}},
     "weights.strategy must be 'channel' or 'tensor'"),
    ({"quant_method": "compressed-tensors", "kv_cache_scheme": {"num_bits": 8, "type": "float"}, "config_groups": {}},
     "kv_cache_scheme: calibrated KV-cache scales are not supported"),
])
def test_unsupported_quantized_checkpoints_are_named(quant, message):
    with pytest.raises(ValueError, match=message):
        checkpoint_fp8(_Config(quant))


def test_quantization_field_is_validated():
    from pagoda.engine.config import ModelConfig

    assert ModelConfig(quantization="fp8").quantization == "fp8"
    with pytest.raises(ValueError, match="quantization must be one of \\('fp8',\\) or None, got 'int4'"):
        ModelConfig(quantization="int4")


def test_kv_cache_dtype_is_validated_and_fp8_needs_cuda():
    from pagoda.engine.config import CacheConfig
    from pagoda.engine.worker.worker import resolve_kv_cache_dtype

    with pytest.raises(ValueError, match="kv_cache_dtype must be one of \\('auto', 'fp8'\\), got 'int8'"):
        CacheConfig(kv_cache_dtype="int8")
    assert resolve_kv_cache_dtype("auto", torch.float32, torch.device("cpu")) == torch.float32
    with pytest.raises(ValueError, match="kv_cache_dtype 'fp8' needs a CUDA device"):
        resolve_kv_cache_dtype("fp8", torch.float32, torch.device("cpu"))


def test_glm4v_quantizes_its_decoder_and_keeps_the_vision_tower(tmp_path):
    """AutoGLM-Phone-9B's architecture: the GLM decoder's linears (q/k/v biased) go to FP8, the vision
    tower's stay in the model's dtype, and an image still encodes."""
    from transformers import Glm4vForConditionalGeneration

    from tests.tiny_models import tiny_glm4v_config

    torch.manual_seed(0)
    hf = Glm4vForConditionalGeneration(tiny_glm4v_config(512)).eval()
    hf.save_pretrained(tmp_path)
    model = load_model(tmp_path, hf.config, torch.float32, "cpu", quantization="fp8")
    names = [name for name, _ in quantizable_linears(model)]
    assert names and not any(name.startswith("visual.") for name in names)
    assert all(layer.weight.dtype == torch.float8_e4m3fn for _, layer in quantizable_linears(model))
    assert all(p.dtype == torch.float32 for name, p in model.named_parameters() if name.startswith("visual."))
    assert model.model.layers[0].self_attn.qkv_proj.bias is not None  # the bias is added after the scaled GEMM
    pixels, grid = model.dummy_image(4)
    (rows,) = model.encode_images(pixels, [grid])
    assert rows.shape[-1] == model.spec.hidden_size and torch.isfinite(rows).all()
    float_logits = _logits(load_model(tmp_path, hf.config, torch.float32, "cpu"), IDS)
    assert 0 < _relative_error(_logits(model, IDS), float_logits) < 0.2  # a text prompt through the FP8 decoder
