"""The KV-occupancy routing policy: a pure function from plain data to a ranking of replicas.

For one request and each candidate replica, the estimated state of the replica is its last
published ``ReplicaStats`` blended with this router's ``LiveLoad`` (requests sent since the
snapshot count, requests finished since do not; the live in-flight count is a floor), and

    cost = queue    * requests on the replica (running + waiting) / max_num_seqs
         + backlog  * prefill tokens before this request's first token / max_num_batched_tokens
         + kv       * KV occupancy once this request's blocks are added (capped at 1)
         + overflow * KV demand beyond the pool (the request would wait for blocks, or preempt)
         - prefix   * fraction of the prompt already in the replica's prefix cache

Lowest cost first. The prefix term and the prefill tokens a hit saves (in ``backlog``) pull a
request toward the replica that holds its prefix; the load terms push back once that replica is
busier by more than the hit is worth, so affinity never piles everything on one replica. Every
term is dimensionless (a full batch, a full step of prefill, a full pool each count 1), so the
default weights of 1 mean "one full batch of queueing is worth one step of prefill".

A request of high priority (``priority < 0``, better than the default 0; lower runs first, vLLM's
convention) is ranked by how soon its first token can come, nothing else:

    cost = queue * ... + backlog * ... + overflow * ...      (the same terms as above)

The prefix bonus and the KV-fill term are dropped: they trade one request's latency for the
cluster's cache hit rate and KV headroom, which is the right trade for bulk traffic and the wrong
one for a request that asked to go first. A prefix hit still counts where it saves time, through
the prefill tokens it takes out of ``backlog``; so an idle replica wins over a busier one that
holds the prompt's prefix unless the saved prefill outweighs the longer queue.

A request's prefix is looked up the way the engine does (``KVCacheManager.get_prefix_hit``):
the leading run of its full blocks, hashed with ``pagoda.engine.kv_cache.block_hash.hash_full_blocks``,
found in the replica's published summary or among the blocks this router has sent it since
(``LiveLoad.routed_blocks``), leaving at least one prompt token to compute.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass, field

from pagoda.cluster.config import RouterWeights
from pagoda.cluster.inflight import LiveLoad
from pagoda.cluster.routing_stats import ReplicaStats
from pagoda.engine.kv_cache.block_hash import hash_full_blocks


@dataclass(frozen=True)
class EngineLimits:
    """What a replica that has not published stats yet is assumed to run with (from the app config)."""

    max_num_seqs: int = 128
    max_num_batched_tokens: int = 2048
    block_size: int = 16


@dataclass(frozen=True)
class RoutingRequest:
    num_prompt_tokens: int
    block_hashes: tuple[int, ...]  # keys of the prompt's full blocks that could be cache hits
    priority: int = 0  # the request's (lower runs first); < 0 ranks by time to first token (module docstring)

    @classmethod
    def from_token_ids(cls, token_ids: Sequence[int], block_size: int, priority: int = 0) -> RoutingRequest:
        # Like get_prefix_hit: only blocks inside the first n-1 tokens can hit (the last token is computed).
        n = len(token_ids)
        return cls(n, tuple(hash_full_blocks(token_ids[: max(0, n - 1)], block_size)), priority)

    @property
    def latency_first(self) -> bool:
        """High priority: ranked by expected time to its first token only."""
        return self.priority < 0

    @classmethod
    def unknown(cls) -> RoutingRequest:
        """A call without a prompt (or one we do not score by prompt): load only."""
        return cls(0, ())


@dataclass(frozen=True)
class ReplicaView:
    replica_id: str
    stats: ReplicaStats | None  # last published; None until the first snapshot arrives
    live: LiveLoad = field(default_factory=LiveLoad)


@dataclass(frozen=True)
class Score:
    replica_id: str
    cost: float  # lower is better
    queue: float  # estimated running + waiting requests
    backlog_tokens: int  # estimated prefill tokens ahead of and including this request's
    kv_demand: float  # estimated KV occupancy with this request admitted (may exceed 1)
    hit_tokens: int  # prompt tokens expected from the replica's prefix cache
    new_tokens: int  # prompt tokens the replica must compute
    new_blocks: int  # KV blocks the request needs beyond its cached prefix


def cached_prefix_blocks(block_hashes: Sequence[int], *caches: Collection[int]) -> int:
    """Length of the leading run of ``block_hashes`` present in any of ``caches``."""
    for i, h in enumerate(block_hashes):
        if not any(h in cache for cache in caches):
            return i
    return len(block_hashes)


def score(request: RoutingRequest, replica: ReplicaView, weights: RouterWeights, limits: EngineLimits) -> Score:
    s, live = replica.stats, replica.live
    block_size = s.block_size if s else limits.block_size
    summary = s.cached_block_hashes if s else frozenset()
    hit_blocks = cached_prefix_blocks(request.block_hashes, summary, live.routed_blocks)
    hit_tokens = hit_blocks * block_size
    new_tokens = request.num_prompt_tokens - hit_tokens
    new_blocks = -(-request.num_prompt_tokens // block_size) - hit_blocks

    published_queue = s.num_running + s.num_waiting if s else 0
    queue = max(live.in_flight, published_queue + live.unseen - live.gone)
    backlog = max(0, (s.pending_prefill_tokens if s else 0) + live.unseen_tokens) + new_tokens
    if s and s.num_blocks:
        kv_demand = (s.kv_usage * s.num_blocks + live.unseen_blocks + new_blocks) / s.num_blocks
    else:
        kv_demand = 0.0  # unknown pool: the load terms decide
    hit_fraction = hit_tokens / request.num_prompt_tokens if request.num_prompt_tokens else 0.0

    cost = (  # time to the first token: the queue, the prefill ahead, waiting for KV blocks
        weights.queue * queue / (s.max_num_seqs if s else limits.max_num_seqs)
        + weights.backlog * backlog / (s.max_num_batched_tokens if s else limits.max_num_batched_tokens)
        + weights.overflow * max(0.0, kv_demand - 1.0)
    )
    if not request.latency_first:  # bulk traffic also keeps pools evenly filled and follows its prefix
        cost += weights.kv * min(kv_demand, 1.0) - weights.prefix * hit_fraction
    return Score(replica.replica_id, cost, queue, backlog, kv_demand, hit_tokens, new_tokens, new_blocks)


def rank(
    request: RoutingRequest, replicas: Sequence[ReplicaView], weights: RouterWeights, limits: EngineLimits
) -> list[Score]:
    """Scores of ``replicas``, best first; equal costs keep the input order (callers shuffle it)."""
    return sorted((score(request, r, weights, limits) for r in replicas), key=lambda s: s.cost)
