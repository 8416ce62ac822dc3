"""BlockPool and block hashes: free-list order (LRU, two tiers), ref counts, the prefix-cache map.

Plain tests pin the behaviours by name; a hypothesis state machine drives random operations
against a model of both tiers' order and checks every invariant after every step.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from hypothesis import event, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from pagoda.engine.kv_cache.block_hash import hash_block_tokens, hash_full_blocks
from pagoda.engine.kv_cache.block_pool import BlockPool


def free_ids(pool: BlockPool) -> list[int]:
    """Free list, head (next evicted) first. White-box: the order is the LRU contract."""
    return [b.block_id for b in pool._free]


def protected_ids(pool: BlockPool) -> list[int]:
    """Protected free list, head first; evicted only after every block in ``free_ids``."""
    return [b.block_id for b in pool._protected]


# ---- block hashes ---------------------------------------------------------------------------


GOLDEN_FIRST_BLOCK = 9121524398691793932  # blake2b-64 of b'\x00' + int64le(1, 2, 3, 4)


def test_hash_is_pinned_and_64_bit():
    # The router in another process (and another release) must compute the same keys.
    h = hash_block_tokens(None, [1, 2, 3, 4])
    assert h == hash_block_tokens(None, (1, 2, 3, 4))
    assert 0 <= h < 2**64
    assert h == GOLDEN_FIRST_BLOCK


def test_hash_is_the_same_in_another_process():
    code = "from engine.kv_cache.block_hash import hash_full_blocks; print(hash_full_blocks(list(range(40)), 16))"
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True, cwd=_repo_root()
    )
    assert out.stdout.strip() == str(hash_full_blocks(list(range(40)), 16))


def _repo_root() -> str:
    return os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_hash_depends_on_parent_and_on_presence_of_parent():
    assert hash_block_tokens(None, [5]) != hash_block_tokens(0, [5])
    assert hash_block_tokens(1, [5]) != hash_block_tokens(2, [5])
    assert hash_block_tokens(2**64 - 1, [5]) != hash_block_tokens(None, [5])  # full unsigned range packs


def test_full_blocks_only():
    assert hash_full_blocks([1, 2, 3], 4) == []
    assert len(hash_full_blocks(list(range(9)), 4)) == 2


def test_continuing_a_chain_needs_the_parent():
    with pytest.raises(ValueError, match="parent_hash"):
        hash_full_blocks(list(range(8)), 4, start_block=1)


@settings(max_examples=100, deadline=None)
@given(tokens=st.lists(st.integers(0, 2**31), max_size=40), block_size=st.integers(1, 5), split=st.integers(0, 10))
def test_chain_can_be_continued_from_any_block(tokens, block_size, split):
    full = hash_full_blocks(tokens, block_size)
    split = min(split, len(full))
    parent = full[split - 1] if split else None
    assert full[:split] + hash_full_blocks(tokens, block_size, split, parent) == full
    manual, parent = [], None
    for i in range(len(tokens) // block_size):
        parent = hash_block_tokens(parent, tokens[i * block_size : (i + 1) * block_size])
        manual.append(parent)
    assert manual == full


# ---- pool: plain behaviours -----------------------------------------------------------------


def test_new_pool_is_all_free():
    pool = BlockPool(4)
    assert pool.num_free_blocks == 4 and pool.usage() == 0.0
    assert free_ids(pool) == [0, 1, 2, 3]
    pool.check_invariants()


def test_get_new_blocks_pops_head_with_one_reference():
    pool = BlockPool(4)
    blocks = pool.get_new_blocks(3)
    assert [b.block_id for b in blocks] == [0, 1, 2]
    assert all(b.ref_count == 1 for b in blocks)
    assert pool.num_free_blocks == 1 and pool.usage() == 0.75
    pool.check_invariants()


def test_shortage_raises_and_changes_nothing():
    pool = BlockPool(2)
    with pytest.raises(ValueError, match="only 2 free"):
        pool.get_new_blocks(3)
    assert pool.num_free_blocks == 2
    pool.check_invariants()


def test_double_free_raises():
    pool = BlockPool(2)
    (block,) = pool.get_new_blocks(1)
    pool.free_blocks([block])
    with pytest.raises(ValueError, match="freed more often"):
        pool.free_blocks([block])


def test_cached_blocks_are_evicted_lru_and_lose_their_hash():
    pool = BlockPool(6)
    blocks = pool.get_new_blocks(4)  # 0..3; free list now [4, 5]
    for i, block in enumerate(blocks):
        assert pool.cache_full_block(block, 100 + i)
    pool.free_blocks(reversed(blocks))  # tail first, as the manager does: 3, 2, 1, 0
    assert free_ids(pool) == [4, 5, 3, 2, 1, 0]
    assert pool.get_cached_block(103) is blocks[3]  # free but still cached
    taken = pool.get_new_blocks(3)
    assert [b.block_id for b in taken] == [4, 5, 3]
    assert pool.get_cached_block(103) is None and taken[2].block_hash is None
    assert pool.get_cached_block(102) is blocks[2]  # not yet evicted
    pool.check_invariants()


def test_freed_unhashed_block_is_recycled_before_cached_ones():
    pool = BlockPool(3)
    a, b, _ = pool.get_new_blocks(3)
    pool.cache_full_block(a, 7)
    pool.free_blocks([a, b])  # a is cached -> tail, b holds nothing -> head
    assert free_ids(pool) == [1, 0]
    assert pool.get_new_blocks(1)[0] is b
    assert pool.get_cached_block(7) is a
    pool.check_invariants()


def test_touch_resurrects_a_cached_block_from_the_middle_of_the_free_list():
    pool = BlockPool(5)
    blocks = pool.get_new_blocks(5)
    for i, block in enumerate(blocks):
        pool.cache_full_block(block, i)
    pool.free_blocks(blocks)
    assert free_ids(pool) == [0, 1, 2, 3, 4]
    hit = pool.get_cached_block(2)
    pool.touch([hit])
    assert hit.ref_count == 1 and free_ids(pool) == [0, 1, 3, 4]
    pool.touch([hit])  # a second request sharing it
    assert hit.ref_count == 2 and pool.num_free_blocks == 4
    pool.free_blocks([hit])
    assert free_ids(pool) == [0, 1, 3, 4]  # still used by one
    pool.free_blocks([hit])
    assert free_ids(pool) == [0, 1, 3, 4, 2]  # most recently used goes last
    pool.check_invariants()


def test_duplicate_content_keeps_the_first_registration():
    pool = BlockPool(2)
    first, second = pool.get_new_blocks(2)
    assert pool.cache_full_block(first, 42)
    assert not pool.cache_full_block(second, 42)
    assert pool.get_cached_block(42) is first and second.block_hash is None
    pool.check_invariants()


def test_cache_full_block_rejects_free_or_already_cached_blocks():
    pool = BlockPool(2)
    (block,) = pool.get_new_blocks(1)
    pool.cache_full_block(block, 1)
    with pytest.raises(ValueError, match="already cached"):
        pool.cache_full_block(block, 2)
    with pytest.raises(ValueError, match="is free"):
        pool.cache_full_block(pool.blocks[1], 3)


def test_reset_prefix_cache_forgets_every_hash_but_keeps_references():
    pool = BlockPool(3)
    used, freed, _ = pool.get_new_blocks(3)
    pool.cache_full_block(used, 1)
    pool.cache_full_block(freed, 2)
    pool.free_blocks([freed])
    assert pool.reset_prefix_cache() == 2
    assert pool.get_cached_block(1) is None and pool.get_cached_block(2) is None
    assert used.ref_count == 1 and pool.num_free_blocks == 1
    assert pool.cached_hashes() == []
    pool.check_invariants()


def test_cached_hashes_most_recently_used_first():
    pool = BlockPool(4)
    blocks = pool.get_new_blocks(4)
    for i, block in enumerate(blocks):
        pool.cache_full_block(block, 10 + i)
    pool.free_blocks([blocks[0]])
    pool.free_blocks([blocks[1]])  # freed later: more recently used than block 0
    assert pool.cached_hashes() == [13, 12, 11, 10]  # in use (newest registration first), then free
    assert pool.cached_hashes(limit=3) == [13, 12, 11]
    assert pool.cached_hashes(limit=0) == []


@pytest.mark.parametrize(
    "corrupt, message",
    [
        (lambda p: setattr(p.blocks[1], "ref_count", 1), "free list"),
        (lambda p: setattr(p.blocks[3], "ref_count", 0), "free list"),
        (lambda p: setattr(p.blocks[3], "block_hash", 99), "hash not in the map"),
        (lambda p: p._cached.__setitem__(98, p.blocks[3]), "other hash"),
        (lambda p: setattr(p.blocks[1], "next", p.blocks[0]), "link"),
    ],
)
def test_check_invariants_names_the_corruption(corrupt, message):
    pool = BlockPool(4)
    blocks = pool.get_new_blocks(4)
    pool.free_blocks(blocks[1:3])  # blocks 0 and 3 used, 1 and 2 free
    pool.check_invariants()
    corrupt(pool)
    with pytest.raises(AssertionError, match=message):
        pool.check_invariants()


# ---- pool: the protected tier ---------------------------------------------------------------


def cached_pool(num_blocks: int) -> tuple[BlockPool, list]:
    """A pool whose blocks are all in use, block ``i`` cached under hash ``100 + i``."""
    pool = BlockPool(num_blocks)
    blocks = pool.get_new_blocks(num_blocks)
    for block in blocks:
        pool.cache_full_block(block, 100 + block.block_id)
    return pool, blocks


def test_unprotected_blocks_are_all_evicted_oldest_first_before_any_protected_one():
    pool, b = cached_pool(6)
    for block, protect in [(b[0], True), (b[1], False), (b[2], True), (b[3], False), (b[4], False)]:
        pool.free_blocks([block], protect=protect)  # interleaved tiers, oldest first
    assert free_ids(pool) == [1, 3, 4] and protected_ids(pool) == [0, 2]
    pool.check_invariants()
    taken = pool.get_new_blocks(3)
    assert [x.block_id for x in taken] == [1, 3, 4]  # the whole ordinary tier, LRU
    assert all(pool.get_cached_block(100 + i) is b[i] for i in (0, 2))  # protected survive
    assert pool.get_new_blocks(1)[0] is b[0]  # then the protected tier, LRU
    assert pool.get_cached_block(100) is None and pool.get_cached_block(102) is b[2]
    pool.check_invariants()


def test_freed_unhashed_block_never_goes_to_the_protected_tier():
    pool = BlockPool(2)
    cached, plain = pool.get_new_blocks(2)
    pool.cache_full_block(cached, 7)
    pool.free_blocks([cached, plain], protect=True)
    assert protected_ids(pool) == [0] and free_ids(pool) == [1]  # nothing to keep: recycled first
    assert not plain.protected
    pool.check_invariants()


def test_hit_resurrects_a_protected_block_and_the_tier_follows_the_last_freer():
    pool, b = cached_pool(4)
    pool.free_blocks([b[0], b[1]], protect=True)
    pool.free_blocks([b[2]])
    pool.touch([pool.get_cached_block(100)])  # a prefix hit on the protected tier
    assert protected_ids(pool) == [1] and free_ids(pool) == [2] and pool.num_free_blocks == 2
    pool.touch([b[0]])  # shared by a second request
    pool.free_blocks([b[0]], protect=True)  # a protected holder leaves first: still in use
    assert protected_ids(pool) == [1] and b[0].ref_count == 1
    pool.free_blocks([b[0]])  # the last freer is unprotected: ordinary tier
    assert free_ids(pool) == [2, 0] and protected_ids(pool) == [1]
    pool.touch([b[2]])  # and back: an ordinary block freed by a protected request
    pool.free_blocks([b[2]], protect=True)
    assert free_ids(pool) == [0] and protected_ids(pool) == [1, 2]
    pool.check_invariants()
    assert [x.block_id for x in pool.get_new_blocks(3)] == [0, 1, 2]


def test_reset_prefix_cache_clears_both_tiers_and_keeps_the_eviction_order():
    pool, b = cached_pool(5)
    pool.free_blocks([b[0], b[1]], protect=True)
    pool.free_blocks([b[2], b[3]])
    assert pool.reset_prefix_cache() == 5
    assert all(pool.get_cached_block(100 + i) is None and x.block_hash is None for i, x in enumerate(b))
    assert protected_ids(pool) == [] and free_ids(pool) == [2, 3, 0, 1]  # ordinary first, as before
    assert pool.cached_hashes() == [] and pool.num_free_blocks == 4
    pool.check_invariants()
    pool.free_blocks([b[4]], protect=True)  # unhashed now: nothing to protect
    assert free_ids(pool) == [4, 2, 3, 0, 1] and protected_ids(pool) == []
    pool.check_invariants()


def test_num_free_blocks_and_usage_count_both_tiers():
    pool, b = cached_pool(4)
    pool.free_blocks([b[0]], protect=True)
    pool.free_blocks([b[1]])
    assert pool.num_free_blocks == 2 and pool.usage() == 0.5
    pool.free_blocks([b[2]], protect=True)
    assert pool.num_free_blocks == 3 and pool.usage() == 0.25
    with pytest.raises(ValueError, match="only 3 free"):
        pool.get_new_blocks(4)
    assert len(pool.get_new_blocks(3)) == 3 and pool.usage() == 1.0


def test_cached_hashes_list_free_blocks_in_reverse_eviction_order():
    pool, b = cached_pool(5)
    pool.free_blocks([b[0]], protect=True)
    pool.free_blocks([b[1]])
    pool.free_blocks([b[2]], protect=True)
    pool.free_blocks([b[3]])  # the most recently freed, but evicted before any protected block
    assert pool.cached_hashes() == [104, 102, 100, 103, 101]  # in use, protected, ordinary
    assert pool.cached_hashes(limit=3) == [104, 102, 100]


@pytest.mark.parametrize(
    "corrupt, message",
    [
        (lambda p: setattr(p.blocks[1], "protected", True), "ordinary free list is marked protected"),
        (lambda p: setattr(p.blocks[2], "protected", False), "protected free list is not marked"),
        (lambda p: p._evict(p.blocks[2]), "unhashed block 2 in the protected"),
        (lambda p: p._protected.append(p.blocks[0]), "free lists"),
    ],
)
def test_check_invariants_names_a_tier_corruption(corrupt, message):
    pool, b = cached_pool(4)
    pool.free_blocks([b[1]])
    pool.free_blocks([b[2]], protect=True)
    pool.check_invariants()
    corrupt(pool)
    with pytest.raises(AssertionError, match=message):
        pool.check_invariants()


# ---- pool: random operations against a model of the free list --------------------------------


class PoolMachine(RuleBasedStateMachine):
    """Model: the exact order of both free-list tiers and each block's reference count."""

    def __init__(self) -> None:
        super().__init__()
        self.pool = BlockPool(6)
        self.model_free = list(range(6))  # ordinary tier, head first
        self.model_protected: list[int] = []  # protected tier, head first
        self.held: list[int] = []  # one entry per reference the "tables" hold

    @precondition(lambda self: self.model_free or self.model_protected)
    @rule(data=st.data())
    def allocate(self, data):
        eviction_order = self.model_free + self.model_protected
        n = data.draw(st.integers(1, len(eviction_order)))
        blocks = self.pool.get_new_blocks(n)
        assert [b.block_id for b in blocks] == eviction_order[:n]
        taken = len(self.model_free)
        if n > taken:
            event("allocation reached the protected tier")
        del self.model_free[:n]
        del self.model_protected[: max(0, n - taken)]
        self.held += [b.block_id for b in blocks]

    @precondition(lambda self: self.held)
    @rule(data=st.data(), block_hash=st.integers(0, 3))
    def cache(self, data, block_hash):
        block = self.pool.blocks[data.draw(st.sampled_from(self.held))]
        if block.block_hash is None:
            registered = self.pool.cache_full_block(block, block_hash)
            assert registered == (self.pool.get_cached_block(block_hash) is block)

    @rule(block_hash=st.integers(0, 3))
    def hit(self, block_hash):
        block = self.pool.get_cached_block(block_hash)
        if block is not None:
            if block.ref_count == 0:
                tier = self.model_protected if block.block_id in self.model_protected else self.model_free
                event("hit on a protected block" if tier is self.model_protected else "hit on an ordinary block")
                tier.remove(block.block_id)
            self.pool.touch([block])
            self.held.append(block.block_id)

    @precondition(lambda self: self.held)
    @rule(data=st.data(), protect=st.booleans())
    def free(self, data, protect):
        block_id = self.held.pop(data.draw(st.integers(0, len(self.held) - 1)))
        block = self.pool.blocks[block_id]
        self.pool.free_blocks([block], protect=protect)
        if block.ref_count == 0:
            if block.block_hash is None:
                self.model_free.insert(0, block_id)
            elif protect:
                self.model_protected.append(block_id)
            else:
                self.model_free.append(block_id)

    @rule()
    def reset(self):
        self.pool.reset_prefix_cache()
        self.model_free += self.model_protected  # eviction order unchanged, one tier
        self.model_protected = []

    @invariant()
    def consistent(self):
        self.pool.check_invariants()
        assert free_ids(self.pool) == self.model_free
        assert protected_ids(self.pool) == self.model_protected
        for block in self.pool.blocks:
            assert block.ref_count == self.held.count(block.block_id)
        num_free = len(self.model_free) + len(self.model_protected)
        assert self.pool.num_free_blocks == num_free and self.pool.usage() == (6 - num_free) / 6

    @invariant()
    def cached_hashes_follow_reverse_eviction_order(self):
        hashes = self.pool.cached_hashes()
        free_newest_first = [self.pool.blocks[i].block_hash for i in reversed(self.model_free + self.model_protected)]
        free_hashes = [h for h in free_newest_first if h is not None]
        assert hashes[len(hashes) - len(free_hashes) :] == free_hashes
        assert all(self.pool.get_cached_block(h).ref_count > 0 for h in hashes[: len(hashes) - len(free_hashes)])

    def teardown(self):
        self.pool.free_blocks([self.pool.blocks[i] for i in self.held])
        self.pool.check_invariants()
        assert self.pool.num_free_blocks == self.pool.num_blocks and self.pool.usage() == 0.0


PoolMachine.TestCase.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)
test_pool_state_machine = PoolMachine.TestCase
