"""One context length for the engine and the API front ends: a model whose sliding window is
shorter than its position table (Mistral v0.1: 32,768 positions, a 4,096-token window) is served
up to the window everywhere, since sliding-window attention is not implemented."""

from __future__ import annotations

import pytest
import torch

from pagoda.cluster.api.config import ApiConfig
from pagoda.cluster.api.errors import ApiError
from pagoda.cluster.api.frontend import Prompt, build_frontend
from pagoda.cluster.config import AppConfig
from pagoda.engine.config import EngineConfig, ModelConfig
from pagoda.engine.llm_engine import LLMEngine
from pagoda.engine.sampling_params import SamplingParams

WINDOW = 96


@pytest.fixture(scope="module")
def windowed_mistral(tmp_path_factory, embedded_path):
    """A tiny random Mistral with 512 positions and a 96-token sliding window."""
    from transformers import AutoTokenizer, MistralConfig, MistralForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(embedded_path)
    config = MistralConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
                           num_key_value_heads=2, max_position_embeddings=512, sliding_window=WINDOW,
                           vocab_size=len(tokenizer), bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("windowed-mistral")
    MistralForCausalLM(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def test_engine_and_front_end_enforce_the_same_context_length(windowed_mistral):
    app = AppConfig(engine=EngineConfig(model=ModelConfig(model=str(windowed_mistral), device="cpu", dtype="float32")))
    engine = LLMEngine(app.engine)
    try:
        frontend = build_frontend(client=None, app=app, api=ApiConfig())
        assert engine.max_model_len == frontend.info.max_model_len == WINDOW
        prompt = Prompt(list(range(10, 10 + WINDOW - 8)), None)
        with pytest.raises(ApiError) as err:  # the front end rejects what the engine would reject
            frontend._check_fits(prompt, SamplingParams(max_tokens=16))
        assert err.value.http_status == 400 and err.value.param == "max_tokens" and f"({WINDOW})" in err.value.message
        with pytest.raises(ValueError, match=f"max_model_len \\({WINDOW}\\)"):
            engine.add_request("over", {"prompt_token_ids": prompt.token_ids}, SamplingParams(max_tokens=16))
        frontend._check_fits(prompt, SamplingParams(max_tokens=8))  # exactly the window: accepted by both
        engine.add_request("fits", {"prompt_token_ids": prompt.token_ids}, SamplingParams(max_tokens=8))
        engine.abort_request("fits")
    finally:
        engine.shutdown()


def test_asking_for_more_than_the_window_names_it(windowed_mistral):
    with pytest.raises(ValueError, match=r"max_model_len \(128\) must be <= the model's sliding_window \(96\)"):
        LLMEngine(EngineConfig(model=ModelConfig(model=str(windowed_mistral), device="cpu", max_model_len=128)))
