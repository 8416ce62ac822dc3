"""TP>1 on one host: one spawned process per rank, driven from the engine's process.

Why every rank, rank 0 included, lives in its own process (and the driver in none):
- the driver never sits inside a collective, so a dead or hung rank can never hang the engine:
  each step is a plain wait on pipes and process sentinels with a deadline;
- after a failure the driver kills every rank and starts a fresh group; nothing CUDA or
  ``torch.distributed`` ever lived in the engine's process, so nothing there is left poisoned;
- a Ray actor hosts a rank the same way (the driver outside the group), so one Worker serves both.
The price is one pickle + pipe hop per step (tens of microseconds against milliseconds of forward;
on GPUs both ends busy-wait briefly before blocking, engine/worker/spin_wait.py).

Each step the driver pickles the SchedulerOutput once and writes it to every rank; every rank runs
the forward and ends up with the sampled ids (an all-gather of per-shard argmaxes for greedy steps,
otherwise rank 0 samples and broadcasts: ``TPModelRunner``), every rank replies, and rank 0's reply
is the step's output. Replies from all ranks (not only rank 0) let a rank's Python
exception surface at once instead of as a collective timeout on its peers. With async scheduling
the driver sends ``launch`` instead and a rank's reply to step n+1 carries step n's output, sent
once step n+1 is queued on its device (``RankHost``); ``flush`` asks for the last one.

Failure detection, all surfacing as ``EngineDeadError`` from ``execute_model`` / ``take_output``:
- a rank process exits (killed, crashed): its sentinel wakes the wait at once;
- a rank replies with an exception: its traceback is in the message;
- no reply within ``step_timeout_s`` (a hung rank; its peers are then stuck in a collective).
The group is then torn down (SIGTERM, then SIGKILL, every process joined: no zombies) and the
rendezvous store, the only port the driver holds, is released. Collectives inside the ranks have
their own timeout (``collective_timeout_s``) as a second line of defence.

Timeouts come from the environment (``PAGODA_STEP_TIMEOUT_S``, default 25 s;
``PAGODA_INIT_TIMEOUT_S``, default 900 s for load + profile + graph capture) or the constructor
(``pagoda.engine.executor.RankTimeouts``, shared with the Ray executor).
"""

from __future__ import annotations

import datetime
import os
import pickle
import signal
import time
import weakref
from multiprocessing.connection import Connection, wait

import torch

from pagoda.engine.config import EngineConfig
from pagoda.engine.errors import EngineDeadError
from pagoda.engine.executor import Executor, RankTimeouts
from pagoda.engine.loader import ResolvedModel
from pagoda.engine.scheduler_output import ModelRunnerOutput, SchedulerOutput
from pagoda.engine.worker.spin_wait import spin_until_readable, spin_wait_s
from pagoda.engine.worker.worker import resolve_device

_HEALTH_TIMEOUT_S = 5.0
_SHUTDOWN_GRACE_S = 5.0


class MultiprocExecutor(Executor):
    def __init__(
        self,
        config: EngineConfig,
        model: ResolvedModel,
        step_timeout_s: float | None = None,
        init_timeout_s: float | None = None,
    ) -> None:
        """Nothing starts here; ``initialize`` spawns the ranks. The config must already be validated."""
        super().__init__()
        self.config = config
        self.model = model
        self.world_size = config.parallel.tensor_parallel_size
        timeouts = RankTimeouts.resolve(step_timeout_s, init_timeout_s)
        self.step_timeout_s, self.init_timeout_s = timeouts.step_s, timeouts.init_s
        self.collective_timeout_s = timeouts.collective_s
        self.spin_s = spin_wait_s(resolve_device(config.model.device).type)  # busy-wait for replies before blocking
        self.procs: list = []
        self.conns: list[Connection] = []
        self._store_box: list = []  # holds the rendezvous TCPStore; emptied to free its port
        self._dead: str | None = None  # why the group is gone; None while it works
        self._submitted = 0  # steps submitted whose output was not taken (async scheduling)
        self._finalizer = weakref.finalize(self, _stop_ranks, self.procs, self.conns, self._store_box, _SHUTDOWN_GRACE_S)

    # ------------------------------------------------------------------ life cycle
    def initialize(self) -> int:
        try:
            self._spawn()
            self._call_all("load_model", (), self.init_timeout_s)
            num_blocks = min(self._call_all("determine_num_blocks", (), self.init_timeout_s))
            self._call_all("initialize_cache", (num_blocks,), self.init_timeout_s)
        except BaseException:
            self.shutdown()
            raise
        return num_blocks

    def _spawn(self) -> None:
        from torch.distributed import TCPStore

        from pagoda.engine.worker.rank import RankSpec
        from pagoda.engine.worker.rank_process import rank_main

        # The driver owns the rendezvous store: port 0 lets the OS pick a free port (no race between
        # choosing and binding it), and dropping the store frees it.
        store = TCPStore(
            "127.0.0.1", 0, is_master=True, wait_for_workers=False,
            timeout=datetime.timedelta(seconds=self.init_timeout_s),
        )
        self._store_box.append(store)
        ctx = torch.multiprocessing.get_context("spawn")  # CUDA cannot be used in forked children
        threads = max(1, (os.cpu_count() or 1) // self.world_size)
        for rank in range(self.world_size):
            parent_end, child_end = ctx.Pipe(duplex=True)
            spec = RankSpec(rank, self.world_size, "127.0.0.1", store.port, self.config, self.model,
                            self.collective_timeout_s, local_rank=rank, num_threads=threads)
            proc = ctx.Process(target=rank_main, name=f"pagoda-tp-rank{rank}", args=(spec, child_end), daemon=True)
            proc.start()
            child_end.close()
            self.procs.append(proc)
            self.conns.append(parent_end)
        self._wait_all(self.init_timeout_s, "start")  # every rank joined the group

    @property
    def store_port(self) -> int | None:
        """The rendezvous port while the group lives (tests check it is freed)."""
        return self._store_box[0].port if self._store_box else None

    @property
    def rank_pids(self) -> list[int]:
        return [p.pid for p in self.procs]

    def shutdown(self) -> None:
        self._finalizer()  # runs _stop_ranks once; later calls do nothing
        if self._dead is None:
            self._dead = "the executor was shut down"

    # ------------------------------------------------------------------ steps
    def execute_model(self, scheduled: SchedulerOutput) -> ModelRunnerOutput:
        return self._call_all("execute_model", (scheduled,), self.step_timeout_s)[0]

    @property
    def overlaps_host(self) -> bool:
        return True  # the ranks compute in their own processes

    def submit(self, scheduled: SchedulerOutput) -> None:
        """Send the step; each rank queues it behind its previous step, then replies with that one's output."""
        self._send_all("launch", (scheduled,))
        self._submitted += 1

    def take_output(self) -> ModelRunnerOutput:
        """The oldest submitted step's output: its reply is on the way if a later step was submitted
        after it; else the ranks are asked to flush."""
        if self._submitted == 1:
            self._send_all("flush", ())
        output = self._wait_all(self.step_timeout_s, "execute_model")[0]
        self._submitted -= 1
        return output

    def check_health(self) -> None:
        for rank, proc in enumerate(self.procs):
            if self._dead is None and not proc.is_alive():
                raise self._fail(self._death_of(rank))
        self._call_all("ping", (), _HEALTH_TIMEOUT_S)

    def collective_stats(self) -> list[dict]:
        """Per rank, time spent in each collective since the last call (needs PAGODA_TIME_COLLECTIVES=1)."""
        return self._call_all("collective_stats", (), _HEALTH_TIMEOUT_S)

    # ------------------------------------------------------------------ plumbing
    def _call_all(self, method: str, args: tuple, timeout_s: float) -> list:
        """Run ``method(*args)`` on every rank; the ranks' results in rank order."""
        if self._submitted:  # a launch's reply may be on its way: it would be taken for this call's
            raise RuntimeError(f"{method!r} called with {self._submitted} submitted step(s) not taken yet")
        self._send_all(method, args)
        return self._wait_all(timeout_s, method)

    def _send_all(self, method: str, args: tuple) -> None:
        if self._dead is not None:
            raise EngineDeadError(f"tensor-parallel group is down: {self._dead}")
        payload = pickle.dumps((method, args), protocol=pickle.HIGHEST_PROTOCOL)  # once, not per rank
        for rank in range(self.world_size):
            self._send(rank, payload)

    def _send(self, rank: int, payload: bytes) -> None:
        try:
            self.conns[rank].send_bytes(payload)
        except OSError:  # the rank's end is closed: it died
            raise self._fail(self._death_of(rank)) from None

    def _wait_all(self, timeout_s: float, what: str) -> list:
        return self._wait_ranks(list(range(self.world_size)), timeout_s, what)

    def _wait_ranks(self, ranks: list[int], timeout_s: float, what: str) -> list:
        """One reply from each of ``ranks``; raises EngineDeadError on death, error or deadline."""
        deadline = time.monotonic() + timeout_s
        pending = {self.conns[r]: r for r in ranks}
        spin_until_readable(list(pending), min(self.spin_s, timeout_s))
        sentinels = {self.procs[r].sentinel: r for r in range(self.world_size)}
        results: dict[int, object] = {}
        while pending:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise self._fail(
                    f"no reply to {what!r} from rank(s) {sorted(pending.values())} within {timeout_s:.1f} s: "
                    f"a rank is hung (its peers then wait in a collective)"
                )
            for ready in wait([*pending, *sentinels], timeout=remaining):
                if ready in sentinels:
                    raise self._fail(self._death_of(sentinels[ready]))
                rank = pending.pop(ready)
                try:
                    status, value = ready.recv()
                except (EOFError, OSError):
                    raise self._fail(self._death_of(rank)) from None
                if status == "error":
                    raise self._fail(self._dead_ranks_first(f"rank {rank} raised in {what!r}:\n{value}"))
                results[rank] = value
        return [results[r] for r in ranks]

    def _death_of(self, rank: int) -> str:
        proc = self.procs[rank]
        proc.join(timeout=1.0)  # reap it: exitcode is known, no zombie
        code = proc.exitcode
        if code is None:
            how = "stopped answering"
        elif code < 0:
            how = f"was killed by {signal.Signals(-code).name}"
        else:
            how = f"exited with code {code}"
        return f"tensor-parallel rank {rank} (pid {proc.pid}) {how}"

    def _dead_ranks_first(self, message: str) -> str:
        """A rank's error is often a peer's death seen through a broken collective: name the dead first."""
        wait([p.sentinel for p in self.procs], timeout=0.5)
        dead = [self._death_of(r) for r, p in enumerate(self.procs) if not p.is_alive()]
        return "; ".join(dead + [message])

    def _fail(self, reason: str) -> EngineDeadError:
        """Record why, tear the group down at once, and return the error to raise."""
        self._dead = reason
        self._finalizer.detach()
        _stop_ranks(self.procs, self.conns, self._store_box, grace_s=0.0)
        return EngineDeadError(f"tensor-parallel group failed: {reason}")


def _stop_ranks(procs: list, conns: list[Connection], store_box: list, grace_s: float) -> None:
    """Ask every rank to exit, wait ``grace_s``, then SIGTERM / SIGKILL the rest and reap them all."""
    if grace_s > 0:
        payload = pickle.dumps(("shutdown", ()))
        for conn in conns:
            try:
                conn.send_bytes(payload)
            except OSError:
                pass
        deadline = time.monotonic() + grace_s
        for proc in procs:
            proc.join(timeout=max(0.0, deadline - time.monotonic()))
    _signal_alive(procs, signal.SIGTERM, wait_s=2.0)
    _signal_alive(procs, signal.SIGKILL, wait_s=5.0)
    for conn in conns:
        conn.close()
    store_box.clear()  # the TCPStore server stops when its last reference goes


def _signal_alive(procs: list, sig: signal.Signals, wait_s: float) -> None:
    alive = [p for p in procs if p.is_alive()]
    for proc in alive:
        try:
            os.kill(proc.pid, sig)
        except ProcessLookupError:
            pass
    for proc in alive:
        proc.join(timeout=wait_s)  # reaps it: no zombie
