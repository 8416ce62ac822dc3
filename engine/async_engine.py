"""AsyncLLMEngine: one asyncio stream of RequestOutputs per request, over a synchronous engine.

Front and core: this object is the front — streams, validation, detokenization, delivery. The engine
itself runs in an engine core (``pagoda.engine.engine_core``) that alone touches it: on a thread of
this process (``core="thread"``, the default) or in a process of its own (``core="process"``,
``ProcessCore``: the front's work never delays a step). Callers validate on their own thread
(``InputProcessor.process`` has no side effects), so a bad request raises ValueError straight from
``generate``. The core hands on token ids (``CoreOutput``); the front's ``OutputProcessor`` makes
them text on the thread that hears from the core, finds stop strings and aborts the completion a stop
string ended.

Text when it is read: a stream without stop strings keeps the core's token news until its consumer asks,
then detokenizes it once (``OutputProcessor.process`` over every step that queued). A consumer that keeps
up gets every step as before; one that falls behind (a loaded replica streaming to many clients) makes
one detokenizer call per chunk it sends instead of one per step. A stream with stop strings is
detokenized as news comes in, so a stop string ends its completion in the core at once.

Delivery: each step's news goes to each caller loop in one ``call_soon_threadsafe`` (not
one per request). A consumer that falls behind gets what queued up in one item: delta outputs joined
(``RequestOutput.followed_by``), cumulative ones superseded. Nothing waits for company: an item goes
as soon as the consumer asks.

Cancellation: when the consumer of a stream stops early (``break``, task cancel, a client that
disconnects), the generator's ``finally`` aborts the request, and its KV blocks return to the
pool at the core's next turn.

State: other threads read the engine only through ``snapshot()`` (``pagoda.engine.snapshot``): the
core publishes a frozen ``EngineSnapshot`` after every step and every batch of commands; ``stats()``
is its stats. ``SnapshotConfig`` sets the prefix-cache summary it carries.
"""

from __future__ import annotations

import asyncio
import threading
from collections import defaultdict
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from pagoda.engine.config import EngineConfig
from pagoda.engine.core_output import CoreOutput
from pagoda.engine.engine_core import make_core
from pagoda.engine.errors import EngineDeadError
from pagoda.engine.input_processor import PreparedRequest, PromptType, has_images
from pagoda.engine.llm_engine import EngineStats
from pagoda.engine.output_processor import OutputKind, OutputProcessor
from pagoda.engine.request import RequestOutput
from pagoda.engine.sampling_params import SamplingParams
from pagoda.engine.snapshot import EngineSnapshot, SnapshotConfig


_NEWS = object()  # a deferred stream's queue item: token news waits in _Stream.news


@dataclass
class _Stream:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue  # RequestOutput items (or _NEWS when deferred), or an Exception that ends the stream
    deferred: bool  # no stop strings: the consumer detokenizes its news when it reads it
    news: list[CoreOutput] = field(default_factory=list)  # deferred: what the core sent since the last read
    signalled: bool = False  # deferred: a _NEWS is in the queue for that news


class AsyncLLMEngine:
    def __init__(self, config: EngineConfig, snapshots: SnapshotConfig | None = None, core: str = "thread") -> None:
        """``core``: where the engine runs, ``"thread"`` or ``"process"`` (``pagoda.engine.engine_core``)."""
        self._streams: dict[str, _Stream] = {}
        self._lock = threading.Lock()  # guards _streams and _outputs
        self._dead: BaseException | None = None
        self._stopping = False
        self.core = make_core(core, config, snapshots, self)
        self.inputs = self.core.inputs
        self._outputs = OutputProcessor(self.core.tokenizer, config.scheduler.stream_interval)

    @classmethod
    def from_kwargs(cls, snapshots: SnapshotConfig | None = None, core: str = "thread", **kwargs) -> AsyncLLMEngine:
        return cls(EngineConfig.from_kwargs(**kwargs), snapshots, core)

    @property
    def tokenizer(self):
        return self.core.tokenizer

    @property
    def engine(self):
        """The ``LLMEngine`` of a thread core (tests reach in with it); a process core's is in its process."""
        return self.core.engine

    @property
    def is_running(self) -> bool:
        """Not failed, not shut down, and the core is alive."""
        return self._dead is None and not self._stopping and self.core.is_alive

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
            prepared = await asyncio.to_thread(self.inputs.process, request_id, prompt, sampling_params, priority,
                                               None, tenant)
        else:
            prepared = self.inputs.process(request_id, prompt, sampling_params, priority, None, tenant)
        stream = self._open(prepared, output_kind)
        self.core.add(prepared)
        finished, held = False, None  # held: an error that queued behind outputs still to send
        try:
            while not finished:
                item, held = self._read(stream, held if held is not None else await stream.queue.get()), None
                if isinstance(item, BaseException):
                    raise item
                if item is None:
                    continue  # news, but no output yet (final outputs, stream_interval)
                while not item.finished and not stream.queue.empty():  # fell behind: send what queued, once
                    later = self._read(stream, stream.queue.get_nowait())
                    if isinstance(later, BaseException):
                        held = later
                        break
                    if later is not None:
                        item = _coalesce(item, later, output_kind)
                finished = item.finished
                yield item
        finally:
            with self._lock:
                self._streams.pop(request_id, None)
                self._outputs.remove(request_id)
            if not finished:
                self.core.abort(request_id)

    def _open(self, prepared: PreparedRequest, output_kind: OutputKind) -> _Stream:
        if self._dead is not None:
            raise EngineDeadError(f"engine is dead: {self._dead!r}")
        if self._stopping:
            raise EngineDeadError("engine was shut down")
        with self._lock:
            if prepared.request_id in self._streams:
                raise ValueError(f"request_id {prepared.request_id!r} is already in use")
            # the front's own check: its completions' ids must not be another stream's (the core checks too,
            # but a clash registered here first would take the other request's news)
            self._outputs.add(prepared, output_kind)
            stream = _Stream(asyncio.get_running_loop(), asyncio.Queue(), deferred=not prepared.params.stop)
            self._streams[prepared.request_id] = stream
        return stream

    def _read(self, stream: _Stream, item):
        """A queue item as the consumer sees it: a deferred stream's _NEWS becomes its output (None: none yet)."""
        if item is not _NEWS:
            return item
        with self._lock:
            news, stream.news, stream.signalled = stream.news, [], False
            outputs, _ = self._outputs.process(news)  # no stop strings: nothing to abort
        return outputs[0] if outputs else None

    async def abort(self, request_id: str) -> None:
        self.core.abort(request_id)

    def snapshot(self) -> EngineSnapshot:
        """The engine's latest published state; safe from any thread."""
        return self.core.snapshot()

    def stats(self) -> EngineStats:
        return self.core.snapshot().stats

    def shutdown(self) -> None:
        """Stop the core; streams still open end with EngineDeadError."""
        if self._stopping:
            return
        self._stopping = True
        self.core.shutdown()
        self._end_all(EngineDeadError("engine was shut down"))

    # ------------------------------------------------------------------ the core's side (CoreSink), on its thread
    def on_outputs(self, news: list[CoreOutput]) -> None:
        """One step's tokens: queued for deferred streams, made outputs for the others; then a single
        thread-safe call per caller loop (each wakes a loop through a pipe). A completion that hit a stop
        string is aborted in the core."""
        by_loop: dict[asyncio.AbstractEventLoop, list] = defaultdict(list)
        with self._lock:
            now = []  # news detokenized here: streams with stop strings, and requests nobody reads (dropped)
            for item in news:
                stream = self._streams.get(self._outputs.parent_of(item.request_id))
                if stream is None or not stream.deferred:
                    now.append(item)
                    continue
                stream.news.append(item)
                if not stream.signalled:
                    stream.signalled = True
                    by_loop[stream.loop].append((stream.queue, _NEWS))
            outputs, stopped = self._outputs.process(now)
            for output in outputs:
                stream = self._streams.get(output.request_id)
                if stream is not None:
                    by_loop[stream.loop].append((stream.queue, output))
        for child in stopped:
            self.core.stop_completion(child)
        for loop, items in by_loop.items():
            try:
                loop.call_soon_threadsafe(_put_all, items)
            except RuntimeError:  # that event loop has closed; nobody is listening
                pass

    def on_rejected(self, request_id: str, error: Exception) -> None:
        with self._lock:
            self._outputs.remove(request_id)
        self._deliver(request_id, error)

    def on_failed(self, error: BaseException) -> None:
        self._dead = error
        dead = error if isinstance(error, EngineDeadError) else EngineDeadError(f"engine step failed: {error!r}")
        self._end_all(dead)

    def _end_all(self, error: EngineDeadError) -> None:
        with self._lock:
            request_ids = list(self._streams)
        for request_id in request_ids:
            self._deliver(request_id, error)

    def _deliver(self, request_id: str, item) -> None:
        with self._lock:
            stream = self._streams.get(request_id)
        if stream is None:
            return
        try:
            stream.loop.call_soon_threadsafe(stream.queue.put_nowait, item)
        except RuntimeError:  # the caller's event loop has closed; nobody is listening
            pass


def _put_all(items: list) -> None:
    for q, item in items:
        q.put_nowait(item)


def _coalesce(item: RequestOutput, later: RequestOutput, kind: OutputKind) -> RequestOutput:
    return item.followed_by(later) if kind is OutputKind.DELTA else later
