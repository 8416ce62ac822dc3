"""A test-only PagodaRouter that can pre-load one replica: requests whose id starts with ``pin:``
go to the replica with the smallest id, everything else is routed by PagodaRouter unchanged."""

from __future__ import annotations

from pagoda.cluster.protocol import GenerateRequest
from pagoda.cluster.router import PagodaRouter

PIN = "pin:"


class PinningRouter(PagodaRouter):
    async def choose_replicas(self, candidate_replicas, pending_request=None):
        ranked = await super().choose_replicas(candidate_replicas, pending_request)  # ledger counts it as usual
        args = (*pending_request.args, *pending_request.kwargs.values()) if pending_request else ()
        request = next((a for a in args if isinstance(a, GenerateRequest)), None)
        if request is not None and request.request_id.startswith(PIN) and candidate_replicas:
            return [[min(candidate_replicas, key=lambda r: r.replica_id.unique_id)]]
        return ranked
