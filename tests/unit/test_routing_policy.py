"""The routing policy as a pure function over fake replicas (no Ray)."""

from __future__ import annotations

import dataclasses
import itertools

from hypothesis import given
from hypothesis import strategies as st

from pagoda.cluster.config import RouterWeights
from pagoda.cluster.inflight import LiveLoad
from pagoda.cluster.routing_policy import EngineLimits, ReplicaView, RoutingRequest, cached_prefix_blocks, rank, score
from pagoda.cluster.routing_stats import ReplicaStats
from pagoda.engine.kv_cache.block_hash import hash_full_blocks
from pagoda.engine.kv_cache.manager import KVCacheManager

BS = 16
W = RouterWeights()
LIMITS = EngineLimits(max_num_seqs=32, max_num_batched_tokens=512, block_size=BS)
PREFIX = list(range(1000, 1000 + 20 * BS))  # a 320-token shared system prompt


def stats(**kw) -> ReplicaStats:
    base = {"num_running": 0, "num_waiting": 0, "kv_usage": 0.0, "num_blocks": 1000, "block_size": BS,
            "max_num_seqs": 32, "max_num_batched_tokens": 512, "pending_prefill_tokens": 0, "num_preemptions": 0}
    return ReplicaStats(**{**base, **kw})


def replica(rid: str, live: LiveLoad | None = None, **kw) -> ReplicaView:
    return ReplicaView(rid, stats(**kw), live or LiveLoad())


def request(tokens, priority: int = 0) -> RoutingRequest:
    return RoutingRequest.from_token_ids(tokens, BS, priority)


def order(req, replicas, weights=W) -> list[str]:
    return [s.replica_id for s in rank(req, replicas, weights, LIMITS)]


def test_idle_replicas_tie_and_keep_the_callers_order():
    req = request(list(range(40)))
    assert order(req, [replica("a"), replica("b"), replica("c")]) == ["a", "b", "c"]
    assert order(req, [replica("c"), replica("a"), replica("b")]) == ["c", "a", "b"]


def test_published_load_ranks_busy_replicas_last():
    req = request(list(range(40)))
    ranked = order(req, [replica("busy", num_running=20, kv_usage=0.6), replica("idle"), replica("mid", num_running=5)])
    assert ranked == ["idle", "mid", "busy"]


def test_prefix_holder_wins_when_load_is_equal():
    tokens = PREFIX + [7, 8, 9]
    holder = replica("holder", cached_block_hashes=frozenset(hash_full_blocks(PREFIX, BS)))
    best = rank(request(tokens), [replica("other"), holder], W, LIMITS)[0]
    assert best.replica_id == "holder"
    assert best.hit_tokens == len(PREFIX) and best.new_tokens == 3


def test_prefix_affinity_gives_way_to_a_much_busier_holder():
    tokens = PREFIX + [7, 8, 9]
    hashes = frozenset(hash_full_blocks(PREFIX, BS))
    slightly_busy = replica("holder", num_running=4, kv_usage=0.1, cached_block_hashes=hashes)
    assert order(request(tokens), [replica("other"), slightly_busy])[0] == "holder"
    swamped = replica("holder", num_running=30, num_waiting=10, pending_prefill_tokens=4000, kv_usage=0.9,
                      cached_block_hashes=hashes)
    assert order(request(tokens), [replica("other"), swamped])[0] == "other"


def test_stale_idle_stats_do_not_attract_a_burst():
    # Both published idle, but this router has sent 10 requests to "a" since the snapshot.
    req = request(list(range(40)))
    a = replica("a", LiveLoad(in_flight=10, unseen=10, unseen_tokens=400, unseen_blocks=30))
    b = replica("b", LiveLoad(in_flight=2, unseen=2, unseen_tokens=80, unseen_blocks=6))
    assert order(req, [a, b]) == ["b", "a"]


def test_requests_finished_since_the_snapshot_no_longer_count():
    req = request(list(range(40)))
    drained = replica("a", LiveLoad(gone=20), num_running=20)
    busy = replica("b", num_running=10)
    assert order(req, [drained, busy]) == ["a", "b"]
    assert score(req, drained, W, LIMITS).queue == 0


def test_live_in_flight_is_a_floor_under_published_counts():
    # The snapshot says 0 (taken before our requests arrived, which we failed to mark unseen): 5 still count.
    s = score(request([1, 2, 3]), replica("a", LiveLoad(in_flight=5)), W, LIMITS)
    assert s.queue == 5


def test_kv_overflow_outweighs_a_shorter_queue():
    long_prompt = request(list(range(300 * BS)))  # 300 blocks
    nearly_full = replica("full", kv_usage=0.85, num_running=2)  # 850 of 1000 blocks used
    roomy = replica("roomy", kv_usage=0.2, num_running=6)
    scores = {s.replica_id: s for s in rank(long_prompt, [nearly_full, roomy], W, LIMITS)}
    assert scores["full"].kv_demand > 1 > scores["roomy"].kv_demand
    assert order(long_prompt, [nearly_full, roomy]) == ["roomy", "full"]


def test_replica_without_stats_is_ranked_by_live_load():
    req = request(list(range(40)))
    fresh = ReplicaView("fresh", None, LiveLoad())
    loaded = ReplicaView("loaded", None, LiveLoad(in_flight=3, unseen=3, unseen_tokens=120))
    assert order(req, [loaded, fresh]) == ["fresh", "loaded"]
    assert score(req, fresh, W, LIMITS).kv_demand == 0.0


def test_unknown_request_ranks_by_load_only():
    assert order(RoutingRequest.unknown(), [replica("busy", num_running=3), replica("idle")]) == ["idle", "busy"]


def test_prefix_match_is_the_leading_run_like_the_engine():
    hashes = hash_full_blocks(PREFIX, BS)
    assert cached_prefix_blocks(hashes, frozenset(hashes)) == 20
    assert cached_prefix_blocks(hashes, frozenset(hashes[:5] + hashes[6:])) == 5  # a hole ends the run
    assert cached_prefix_blocks(hashes, frozenset(hashes[1:])) == 0


def test_router_hit_equals_the_engines_prefix_hit():
    """The router's estimate uses the engine's hash chain and hit rule, so it predicts the engine exactly."""
    mgr = KVCacheManager(num_blocks=64, block_size=BS)
    cached = PREFIX + [5] * 7
    hit = mgr.get_prefix_hit(cached)
    mgr.allocate("warm", cached, hit, len(cached))
    mgr.free("warm")
    for tokens in (PREFIX + [1, 2], PREFIX, PREFIX[:BS * 3 + 1], [9] + PREFIX):
        engine_hit = mgr.get_prefix_hit(tokens).num_tokens
        view = ReplicaView("r", stats(cached_block_hashes=frozenset(mgr.cached_block_hashes())))
        assert score(request(tokens), view, W, LIMITS).hit_tokens == engine_hit


def test_zero_weights_ignore_their_term():
    tokens = PREFIX + [1]
    hashes = frozenset(hash_full_blocks(PREFIX, BS))
    no_prefix = dataclasses.replace(W, prefix=0.0, backlog=0.0)
    holder = replica("holder", num_running=1, cached_block_hashes=hashes)
    assert order(request(tokens), [holder, replica("other")], no_prefix) == ["other", "holder"]


# ---- high priority: time to first token only ---------------------------------------------------------


def test_high_priority_takes_the_least_loaded_replica_past_a_busier_prefix_holder():
    tokens = PREFIX + [7, 8, 9]
    holder = replica("holder", num_running=20, num_waiting=4, kv_usage=0.1,
                     cached_block_hashes=frozenset(hash_full_blocks(PREFIX, BS)))
    idle = replica("idle")
    assert order(request(tokens), [idle, holder]) == ["holder", "idle"]  # bulk: the prefix is worth the queue
    assert order(request(tokens, priority=-1), [idle, holder]) == ["idle", "holder"]
    assert order(request(tokens, priority=5), [idle, holder]) == ["holder", "idle"]  # low priority: as bulk
    # What a hit saves still counts (fewer prefill tokens in the backlog): a lightly loaded holder keeps it.
    light = replica("holder", num_running=4, kv_usage=0.1, cached_block_hashes=holder.stats.cached_block_hashes)
    assert order(request(tokens, priority=-1), [idle, light]) == ["holder", "idle"]


def test_high_priority_ignores_kv_fill_but_not_overflow():
    req, urgent = request(list(range(40))), request(list(range(40)), priority=-3)
    full_but_idle = replica("full", kv_usage=0.9)
    roomy_but_busy = replica("roomy", kv_usage=0.1, num_running=8)
    assert order(req, [full_but_idle, roomy_but_busy]) == ["roomy", "full"]
    assert order(urgent, [full_but_idle, roomy_but_busy]) == ["full", "roomy"]
    s = score(urgent, full_but_idle, W, LIMITS)
    assert s.cost == W.backlog * s.backlog_tokens / 512  # no queue: the prefill ahead of its first token only
    long_prompt = request(list(range(300 * BS)), priority=-1)  # would overflow the nearly full pool: it waits
    assert order(long_prompt, [replica("full", kv_usage=0.85), replica("roomy", kv_usage=0.2, num_running=6)]) == \
        ["roomy", "full"]


# ---- properties ------------------------------------------------------------------------------------

live_loads = st.builds(
    LiveLoad,
    in_flight=st.integers(0, 200), unseen=st.integers(0, 200), unseen_tokens=st.integers(0, 50_000),
    unseen_blocks=st.integers(0, 3000), gone=st.integers(0, 200),
)
replica_stats = st.builds(
    stats,
    num_running=st.integers(0, 64), num_waiting=st.integers(0, 256), kv_usage=st.floats(0, 1),
    pending_prefill_tokens=st.integers(0, 100_000),
)
prompts = st.lists(st.integers(0, 50), min_size=1, max_size=12 * BS)


@given(prompts, replica_stats, live_loads, st.integers(1, 50))
def test_more_load_never_lowers_the_cost(tokens, s, live, extra):
    req = request(tokens)
    base = score(req, ReplicaView("r", s, live), W, LIMITS).cost
    for more in (
        dataclasses.replace(live, in_flight=live.in_flight + extra, unseen=live.unseen + extra),
        dataclasses.replace(live, unseen_tokens=live.unseen_tokens + extra * 10),
        dataclasses.replace(live, unseen_blocks=live.unseen_blocks + extra),
    ):
        assert score(req, ReplicaView("r", s, more), W, LIMITS).cost >= base


@given(prompts, replica_stats, live_loads)
def test_a_cached_prefix_never_raises_the_cost(tokens, s, live):
    req = request(tokens)
    cold = score(req, ReplicaView("r", s, live), W, LIMITS)
    warm = score(req, ReplicaView("r", dataclasses.replace(s, cached_block_hashes=frozenset(req.block_hashes)), live),
                 W, LIMITS)
    assert warm.cost <= cold.cost
    assert warm.hit_tokens == len(req.block_hashes) * BS < len(tokens) or len(tokens) == 0


@given(st.lists(st.tuples(replica_stats, live_loads), min_size=1, max_size=6), prompts)
def test_rank_is_a_sorted_permutation(views, tokens):
    replicas = [ReplicaView(f"r{i}", s, live) for i, (s, live) in enumerate(views)]
    ranked = rank(request(tokens), replicas, W, LIMITS)
    assert sorted(s.replica_id for s in ranked) == sorted(r.replica_id for r in replicas)
    assert all(a.cost <= b.cost for a, b in itertools.pairwise(ranked))


weights = st.builds(RouterWeights, queue=st.floats(0, 10), backlog=st.floats(0, 10), kv=st.floats(0, 10),
                    overflow=st.floats(0, 100), prefix=st.floats(0, 10))


@given(st.lists(st.tuples(replica_stats, live_loads, st.integers(0, 12)), min_size=1, max_size=6), prompts,
       st.integers(-5, -1), weights)
def test_high_priority_picks_the_least_queue_and_backlog(views, tokens, priority, w):
    """Among replicas its blocks fit on, none is expected to reach a high-priority request's first token
    sooner (queue + backlog, as weighted) than the one it is sent to — whatever prefixes they hold."""
    req = request(tokens, priority)
    replicas = [ReplicaView(f"r{i}", dataclasses.replace(s, cached_block_hashes=frozenset(req.block_hashes[:k])), live)
                for i, (s, live, k) in enumerate(views)]
    scores = rank(req, replicas, w, LIMITS)

    def load(s) -> float:
        st_ = next(r.stats for r in replicas if r.replica_id == s.replica_id)
        return w.queue * s.queue / st_.max_num_seqs + w.backlog * s.backlog_tokens / st_.max_num_batched_tokens

    fitting = [s for s in scores if s.kv_demand <= 1]
    assert all(load(scores[0]) <= load(s) + 1e-9 for s in fitting)
