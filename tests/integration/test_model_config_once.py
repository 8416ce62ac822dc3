"""An engine start reads the model's config.json once: the engine resolves the model into one
``ResolvedModel`` (folder, HF config, EOS ids) and hands that object down to the tokenizer, the
executor, the worker and the model, instead of each of them loading the config again."""

from __future__ import annotations

from pagoda.engine.llm_engine import LLMEngine
from pagoda.engine.models.registry import model_spec


def test_the_hf_config_is_read_once_and_handed_down(tiny_models, monkeypatch):
    import transformers

    real = transformers.AutoConfig.from_pretrained
    reads: list = []
    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", lambda *a, **k: reads.append(a[0]) or real(*a, **k))
    engine = LLMEngine.from_kwargs(model=str(tiny_models["qwen3"]), device="cpu", dtype="float32")
    try:
        assert len(reads) == 1, reads
        worker = engine.executor.worker
        assert worker.source is engine.model  # the worker builds from the engine's object
        assert worker.model.spec == model_spec(engine.model.hf_config)
    finally:
        engine.shutdown()
