"""``RankActor``: one tensor-parallel rank as a Ray actor, hosting ``pagoda.engine.worker.rank.RankHost``.

The ``RayExecutor`` (cluster/ray_executor.py) starts k of these in one placement group, one bundle
each. Life of an actor:

    RankActor(rank, world_size)                      scheduled into its bundle; nothing loaded yet
    rendezvous() -> (node ip, port)                  rank 0 only: opens the group's TCPStore on its node
    start(RankSpec) -> RankInfo                      joins the NCCL / gloo group, builds the Worker
    call(method, *args)                              RankHost.call: load_model, execute_model, ping, ...

Rank 0 holds the rendezvous store, not the driver: the driver (a Serve replica) may run on another
node than its ranks when it is not inside their placement group, and the ranks are packed on one
node, so rank 0's node address reaches them all. A GPU rank sees one GPU (Ray sets
CUDA_VISIBLE_DEVICES to its bundle's), so its device is ``cuda:0``.

``call`` takes its arguments unpacked so that an ObjectRef passed by the driver (the step's
``SchedulerOutput``, put once for all ranks) is resolved by Ray before the call runs.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Any

import ray
from torch.distributed import TCPStore

from pagoda.engine.worker.rank import RankHost, RankSpec


@dataclass(frozen=True)
class RankInfo:
    """Where a started rank runs, for error messages and tests."""

    rank: int
    pid: int
    node_ip: str


class RankActor:
    def __init__(self, rank: int, world_size: int) -> None:
        self.rank, self.world_size = rank, world_size
        self._store = None  # rank 0's rendezvous TCPStore server; kept alive with the actor
        self._host: RankHost | None = None

    def rendezvous(self, timeout_s: float) -> tuple[str, int]:
        """Open the group's rendezvous store on this node; returns the address the ranks join."""
        host = ray.util.get_node_ip_address()
        # Port 0: the OS picks a free port and the store binds it at once (no race between choosing and binding).
        self._store = TCPStore(
            host, 0, is_master=True, wait_for_workers=False, timeout=datetime.timedelta(seconds=timeout_s)
        )
        return host, self._store.port

    def start(self, spec: RankSpec) -> RankInfo:
        """Join the group (returns once every rank has) and build this rank's Worker."""
        self._host = RankHost(spec)
        return RankInfo(self.rank, os.getpid(), ray.util.get_node_ip_address())

    def call(self, method: str, *args: Any) -> Any:
        return self._host.call(method, args)
