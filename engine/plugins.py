"""What other rooms plug into the engine, by name, without the engine importing them.

    register(EXECUTOR_BACKEND, "ray", "some.module:RayExecutor")   # an object, or "module:attribute"
    resolve(EXECUTOR_BACKEND, "ray")                               # imports the module on first use

The package root (``pagoda/__init__.py``) is the one place that knows both the engine and
``cluster/``: it registers the Ray executor and the ``serve`` / ``status`` subcommands here as
"module:attribute" strings, so nothing is imported until used (``import pagoda`` stays free of torch
and Ray), and it works from a source tree as well as an installed wheel. Light: no torch here.
"""

from __future__ import annotations

import importlib
from typing import Any

EXECUTOR_BACKEND = "executor_backend"  # distributed_executor_backend name -> executor factory(config, model)
CLI_COMMAND = "cli_command"  # `pagoda <name>` -> pagoda.engine.cli.CliCommand
_REGISTRY: dict[str, dict[str, Any]] = {}  # kind -> name -> object, or "module:attribute" until first use


def register(kind: str, name: str, target: Any) -> None:
    """Make ``resolve(kind, name)`` return ``target`` (an object, or "module:attribute" imported on first use)."""
    _REGISTRY.setdefault(kind, {})[name] = target


def names(kind: str) -> list[str]:
    return sorted(_REGISTRY.get(kind, {}))


def resolve(kind: str, name: str) -> Any:
    """The object registered as ``name``; KeyError when nothing is."""
    target = _REGISTRY.get(kind, {})[name]
    if isinstance(target, str):
        module, _, attribute = target.partition(":")
        target = getattr(importlib.import_module(module), attribute)
        _REGISTRY[kind][name] = target
    return target
