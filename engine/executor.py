"""Executors hand a SchedulerOutput to the workers and return rank 0's sampled tokens.

The interface is what the engine sees, whoever runs the ranks: in-process for TP=1 here, local
processes for TP>1 (``engine/worker/multiproc_executor.py``), and Ray actors
(``cluster/ray_executor.py``, ``distributed_executor_backend="ray"``) — all with the same
methods. A failed rank surfaces from ``execute_model`` (or ``submit``/``take_output``) as
``EngineDeadError``.

Backends for TP>1 are a registry by name (``register_executor_backend``, in ``engine/plugins.py``): "mp"
is registered here; the engine never imports ``cluster/``, whose Ray executor the package root
(``pagoda/__init__.py``) registers as "ray" by module name, imported on first use — so
``LLM(..., distributed_executor_backend="ray")`` works with nothing but ``pagoda.engine`` imported.

Async scheduling uses ``submit(step)`` then ``take_output()``, which returns the results in
submission order. The engine keeps at most two steps submitted: it submits step n+1 before
taking step n, so step n+1 is queued on the device while the host handles step n. The base
class runs each submitted step to completion (no overlap); the in-process, local multi-process and
Ray executors queue it instead (``ModelRunner.launch``/``finish``).
"""

from __future__ import annotations

import abc
import os
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from pagoda.engine import plugins
from pagoda.engine.config import EngineConfig
from pagoda.engine.scheduler_output import ModelRunnerOutput, SchedulerOutput

if TYPE_CHECKING:
    from pagoda.engine.loader import ResolvedModel


class Executor(abc.ABC):
    def __init__(self) -> None:
        self._done: deque[ModelRunnerOutput] = deque()  # results of submitted steps (the base class's submit)

    @abc.abstractmethod
    def initialize(self) -> int:
        """Load the model on every rank, size the KV cache; returns the number of KV blocks (equal on all ranks)."""

    @abc.abstractmethod
    def execute_model(self, scheduled: SchedulerOutput) -> ModelRunnerOutput:
        """Run one step on every rank; rank 0's sampled tokens come back."""

    @property
    def overlaps_host(self) -> bool:
        """Whether a submitted step runs while the engine's thread goes on (what async scheduling needs to
        gain anything). Here: no, ``submit`` runs the step."""
        return False

    def submit(self, scheduled: SchedulerOutput) -> None:
        """Start a step; its result comes from a later ``take_output``. Here: run it now."""
        self._done.append(self.execute_model(scheduled))

    def take_output(self) -> ModelRunnerOutput:
        """The result of the oldest submitted step not taken yet."""
        return self._done.popleft()

    def check_health(self) -> None:
        """Raise if a rank is dead or hung."""

    def shutdown(self) -> None:
        """Release the ranks; safe to call twice."""


class UniProcExecutor(Executor):
    """TP=1: one worker in the engine's own process."""

    def __init__(self, config: EngineConfig, model: ResolvedModel) -> None:
        from pagoda.engine.worker.worker import Worker

        super().__init__()
        self.worker = Worker(config, model)
        self._launched: deque = deque()  # StepHandles submitted, not taken

    def initialize(self) -> int:
        self.worker.load_model()
        num_blocks = self.worker.determine_num_blocks()
        self.worker.initialize_cache(num_blocks)
        return num_blocks

    def execute_model(self, scheduled: SchedulerOutput) -> ModelRunnerOutput:
        return self.worker.execute_model(scheduled)

    @property
    def overlaps_host(self) -> bool:
        return self.worker.device.type == "cuda"  # a CPU forward runs when it is launched

    def submit(self, scheduled: SchedulerOutput) -> None:
        self._launched.append(self.worker.launch(scheduled))  # queued on the device, not waited for

    def take_output(self) -> ModelRunnerOutput:
        return self.worker.finish(self._launched.popleft())

    def shutdown(self) -> None:
        self.worker = None  # model, KV cache and graphs go with the last reference


DEFAULT_STEP_TIMEOUT_S = 25.0
DEFAULT_INIT_TIMEOUT_S = 900.0


@dataclass(frozen=True)
class RankTimeouts:
    """Deadlines of a multi-rank executor (local processes or Ray actors alike)."""

    step_s: float  # every rank answers one step within this (PAGODA_STEP_TIMEOUT_S, default 25 s)
    init_s: float  # load + profile + cache + graph capture (PAGODA_INIT_TIMEOUT_S, default 900 s)

    @property
    def collective_s(self) -> float:
        """Each collective's own timeout inside the ranks: a second line of defence behind the step deadline."""
        return max(60.0, 2 * self.step_s)

    @classmethod
    def resolve(cls, step_s: float | None = None, init_s: float | None = None) -> RankTimeouts:
        """The given values, else the environment's, else the defaults."""
        return cls(
            step_s or float(os.environ.get("PAGODA_STEP_TIMEOUT_S", DEFAULT_STEP_TIMEOUT_S)),
            init_s or float(os.environ.get("PAGODA_INIT_TIMEOUT_S", DEFAULT_INIT_TIMEOUT_S)),
        )


MAX_CPU_TENSOR_PARALLEL = 8  # CPU ranks are for tests and smoke checks; more only oversubscribes the host


def check_parallel_config(config: EngineConfig, hf_config) -> None:
    """ValueError naming the values when the tensor-parallel setup cannot work; starts nothing."""
    from pagoda.engine.models.registry import check_tensor_parallel

    tp = config.parallel.tensor_parallel_size
    check_tensor_parallel(hf_config, tp)
    if tp == 1:
        return
    device = config.model.device
    if config.parallel.distributed_executor_backend == "ray" and device != "cpu":
        return  # the ranks' GPUs are the Ray cluster's, not this process's: RayExecutor checks them
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        available = torch.cuda.device_count()
        if tp > available:
            raise ValueError(
                f"tensor_parallel_size ({tp}) is larger than the number of CUDA devices torch sees ({available})"
            )
    elif tp > MAX_CPU_TENSOR_PARALLEL:
        raise ValueError(
            f"tensor_parallel_size ({tp}) on CPU must be <= {MAX_CPU_TENSOR_PARALLEL} "
            f"(CPU ranks are for tests; they share the host's cores)"
        )


ExecutorFactory = Callable[[EngineConfig, "ResolvedModel"], Executor]  # an unstarted executor for TP > 1


def register_executor_backend(name: str, factory: ExecutorFactory | str) -> None:
    """Make ``distributed_executor_backend=name`` build its executor with ``factory(config, model)``
    (or "module:attribute", imported on first use)."""
    plugins.register(plugins.EXECUTOR_BACKEND, name, factory)


def executor_backend(name: str) -> ExecutorFactory:
    """The factory registered as ``name``."""
    try:
        return plugins.resolve(plugins.EXECUTOR_BACKEND, name)
    except KeyError:
        raise ValueError(f"distributed_executor_backend {name!r} is not registered "
                         f"(known: {plugins.names(plugins.EXECUTOR_BACKEND)})") from None


def _multiproc_executor(config: EngineConfig, model: ResolvedModel) -> Executor:
    from pagoda.engine.worker.multiproc_executor import MultiprocExecutor

    return MultiprocExecutor(config, model)


register_executor_backend("mp", _multiproc_executor)


def make_executor(config: EngineConfig, model: ResolvedModel) -> Executor:
    """UniProcExecutor for TP=1; above, the ``distributed_executor_backend``'s: MultiprocExecutor (a process
    per rank, "mp") or RayExecutor (an actor per rank, "ray"). Validates first."""
    check_parallel_config(config, model.hf_config)
    if config.parallel.tensor_parallel_size == 1:
        return UniProcExecutor(config, model)
    return executor_backend(config.parallel.distributed_executor_backend)(config, model)
