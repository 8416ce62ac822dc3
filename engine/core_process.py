"""``ProcessCore``: the engine loop in a process of its own (``engine_core="process"``).

Why: in one process the engine thread and the front (a Serve replica's event loop, Ray's threads,
the metrics poll) take turns holding the GIL, so every step waits while the front streams tokens. With
the loop in its own process a step waits for nothing but the device. vLLM v1 splits its engine core
off the same way.

    front process                                     core process ("pagoda-engine-core")
    AsyncLLMEngine ─ add/abort ─► sender thread ══ pipe ══► reader thread ─► command queue
                                                                               │ run_engine_loop
    streams ◄─ CoreSink ◄─ receiver thread ◄══ pipe ══ outbox thread ◄─ outputs, rejections, snapshots

Messages (pickled, one per send; each side drains what queued and sends it as one message):

- down: a list of commands, ``("add", prepared)`` / ``("abort", request_id)`` /
  ``("stop_completion", completion_id)``, or ``[("stop",)]``;
- up: ``("ready", snapshot)`` or ``("start_failed", error)`` once, then ``_Batch``es: the latest snapshot,
  every step's ``CoreOutput``s in order (token ids: the front detokenizes), rejections, and a failure.
  A request crosses once, down; the snapshot's prefix summary crosses only when the core rebuilt it.

Lifetime: the front's ``shutdown`` sends stop and joins the process. If the front dies (its replica is
killed, ``os._exit``), the core's reader sees the pipe close and ends the process, even while a step is
stuck. If the core dies, the front's receiver sees its pipe close and fails every stream with
``EngineDeadError`` (the replica then exits and Serve replaces it).

The core process is a fresh interpreter (``python -m pagoda.engine.core_process``; never a fork: the front
holds threads, and CUDA must start in the core) that inherits the two pipes; it may start TP ranks of its
own (the multi-process executor), and an ``atexit`` hook of the front stops it.
The Ray executor's ranks are placed from the replica's own Ray worker, so Ray TP runs on a ``ThreadCore``.
"""

from __future__ import annotations

import atexit
import dataclasses
import logging
import os
import pickle
import queue
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from multiprocessing.connection import Connection

from pagoda.engine.config import EngineConfig
from pagoda.engine.core_output import CoreOutput
from pagoda.engine.engine_core import CoreSink, EngineCore, run_engine_loop
from pagoda.engine.errors import EngineDeadError
from pagoda.engine.input_processor import PreparedRequest
from pagoda.engine.llm_engine import LLMEngine, make_input_processor, resolve_config
from pagoda.engine.loader import open_model
from pagoda.engine.snapshot import EngineSnapshot, SnapshotConfig, SnapshotPublisher

logger = logging.getLogger("pagoda.engine_core")
ORPHAN_EXIT_S = 5.0  # a core whose front is gone ends its process this long after, stuck step or not
SHUTDOWN_WAIT_S = 30.0


@dataclass
class _Batch:
    """What the core sends up in one message; the front applies it in field order."""

    snapshot: EngineSnapshot | None = None  # the latest; cached_block_hashes None: unchanged since the last one
    outputs: list[list[CoreOutput]] = field(default_factory=list)  # per step
    rejected: list[tuple[str, Exception]] = field(default_factory=list)
    failed: BaseException | None = None


class ProcessCore(EngineCore):
    """The front's handle on a core process; ``sink`` hears from it on the receiver thread."""

    def __init__(self, config: EngineConfig, snapshots: SnapshotConfig | None, sink: CoreSink) -> None:
        model, tokenizer = open_model(config.model)  # the front validates and tokenizes: no weights, no device
        self.inputs = make_input_processor(resolve_config(config, model.hf_config), model, tokenizer)
        self._sink = sink
        self._stopping = False
        self._dead = False
        self._process, self._commands_conn, self._events_conn = _start_core_process()
        self._commands_conn.send_bytes(_dumps((config, snapshots, _torch_threads())))  # what to build
        try:
            self._snapshot = self._wait_ready()
        except BaseException:
            self._kill()
            raise
        self._summary = self._snapshot.cached_block_hashes  # the last one received: a snapshot without one keeps it
        self._outbox: queue.SimpleQueue = queue.SimpleQueue()
        self._sender = threading.Thread(target=self._send_loop, name="pagoda-core-send", daemon=True)
        self._receiver = threading.Thread(target=self._receive_loop, name="pagoda-core-receive", daemon=True)
        self._sender.start()
        self._receiver.start()
        atexit.register(self.shutdown)

    def _wait_ready(self) -> EngineSnapshot:
        """Block until the core has built its engine (loading weights can take minutes); its error if it failed."""
        while not self._events_conn.poll(0.5):
            if self._process.poll() is not None:
                break
        try:
            kind, payload = pickle.loads(self._events_conn.recv_bytes())
        except EOFError:  # it died before a word; its stderr (the replica's log) says why
            raise RuntimeError(f"engine core process exited with code {self._process.wait()} while starting") from None
        if kind == "start_failed":
            raise payload
        return payload

    # ------------------------------------------------------------------ the front's side
    def add(self, prepared: PreparedRequest) -> None:
        self._outbox.put(("add", prepared))

    def abort(self, request_id: str) -> None:
        self._outbox.put(("abort", request_id))

    def stop_completion(self, completion_id: str) -> None:
        self._outbox.put(("stop_completion", completion_id))

    def snapshot(self) -> EngineSnapshot:
        return self._snapshot

    @property
    def is_alive(self) -> bool:
        return not self._dead and not self._stopping and self._process.poll() is None

    def shutdown(self) -> None:
        if self._stopping:
            return
        self._stopping = True
        atexit.unregister(self.shutdown)
        self._outbox.put(("stop",))
        try:
            self._process.wait(SHUTDOWN_WAIT_S)
        except subprocess.TimeoutExpired:
            self._kill()

    def _kill(self) -> None:
        if self._process.poll() is None:
            self._process.kill()
            self._process.wait(5)

    # ------------------------------------------------------------------ the front's threads
    def _send_loop(self) -> None:
        """Every command queued since the last send goes in one message; stop is the last."""
        while True:
            commands = _drain(self._outbox)
            try:
                self._commands_conn.send_bytes(pickle.dumps(commands, protocol=pickle.HIGHEST_PROTOCOL))
            except OSError:  # the core is gone; the receiver reports it
                return
            if commands[-1][0] == "stop":
                self._commands_conn.close()
                return

    def _receive_loop(self) -> None:
        while True:
            try:
                batch: _Batch = pickle.loads(self._events_conn.recv_bytes())
            except (EOFError, OSError):
                break
            self._apply(batch)
            if batch.failed is not None:
                return
        if not self._stopping and not self._dead:  # the process died without a word (killed, out of memory)
            self._dead = True
            try:
                code = self._process.wait(5)
            except subprocess.TimeoutExpired:  # its pipe closed but it lives on: it will not be heard again
                self._kill()
                code = self._process.returncode
            self._sink.on_failed(EngineDeadError(f"engine core process exited (exit code {code})"))

    def _apply(self, batch: _Batch) -> None:
        if batch.snapshot is not None:
            snapshot = batch.snapshot
            if snapshot.cached_block_hashes is None:
                snapshot = dataclasses.replace(snapshot, cached_block_hashes=self._summary)
            self._summary = snapshot.cached_block_hashes
            self._snapshot = snapshot  # before delivering: a caller that sees its end sees it in stats too
        for request_id, error in batch.rejected:
            self._sink.on_rejected(request_id, error)
        for outputs in batch.outputs:
            self._sink.on_outputs(outputs)
        if batch.failed is not None:
            self._dead = True
            self._sink.on_failed(batch.failed)


def _drain(q: queue.SimpleQueue) -> list:
    items = [q.get()]
    while True:
        try:
            items.append(q.get_nowait())
        except queue.Empty:
            return items


def _torch_threads() -> int | None:
    """The torch threads this process was limited to (a CPU replica's share), for the core to use too."""
    torch = sys.modules.get("torch")
    return torch.get_num_threads() if torch is not None else None


# ---------------------------------------------------------------------- the core process
def _start_core_process() -> tuple[subprocess.Popen, Connection, Connection]:
    """``python -m pagoda.engine.core_process`` with one pipe each way; (process, commands out, events in).
    A fresh interpreter, not multiprocessing's spawn: that re-runs the caller's main module in the child,
    which a script without a ``__main__`` guard cannot survive, and which in a Ray worker imports Ray."""
    core_commands, commands = os.pipe()
    events, core_events = os.pipe()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}  # imports what the front imports
    # CPU: the core's OpenMP threads share the replica's cores with the front, which streams while a step runs.
    # Spinning at each parallel region's end (libgomp's default) then costs whole time slices: on 2 busy cores a
    # tiny model's steps took 5x longer at random; passive waiting kept them steady. An explicit setting wins.
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    process = subprocess.Popen([sys.executable, "-m", "pagoda.engine.core_process", str(core_commands),
                                str(core_events)], pass_fds=(core_commands, core_events), env=env)
    os.close(core_commands)  # the core's ends: only its process holds them, so its death closes the pipes
    os.close(core_events)
    return process, Connection(commands, readable=False), Connection(events, writable=False)


def _core_main(commands_conn: Connection, events_conn: Connection) -> None:
    config, snapshots, torch_threads = pickle.loads(commands_conn.recv_bytes())
    if torch_threads:
        import torch

        torch.set_num_threads(torch_threads)
    try:
        engine = LLMEngine(config)
    except BaseException as exc:  # noqa: BLE001 (any start failure goes back to the front as itself)
        events_conn.send_bytes(_dumps(("start_failed", _picklable(exc))))
        return
    publisher = _Publisher(engine, snapshots)
    outbox = _Outbox(events_conn)
    publisher.outbox = outbox
    events_conn.send_bytes(_dumps(("ready", publisher.latest)))
    commands: queue.SimpleQueue = queue.SimpleQueue()
    stop = threading.Event()
    threading.Thread(target=_read_commands, args=(commands_conn, commands, stop), name="pagoda-core-read",
                     daemon=True).start()
    try:
        run_engine_loop(engine, publisher, commands, outbox, stop.is_set)
    finally:
        outbox.close()
        engine.shutdown()


def _read_commands(conn: Connection, commands: queue.SimpleQueue, stop: threading.Event) -> None:
    while True:
        try:
            batch = pickle.loads(conn.recv_bytes())
        except (EOFError, OSError):  # the front is gone: stop, and end the process if a step is stuck
            stop.set()
            commands.put(("wake",))
            time.sleep(ORPHAN_EXIT_S)
            os._exit(0)
        for command in batch:
            if command[0] == "stop":  # the last command: the front closes its end next, which is no orphaning
                stop.set()
                commands.put(("wake",))
                return
            commands.put(command)


class _Publisher(SnapshotPublisher):
    """Publishes as usual and queues each snapshot for the front."""

    outbox: _Outbox

    def after_step(self) -> None:
        super().after_step()
        self.outbox.put_snapshot(self.latest)

    def after_commands(self, waited: bool) -> None:
        super().after_commands(waited)
        self.outbox.put_snapshot(self.latest)


class _Outbox:
    """The core's ``CoreSink``: what the loop hands on is queued, and a thread sends what queued as one
    ``_Batch`` (pickling off the loop's thread)."""

    def __init__(self, conn: Connection) -> None:
        self._conn = conn
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._summary_sent: frozenset[int] | None = None
        self._thread = threading.Thread(target=self._run, name="pagoda-core-outbox", daemon=True)
        self._thread.start()

    def put_snapshot(self, snapshot: EngineSnapshot) -> None:
        self._queue.put(("snapshot", snapshot))

    def on_outputs(self, outputs: list[CoreOutput]) -> None:
        self._queue.put(("outputs", outputs))

    def on_rejected(self, request_id: str, error: Exception) -> None:
        self._queue.put(("rejected", (request_id, error)))

    def on_failed(self, error: BaseException) -> None:
        self._queue.put(("failed", _picklable(error)))

    def close(self) -> None:
        self._queue.put(("close", None))
        self._thread.join(SHUTDOWN_WAIT_S)

    def _run(self) -> None:
        while True:
            items = _drain(self._queue)
            batch, closing = _Batch(), False
            for kind, item in items:
                if kind == "snapshot":
                    batch.snapshot = item
                elif kind == "outputs":
                    batch.outputs.append(item)
                elif kind == "rejected":
                    batch.rejected.append(item)
                elif kind == "failed":
                    batch.failed = item
                else:
                    closing = True
            if batch.snapshot is not None:
                batch.snapshot = self._wire_snapshot(batch.snapshot)
            try:
                self._conn.send_bytes(_dumps(batch))
            except OSError:  # the front is gone
                return
            if closing:
                return

    def _wire_snapshot(self, snapshot: EngineSnapshot) -> EngineSnapshot:
        if snapshot.cached_block_hashes is self._summary_sent:
            return dataclasses.replace(snapshot, cached_block_hashes=None)
        self._summary_sent = snapshot.cached_block_hashes
        return snapshot


def _dumps(obj) -> bytes:
    return pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)


def _picklable(error: BaseException) -> BaseException:
    """``error`` if it survives pickling, else a RuntimeError that names it."""
    try:
        pickle.loads(_dumps(error))
        return error
    except Exception:  # noqa: BLE001 (whatever makes it unpicklable)
        return RuntimeError(f"{type(error).__name__}: {error}")


if __name__ == "__main__":  # the core process: python -m pagoda.engine.core_process COMMANDS_FD EVENTS_FD
    from pagoda.engine.core_process import _core_main as main  # its classes by their importable names, not __main__'s

    main(Connection(int(sys.argv[1]), writable=False), Connection(int(sys.argv[2]), readable=False))
