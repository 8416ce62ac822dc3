"""Busy-waiting on pipes before blocking, for the per-step driver <-> rank hops of GPU ranks.

A blocked process (pipe read, ``select``) is descheduled; waking it and getting its core back
up to speed costs tens to hundreds of microseconds per hop, and a decode step has two hops
(driver -> ranks, ranks -> driver) of a few-millisecond step. Spinning on a non-blocking
``poll()`` for a bounded window first keeps the waiting process on its core; past the window it
blocks as before, so a long prefill or an idle engine costs no CPU. Every ``poll()`` is a syscall
that releases the GIL, so the driver's other Python threads (the async engine's event loop) keep
running while its engine thread spins.

``PAGODA_SPIN_WAIT_MS`` sets the window (0 turns spinning off). The default is on for CUDA ranks
(a GPU host has cores to spare) and off for CPU ranks, whose cores do the model's work. Measured
on 2 x H100, TP=2 batch-1 decode: 5.11 ms/token with it, 5.17 without (one run each, the same
machine; bench/results/tp_llama-3.1-8b_cuda_latency.*) — a small gain, within run-to-run noise.
"""

from __future__ import annotations

import os
import time
from multiprocessing.connection import Connection

DEFAULT_SPIN_WAIT_MS = 20.0


def spin_wait_s(device_type: str) -> float:
    """The spin window in seconds for ranks on ``device_type`` ("cuda" or "cpu")."""
    default = DEFAULT_SPIN_WAIT_MS if device_type == "cuda" else 0.0
    return float(os.environ.get("PAGODA_SPIN_WAIT_MS", default)) / 1000


def spin_until_readable(conns: list[Connection], seconds: float) -> None:
    """Return once every connection in ``conns`` has data (or its peer closed), or after ``seconds``."""
    if seconds <= 0:
        return
    deadline = time.perf_counter() + seconds
    waiting = list(conns)
    while waiting and time.perf_counter() < deadline:
        try:
            waiting = [c for c in waiting if not c.poll()]
        except (EOFError, OSError):  # a closed end: the blocking path reports it
            return
