"""Collecting what a bench's load processes send back."""

from __future__ import annotations

import queue


def take_results(q, n: int, workers) -> list:
    """``n`` items from the multiprocessing queue ``q``; raises as soon as one of ``workers`` (the
    processes that put them there) has exited with an error instead of waiting forever."""
    items = []
    while len(items) < n:
        try:
            items.append(q.get(timeout=5))
        except queue.Empty:
            dead = [w for w in workers if w.exitcode not in (None, 0)]
            if dead:
                raise RuntimeError(f"a load process exited with {dead[0].exitcode}") from None
    return items
