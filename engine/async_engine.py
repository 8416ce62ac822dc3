"""AsyncLLMEngine: one asyncio stream of RequestOutputs per request, over a synchronous engine.

Threads: the LLMEngine lives on one dedicated thread that alone mutates it — it drains a command
queue (add, abort), runs ``step()`` while there is work, and posts each output to the stream's
event loop. Callers validate on their own thread (``InputProcessor.process`` has no side
effects), so a bad request raises ValueError straight from ``generate``.

Delivery: the engine thread hands each step's outputs to each caller loop in one
``call_soon_threadsafe`` (not one per request). A consumer that falls behind gets what queued up
in one item: delta outputs joined (``RequestOutput.followed_by``), cumulative ones superseded.
Nothing waits for company: an item goes as soon as the consumer asks.

Cancellation: when the consumer of a stream stops early (``break``, task cancel, a client that
disconnects), the generator's ``finally`` aborts the request, and its KV blocks return to the
pool at the engine thread's next turn.

State: other threads read the engine only through ``snapshot()`` (``pagoda.engine.snapshot``): the
engine thread publishes a frozen ``EngineSnapshot`` after every step and every batch of commands;
``stats()`` is its stats. ``SnapshotConfig`` sets the prefix-cache summary it carries.
"""

from __future__ import annotations

import asyncio
import queue
import threading
from collections import defaultdict
from collections.abc import AsyncIterator
from dataclasses import dataclass

from pagoda.engine.config import EngineConfig
from pagoda.engine.errors import EngineDeadError, QueueFullError
from pagoda.engine.input_processor import PreparedRequest, PromptType, has_images
from pagoda.engine.llm_engine import EngineStats, LLMEngine
from pagoda.engine.output_processor import OutputKind
from pagoda.engine.request import RequestOutput
from pagoda.engine.sampling_params import SamplingParams
from pagoda.engine.snapshot import EngineSnapshot, SnapshotConfig, SnapshotPublisher


@dataclass
class _Stream:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue  # RequestOutput items, or an Exception that ends the stream


class AsyncLLMEngine:
    def __init__(self, config: EngineConfig, snapshots: SnapshotConfig | None = None) -> None:
        self.engine = LLMEngine(config)  # the engine thread's alone once it starts; others read snapshot()
        self._snapshots = SnapshotPublisher(self.engine, snapshots)
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._streams: dict[str, _Stream] = {}
        self._lock = threading.Lock()  # guards _streams
        self._dead: BaseException | None = None
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="pagoda-engine", daemon=True)
        self._thread.start()

    @classmethod
    def from_kwargs(cls, snapshots: SnapshotConfig | None = None, **kwargs) -> AsyncLLMEngine:
        return cls(EngineConfig.from_kwargs(**kwargs), snapshots)

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    @property
    def is_running(self) -> bool:
        """Not failed, not shut down, and the engine thread is alive."""
        return self._dead is None and not self._stopping and self._thread.is_alive()

    # ------------------------------------------------------------------ the caller's side
    async def generate(
        self,
        prompt: PromptType,
        sampling_params: SamplingParams | None,
        request_id: str,
        priority: int = 0,
        output_kind: OutputKind = OutputKind.CUMULATIVE,
        tenant: str | None = None,
    ) -> AsyncIterator[RequestOutput]:
        """Stream outputs until the request finishes. Raises ValueError on bad input, QueueFullError at the
        queue limit (``LLMEngine.add_prepared`` decides, on the engine thread), EngineDeadError once the
        engine has failed."""
        if has_images(prompt):  # decoding and resizing a screenshot takes tens of ms: not on the event loop
            prepared = await asyncio.to_thread(self.engine.inputs.process, request_id, prompt, sampling_params, priority,
                                               None, tenant)
        else:
            prepared = self.engine.inputs.process(request_id, prompt, sampling_params, priority, None, tenant)
        stream = self._open(prepared)
        self._commands.put(("add", prepared, output_kind))
        finished, pending = False, None
        try:
            while not finished:
                item, pending = (pending if pending is not None else await stream.queue.get()), None
                if isinstance(item, BaseException):
                    raise item
                while not item.finished and not stream.queue.empty():  # fell behind: send what queued, once
                    later = stream.queue.get_nowait()
                    if isinstance(later, BaseException):
                        pending = later
                        break
                    item = _coalesce(item, later, output_kind)
                finished = item.finished
                yield item
        finally:
            with self._lock:
                self._streams.pop(request_id, None)
            if not finished:
                self._commands.put(("abort", request_id))

    def _open(self, prepared: PreparedRequest) -> _Stream:
        if self._dead is not None:
            raise EngineDeadError(f"engine is dead: {self._dead!r}")
        with self._lock:
            if prepared.request_id in self._streams:
                raise ValueError(f"request_id {prepared.request_id!r} is already in use")
            stream = _Stream(asyncio.get_running_loop(), asyncio.Queue())
            self._streams[prepared.request_id] = stream
        return stream

    async def abort(self, request_id: str) -> None:
        self._commands.put(("abort", request_id))

    def snapshot(self) -> EngineSnapshot:
        """The engine's latest published state; safe from any thread."""
        return self._snapshots.latest

    def stats(self) -> EngineStats:
        return self._snapshots.latest.stats

    def shutdown(self) -> None:
        self._stopping = True
        self._commands.put(("wake",))
        self._thread.join(timeout=30)
        self.engine.shutdown()

    # ------------------------------------------------------------------ the engine thread
    def _run(self) -> None:
        while not self._stopping:
            idle = not self.engine.has_unfinished_requests()
            if self._drain_commands(block=idle) or idle:
                self._snapshots.after_commands(waited=idle)
            if not self.engine.has_unfinished_requests():
                continue
            try:
                outputs = self.engine.step()
            except BaseException as exc:  # a failed step kills the engine; every stream learns why
                self._fail_all(exc)
                return
            self._snapshots.after_step()  # before delivering: a caller that sees its end sees it in stats too
            self._deliver_step(outputs)

    def _drain_commands(self, block: bool) -> bool:
        """Apply every queued command, waiting up to 0.5 s for the first when ``block``; whether any came."""
        try:
            command = self._commands.get(block=block, timeout=0.5 if block else None)
        except queue.Empty:
            return False
        while True:
            self._apply(command)
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                return True

    def _apply(self, command: tuple) -> None:
        kind = command[0]
        if kind == "add":
            _, prepared, output_kind = command
            try:
                self.engine.add_prepared(prepared, output_kind)
            except (ValueError, QueueFullError) as exc:
                self._deliver(prepared.request_id, exc)
        elif kind == "abort":
            self.engine.abort_request(command[1])

    def _deliver_step(self, outputs: list[RequestOutput]) -> None:
        """One step's outputs: a single thread-safe call per caller loop (each wakes a loop through a pipe)."""
        by_loop: dict[asyncio.AbstractEventLoop, list] = defaultdict(list)
        with self._lock:
            for output in outputs:
                stream = self._streams.get(output.request_id)
                if stream is not None:
                    by_loop[stream.loop].append((stream.queue, output))
        for loop, items in by_loop.items():
            try:
                loop.call_soon_threadsafe(_put_all, items)
            except RuntimeError:  # that event loop has closed; nobody is listening
                pass

    def _deliver(self, request_id: str, item) -> None:
        with self._lock:
            stream = self._streams.get(request_id)
        if stream is None:
            return
        try:
            stream.loop.call_soon_threadsafe(stream.queue.put_nowait, item)
        except RuntimeError:  # the caller's event loop has closed; nobody is listening
            pass

    def _fail_all(self, exc: BaseException) -> None:
        self._dead = exc
        error = EngineDeadError(f"engine step failed: {exc!r}")
        with self._lock:
            streams = list(self._streams.items())
        for request_id, _ in streams:
            self._deliver(request_id, error)


def _put_all(items: list) -> None:
    for q, item in items:
        q.put_nowait(item)


def _coalesce(item: RequestOutput, later: RequestOutput, kind: OutputKind) -> RequestOutput:
    return item.followed_by(later) if kind is OutputKind.DELTA else later
