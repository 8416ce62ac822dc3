"""The body of one spawned tensor-parallel rank: join the group, build a Worker, serve calls.

Protocol over one duplex pipe to the driver (``MultiprocExecutor``):

    driver -> rank   pickle((method, args))        method is a Worker method name, "ping",
                                                   "collective_stats", "shutdown" or the test
                                                   hook "_test_hang_next_step"
    rank -> driver   ("ok", result) | ("error", traceback text)

The first message a rank sends is ("ok", None) once it has joined the group (or ("error", ...)).
``execute_model`` returns the ModelRunnerOutput on rank 0 and None elsewhere: the other ranks
hold the same tokens and need not ship them back.

With ``PAGODA_TIME_COLLECTIVES=1`` in the environment the rank's group is a ``TimedTPGroup``
and "collective_stats" returns (and resets) the time spent in each collective (bench/tp.py).

A rank never outlives its driver: it exits when the pipe reaches EOF, and a watchdog thread exits
the process when the parent pid changes (the driver died while the rank was inside a step or a
collective and not reading the pipe).
"""

from __future__ import annotations

import os
import pickle
import threading
import time
import traceback
from multiprocessing.connection import Connection
from pathlib import Path

import torch

from engine.config import EngineConfig
from engine.distributed import TimedTPGroup, init_tp_group
from engine.worker.worker import Worker, resolve_device

_PARENT_POLL_S = 1.0


def rank_main(
    rank: int,
    world_size: int,
    store_port: int,
    config: EngineConfig,
    model_path: Path,
    eos_token_ids: tuple[int, ...],
    conn: Connection,
    collective_timeout_s: float,
) -> None:
    """Entry point of the spawned process for ``rank``."""
    _exit_with_parent(os.getppid())
    group = None
    try:
        device = resolve_device(config.model.device, local_rank=rank)
        if device.type == "cuda":
            torch.cuda.set_device(device)
        else:  # ranks share the host's cores; oversubscribing them makes every rank slower
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // world_size))
        group = init_tp_group(rank, world_size, "127.0.0.1", store_port, device, collective_timeout_s)
        tp = TimedTPGroup(group, device) if os.environ.get("PAGODA_TIME_COLLECTIVES") == "1" else group
        worker = Worker(config, model_path, eos_token_ids, tp, device)
    except Exception:  # noqa: BLE001 - any start-up failure goes back to the driver as text
        _send(conn, ("error", traceback.format_exc()))
        return
    _send(conn, ("ok", None))
    try:
        _serve(worker, conn)
    finally:
        group.destroy()


def _serve(worker: Worker, conn: Connection) -> None:
    hang_next_step = False
    while True:
        try:
            method, args = pickle.loads(conn.recv_bytes())
        except (EOFError, OSError):  # the driver is gone
            return
        if method == "shutdown":
            _send(conn, ("ok", None))
            return
        if method == "_test_hang_next_step":  # test hook: simulate a rank stuck inside a step
            hang_next_step = True
            _send(conn, ("ok", None))
            continue
        if method == "execute_model" and hang_next_step:
            while True:
                time.sleep(3600)
        try:
            if method == "ping":
                result = None
            elif method == "collective_stats":
                result = _collective_stats(worker.tp)
            else:
                result = getattr(worker, method)(*args)
            if method == "execute_model" and not worker.tp.is_first:
                result = None
            reply = ("ok", result)
        except Exception:  # noqa: BLE001 - the driver decides; the traceback travels as text
            reply = ("error", traceback.format_exc())
        if not _send(conn, reply):
            return


def _collective_stats(tp) -> dict:
    if not isinstance(tp, TimedTPGroup):
        return {}
    stats = tp.stats()
    tp.reset()
    return stats


def _send(conn: Connection, message: tuple) -> bool:
    try:
        conn.send(message)
        return True
    except (BrokenPipeError, EOFError, OSError):
        return False


def _exit_with_parent(parent_pid: int) -> None:
    """Exit this process as soon as the driver that spawned it is gone (no orphaned ranks)."""

    def watch() -> None:
        while True:
            time.sleep(_PARENT_POLL_S)
            if os.getppid() != parent_pid:
                os._exit(1)

    threading.Thread(target=watch, name="pagoda-parent-watch", daemon=True).start()
