"""pagoda's single-replica inference engine (no Ray inside).

Public API, vLLM-shaped: ``from engine import LLM, SamplingParams``. Heavy modules load lazily so
that ``engine.kv_cache`` and friends import without torch.
"""

from engine.sampling_params import SamplingParams

_LAZY = {
    "LLM": "engine.llm",
    "LLMEngine": "engine.llm_engine",
    "AsyncLLMEngine": "engine.async_engine",
    "EngineConfig": "engine.config",
    "RequestOutput": "engine.request",
    "CompletionOutput": "engine.request",
}

__all__ = ["SamplingParams", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'engine' has no attribute {name!r}")
