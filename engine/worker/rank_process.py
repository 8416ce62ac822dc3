"""The body of one spawned tensor-parallel rank: a ``RankHost`` served over a pipe.

Protocol over one duplex pipe to the driver (``MultiprocExecutor``):

    driver -> rank   pickle((method, args))        method is a ``RankHost.call`` method
                                                   (engine/worker/rank.py) or "shutdown"
    rank -> driver   ("ok", result) | ("error", traceback text)
                     (nothing for a "launch" that had no earlier step to finish: ``NO_REPLY``)

The first message a rank sends is ("ok", None) once it has joined the group (or ("error", ...)).
GPU ranks spin briefly before each blocking read (engine/worker/spin_wait.py).

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

from pagoda.engine.worker.rank import NO_REPLY, RankHost, RankSpec
from pagoda.engine.worker.spin_wait import spin_until_readable, spin_wait_s

_PARENT_POLL_S = 1.0


def rank_main(spec: RankSpec, conn: Connection) -> None:
    """Entry point of the spawned process for ``spec.rank``."""
    _exit_with_parent(os.getppid())
    try:
        host = RankHost(spec)
    except Exception:  # noqa: BLE001 - any start-up failure goes back to the driver as text
        _send(conn, ("error", traceback.format_exc()))
        return
    _send(conn, ("ok", None))
    try:
        _serve(host, conn, spin_wait_s(host.device.type))
    finally:
        host.close()


def _serve(host: RankHost, conn: Connection, spin_s: float) -> None:
    while True:
        spin_until_readable([conn], spin_s)  # the next step's message comes within a step's time
        try:
            method, args = pickle.loads(conn.recv_bytes())
        except (EOFError, OSError):  # the driver is gone
            return
        if method == "shutdown":
            _send(conn, ("ok", None))
            return
        try:
            result = host.call(method, args)
            if result is NO_REPLY:
                continue
            reply = ("ok", result)
        except Exception:  # noqa: BLE001 - the driver decides; the traceback travels as text
            reply = ("error", traceback.format_exc())
        if not _send(conn, reply):
            return


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
