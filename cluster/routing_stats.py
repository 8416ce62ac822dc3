"""What a replica publishes for the router (through Serve's ``record_routing_stats``).

Serve's controller polls each replica every ``router.stats_period_s`` and broadcasts the dicts to
every router, so the numbers are a snapshot that ages until the next one; the router blends them
with the requests it has sent since (``pagoda.cluster.inflight``).

The engine numbers and the prefix summary come from the engine's latest ``EngineSnapshot``
(``pagoda.engine.snapshot``). The summary is the replica's most recently used prefix-cache block
hashes (``KVCacheManager.cached_block_hashes``, rebuilt at most once per stats period while the
engine is busy), packed as little-endian uint64 bytes: 8 bytes a block, 32 KiB for the default 4096.
"""

from __future__ import annotations

import struct
import time
from dataclasses import dataclass, field

WIRE_VERSION = 1


@dataclass(frozen=True)
class ReplicaStats:
    num_running: int  # requests in the running batch
    num_waiting: int  # requests queued for admission (waiting or preempted)
    kv_usage: float  # fraction of KV blocks held by requests, in [0, 1]
    num_blocks: int  # KV blocks in the pool
    block_size: int  # tokens per block
    max_num_seqs: int  # the engine's batch limit
    max_num_batched_tokens: int  # the engine's token budget per step
    pending_prefill_tokens: int  # prompt tokens of requests that have not produced a first token yet
    num_preemptions: int  # since start
    cached_block_hashes: frozenset[int] = field(default_factory=frozenset)  # the prefix summary
    published_at: float = 0.0  # replica's time.time() of the engine snapshot; router entries newer are not in it

    def to_wire(self) -> dict:
        """A plain dict for ``record_routing_stats`` (hashes packed as bytes)."""
        hashes = sorted(self.cached_block_hashes)
        return {
            "v": WIRE_VERSION,
            "num_running": self.num_running,
            "num_waiting": self.num_waiting,
            "kv_usage": self.kv_usage,
            "num_blocks": self.num_blocks,
            "block_size": self.block_size,
            "max_num_seqs": self.max_num_seqs,
            "max_num_batched_tokens": self.max_num_batched_tokens,
            "pending_prefill_tokens": self.pending_prefill_tokens,
            "num_preemptions": self.num_preemptions,
            "cached_block_hashes": struct.pack(f"<{len(hashes)}Q", *hashes),
            "published_at": self.published_at,
        }

    @classmethod
    def from_wire(cls, wire: dict | None) -> ReplicaStats | None:
        """The stats in ``wire``, or None for an empty dict (a replica that has not published yet)
        or a wire version this router does not know."""
        if not wire or wire.get("v") != WIRE_VERSION:
            return None
        packed = wire["cached_block_hashes"]
        hashes = frozenset(struct.unpack(f"<{len(packed) // 8}Q", packed))
        fields = {k: v for k, v in wire.items() if k not in ("v", "cached_block_hashes")}
        return cls(**fields, cached_block_hashes=hashes)


def now() -> float:
    """The clock of ``published_at`` and the ledger (wall time: replicas and routers share it via NTP)."""
    return time.time()
