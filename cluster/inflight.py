"""The router's own live view of the requests it has sent: what the published stats cannot show yet.

Replica stats are a snapshot taken every ``stats_period_s``. A router that trusted them alone would
send every request of a burst to the replica that looked idle at the last snapshot (herding). So
each router keeps a ledger of its requests:

- ``assign`` when ``choose_replicas`` picks a replica (tentative: the request has not reached it
  yet, but the next decision must already count it);
- ``confirm`` when the replica accepted it (possibly another one than first picked);
- ``complete`` when it finished, failed or was cancelled.

``view(replica, published_at)`` splits the router's requests on a replica against a snapshot's
time: those assigned after it are *unseen* (add them to the snapshot), those in it that completed
since are *gone* (subtract them). It also lists the prompt blocks the router has sent the replica
that the snapshot's prefix summary may not show yet (blocks of requests still in flight, or
released after the snapshot was taken): the next request with that prefix follows them there
instead of waiting a stats period to learn where it went. Pure Python, single-threaded (the
router's event loop).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field

from pagoda.cluster.routing_stats import now


@dataclass(frozen=True)
class LiveLoad:
    """This router's requests on one replica, relative to the replica's last published stats."""

    in_flight: int = 0  # assigned and not completed
    unseen: int = 0  # of those, assigned after the stats were taken
    unseen_tokens: int = 0  # their prompt tokens not expected in the replica's prefix cache
    unseen_blocks: int = 0  # their new KV blocks
    gone: int = 0  # requests counted in the stats that have completed since
    routed_blocks: Collection[int] = frozenset()  # prompt block hashes sent there, maybe not in the stats yet


@dataclass
class _Entry:
    replica_id: str
    new_tokens: int
    new_blocks: int
    assigned_at: float
    block_hashes: Sequence[int] = ()
    confirmed: bool = False


@dataclass
class _Routed:
    """A prompt block hash this router sent to a replica."""

    holders: int = 0  # in-flight requests of ours with this block
    released_at: float = 0.0  # when the last one that reached the replica completed (0: none has)


@dataclass
class _ReplicaBlocks:
    blocks: dict[int, _Routed] = field(default_factory=dict)
    pruned_for: float = float("-inf")  # snapshot time of the last prune


class InFlightLedger:
    def __init__(self, tentative_ttl_s: float = 30.0, clock: Callable[[], float] = now) -> None:
        self._ttl = tentative_ttl_s  # an unconfirmed entry older than this was cancelled before routing
        self._clock = clock
        self._entries: dict[str, _Entry] = {}  # request id -> entry
        self._by_replica: dict[str, dict[str, _Entry]] = defaultdict(dict)
        self._completed: dict[str, list[tuple[float, float]]] = defaultdict(list)  # replica -> (assigned, done)
        self._routed: dict[str, _ReplicaBlocks] = defaultdict(_ReplicaBlocks)

    def __len__(self) -> int:
        return len(self._entries)

    def assign(
        self, request_id: str, replica_id: str, new_tokens: int = 0, new_blocks: int = 0,
        block_hashes: Sequence[int] = (),
    ) -> None:
        """Count ``request_id`` (its uncached tokens and blocks, its prompt's block hashes) on
        ``replica_id`` from now on, replacing an earlier pick on a retry."""
        self._remove(request_id)
        entry = _Entry(replica_id, new_tokens, new_blocks, self._clock(), block_hashes)
        self._add(request_id, entry)

    def confirm(self, request_id: str, replica_id: str) -> None:
        """The request reached ``replica_id`` (moved there if it was first picked elsewhere)."""
        entry = self._entries.get(request_id)
        if entry is None:  # routed without a choose_replicas of ours (a call we do not score)
            return
        if entry.replica_id != replica_id:
            self._remove(request_id)
            entry.replica_id = replica_id
            self._add(request_id, entry)
        entry.confirmed = True

    def complete(self, request_id: str) -> None:
        """Finished, failed or cancelled; unknown ids are ignored."""
        entry = self._remove(request_id)
        if entry is not None and entry.confirmed:
            self._completed[entry.replica_id].append((entry.assigned_at, self._clock()))

    def drop_replica(self, replica_id: str) -> None:
        """The replica is gone: forget its requests (their callers see errors)."""
        for request_id in list(self._by_replica.pop(replica_id, {})):
            del self._entries[request_id]
        self._completed.pop(replica_id, None)
        self._routed.pop(replica_id, None)

    def view(self, replica_id: str, published_at: float | None) -> LiveLoad:
        """This router's load on ``replica_id`` against stats taken at ``published_at`` (None: no stats yet)."""
        self._expire_tentative(replica_id)
        entries = self._by_replica.get(replica_id, {}).values()
        if published_at is None:
            unseen = list(entries)
        else:
            unseen = [e for e in entries if e.assigned_at >= published_at]
        return LiveLoad(
            in_flight=len(entries),
            unseen=len(unseen),
            unseen_tokens=sum(e.new_tokens for e in unseen),
            unseen_blocks=sum(e.new_blocks for e in unseen),
            gone=self._gone_since(replica_id, published_at),
            routed_blocks=self._routed_blocks(replica_id, published_at),
        )

    def _routed_blocks(self, replica_id: str, published_at: float | None) -> Collection[int]:
        routed = self._routed.get(replica_id)
        if routed is None:
            return frozenset()
        # Released before the snapshot: its summary shows them if the replica still caches them. Without
        # snapshots (a replica that never publishes) keep them for a while only, so the map stays bounded.
        horizon = published_at if published_at is not None else self._clock() - self._ttl
        if horizon > routed.pruned_for + (0.0 if published_at is not None else 1.0):
            stale = [h for h, r in routed.blocks.items() if r.holders == 0 and r.released_at < horizon]
            for h in stale:
                del routed.blocks[h]
            routed.pruned_for = horizon
        return routed.blocks.keys()

    def _gone_since(self, replica_id: str, published_at: float | None) -> int:
        done = self._completed.get(replica_id)
        if not done:
            return 0
        # Completions before the snapshot are already out of it, and snapshots only get newer.
        horizon = published_at if published_at is not None else self._clock() - self._ttl
        done[:] = [(a, d) for a, d in done if d >= horizon]
        return 0 if published_at is None else sum(a < published_at for a, _ in done)

    def _expire_tentative(self, replica_id: str) -> None:
        cutoff = self._clock() - self._ttl
        stale = [rid for rid, e in self._by_replica.get(replica_id, {}).items() if not e.confirmed and e.assigned_at < cutoff]
        for request_id in stale:
            self._remove(request_id)

    def _add(self, request_id: str, entry: _Entry) -> None:
        self._entries[request_id] = entry
        self._by_replica[entry.replica_id][request_id] = entry
        blocks = self._routed[entry.replica_id].blocks
        for h in entry.block_hashes:
            routed = blocks.get(h)
            if routed is None:
                routed = blocks[h] = _Routed()
            routed.holders += 1

    def _remove(self, request_id: str) -> _Entry | None:
        entry = self._entries.pop(request_id, None)
        if entry is None:
            return None
        del self._by_replica[entry.replica_id][request_id]
        blocks, now = self._routed[entry.replica_id].blocks, self._clock()
        for h in entry.block_hashes:
            routed = blocks.get(h)
            if routed is None:
                continue
            routed.holders -= 1
            if entry.confirmed:
                routed.released_at = now
            elif routed.holders == 0 and not routed.released_at:
                del blocks[h]  # only ever picked, never sent there: no trace of it on that replica
        return entry
