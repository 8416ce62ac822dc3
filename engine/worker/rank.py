"""One tensor-parallel rank, whoever hosts it: join the group, build the Worker, answer calls.

Two hosts drive a rank through this class and differ only in transport: a spawned process reading
a pipe (``engine/worker/rank_process.py``, the local ``MultiprocExecutor``) and a Ray actor
(``cluster/rank_actor.py``, the ``RayExecutor``). Both keep the driver outside the group.

Calls (``RankHost.call(method, args)``): any ``Worker`` method (``load_model``,
``determine_num_blocks``, ``initialize_cache``, ``execute_model``), ``ping`` and ``collective_stats``.
``execute_model`` returns the ModelRunnerOutput on rank 0 and None elsewhere: the other ranks hold
the same tokens and need not ship them back.

Async scheduling adds two calls that keep one step queued on the device: ``launch(step)``
queues the step, then finishes the step launched before it and returns that one's output (or
``NO_REPLY`` when there was none: the host sends nothing back); ``flush`` finishes the last
launched step and returns its output.

With ``PAGODA_TIME_COLLECTIVES=1`` in the environment the rank's group is a ``TimedTPGroup`` and
``collective_stats`` returns (and resets) the time spent in each collective (bench/tp.py).
With ``PAGODA_PROFILE_DIR`` set, each rank runs ``torch.profiler`` over its execute_model (or launch) calls
``PAGODA_PROFILE_STEPS`` (default 40:60) and writes the op/kernel table and a Chrome trace there
(``_StepProfiler``; a developer's tool: where a tensor-parallel step's time goes, GPU kernels and
NCCL included).
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from pagoda.engine.config import EngineConfig
from pagoda.engine.distributed import TimedTPGroup, TorchTPGroup, init_tp_group
from pagoda.engine.loader import ResolvedModel
from pagoda.engine.worker.worker import Worker, resolve_device, resolve_dtype

logger = logging.getLogger(__name__)

NO_REPLY = object()  # a call whose host sends no reply (a launch with no earlier step to finish)
_STEP_CALLS = ("execute_model", "launch")


@dataclass(frozen=True)
class RankSpec:
    """Where one rank joins its group and what it runs (picklable: travels to the rank's host)."""

    rank: int
    world_size: int
    store_host: str  # the rendezvous TCPStore: the local driver's, or rank 0's actor on its node
    store_port: int
    config: EngineConfig  # model.device is "cuda" or "cpu" here when the host decided it
    model: ResolvedModel  # its folder readable at the same path on the rank's node
    collective_timeout_s: float
    local_rank: int  # this rank's CUDA device index among the GPUs its process sees
    num_threads: int  # torch CPU threads (CPU ranks share the host's cores)


class RankHost:
    def __init__(self, spec: RankSpec) -> None:
        """Pick the device, join the group (blocks until every rank has), build the Worker."""
        device = self.device = resolve_device(spec.config.model.device, local_rank=spec.local_rank)
        if device.type == "cuda":
            torch.cuda.set_device(device)
        else:  # oversubscribed cores make every rank slower
            torch.set_num_threads(spec.num_threads)
        self.group: TorchTPGroup = init_tp_group(
            spec.rank, spec.world_size, spec.store_host, spec.store_port, device, spec.collective_timeout_s
        )
        if device.type == "cuda" and spec.config.parallel.custom_all_reduce:
            why_not = self.group.enable_custom_all_reduce(resolve_dtype(spec.config.model.dtype, device))
            if why_not:
                logger.info("rank %d: all-reduces stay on NCCL: %s", spec.rank, why_not)
        tp = TimedTPGroup(self.group, device) if os.environ.get("PAGODA_TIME_COLLECTIVES") == "1" else self.group
        self.worker = Worker(spec.config, spec.model, tp, device)
        self._launched = None  # the StepHandle of the last ``launch``, until a later call finishes it
        tag = "oneshot" if self.group.custom_all_reduce is not None else "nccl"
        self._profile = _StepProfiler(spec.rank, tag) if os.environ.get("PAGODA_PROFILE_DIR") else None

    def call(self, method: str, args: tuple = ()) -> Any:
        """Run one driver call; exceptions propagate to the host, which reports them to the driver."""
        if method == "ping":
            return None
        if method == "collective_stats":
            return _collective_stats(self.worker.tp)
        if method == "launch":
            result = self._launch(*args)
        elif method == "flush":
            result = self._finish_launched()
        elif method == "execute_model" and self._profile is not None:
            result = self._profile.run(self.worker.execute_model, *args)
        else:
            result = getattr(self.worker, method)(*args)
        if method in (*_STEP_CALLS, "flush") and result is not NO_REPLY and not self.worker.tp.is_first:
            return None
        return result

    def _launch(self, scheduled):
        """Queue ``scheduled`` behind the last launched step, then finish that one."""
        if self._profile is None:
            handle = self.worker.launch(scheduled)
        else:
            handle = self._profile.run(self.worker.launch, scheduled)
        previous, self._launched = self._finish_launched(), handle
        return previous

    def _finish_launched(self):
        handle, self._launched = self._launched, None
        return NO_REPLY if handle is None else self.worker.finish(handle)

    def close(self) -> None:
        self.group.destroy()


def _collective_stats(tp) -> dict:
    if not isinstance(tp, TimedTPGroup):
        return {}
    stats = tp.stats()
    tp.reset()
    return stats


def _profile_steps() -> range:
    """The execute_model calls profiled: ``PAGODA_PROFILE_STEPS=start:stop``, default 40:60 (past
    start-up and warm-up steps)."""
    start, stop = os.environ.get("PAGODA_PROFILE_STEPS", "40:60").split(":")
    return range(int(start), int(stop))


class _StepProfiler:
    """``torch.profiler`` over execute_model calls ``_profile_steps()``; writes ``rank<r>-<tag>.txt``
    (op/kernel table, the wall time of each call and the idle gap before it) and the Chrome trace
    ``rank<r>-<tag>.json.gz``. The tag names the all-reduce path, so two engines of one run keep
    their files apart."""

    def __init__(self, rank: int, tag: str) -> None:
        self.rank, self.tag, self.calls, self.prof = rank, tag, 0, None
        self.steps = _profile_steps()
        self.walls: list[float] = []
        self.gaps: list[float] = []
        self._last_end: float | None = None

    def run(self, fn, *args):
        from torch.profiler import ProfilerActivity, profile

        if self.calls == self.steps.start:
            self.prof = profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA])
            self.prof.__enter__()
        begin = time.perf_counter()
        result = fn(*args)
        end = time.perf_counter()
        if self.prof is not None:
            self.walls.append(end - begin)
            if self._last_end is not None:
                self.gaps.append(begin - self._last_end)
        self._last_end = end
        self.calls += 1
        if self.calls == self.steps.stop and self.prof is not None:
            self.prof.__exit__(None, None, None)
            averages = self.prof.key_averages()
            table = averages.table(sort_by="self_cuda_time_total", row_limit=40, max_name_column_width=70)
            out = Path(os.environ["PAGODA_PROFILE_DIR"])
            summary = (f"{len(self.steps)} execute_model calls: wall {_mean_ms(self.walls):.3f} ms each, "
                       f"idle before each {_mean_ms(self.gaps):.3f} ms")
            (out / f"rank{self.rank}-{self.tag}.txt").write_text(f"{summary}\n{table}\n")
            self.prof.export_chrome_trace(str(out / f"rank{self.rank}-{self.tag}.json.gz"))
            self.prof = None
        return result


def _mean_ms(seconds: list[float]) -> float:
    return 1000 * sum(seconds) / max(1, len(seconds))
