"""The router's in-flight ledger and the routing-stats wire format (no Ray)."""

from __future__ import annotations

from pagoda.cluster.inflight import InFlightLedger, LiveLoad
from pagoda.cluster.routing_stats import ReplicaStats


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def make() -> tuple[InFlightLedger, Clock]:
    clock = Clock()
    return InFlightLedger(tentative_ttl_s=30.0, clock=clock), clock


def test_assign_counts_immediately_and_complete_releases():
    ledger, _ = make()
    ledger.assign("r1", "a", new_tokens=100, new_blocks=7)
    ledger.assign("r2", "a", new_tokens=50, new_blocks=4)
    assert ledger.view("a", None) == LiveLoad(in_flight=2, unseen=2, unseen_tokens=150, unseen_blocks=11)
    ledger.confirm("r1", "a")
    ledger.complete("r1")
    ledger.complete("r2")
    ledger.complete("unknown")
    assert ledger.view("a", None) == LiveLoad() and len(ledger) == 0


def test_confirm_moves_a_request_to_the_replica_that_took_it():
    ledger, _ = make()
    ledger.assign("r1", "a", 10, 1)
    ledger.confirm("r1", "b")  # "a" rejected it (full); Serve fell through to "b"
    assert ledger.view("a", None).in_flight == 0
    assert ledger.view("b", None).in_flight == 1


def test_retry_replaces_the_earlier_pick():
    ledger, _ = make()
    ledger.assign("r1", "a", 10, 1)
    ledger.assign("r1", "b", 10, 1)
    assert ledger.view("a", None).in_flight == 0 and ledger.view("b", None).in_flight == 1


def test_snapshot_time_splits_seen_from_unseen_and_counts_gone():
    ledger, clock = make()
    ledger.assign("old", "a", 100, 7)
    ledger.confirm("old", "a")
    ledger.assign("done", "a", 30, 2)
    ledger.confirm("done", "a")
    clock.t = 105.0
    snapshot = 104.0  # taken after "old" and "done" arrived
    ledger.assign("new", "a", 40, 3)
    clock.t = 106.0
    ledger.complete("done")  # in the snapshot, finished since
    view = ledger.view("a", snapshot)
    assert view == LiveLoad(in_flight=2, unseen=1, unseen_tokens=40, unseen_blocks=3, gone=1)
    assert ledger.view("a", 107.0).gone == 0  # a newer snapshot no longer holds it


def test_unconfirmed_picks_expire():
    ledger, clock = make()
    ledger.assign("cancelled-before-routing", "a", 10, 1)
    ledger.assign("routed", "a", 10, 1)
    ledger.confirm("routed", "a")
    clock.t += 31
    assert ledger.view("a", None).in_flight == 1


def test_drop_replica_forgets_its_requests():
    ledger, _ = make()
    ledger.assign("r1", "a", 10, 1)
    ledger.assign("r2", "b", 10, 1)
    ledger.drop_replica("a")
    assert ledger.view("a", None) == LiveLoad() and len(ledger) == 1
    ledger.complete("r1")  # its completion callback may still fire: ignored


def test_stats_wire_round_trip_is_compact():
    hashes = frozenset({0, 1, 2**64 - 1, 123456789})
    stats = ReplicaStats(3, 1, 0.25, 100, 16, 32, 512, 700, 2, hashes, published_at=12.5)
    wire = stats.to_wire()
    assert isinstance(wire["cached_block_hashes"], bytes) and len(wire["cached_block_hashes"]) == 8 * len(hashes)
    assert ReplicaStats.from_wire(wire) == stats


def test_empty_or_foreign_stats_mean_no_stats():
    assert ReplicaStats.from_wire({}) is None
    assert ReplicaStats.from_wire(None) is None
    assert ReplicaStats.from_wire({"v": 999}) is None


def test_routed_blocks_follow_requests_until_a_snapshot_covers_them():
    ledger, clock = make()
    ledger.assign("r1", "a", 10, 1, block_hashes=(11, 12))
    ledger.confirm("r1", "a")
    assert set(ledger.view("a", None).routed_blocks) == {11, 12}
    clock.t = 101.0
    ledger.complete("r1")  # released at 101: a snapshot from 100.5 cannot show the cached blocks yet
    assert set(ledger.view("a", 100.5).routed_blocks) == {11, 12}
    assert set(ledger.view("a", 102.0).routed_blocks) == set()  # a later snapshot's summary speaks for them


def test_routed_blocks_move_with_the_request_and_stay_bounded_without_stats():
    ledger, clock = make()
    ledger.assign("r1", "a", 10, 1, block_hashes=(11,))
    ledger.confirm("r1", "b")
    assert set(ledger.view("a", None).routed_blocks) == set()
    assert set(ledger.view("b", None).routed_blocks) == {11}
    ledger.complete("r1")
    clock.t += 60  # no stats ever: forgotten after the ledger's horizon
    assert set(ledger.view("b", None).routed_blocks) == set()
