"""Executors hand a SchedulerOutput to the workers and return rank 0's sampled tokens.

The interface is what the engine sees, whoever runs the ranks: in-process for TP=1 here, local
processes for TP>1, and Ray actors in ``cluster/`` — all with the same four methods.
"""

from __future__ import annotations

import abc
from pathlib import Path

from engine.config import EngineConfig
from engine.scheduler_output import ModelRunnerOutput, SchedulerOutput


class Executor(abc.ABC):
    @abc.abstractmethod
    def initialize(self) -> int:
        """Load the model on every rank, size the KV cache; returns the number of KV blocks (equal on all ranks)."""

    @abc.abstractmethod
    def execute_model(self, scheduled: SchedulerOutput) -> ModelRunnerOutput:
        """Run one step on every rank; rank 0's sampled tokens come back."""

    def check_health(self) -> None:
        """Raise if a rank is dead or hung."""

    def shutdown(self) -> None:
        """Release the ranks; safe to call twice."""


class UniProcExecutor(Executor):
    """TP=1: one worker in the engine's own process."""

    def __init__(self, config: EngineConfig, model_path: Path, eos_token_ids: tuple[int, ...]) -> None:
        from engine.worker.worker import Worker

        self.worker = Worker(config, model_path, eos_token_ids)

    def initialize(self) -> int:
        self.worker.load_model()
        num_blocks = self.worker.determine_num_blocks()
        self.worker.initialize_cache(num_blocks)
        return num_blocks

    def execute_model(self, scheduled: SchedulerOutput) -> ModelRunnerOutput:
        return self.worker.execute_model(scheduled)


def make_executor(config: EngineConfig, model_path: Path, eos_token_ids: tuple[int, ...]) -> Executor:
    tp = config.parallel.tensor_parallel_size
    if tp == 1:
        return UniProcExecutor(config, model_path, eos_token_ids)
    raise ValueError(
        f"tensor_parallel_size={tp} needs the multi-process executor, which this build does not have yet; use 1"
    )
