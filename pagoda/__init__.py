"""pagoda: a Ray-based LLM serving cluster: paged KV cache, continuous batching, tensor
parallelism, Ray Serve replicas behind a KV-aware router.

Public API, vLLM-shaped: ``from pagoda import LLM, SamplingParams``. The three subpackages are
the repository's top-level folders, linked in here so that ``pagoda`` is the one import name:

    pagoda.engine    one replica's inference engine, no Ray inside (``engine/``)
    pagoda.kernels   Triton kernels, each with a pure-torch reference (``kernels/``)
    pagoda.cluster   Ray Serve replicas, the KV-aware router, gRPC and OpenAI HTTP (``cluster/``)

The folders have no ``__init__.py`` of their own (they are namespace portions of ``pagoda``), so a
shell in the repository root never imports them as top-level ``engine``/``kernels``/``cluster``:
``kernels`` is Hugging Face's package, which transformers imports. Heavy modules load lazily, so
``import pagoda`` and ``pagoda.engine.kv_cache`` need no torch.
"""

from pagoda.engine import plugins
from pagoda.engine.sampling_params import SamplingParams

# The composition root: cluster/ plugs into the engine here, by module name (imported on first use), so
# the engine never imports cluster/ and `import pagoda` loads neither Ray nor torch.
plugins.register(plugins.EXECUTOR_BACKEND, "ray", "pagoda.cluster.ray_executor:RayExecutor")
plugins.register(plugins.CLI_COMMAND, "serve", "pagoda.cluster.cli_commands:SERVE")
plugins.register(plugins.CLI_COMMAND, "status", "pagoda.cluster.cli_commands:STATUS")

_LAZY = {
    "LLM": "pagoda.engine.llm",
    "LLMEngine": "pagoda.engine.llm_engine",
    "AsyncLLMEngine": "pagoda.engine.async_engine",
    "EngineConfig": "pagoda.engine.config",
    "RequestOutput": "pagoda.engine.request",
    "CompletionOutput": "pagoda.engine.request",
}

__all__ = ["AsyncLLMEngine", "CompletionOutput", "EngineConfig", "LLM", "LLMEngine", "RequestOutput", "SamplingParams"]


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'pagoda' has no attribute {name!r}")
