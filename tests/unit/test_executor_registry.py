"""Executor backends and CLI subcommands are found by name: engine/ never imports cluster/.

- ``make_executor`` builds a TP > 1 executor through the backend registry (``engine/plugins.py``);
- "ray" resolves in a process that imported nothing but ``pagoda.engine``: the package root registered
  it by module name, imported on first use;
- the engine's modules import no ``pagoda.cluster`` module, and the CLI finds ``serve`` and ``status``
  in the same registry.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from pagoda.engine import executor, plugins
from pagoda.engine.config import EngineConfig

ENGINE = Path(__file__).resolve().parents[2] / "engine"


def run_python(code: str) -> str:
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def test_a_registered_backend_builds_the_executor_for_tp_above_one(monkeypatch):
    from transformers import LlamaConfig

    built = []
    monkeypatch.setitem(plugins._REGISTRY[plugins.EXECUTOR_BACKEND], "ray",
                        lambda config, model: built.append((config, model)) or "fake")
    hf_config = LlamaConfig(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
                            architectures=["LlamaForCausalLM"])
    model = SimpleNamespace(hf_config=hf_config)
    config = EngineConfig.from_kwargs(device="cpu", tensor_parallel_size=2, distributed_executor_backend="ray")
    assert executor.make_executor(config, model) == "fake"
    assert built == [(config, model)]


def test_register_and_look_up_by_name():
    def factory(config, model):
        return None

    executor.register_executor_backend("test-backend", factory)
    try:
        assert executor.executor_backend("test-backend") is factory
    finally:
        plugins._REGISTRY[plugins.EXECUTOR_BACKEND].pop("test-backend")
    assert executor.executor_backend("mp") is executor._multiproc_executor
    with pytest.raises(ValueError, match=r"'nope' is not registered \(known: .*'mp'"):
        executor.executor_backend("nope")


def test_ray_resolves_with_only_the_engine_imported():
    pytest.importorskip("ray")
    code = ("import sys; from pagoda.engine.executor import executor_backend; "
            "before = sorted(m for m in sys.modules if m.startswith('pagoda.cluster')); "
            "factory = executor_backend('ray'); print(before, factory.__module__, factory.__name__)")
    assert run_python(code) == "[] pagoda.cluster.ray_executor RayExecutor"


def test_the_engine_imports_no_cluster_module():
    code = ("import sys; import pagoda.engine.llm, pagoda.engine.async_engine, pagoda.engine.cli; "
            "print(sorted(m for m in sys.modules if m.startswith('pagoda.cluster')))")
    assert run_python(code) == "[]"
    offenders = [f"{path.relative_to(ENGINE)}:{n}" for path in ENGINE.rglob("*.py")
                 for n, line in enumerate(path.read_text().splitlines(), 1)
                 if "pagoda.cluster" in line or "from pagoda import cluster" in line]
    assert offenders == []


def test_the_cli_finds_the_cluster_subcommands_by_name():
    from pagoda.engine.cli import build_parser, plugin_commands

    commands = plugin_commands()
    assert sorted(commands) == ["serve", "status"]
    assert build_parser(commands).parse_args(["status", "--json"]).command == "status"
