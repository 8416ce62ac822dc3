"""What ``bench.vlm``'s phases share: the device, the clock the phases and --deadline-s count from,
and the guard that records a failed phase so that the others still run (one device call has to bring
back everything)."""

from __future__ import annotations

import time
import traceback

import torch

from bench.offline import _free

CUDA = torch.cuda.is_available()
DEVICE, DTYPE = ("cuda", torch.bfloat16) if CUDA else ("cpu", torch.float32)
_start = time.monotonic()


def restart_clock() -> None:
    """Phase times and --deadline-s count from now (``bench.vlm.main``), not from the import."""
    global _start
    _start = time.monotonic()


def elapsed() -> float:
    """Seconds since the run started."""
    return time.monotonic() - _start


def sync() -> None:
    if CUDA:
        torch.cuda.synchronize()


def guard(name: str, fn, *args) -> dict:
    """``fn(*args)`` timed; an exception is printed and recorded so the other phases still run (one
    device call has to bring back everything)."""
    print(f"--- {name} (t={elapsed():.0f} s)", flush=True)
    t = time.perf_counter()
    try:
        out = fn(*args)
    except Exception as e:  # noqa: BLE001 - record and go on
        traceback.print_exc()
        out = {"error": f"{type(e).__name__}: {e}"}
        _free()
    out["seconds"] = time.perf_counter() - t
    print(f"--- {name} done in {out['seconds']:.1f} s" + (f": {out['error']}" if "error" in out else ""), flush=True)
    return out
