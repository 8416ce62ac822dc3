"""The fixed pool of KV blocks: two-tier free list, reference counts, and the prefix-cache map.

A block is in exactly one of three states:

- used:            ``ref_count > 0``; held by that many block tables; in no free list.
- free and cached: ``ref_count == 0`` and ``block_hash`` set; in one of the two free lists (the
  ordinary or the protected tier) *and* in the hash map, so a prefix hit can resurrect it
  (``touch``) from either tier until it is evicted.
- free:            ``ref_count == 0``, no hash; in the ordinary free list.

Invariants (``check_invariants`` verifies them all):
- the two free lists together hold exactly the blocks with ``ref_count == 0``, each once;
  ``num_free_blocks + (blocks with ref_count > 0) == num_blocks``;
- the protected list holds only cached blocks, and a free block's ``protected`` flag names its list;
- ``hash -> block`` maps only to blocks carrying that hash, and every block carrying a hash is the
  one the map points to (a block whose content duplicates a cached block stays unhashed).

Eviction is LRU within each tier, and the ordinary tier goes first: allocation pops the head of the
ordinary list, and the head of the protected list only once the ordinary list is empty; popping a
cached block evicts its hash. A freed cached block goes to the tail of the protected list when its
last holder frees it with ``protect=True`` (a request the scheduler protects, e.g. high priority),
else to the tail of the ordinary list: the tier follows the last freer, so a protected block that a
hit resurrects and an unprotected request frees last becomes ordinary again. A freed *unhashed*
block goes to the head of the ordinary list whatever ``protect`` says: it holds nothing reusable, so
it should be recycled before any cached block. ``reset_prefix_cache`` moves the protected blocks
(now holding nothing) behind the ordinary ones, which leaves the pool's eviction order unchanged.
Everything is O(1) per block; the free lists are intrusive and doubly linked so a cached block can
be unlinked from the middle of either when a prefix hit resurrects it.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field


def _check(ok: bool, message: str) -> None:
    # Not `assert`: invariant checks must survive `python -O`.
    if not ok:
        raise AssertionError(message)


@dataclass(eq=False, slots=True)
class KVBlock:
    """One block of KV slots. Links and ``protected`` are for the free lists only (stale while used)."""

    block_id: int
    ref_count: int = 0  # block tables holding this block
    block_hash: int | None = None  # prefix-cache key, set once the block is full and registered
    protected: bool = False  # while free: in the protected tier (evicted after every ordinary block)
    prev: KVBlock | None = field(default=None, repr=False)
    next: KVBlock | None = field(default=None, repr=False)


class FreeBlockQueue:
    """Intrusive doubly-linked list of free blocks between two sentinels; head is evicted first."""

    def __init__(self, blocks: Iterable[KVBlock]) -> None:
        self._head = KVBlock(-1)
        self._tail = KVBlock(-1)
        self._head.next, self._tail.prev = self._tail, self._head
        self._len = 0
        for block in blocks:
            self.append(block)

    def __len__(self) -> int:
        return self._len

    def popleft(self) -> KVBlock:
        if self._len == 0:
            raise IndexError("pop from an empty free list")
        block = self._head.next
        self.remove(block)
        return block

    def remove(self, block: KVBlock) -> None:
        block.prev.next, block.next.prev = block.next, block.prev
        block.prev = block.next = None
        self._len -= 1

    def append(self, block: KVBlock) -> None:
        self._link(block, self._tail.prev, self._tail)

    def appendleft(self, block: KVBlock) -> None:
        self._link(block, self._head, self._head.next)

    def _link(self, block: KVBlock, before: KVBlock, after: KVBlock) -> None:
        block.prev, block.next = before, after
        before.next = after.prev = block
        self._len += 1

    def __iter__(self) -> Iterator[KVBlock]:
        """Head (next to evict) to tail (most recently freed)."""
        return self._walk(self._head, "next", self._tail)

    def __reversed__(self) -> Iterator[KVBlock]:
        return self._walk(self._tail, "prev", self._head)

    def checked_list(self, max_len: int) -> list[KVBlock]:
        """The blocks head to tail, checking every link; a corrupted (cyclic) list fails, not hangs."""
        listed: list[KVBlock] = []
        node = self._head
        while node.next is not self._tail:
            _check(
                node.next is not None and node.next.prev is node, f"broken free-list link after block {node.block_id}"
            )
            node = node.next
            listed.append(node)
            _check(len(listed) <= max_len, "free list longer than the pool (cycle?)")
        _check(self._tail.prev is node, "free-list tail link is stale")
        _check(len(listed) == self._len, f"free list length {len(listed)} != counter {self._len}")
        return listed

    def _walk(self, start: KVBlock, step: str, stop: KVBlock) -> Iterator[KVBlock]:
        node = getattr(start, step)
        while node is not stop:
            yield node
            node = getattr(node, step)


class BlockPool:
    """``num_blocks`` KV blocks, ids ``0 .. num_blocks - 1``, all usable."""

    def __init__(self, num_blocks: int) -> None:
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
        self.num_blocks = num_blocks
        self.blocks = [KVBlock(i) for i in range(num_blocks)]
        self._free = FreeBlockQueue(self.blocks)  # ordinary tier: evicted first
        self._protected = FreeBlockQueue(())  # protected tier: evicted only once _free is empty
        self._cached: dict[int, KVBlock] = {}  # block hash -> the block holding that content

    @property
    def num_free_blocks(self) -> int:
        """Blocks that ``get_new_blocks`` can hand out, evictable cached ones of both tiers included."""
        return len(self._free) + len(self._protected)

    def usage(self) -> float:
        """Fraction of blocks with ``ref_count > 0``, in [0, 1]."""
        return (self.num_blocks - self.num_free_blocks) / self.num_blocks

    def get_new_blocks(self, n: int) -> list[KVBlock]:
        """Take ``n`` blocks in eviction order (ordinary tier first), evicting their hashes; ref 1 each."""
        if n > self.num_free_blocks:
            raise ValueError(f"asked for {n} blocks, only {self.num_free_blocks} free (check first)")
        blocks = [(self._free or self._protected).popleft() for _ in range(n)]
        for block in blocks:
            self._evict(block)
            block.ref_count = 1
        return blocks

    def get_cached_block(self, block_hash: int) -> KVBlock | None:
        """The block holding content ``block_hash``, used or free, or None. No side effects."""
        return self._cached.get(block_hash)

    def touch(self, blocks: Iterable[KVBlock]) -> None:
        """Take one more reference on each block, resurrecting free cached ones from either tier."""
        for block in blocks:
            if block.ref_count == 0:
                self._tier(block).remove(block)
            block.ref_count += 1

    def free_blocks(self, blocks: Iterable[KVBlock], *, protect: bool = False) -> None:
        """Drop one reference on each block; pass them in eviction order (first evicted first).

        A cached block whose last reference this drops joins the protected tier if ``protect``,
        else the ordinary one; an unhashed block always joins the ordinary tier, to be recycled first.
        """
        for block in blocks:
            if block.ref_count <= 0:
                raise ValueError(f"block {block.block_id} freed more often than taken")
            block.ref_count -= 1
            if block.ref_count == 0:
                self._release(block, protect)

    def _release(self, block: KVBlock, protect: bool) -> None:
        block.protected = protect and block.block_hash is not None
        if block.block_hash is None:
            self._free.appendleft(block)  # nothing to keep: recycle it first
        else:
            self._tier(block).append(block)

    def _tier(self, block: KVBlock) -> FreeBlockQueue:
        """The free list a free block is in."""
        return self._protected if block.protected else self._free

    def cache_full_block(self, block: KVBlock, block_hash: int) -> bool:
        """Register a used, full block under ``block_hash``.

        Returns False and changes nothing when another block already holds that content (two
        requests computed the same prefix concurrently): the first registration wins.
        """
        if block.ref_count == 0:
            raise ValueError(f"block {block.block_id} is free; only used blocks can be cached")
        if block.block_hash is not None:
            raise ValueError(f"block {block.block_id} is already cached under {block.block_hash:#x}")
        if block_hash in self._cached:
            return False
        block.block_hash = block_hash
        self._cached[block_hash] = block
        return True

    def cached_hashes(self, limit: int | None = None) -> list[int]:
        """Cached hashes, most recently used first: blocks in use (newest registration first), then
        free cached blocks in reverse eviction order, i.e. the protected tier from the most recently
        freed, then the ordinary tier likewise. A truncated list (the router's prefix summary) thus
        keeps the hashes that will survive longest."""
        in_use = (h for h in reversed(self._cached) if self._cached[h].ref_count > 0)
        free_newest_first = itertools.chain(reversed(self._protected), reversed(self._free))
        free = (b.block_hash for b in free_newest_first if b.block_hash is not None)
        return list(itertools.islice(itertools.chain(in_use, free), limit))

    def reset_prefix_cache(self) -> int:
        """Forget every cached hash (e.g. after a weight update); returns how many were dropped.

        Blocks in use keep their content and references; they just stop being shareable. Protected
        free blocks hold nothing to protect any more: they join the ordinary tier behind its blocks,
        so the pool's eviction order is unchanged.
        """
        dropped = len(self._cached)
        for block in self._cached.values():
            block.block_hash = None
        self._cached.clear()
        while self._protected:
            block = self._protected.popleft()
            block.protected = False
            self._free.append(block)
        return dropped

    def _evict(self, block: KVBlock) -> None:
        if block.block_hash is not None:
            del self._cached[block.block_hash]
            block.block_hash = None

    def check_invariants(self) -> None:
        """Raise AssertionError naming the first broken pool invariant."""
        ordinary = self._free.checked_list(max_len=self.num_blocks)
        protected = self._protected.checked_list(max_len=self.num_blocks)
        listed = ordinary + protected
        listed_ids = {b.block_id for b in listed}
        _check(len(listed_ids) == len(listed), "a block appears twice in the free lists")
        zero_ref = {b.block_id for b in self.blocks if b.ref_count == 0}
        _check(listed_ids == zero_ref, f"free lists {sorted(listed_ids)} != ref-0 blocks {sorted(zero_ref)}")
        _check(all(b.ref_count >= 0 for b in self.blocks), "negative ref_count")
        used = sum(b.ref_count > 0 for b in self.blocks)
        _check(self.num_free_blocks + used == self.num_blocks, f"free {self.num_free_blocks} + used {used} != total")
        for block in ordinary:
            _check(not block.protected, f"block {block.block_id} in the ordinary free list is marked protected")
        for block in protected:
            _check(block.protected, f"block {block.block_id} in the protected free list is not marked protected")
            _check(block.block_hash is not None, f"unhashed block {block.block_id} in the protected free list")
        for block_hash, block in self._cached.items():
            _check(
                block.block_hash == block_hash,
                f"hash map entry {block_hash:#x} -> block {block.block_id} with other hash",
            )
            _check(
                0 <= block.block_id < self.num_blocks and self.blocks[block.block_id] is block,
                f"hash map points outside the pool ({block.block_id})",
            )
        for block in self.blocks:
            if block.block_hash is not None:
                _check(self._cached.get(block.block_hash) is block, f"block {block.block_id} hash not in the map")
