"""The engine core: the loop that alone drives an ``LLMEngine``, and where it runs.

    loop: apply queued commands (add, abort) → step while there is work → hand each step's outputs on

``AsyncLLMEngine`` is the asyncio front; an engine core is its back. Two run the same loop:

- ``ThreadCore``: the loop on a thread of the caller's process. Cheapest to start; the loop shares the
  GIL with everything else there (a Serve replica's event loop and Ray's threads), so under load each
  step waits for the interpreter as long as the front keeps it busy.
- ``ProcessCore`` (``pagoda.engine.core_process``): the loop in a process of its own, so the front's
  work never delays a step; commands and outputs cross a pipe, one message per step.

A core deals in tokens: each step hands on ``CoreOutput``s (``pagoda.engine.core_output``), and the
front detokenizes them (``OutputProcessor``), finds stop strings, and aborts what one ended.

The contract between a core and its front, both directions:

- into the core: ``add(prepared)`` (validated by the front), ``abort(request_id)`` (a prompt, every
  completion) and ``stop_completion(completion_id)`` (one completion a stop string ended), applied in
  the order sent, before the next step;
- out of it, on a thread of the core's choosing: ``CoreSink.on_outputs`` once per step,
  ``on_rejected`` for an add the engine refused (ValueError, QueueFullError), ``on_failed`` once when a
  step raised or the core died; ``snapshot()`` is the engine's latest published state (``EngineSnapshot``).
"""

from __future__ import annotations

import abc
import queue
import threading
from collections.abc import Callable
from typing import Protocol

from pagoda.engine.config import EngineConfig
from pagoda.engine.core_output import CoreOutput
from pagoda.engine.errors import QueueFullError
from pagoda.engine.input_processor import InputProcessor, PreparedRequest
from pagoda.engine.llm_engine import LLMEngine
from pagoda.engine.snapshot import EngineSnapshot, SnapshotConfig, SnapshotPublisher

CORES = ("thread", "process")
IDLE_WAIT_S = 0.5  # an idle loop wakes this often to publish a fresh snapshot (health reads its age)


class CoreSink(Protocol):
    """Where a core's news goes: the front's streams."""

    def on_outputs(self, outputs: list[CoreOutput]) -> None: ...

    def on_rejected(self, request_id: str, error: Exception) -> None: ...

    def on_failed(self, error: BaseException) -> None: ...


class EngineCore(abc.ABC):
    """The back of an ``AsyncLLMEngine``: runs the engine loop somewhere and relays commands to it."""

    inputs: InputProcessor  # validates and tokenizes on the front's side (no side effects on the engine)

    @property
    def tokenizer(self):
        return self.inputs.tokenizer

    @abc.abstractmethod
    def add(self, prepared: PreparedRequest) -> None:
        """Queue a validated request; a refusal comes back through ``CoreSink.on_rejected``."""

    @abc.abstractmethod
    def abort(self, request_id: str) -> None:
        """Drop a prompt wherever it is (unknown ids are ignored); its KV blocks return at the next turn."""

    @abc.abstractmethod
    def stop_completion(self, completion_id: str) -> None:
        """End one completion (``<id>`` or ``<id>#<i>``) that a stop string ended in the front."""

    @abc.abstractmethod
    def snapshot(self) -> EngineSnapshot:
        """The engine's latest published state; safe from any thread."""

    @property
    @abc.abstractmethod
    def is_alive(self) -> bool:
        """The loop runs (it has not failed, died or been shut down)."""

    @abc.abstractmethod
    def shutdown(self) -> None:
        """Stop the loop and release the engine (its ranks, its process); safe to call twice."""


def run_engine_loop(engine: LLMEngine, publisher: SnapshotPublisher, commands: queue.SimpleQueue,
                    sink: CoreSink, stopping: Callable[[], bool]) -> None:
    """Drive ``engine`` until ``stopping()`` or a step raises (then ``sink.on_failed`` and return).
    ``commands`` holds ``("add", prepared)``, ``("abort", request_id)``, ``("stop_completion", completion_id)``
    and ``("wake",)``."""
    while not stopping():
        idle = not engine.has_unfinished_requests()
        if _drain(engine, commands, sink, block=idle) or idle:
            publisher.after_commands(waited=idle)
        if not engine.has_unfinished_requests():
            continue
        try:
            outputs = engine.step_core()
        except BaseException as exc:  # noqa: BLE001 (a failed step kills the engine; every stream learns why)
            sink.on_failed(exc)
            return
        publisher.after_step()  # before delivering: a caller that sees its end sees it in stats too
        sink.on_outputs(outputs)


def _drain(engine: LLMEngine, commands: queue.SimpleQueue, sink: CoreSink, block: bool) -> bool:
    """Apply every queued command, waiting up to IDLE_WAIT_S for the first when ``block``; whether any came."""
    try:
        command = commands.get(block=block, timeout=IDLE_WAIT_S if block else None)
    except queue.Empty:
        return False
    while True:
        _apply(engine, command, sink)
        try:
            command = commands.get_nowait()
        except queue.Empty:
            return True


def _apply(engine: LLMEngine, command: tuple, sink: CoreSink) -> None:
    kind = command[0]
    if kind == "add":
        prepared = command[1]
        try:
            engine.add_prepared(prepared, None)  # the front turns its tokens into outputs
        except (ValueError, QueueFullError) as exc:
            sink.on_rejected(prepared.request_id, exc)
    elif kind == "abort":
        engine.abort_request(command[1])
    elif kind == "stop_completion":
        engine.stop_completions([command[1]])


class ThreadCore(EngineCore):
    """The engine loop on a daemon thread of this process; ``engine`` is that thread's alone once it starts."""

    def __init__(self, config: EngineConfig, snapshots: SnapshotConfig | None, sink: CoreSink) -> None:
        self.engine = LLMEngine(config)
        self.inputs = self.engine.inputs
        self._publisher = SnapshotPublisher(self.engine, snapshots)
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, args=(sink,), name="pagoda-engine", daemon=True)
        self._thread.start()

    def _run(self, sink: CoreSink) -> None:  # returns when stopped or when a step failed (the thread then ends)
        run_engine_loop(self.engine, self._publisher, self._commands, sink, lambda: self._stopping)

    def add(self, prepared: PreparedRequest) -> None:
        self._commands.put(("add", prepared))

    def abort(self, request_id: str) -> None:
        self._commands.put(("abort", request_id))

    def stop_completion(self, completion_id: str) -> None:
        self._commands.put(("stop_completion", completion_id))

    def snapshot(self) -> EngineSnapshot:
        return self._publisher.latest

    @property
    def is_alive(self) -> bool:
        return not self._stopping and self._thread.is_alive()

    def shutdown(self) -> None:
        self._stopping = True
        self._commands.put(("wake",))
        self._thread.join(timeout=30)
        self.engine.shutdown()


def make_core(kind: str, config: EngineConfig, snapshots: SnapshotConfig | None, sink: CoreSink) -> EngineCore:
    if kind == "thread":
        return ThreadCore(config, snapshots, sink)
    if kind == "process":
        from pagoda.engine.core_process import ProcessCore

        return ProcessCore(config, snapshots, sink)
    raise ValueError(f"engine core must be one of {CORES}, got {kind!r}")
