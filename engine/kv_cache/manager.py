"""Per-request block tables over the BlockPool, with prefix caching. Pure Python.

The scheduler speaks in check/act pairs and decides whom to preempt; nothing here raises on a
shortage (the act half raises only when the check half was skipped, which is a caller bug)::

    hit = mgr.get_prefix_hit(tokens)                   # lookup, no side effects
    if mgr.can_allocate(hit, n): mgr.allocate(req_id, tokens, hit, n)
    if mgr.can_append(req_id, n): mgr.append(req_id, tokens, n)
    mgr.free(req_id, protect=False)                    # finish, abort or preemption

``free(..., protect=True)`` is for requests the scheduler protects (e.g. high priority): their
cached blocks are evicted only after every unprotected free block (see ``block_pool``).

Invariants (``check_invariants`` verifies them all, on top of the pool's):
- a table covers exactly its tokens: ``len(table) == ceil(num_tokens / block_size)``;
- a block's ``ref_count`` equals the number of tables holding it; no table holds a block twice;
- only full blocks are shared or cached, so a request writes new KV only into blocks it alone
  holds (a hit always ends on a block boundary; appended blocks are fresh);
- with prefix caching on, a table knows the chain key of each of its full blocks, whether or not
  that block is the one registered under it (a concurrent duplicate stays unregistered) — except
  a last full block that ends in a token still being sampled (async scheduling): its key comes
  with the next ``append``.

A block is registered when the tokens that fill it are *scheduled*, not after the forward pass:
a request scheduled in the same step may hit it, which is safe because every layer writes the
step's KV before its attention reads the cache.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

from pagoda.engine.kv_cache.block_hash import ExtraKeys, hash_block, hash_full_blocks
from pagoda.engine.kv_cache.block_pool import BlockPool, KVBlock


def _check(ok: bool, message: str) -> None:
    # Not `assert`: invariant checks must survive `python -O`.
    if not ok:
        raise AssertionError(message)


@dataclass(frozen=True)
class PrefixHit:
    """Result of ``get_prefix_hit``: cached blocks a new request can reuse."""

    block_ids: tuple[int, ...] = ()  # leading blocks of the request's table, in order
    num_tokens: int = 0  # tokens whose KV they hold: len(block_ids) * block_size


@dataclass
class _Table:
    blocks: list[KVBlock]
    num_tokens: int  # tokens the table covers (computed + scheduled)
    hashes: list[int] = field(default_factory=list)  # chain keys of the full blocks (prefix caching on)
    extra_keys: ExtraKeys = None  # the request's image hashes per token range (block_hash.ExtraKeys)


class KVCacheManager:
    """Block tables of the running requests, ``block_size`` tokens per block."""

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True) -> None:
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.pool = BlockPool(num_blocks)
        self._tables: dict[str, _Table] = {}
        self._query_tokens = 0
        self._hit_tokens = 0

    # ---- lookups -------------------------------------------------------------------------

    def get_prefix_hit(self, token_ids: Sequence[int], extra_keys: ExtraKeys = None) -> PrefixHit:
        """Longest run of leading full blocks of ``token_ids`` found in the cache (``extra_keys``:
        the request's image hashes, part of each block's key).

        Leaves at least one token to compute: a fully cached prompt still needs its last token's
        forward pass for the logits. Empty when prefix caching is off.
        """
        if not self.enable_prefix_caching:
            return PrefixHit()
        bs, block_ids, parent = self.block_size, [], None
        for i in range((len(token_ids) - 1) // bs):
            parent = hash_block(token_ids, bs, i, parent, extra_keys)
            block = self.pool.get_cached_block(parent)
            if block is None:
                break
            block_ids.append(block.block_id)
        return PrefixHit(tuple(block_ids), len(block_ids) * bs)

    def can_allocate(self, hit: PrefixHit, num_new_tokens: int) -> bool:
        """Whether ``allocate(..., hit, num_new_tokens)`` would find enough free blocks."""
        return self.allocate_shortage(hit, num_new_tokens) == 0

    def can_append(self, req_id: str, num_new_tokens: int) -> bool:
        """Whether ``append(req_id, ..., num_new_tokens)`` would find enough free blocks."""
        return self.append_shortage(req_id, num_new_tokens) == 0

    def allocate_shortage(self, hit: PrefixHit, num_new_tokens: int, reserve: int = 0) -> int:
        """Free blocks missing for ``allocate(..., hit, num_new_tokens)`` while ``reserve`` blocks stay free for
        others; 0 when it fits."""
        # Resurrecting a free cached hit block takes it out of the free list too.
        resurrected = sum(self.pool.blocks[i].ref_count == 0 for i in hit.block_ids)
        needed = self._blocks_needed(hit.num_tokens + num_new_tokens, len(hit.block_ids))
        return max(0, needed + resurrected + reserve - self.pool.num_free_blocks)

    def append_shortage(self, req_id: str, num_new_tokens: int) -> int:
        """Free blocks missing for ``append(req_id, ..., num_new_tokens)``; 0 when it fits."""
        return max(0, self.blocks_to_append(req_id, num_new_tokens) - self.pool.num_free_blocks)

    def blocks_to_append(self, req_id: str, num_new_tokens: int) -> int:
        """New blocks ``append(req_id, ..., num_new_tokens)`` would take."""
        table = self._table(req_id)
        return self._blocks_needed(table.num_tokens + num_new_tokens, len(table.blocks))

    def num_freeable_blocks(self, req_id: str) -> int:
        """Blocks ``free(req_id)`` would return to the free list: those no other request holds."""
        return sum(block.ref_count == 1 for block in self._table(req_id).blocks)

    # ---- actions -------------------------------------------------------------------------

    def allocate(
        self, req_id: str, token_ids: Sequence[int], hit: PrefixHit, num_new_tokens: int, extra_keys: ExtraKeys = None
    ) -> list[int]:
        """Create ``req_id``'s table: the hit blocks, then fresh blocks for ``num_new_tokens``.

        ``token_ids`` must contain every token the table will cover (``hit.num_tokens +
        num_new_tokens``); blocks that become full are registered in the prefix cache, keyed with
        ``extra_keys`` (the request's images; the table keeps it for later appends).
        Returns the whole block table. Raises ValueError only on caller bugs (a known req_id,
        a stale or malformed hit, too few tokens, or skipping ``can_allocate``).
        """
        if req_id in self._tables:
            raise ValueError(f"request {req_id!r} already has blocks; free it before allocating again")
        self._check_token_count(req_id, token_ids, hit.num_tokens + num_new_tokens, num_new_tokens)
        hit_blocks, hit_hashes = self._resolve_hit(token_ids, hit, extra_keys)
        if not self.can_allocate(hit, num_new_tokens):
            raise ValueError(f"not enough free blocks for request {req_id!r}; call can_allocate first")
        self.pool.touch(hit_blocks)  # before get_new_blocks, so the hits are not handed out again
        num_tokens = hit.num_tokens + num_new_tokens
        new_blocks = self.pool.get_new_blocks(self._blocks_needed(num_tokens, len(hit_blocks)))
        table = self._tables[req_id] = _Table(hit_blocks + new_blocks, num_tokens, hit_hashes, extra_keys)
        self._cache_full_blocks(table, token_ids)
        self._query_tokens += len(token_ids)
        self._hit_tokens += hit.num_tokens
        return [b.block_id for b in table.blocks]

    def append(self, req_id: str, token_ids: Sequence[int], num_new_tokens: int, num_pending: int = 0) -> list[int]:
        """Grow ``req_id``'s table to cover ``num_new_tokens`` more tokens.

        ``token_ids`` is the request's token list; with the ``num_pending`` tokens still being
        sampled after it, it covers at least the new total. Newly full blocks whose tokens are all
        known are registered in the prefix cache. Returns only the appended block ids.
        """
        table = self._table(req_id)
        num_tokens = table.num_tokens + num_new_tokens
        self._check_token_count(req_id, token_ids, num_tokens - num_pending, num_new_tokens)
        if not self.can_append(req_id, num_new_tokens):
            raise ValueError(f"not enough free blocks for request {req_id!r}; call can_append first")
        new_blocks = self.pool.get_new_blocks(self._blocks_needed(num_tokens, len(table.blocks)))
        table.blocks.extend(new_blocks)
        table.num_tokens = num_tokens
        self._cache_full_blocks(table, token_ids)
        return [b.block_id for b in new_blocks]

    def free(self, req_id: str, *, protect: bool = False) -> None:
        """Release ``req_id``'s blocks (finish, abort or preemption). Unknown ids are a no-op.

        With ``protect``, the cached blocks this frees last go to the pool's protected tier: a hit
        can still reuse them, and they are evicted only once no unprotected free block is left. A
        block another request still holds takes the tier of whichever request frees it last.
        """
        table = self._tables.pop(req_id, None)
        if table is not None:
            # Tail first: deep blocks are the least likely to be shared, so they are evicted first.
            self.pool.free_blocks(reversed(table.blocks), protect=protect)

    def reset_prefix_cache(self) -> int:
        """Forget every cached prefix; running requests keep their blocks. Returns hashes dropped."""
        return self.pool.reset_prefix_cache()

    # ---- queries -------------------------------------------------------------------------

    def __contains__(self, req_id: str) -> bool:
        return req_id in self._tables

    def block_table(self, req_id: str) -> list[int]:
        """Block ids of ``req_id``, in token order (a copy)."""
        return [b.block_id for b in self._table(req_id).blocks]

    def num_tokens(self, req_id: str) -> int:
        """Tokens ``req_id``'s table covers (computed + scheduled)."""
        return self._table(req_id).num_tokens

    @property
    def num_blocks(self) -> int:
        return self.pool.num_blocks

    @property
    def num_free_blocks(self) -> int:
        """Free blocks, evictable cached ones of both tiers included."""
        return self.pool.num_free_blocks

    def usage(self) -> float:
        """Fraction of blocks held by some request, in [0, 1] (the router's KV occupancy)."""
        return self.pool.usage()

    def cached_block_hashes(self, limit: int | None = None) -> list[int]:
        """Hashes in the prefix cache, most recently used first (the router's prefix summary);
        free ones in reverse eviction order, protected tier first (``BlockPool.cached_hashes``)."""
        return self.pool.cached_hashes(limit)

    @property
    def prefix_cache_stats(self) -> tuple[int, int]:
        """(tokens looked up, tokens hit), summed over first allocations."""
        return self._query_tokens, self._hit_tokens

    def check_invariants(self) -> None:
        """Raise AssertionError naming the first broken invariant (pool and tables)."""
        self.pool.check_invariants()
        holders: Counter[int] = Counter()
        for req_id, table in self._tables.items():
            ids = [b.block_id for b in table.blocks]
            _check(len(set(ids)) == len(ids), f"request {req_id!r} holds a block twice: {ids}")
            expected = self._blocks_needed(table.num_tokens, 0)
            _check(len(ids) == expected, f"request {req_id!r}: {len(ids)} blocks for {table.num_tokens} tokens")
            if self.enable_prefix_caching:
                full = table.num_tokens // self.block_size
                _check(
                    full - 1 <= len(table.hashes) <= full,
                    f"request {req_id!r}: {len(table.hashes)} keys for {full} full blocks",
                )
            holders.update(ids)
        for block in self.pool.blocks:
            _check(
                block.ref_count == holders[block.block_id],
                f"block {block.block_id}: ref_count {block.ref_count} but held by {holders[block.block_id]} tables",
            )

    # ---- helpers -------------------------------------------------------------------------

    def _table(self, req_id: str) -> _Table:
        table = self._tables.get(req_id)
        if table is None:
            raise KeyError(f"request {req_id!r} has no blocks (never allocated, or already freed)")
        return table

    def _blocks_needed(self, num_tokens: int, num_held: int) -> int:
        return max(0, -(-num_tokens // self.block_size) - num_held)

    def _check_token_count(self, req_id: str, token_ids: Sequence[int], num_tokens: int, num_new: int) -> None:
        if num_new < 0:
            raise ValueError(f"request {req_id!r}: num_new_tokens must be >= 0, got {num_new}")
        if num_tokens > len(token_ids):
            raise ValueError(
                f"request {req_id!r}: table would cover {num_tokens} tokens, token_ids has {len(token_ids)}"
            )

    def _resolve_hit(
        self, token_ids: Sequence[int], hit: PrefixHit, extra_keys: ExtraKeys
    ) -> tuple[list[KVBlock], list[int]]:
        """The hit's blocks and chain keys, re-verified against ``token_ids``.

        A hit goes stale if blocks were allocated between ``get_prefix_hit`` and ``allocate``
        (its free cached blocks may have been evicted and reused): refuse it rather than serve
        another prompt's KV.
        """
        if hit.num_tokens != len(hit.block_ids) * self.block_size:
            raise ValueError(f"malformed PrefixHit: {len(hit.block_ids)} blocks but {hit.num_tokens} tokens")
        if hit.block_ids and not self.enable_prefix_caching:
            raise ValueError("PrefixHit with blocks while prefix caching is off")
        hashes = hash_full_blocks(token_ids[: hit.num_tokens], self.block_size, extra_keys=extra_keys)
        blocks = [self.pool.get_cached_block(h) for h in hashes]
        if [b.block_id if b is not None else None for b in blocks] != list(hit.block_ids):
            raise ValueError("stale PrefixHit: the cache changed since get_prefix_hit; look it up again")
        return blocks, hashes

    def _cache_full_blocks(self, table: _Table, token_ids: Sequence[int]) -> None:
        """Register the table's blocks that became full, continuing its hash chain."""
        if not self.enable_prefix_caching:
            return
        bs = self.block_size
        parent = table.hashes[-1] if table.hashes else None
        for i in range(len(table.hashes), min(table.num_tokens, len(token_ids)) // bs):
            parent = hash_block(token_ids, bs, i, parent, table.extra_keys)
            self.pool.cache_full_block(table.blocks[i], parent)  # False for a concurrent duplicate: fine
            table.hashes.append(parent)
