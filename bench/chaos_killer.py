"""``Killer``: Ray's RandomKiller pattern for ``bench.chaos`` — every N seconds (seeded jitter) SIGKILL one
process among the configured targets, then watch Serve put the application back together.

Targets, found in the GCS actor table of the attached cluster (the public state API needs the dashboard,
which the chaos driver does not start; the integration tests read the same table):

    replica   an engine replica    actor class ``ServeReplica:<app>:<app>-engine``
    rank      a tensor-parallel rank of one engine (TP > 1, Ray executor)    ``RankActor``
    ingress   the API ingress      ``ServeReplica:<app>:<app>-api``

SIGKILL of the actor's process, not ``ray.kill``: a crash gives no one a chance to clean up. After a
kill the cluster is *whole again* when the victim (and, for a rank, the replica that owned it) is dead
in the GCS, every deployment of the application has only RUNNING replicas at its target count, and
every engine has its ranks; ``replaced_s`` is how long that took. The next kill waits for it (or for
``recovery_limit_s``): kills on a broken cluster would measure model loading, not failover.
"""

from __future__ import annotations

import os
import random
import signal
import threading
import time
from dataclasses import dataclass, field

TARGETS = ("replica", "rank", "ingress")


@dataclass(frozen=True)
class ActorInfo:
    """One live actor of the GCS table."""

    name: str  # the actor's name, else its id (rank actors have none)
    cls: str  # Ray's actor class name
    pid: int
    address: str  # its core worker's ip:port
    owner_address: str  # the core worker that created it: a rank's engine replica


@dataclass
class Kill:
    """One kill; times are ``time.perf_counter()`` (the load's clock)."""

    target: str
    at: float
    victim: str = ""
    pid: int = 0
    owner: str = ""  # a rank's engine replica, which dies with it
    skipped: str = ""  # why nothing was killed (no live victim)
    replaced_at: float | None = None  # when the cluster was whole again; None: not within the limit


@dataclass
class Killer:
    app: str
    targets: tuple[str, ...]
    every_s: float  # mean time between kills
    jitter_s: float  # each interval is every_s +- jitter_s (uniform)
    expected: dict[str, int]  # actor class -> live count of a whole cluster
    seed: int = 0
    order: str = "random"  # random: seeded choice of target; cycle: the targets in turn
    max_kills: int | None = None
    recovery_limit_s: float = 60.0
    kills: list[Kill] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._rng = random.Random(self.seed)
        self._stop = threading.Event()

    @classmethod
    def for_app(cls, app: str, replicas: int, tp: int, **kwargs) -> Killer:
        expected = {_class(app, "replica"): replicas, _class(app, "ingress"): 1}
        if tp > 1:
            expected[_class(app, "rank")] = replicas * tp
        return cls(app, expected=expected, **kwargs)

    def run(self, start: float, stop_at: float) -> None:
        """Kill until ``stop_at`` (perf_counter) or ``max_kills``; returns once the last kill's cluster is whole."""
        due = start + self._interval()
        while not self._stop.is_set() and due < stop_at and len(self.kills) < (self.max_kills or 10**9):
            if self._stop.wait(max(0.0, due - time.perf_counter())):
                break
            kill = self.kill_one(self._next_target())
            self.kills.append(kill)
            if not kill.skipped:
                kill.replaced_at = self.wait_whole(kill)
            due = max(kill.at + self._interval(), time.perf_counter() + 2.0)  # 2 s of whole cluster before the next

    def stop(self) -> None:
        self._stop.set()

    def kill_one(self, target: str) -> Kill:
        actors = live_actors()
        victims = sorted((a for a in actors.values() if a.cls == _class(self.app, target)), key=lambda a: a.name)
        if not victims:
            return Kill(target, time.perf_counter(), skipped=f"no live {_class(self.app, target)}")
        victim = self._rng.choice(victims)
        owner = next((a.name for a in actors.values() if a.address == victim.owner_address), "")
        os.kill(victim.pid, signal.SIGKILL)
        return Kill(target, time.perf_counter(), victim.name, victim.pid, owner if target == "rank" else "")

    def wait_whole(self, kill: Kill) -> float | None:
        """When the cluster was whole again after ``kill`` (perf_counter), or None after ``recovery_limit_s``."""
        return self.wait_whole_since(kill.at, self.recovery_limit_s, {kill.victim, kill.owner} - {""})

    def wait_whole_since(self, since: float, limit_s: float, gone: set[str] = frozenset()) -> float | None:
        """When the cluster was whole (perf_counter), polling until ``limit_s`` after ``since``; else None."""
        while time.perf_counter() - since < limit_s:
            if self.is_whole(gone):
                return time.perf_counter()
            time.sleep(0.25)
        return None

    def is_whole(self, gone: set[str] = frozenset()) -> bool:
        """Every expected actor is live (and none of ``gone``) and Serve runs every replica of the app."""
        from ray import serve

        actors = live_actors()
        if gone & set(actors):
            return False
        counts = {cls: sum(a.cls == cls for a in actors.values()) for cls in self.expected}
        if counts != self.expected:
            return False
        app = serve.status().applications.get(self.app)
        if app is None:
            return False
        replicas = {cls: n for cls, n in self.expected.items() if cls.startswith("ServeReplica:")}
        states = {f"ServeReplica:{self.app}:{name}": {_plain(k): v for k, v in d.replica_states.items() if v}
                  for name, d in app.deployments.items()}
        return all(states.get(cls) == {"RUNNING": n} for cls, n in replicas.items())

    def _interval(self) -> float:
        return max(1.0, self.every_s + self._rng.uniform(-self.jitter_s, self.jitter_s))

    def _next_target(self) -> str:
        if self.order == "cycle":
            return self.targets[len(self.kills) % len(self.targets)]
        return self._rng.choice(self.targets)


def live_actors() -> dict[str, ActorInfo]:
    """ALIVE actors of the connected cluster by name (or id), from the GCS actor table."""
    import ray._private.state as ray_state  # the public ray.util.state API needs the dashboard

    out = {}
    for actor_id, a in ray_state.actors().items():
        if a["State"] != "ALIVE" or not a.get("Pid"):
            continue
        name = a["Name"] or actor_id
        out[name] = ActorInfo(name, a["ActorClassName"], int(a["Pid"]), _where(a["Address"]), _where(a["OwnerAddress"]))
    return out


def _where(address: dict) -> str:
    return f"{address.get('IPAddress')}:{address.get('Port')}"


def _class(app: str, target: str) -> str:
    from pagoda.cluster.api.ingress import INGRESS_SUFFIX
    from pagoda.cluster.app import DEPLOYMENT_SUFFIX

    return {"replica": f"ServeReplica:{app}:{app}{DEPLOYMENT_SUFFIX}", "rank": "RankActor",
            "ingress": f"ServeReplica:{app}:{app}{INGRESS_SUFFIX}"}[target]


def _plain(value) -> str:
    """Serve's status enums as their plain names ('RUNNING')."""
    return str(getattr(value, "value", value))
