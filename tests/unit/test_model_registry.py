"""The model registry and ModelSpec: every architecture's differences are spec fields set in one
table, classes are imported only when built, and each class implements the declared interface."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from pagoda.engine.models.base import CausalLM
from pagoda.engine.models.registry import SUPPORTED_ARCHITECTURES, build_model, model_class, model_spec
from tests.tiny_models import tiny_config as _tiny_config

ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM",
                 "glm4": "Glm4ForCausalLM", "glm": "GlmForCausalLM"}


def tiny_config(arch: str, vocab_size: int):
    """tests.tiny_models' config with the ``architectures`` entry save_pretrained would write."""
    config = _tiny_config(arch, vocab_size)
    config.architectures = [ARCHITECTURES[arch]]
    return config

# tiny_config arch -> the fields that set the family apart (attention_bias is False in these configs)
EXPECTED = {
    "llama": dict(rope_neox=True, qkv_bias=False, o_bias=False, qk_norm=False, sandwich_norms=False),
    "qwen2": dict(rope_neox=True, qkv_bias=True, o_bias=False, qk_norm=False, sandwich_norms=False),
    "qwen3": dict(rope_neox=True, qkv_bias=False, o_bias=False, qk_norm=True, sandwich_norms=False),
    "glm4": dict(rope_neox=False, qkv_bias=True, o_bias=False, mlp_bias=False, sandwich_norms=True),
    "glm": dict(rope_neox=False, qkv_bias=True, o_bias=False, mlp_bias=False, sandwich_norms=False),
}


@pytest.mark.parametrize("arch", sorted(EXPECTED))
def test_each_family_is_a_set_of_spec_fields(arch):
    config = tiny_config(arch, vocab_size=128)
    spec = model_spec(config)
    assert spec.architecture == config.architectures[0]
    assert {k: getattr(spec, k) for k in EXPECTED[arch]} == EXPECTED[arch]
    assert (spec.num_layers, spec.num_heads, spec.num_kv_heads) == (2, 4, 2)
    assert spec.head_dim == (16 if arch in ("qwen3", "glm4", "glm") else 64 // 4)
    assert spec.rope["partial_rotary_factor"] == (0.5 if arch.startswith("glm") else 1.0)


@pytest.mark.parametrize("arch", sorted(EXPECTED))
def test_every_registered_class_implements_the_interface(arch):
    model = build_model(tiny_config(arch, vocab_size=128), torch.float32, "cpu")
    assert isinstance(model, CausalLM)
    assert model.num_layers == 2 and model.spec == model_spec(tiny_config(arch, vocab_size=128))


def test_every_supported_architecture_resolves_to_a_causal_lm():
    for arch in SUPPORTED_ARCHITECTURES:
        config = tiny_config("llama", vocab_size=128)
        config.architectures = [arch]
        assert issubclass(model_class(model_spec(config)), CausalLM)


def test_an_unsupported_activation_names_the_field():
    config = tiny_config("llama", vocab_size=128)
    config.hidden_act = "gelu"
    with pytest.raises(ValueError, match=r"hidden_act 'gelu' is not supported"):
        model_spec(config)


def test_model_classes_are_imported_only_when_built():
    code = ("import sys, pagoda.engine.models.registry as r; "
            "print(sorted(m for m in sys.modules if m.startswith('pagoda.engine.models.') and m not in "
            "('pagoda.engine.models.registry', 'pagoda.engine.models.spec', 'pagoda.engine.models.base')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "[]"
