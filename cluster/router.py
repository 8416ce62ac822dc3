"""``PagodaRouter``: Ray Serve's custom request router around ``routing_policy.rank``.

Serve instantiates one router per deployment handle owner (the driver, each ingress proxy or
deployment that calls the engine) and calls ``choose_replicas`` for every request; we return all
candidates as ranks of one, best first. Serve sends to the first rank whose replica accepts (the
replica rejects when at ``max_ongoing_requests``) and falls through to the next otherwise.

Inputs to the policy, per replica:
- ``routing_stats`` the replica published (``ReplicaStats`` on the wire), decoded once per snapshot;
- this router's ``InFlightLedger`` (assign on choose, confirm on ``on_request_routed``, complete on
  ``on_request_completed``), so a burst spreads out instead of herding onto the replica that
  looked idlest at the last snapshot.

Only ``generate`` calls are scored and counted; other methods (``stats``, ``tokenize``) are cheap
and go to a random replica. A ``generate`` call's prompt and priority make its ``RoutingRequest``
(high priority ranks by time to first token: see ``routing_policy``).
"""

from __future__ import annotations

import logging
import random
from collections import OrderedDict
from typing import Any

from ray.serve.request_router import PendingRequest, ReplicaID, RequestRouter, RunningReplica

from pagoda.cluster.config import RouterWeights
from pagoda.cluster.inflight import InFlightLedger
from pagoda.cluster.protocol import GENERATE_METHOD, GenerateRequest
from pagoda.cluster.routing_policy import EngineLimits, ReplicaView, RoutingRequest, rank
from pagoda.cluster.routing_stats import ReplicaStats

logger = logging.getLogger("ray.serve")

_HASH_CACHE_SIZE = 1024  # routing requests kept for retries of choose_replicas


class PagodaRouter(RequestRouter):
    def initialize_state(
        self,
        weights: dict | None = None,
        max_num_seqs: int = 128,
        max_num_batched_tokens: int = 2048,
        block_size: int = 16,
        tentative_ttl_s: float = 30.0,
    ) -> None:
        """Called by Serve with ``request_router_kwargs`` (JSON: the app config's router and engine limits)."""
        self.weights = RouterWeights(**(weights or {}))
        self.limits = EngineLimits(max_num_seqs, max_num_batched_tokens, block_size)
        self.ledger = InFlightLedger(tentative_ttl_s)
        self._stats: dict[ReplicaID, tuple[Any, ReplicaStats | None]] = {}  # wire dict (by identity) -> decoded
        self._requests: OrderedDict[str, RoutingRequest] = OrderedDict()  # internal request id -> hashed prompt

    async def choose_replicas(
        self, candidate_replicas: list[RunningReplica], pending_request: PendingRequest | None = None
    ) -> list[list[RunningReplica]]:
        if not candidate_replicas:
            return []
        candidates = list(candidate_replicas)
        random.shuffle(candidates)  # equal costs (e.g. all idle) break at random, not on the first replica
        if pending_request is None or pending_request.metadata.call_method != GENERATE_METHOD:
            return [[r] for r in candidates]  # stats, tokenize: cheap, any replica
        request = self._routing_request(pending_request)
        by_id = {r.replica_id.unique_id: r for r in candidates}
        ranked = rank(request, [self._view(r) for r in candidates], self.weights, self.limits)
        best = ranked[0]
        self.ledger.assign(pending_request.metadata.internal_request_id, best.replica_id, best.new_tokens,
                           best.new_blocks, request.block_hashes)
        return [[by_id[s.replica_id]] for s in ranked]

    # ---- Serve's lifecycle hooks -----------------------------------------------------------------

    def on_request_routed(self, pending_request: PendingRequest, replica_id: ReplicaID, result) -> None:
        self.ledger.confirm(pending_request.metadata.internal_request_id, replica_id.unique_id)

    def on_request_completed(self, replica_id: ReplicaID, internal_request_id: str) -> None:
        self.ledger.complete(internal_request_id)
        self._requests.pop(internal_request_id, None)

    def update_replicas(self, replicas: list[RunningReplica]) -> None:
        super().update_replicas(replicas)
        live = {r.replica_id for r in replicas}
        for replica_id in [rid for rid in self._stats if rid not in live]:
            self._forget(replica_id)

    def on_replica_actor_died(self, replica_id: ReplicaID) -> None:
        super().on_replica_actor_died(replica_id)
        self._forget(replica_id)

    # ---- helpers ------------------------------------------------------------------------------------

    def _forget(self, replica_id: ReplicaID) -> None:
        self._stats.pop(replica_id, None)
        self.ledger.drop_replica(replica_id.unique_id)

    def _view(self, replica: RunningReplica) -> ReplicaView:
        replica_id, stats = replica.replica_id.unique_id, self._decoded_stats(replica)
        return ReplicaView(replica_id, stats, self.ledger.view(replica_id, stats.published_at if stats else None))

    def _decoded_stats(self, replica: RunningReplica) -> ReplicaStats | None:
        wire = replica.routing_stats
        cached = self._stats.get(replica.replica_id)
        if cached is not None and cached[0] is wire:
            return cached[1]
        try:
            stats = ReplicaStats.from_wire(wire)
        except (KeyError, TypeError, ValueError) as exc:  # a replica of another version: route by load
            logger.warning("ignoring malformed routing stats from %s: %r", replica.replica_id, exc)
            stats = None
        self._stats[replica.replica_id] = (wire, stats)
        return stats

    def _routing_request(self, pending_request: PendingRequest) -> RoutingRequest:
        key = pending_request.metadata.internal_request_id
        cached = self._requests.get(key)
        if cached is not None:
            return cached
        generate = next((a for a in (*pending_request.args, *pending_request.kwargs.values())
                         if isinstance(a, GenerateRequest)), None)
        if generate is None:
            return RoutingRequest.unknown()
        request = RoutingRequest.from_token_ids(generate.prompt_token_ids, self.limits.block_size, generate.priority)
        self._requests[key] = request
        while len(self._requests) > _HASH_CACHE_SIZE:
            self._requests.popitem(last=False)
        return request
