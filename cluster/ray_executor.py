"""``RayExecutor``: TP > 1 with every rank a Ray actor; the engine (driver) stays outside the group.

Same interface and failure semantics as the local ``MultiprocExecutor``
(engine/worker/multiproc_executor.py); the engine picks it with
``distributed_executor_backend="ray"``, which a Serve replica with TP > 1 uses; the package root
(``pagoda/__init__.py``) registers it under that name, so the engine never imports ``cluster/``.

Start (``initialize``): the ranks' placement (``pagoda.cluster.placement``: bundles 1..k of the Serve
replica's group, or a STRICT_PACK group the executor reserves and later removes) → k
``RankActor``s, one per bundle → rank 0 opens the rendezvous store on its node and returns its
address → every rank joins the NCCL (GPU) / gloo (CPU) group and builds its Worker → load, profile
(the block count is the minimum over ranks), allocate the KV cache.

Each step the driver ``ray.put``s the SchedulerOutput once, calls ``execute_model`` on every rank
with that reference, and ``ray.get``s all replies under the step deadline; rank 0's reply is the
step's output (the others return None). Replies from every rank let a rank's exception surface at
once instead of as a collective timeout on its peers.

With async scheduling (``submit``/``take_output``) each rank gets ``launch(step)`` instead, as the local
ranks do (``pagoda.engine.worker.rank``): the rank queues the step behind the one it launched before
and replies with that one's output, so step n + 1 is on its way to the ranks while the driver takes
step n's result. The driver keeps the replies in submission order, each marked with whether it
carries a step's output (a launch with nothing launched before it carries none, but is still waited
for, so that its errors surface); when no reply in hand carries the oldest step's output, the ranks
are asked to ``flush``.

Failure detection, all surfacing as ``EngineDeadError`` naming the rank and the cause:
- a rank actor dies (``ray.kill``, a crash, its node lost): ``RayActorError`` from its reply;
- a rank raises: its traceback (``RayTaskError``); a peer's death seen through a broken collective
  is reported as that peer's death first;
- no reply within the step deadline (``GetTimeoutError``): a hung rank.
The group is then torn down at once: every actor ``ray.kill``ed, the placement group removed if the
executor reserved it. Timeouts are ``MultiprocExecutor``'s (``pagoda.engine.executor.RankTimeouts``:
``PAGODA_STEP_TIMEOUT_S`` default 25 s, ``PAGODA_INIT_TIMEOUT_S`` default 900 s).

The model folder must be readable at the driver's path on the ranks' node: inside a Serve replica's
group that is the replica's own node (STRICT_PACK).
"""

from __future__ import annotations

import contextlib
import dataclasses
import re
import weakref
from collections import deque

import ray
from ray.exceptions import GetTimeoutError, RayActorError, RayError

from pagoda.cluster.placement import RankPlacement, place_ranks
from pagoda.cluster.rank_actor import RankActor, RankInfo
from pagoda.engine.config import EngineConfig
from pagoda.engine.errors import EngineDeadError
from pagoda.engine.executor import Executor, RankTimeouts
from pagoda.engine.loader import ResolvedModel
from pagoda.engine.scheduler_output import ModelRunnerOutput, SchedulerOutput
from pagoda.engine.worker.rank import RankSpec

_HEALTH_TIMEOUT_S = 5.0
_ANSI = re.compile(r"\x1b\[[0-9;]*m")  # Ray colours the header of a remote traceback
_DEATH_GRACE_S = 2.0  # after one rank fails, how long to let its peers' replies (or deaths) arrive


class RayExecutor(Executor):
    def __init__(
        self,
        config: EngineConfig,
        model: ResolvedModel,
        step_timeout_s: float | None = None,
        init_timeout_s: float | None = None,
    ) -> None:
        """Nothing starts here; ``initialize`` places and starts the ranks. The config must be validated."""
        super().__init__()
        self.config = config
        self.model = model
        self.world_size = config.parallel.tensor_parallel_size
        self.timeouts = RankTimeouts.resolve(step_timeout_s, init_timeout_s)
        self.actors: list = []  # ray ActorHandles in rank order; emptied on teardown
        self.rank_infos: list[RankInfo] = []
        self._placement: list[RankPlacement] = []  # zero or one; emptied on teardown
        self._dead: str | None = None  # why the group is gone; None while it works
        # async scheduling: every rank's reply refs in submission order, with whether they carry a step's
        # output; and whether the ranks hold a launched step whose output no call has asked for yet
        self._replies: deque[tuple[list, bool]] = deque()
        self._launched = False
        self._finalizer = weakref.finalize(self, _teardown, self.actors, self._placement)

    # ------------------------------------------------------------------ life cycle
    def initialize(self) -> int:
        init_s = self.timeouts.init_s
        try:
            self._start_ranks()
            self._call_all("load_model", (), init_s)
            num_blocks = min(self._call_all("determine_num_blocks", (), init_s))
            self._call_all("initialize_cache", (num_blocks,), init_s)
        except BaseException:
            self.shutdown()
            raise
        return num_blocks

    def _start_ranks(self) -> None:
        if not ray.is_initialized():
            ray.init()  # the cluster at RAY_ADDRESS, else a local one (a script using the engine directly)
        init_s = self.timeouts.init_s
        placement = place_ranks(self.world_size, self.config.model.device, init_s)
        self._placement.append(placement)
        actor_class = ray.remote(RankActor)
        for rank in range(self.world_size):
            self.actors.append(actor_class.options(**placement.actor_options(rank)).remote(rank, self.world_size))
        store_host, store_port = self._gather([self.actors[0].rendezvous.remote(init_s)], init_s, "rendezvous")[0]
        # The ranks run where the placement says, whatever the driver's own device is.
        device = "cuda" if placement.gpu else "cpu"
        config = dataclasses.replace(self.config, model=dataclasses.replace(self.config.model, device=device))
        specs = [
            RankSpec(rank, self.world_size, store_host, store_port, config, self.model, self.timeouts.collective_s,
                     local_rank=0, num_threads=1)  # one GPU / one CPU per actor
            for rank in range(self.world_size)
        ]
        self.rank_infos = self._gather([a.start.remote(s) for a, s in zip(self.actors, specs)], init_s, "start")

    @property
    def placement_group(self):
        """The group the ranks run in (None before ``initialize`` and after teardown)."""
        return self._placement[0].group if self._placement else None

    @property
    def owns_placement_group(self) -> bool:
        return bool(self._placement) and self._placement[0].owned

    def shutdown(self) -> None:
        self._finalizer()  # runs _teardown once; later calls do nothing
        if self._dead is None:
            self._dead = "the executor was shut down"

    # ------------------------------------------------------------------ steps
    def execute_model(self, scheduled: SchedulerOutput) -> ModelRunnerOutput:
        if self._dead is not None:
            raise EngineDeadError(f"tensor-parallel group is down: {self._dead}")
        step = ray.put(scheduled)  # serialized once; each rank's call carries the reference
        return self._call_all("execute_model", (step,), self.timeouts.step_s)[0]

    @property
    def overlaps_host(self) -> bool:
        return True  # the ranks compute in their own actors

    def submit(self, scheduled: SchedulerOutput) -> None:
        """Send the step to every rank; each queues it behind its launched step and replies with that
        one's output (see the module docstring)."""
        step = ray.put(scheduled)
        self._replies.append((self._send_all("launch", (step,)), self._launched))
        self._launched = True

    def take_output(self) -> ModelRunnerOutput:
        """The oldest submitted step's output: from the reply of the launch after it, else from a flush."""
        while True:
            if not self._replies:
                if not self._launched:
                    raise RuntimeError("take_output without a submitted step")
                self._replies.append((self._send_all("flush", ()), True))
                self._launched = False
            refs, carries_output = self._replies.popleft()
            replies = self._gather(refs, self.timeouts.step_s, "execute_model")
            if carries_output:
                return replies[0]

    def check_health(self) -> None:
        self._call_all("ping", (), _HEALTH_TIMEOUT_S)

    def collective_stats(self) -> list[dict]:
        """Per rank, time spent in each collective since the last call (needs PAGODA_TIME_COLLECTIVES=1)."""
        return self._call_all("collective_stats", (), _HEALTH_TIMEOUT_S)

    # ------------------------------------------------------------------ plumbing
    def _call_all(self, method: str, args: tuple, timeout_s: float) -> list:
        """Run ``method(*args)`` on every rank; the ranks' results in rank order."""
        return self._gather(self._send_all(method, args), timeout_s, method)

    def _send_all(self, method: str, args: tuple) -> list:
        """Start ``method(*args)`` on every rank; the replies' refs in rank order."""
        if self._dead is not None:
            raise EngineDeadError(f"tensor-parallel group is down: {self._dead}")
        return [actor.call.remote(method, *args) for actor in self.actors]

    def _gather(self, refs: list, timeout_s: float, what: str) -> list:
        """Every reply (``refs[i]`` is rank i's); raises EngineDeadError on death, error or deadline."""
        try:
            return ray.get(refs, timeout=timeout_s)  # raises as soon as any reply is an error
        except GetTimeoutError:
            _, pending = ray.wait(refs, num_returns=len(refs), timeout=0)
            hung = [rank for rank, ref in enumerate(refs) if ref in pending]
            raise self._fail(
                f"no reply to {what!r} from rank(s) {hung} within {timeout_s:.1f} s: "
                f"a rank is hung (its peers then wait in a collective)"
            ) from None
        except RayError as exc:
            raise self._fail(self._diagnose(refs, what, exc)) from exc

    def _diagnose(self, refs: list, what: str, first: Exception) -> str:
        """What failed, dead ranks first: a rank's error is often a peer's death seen through a collective."""
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=_DEATH_GRACE_S)
        dead, raised = [], []
        for rank, ref in enumerate(refs):
            if ref not in ready:
                continue
            try:
                ray.get(ref, timeout=0)
            except RayActorError as exc:
                dead.append(self._death_of(rank, exc))
            except RayError as exc:
                raised.append(f"rank {rank} raised in {what!r}:\n{_ANSI.sub('', str(exc))}")
        return "; ".join(dead + raised) or f"{what!r} failed: {first}"

    def _death_of(self, rank: int, exc: Exception) -> str:
        where = ""
        if rank < len(self.rank_infos):
            info = self.rank_infos[rank]
            where = f" (pid {info.pid}, node {info.node_ip})"
        return f"tensor-parallel rank {rank}{where} died: {_cause(exc)}"

    def _fail(self, reason: str) -> EngineDeadError:
        """Record why, tear the group down at once, and return the error to raise."""
        self._dead = reason
        self._finalizer.detach()
        _teardown(self.actors, self._placement)
        return EngineDeadError(f"tensor-parallel group failed: {reason}")


def _cause(exc: Exception) -> str:
    """The line of a RayActorError that says why the actor died (Ray prints it after the actor's ids)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    because = [line for line in lines if line.startswith("The actor is dead because")]
    return (because or lines or [type(exc).__name__])[0]


def _teardown(actors: list, placement: list[RankPlacement]) -> None:
    """Kill every rank actor and remove the placement group the executor reserved; idempotent."""
    if ray.is_initialized():
        for actor in actors:
            with contextlib.suppress(Exception):  # already gone: teardown goes on with the others
                ray.kill(actor, no_restart=True)
        for p in placement:
            with contextlib.suppress(Exception):
                p.release()
    actors.clear()
    placement.clear()

