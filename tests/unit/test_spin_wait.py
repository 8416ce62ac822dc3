"""Bounded busy-waiting on pipes (engine/worker/spin_wait.py)."""

from __future__ import annotations

import multiprocessing
import threading
import time

from pagoda.engine.worker.spin_wait import spin_until_readable, spin_wait_s


def test_returns_as_soon_as_every_pipe_has_data():
    (a_recv, a_send), (b_recv, b_send) = multiprocessing.Pipe(duplex=False), multiprocessing.Pipe(duplex=False)
    a_send.send("x")
    threading.Timer(0.05, b_send.send, args=("y",)).start()
    begin = time.perf_counter()
    spin_until_readable([a_recv, b_recv], seconds=5.0)
    assert 0.04 < time.perf_counter() - begin < 2.0
    assert a_recv.recv() == "x" and b_recv.recv() == "y"


def test_gives_up_after_the_window_and_on_a_closed_pipe():
    recv, send = multiprocessing.Pipe(duplex=False)
    begin = time.perf_counter()
    spin_until_readable([recv], seconds=0.05)
    assert 0.04 < time.perf_counter() - begin < 1.0
    send.close()
    begin = time.perf_counter()
    spin_until_readable([recv], seconds=5.0)  # EOF counts as readable: the blocking read reports it
    assert time.perf_counter() - begin < 1.0


def test_window_defaults_by_device_and_follows_the_environment(monkeypatch):
    monkeypatch.delenv("PAGODA_SPIN_WAIT_MS", raising=False)
    assert spin_wait_s("cpu") == 0.0 and spin_wait_s("cuda") == 0.02
    monkeypatch.setenv("PAGODA_SPIN_WAIT_MS", "0")
    assert spin_wait_s("cuda") == 0.0
    monkeypatch.setenv("PAGODA_SPIN_WAIT_MS", "5")
    assert spin_wait_s("cpu") == 0.005
    spin_until_readable([], seconds=1.0)  # nothing to wait for
