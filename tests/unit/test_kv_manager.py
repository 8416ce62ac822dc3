"""KVCacheManager: block tables, prefix reuse, check/act pairs, and no leaks.

The state machine at the bottom plays scheduler with a tiny vocabulary (so prefixes collide
often) and a tiny pool (so shortage, eviction and preemption happen often). Besides the
bookkeeping invariants it simulates the KV itself: every slot a request "computes" records the
prefix it was computed from, and every table must read back exactly its own prefix — a prefix
hit that served another prompt's KV, or a write into a shared block, would fail it.
"""

from __future__ import annotations

import math

import pytest
from hypothesis import event, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from pagoda.engine.kv_cache.block_hash import hash_full_blocks
from pagoda.engine.kv_cache.manager import KVCacheManager, PrefixHit


def start(mgr: KVCacheManager, req_id: str, tokens: list[int], num_new: int | None = None) -> list[int]:
    """What the scheduler does for a waiting request: look up, check, allocate the rest."""
    hit = mgr.get_prefix_hit(tokens)
    num_new = len(tokens) - hit.num_tokens if num_new is None else num_new
    assert mgr.can_allocate(hit, num_new)
    return mgr.allocate(req_id, tokens, hit, num_new)


# ---- prefix reuse ---------------------------------------------------------------------------


def test_second_request_reuses_the_shared_prefix_blocks():
    mgr = KVCacheManager(num_blocks=32, block_size=16)
    prefix = list(range(64))
    first = start(mgr, "a", prefix + [1000 + i for i in range(10)])
    hit = mgr.get_prefix_hit(prefix + [2000 + i for i in range(10)])
    assert hit.num_tokens == 64 and len(hit.block_ids) == 4
    assert list(hit.block_ids) == first[:4]
    second = mgr.allocate("b", prefix + [2000 + i for i in range(10)], hit, 10)
    assert second[:4] == first[:4] and second[4] != first[4]
    assert [mgr.pool.blocks[i].ref_count for i in first] == [2, 2, 2, 2, 1]
    assert mgr.prefix_cache_stats == (74 + 74, 64)
    mgr.check_invariants()


def test_hit_leaves_at_least_one_token_to_compute():
    mgr = KVCacheManager(num_blocks=16, block_size=16)
    prompt = list(range(64))
    start(mgr, "a", prompt)  # 4 full blocks, all cached
    assert mgr.get_prefix_hit(prompt).num_tokens == 48  # the last block is recomputed for its logits
    assert mgr.get_prefix_hit(prompt + [7]).num_tokens == 64
    assert mgr.get_prefix_hit(prompt[:1]).num_tokens == 0
    assert mgr.get_prefix_hit([]).num_tokens == 0


def test_hit_stops_at_the_first_uncached_block():
    mgr = KVCacheManager(num_blocks=16, block_size=4)
    start(mgr, "a", [1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3, 0])
    assert mgr.get_prefix_hit([1, 1, 1, 1, 9, 9, 9, 9, 3, 3, 3, 3, 0]).num_tokens == 4
    assert mgr.get_prefix_hit([9, 1, 1, 1, 2, 2, 2, 2, 0]).num_tokens == 0  # chained: same block, other parent


def test_prefix_caching_off_never_hits_or_caches():
    mgr = KVCacheManager(num_blocks=8, block_size=4, enable_prefix_caching=False)
    start(mgr, "a", list(range(9)))
    assert mgr.get_prefix_hit(list(range(9))) == PrefixHit()
    assert mgr.cached_block_hashes() == []
    with pytest.raises(ValueError, match="prefix caching is off"):
        mgr.allocate("b", list(range(9)), PrefixHit((0,), 4), 5)
    mgr.check_invariants()


def test_appended_blocks_are_cached_when_full_and_continue_the_chain():
    mgr = KVCacheManager(num_blocks=8, block_size=4)
    tokens = [5, 6, 7]
    assert start(mgr, "a", tokens) == [0]
    for token in [8, 9, 10, 11, 12]:  # decode: one new token a step
        tokens.append(token)
        assert mgr.can_append("a", 1)
        new = mgr.append("a", tokens, 1)
        assert new == ([1] if len(tokens) == 5 else [])  # a block only when crossing a boundary
    assert mgr.num_tokens("a") == 8 and mgr.block_table("a") == [0, 1]
    assert set(mgr.cached_block_hashes()) == set(hash_full_blocks(tokens, 4))  # both blocks now full
    hit = mgr.get_prefix_hit(tokens + [13])
    assert hit.block_ids == (0, 1)


def test_chunked_prefill_appends_then_caches():
    mgr = KVCacheManager(num_blocks=8, block_size=4)
    tokens = list(range(10))
    assert start(mgr, "a", tokens, num_new=3) == [0]
    assert mgr.cached_block_hashes() == []  # block 0 holds 3 of 4 tokens
    assert mgr.append("a", tokens, 5) == [1]
    assert mgr.num_tokens("a") == 8 and len(mgr.cached_block_hashes()) == 2
    assert mgr.append("a", tokens, 2) == [2]
    assert mgr.can_append("a", 0) and mgr.append("a", tokens, 0) == []
    mgr.check_invariants()


# ---- check/act -------------------------------------------------------------------------------


def test_can_allocate_counts_free_cached_hits_against_free_blocks():
    mgr = KVCacheManager(num_blocks=4, block_size=4)
    prompt = list(range(12))
    start(mgr, "a", prompt + [99])  # 4 blocks: 3 full and cached, 1 partial
    mgr.free("a")
    assert mgr.num_free_blocks == 4
    hit = mgr.get_prefix_hit(prompt + [50, 51, 52, 53])
    assert hit.num_tokens == 12
    assert mgr.can_allocate(hit, 4)  # 3 resurrected + 1 new = 4
    assert not mgr.can_allocate(hit, 5)  # would need 2 new blocks, only 1 not in the hit
    mgr.allocate("b", prompt + [50, 51, 52, 53], hit, 4)
    assert mgr.num_free_blocks == 0 and mgr.usage() == 1.0
    mgr.check_invariants()


def test_can_append_and_shortage_without_check_raises_cleanly():
    mgr = KVCacheManager(num_blocks=2, block_size=2)
    start(mgr, "a", [1, 2, 3])
    assert mgr.can_append("a", 1) and not mgr.can_append("a", 2)
    with pytest.raises(ValueError, match="can_append first"):
        mgr.append("a", [1, 2, 3, 4, 5], 2)
    assert mgr.block_table("a") == [0, 1] and mgr.num_tokens("a") == 3
    with pytest.raises(ValueError, match="can_allocate first"):
        mgr.allocate("b", [7, 7, 7], PrefixHit(), 3)
    assert "b" not in mgr
    mgr.check_invariants()


def test_stale_hit_is_refused_without_side_effects():
    mgr = KVCacheManager(num_blocks=3, block_size=2)
    start(mgr, "a", [1, 2, 3, 4, 5])
    mgr.free("a")
    hit = mgr.get_prefix_hit([1, 2, 3, 4, 5])
    assert hit.num_tokens == 4
    start(mgr, "b", [8, 8, 8, 8, 8, 8])  # needs all 3 blocks: evicts a's cached blocks
    mgr.free("b")
    with pytest.raises(ValueError, match="stale PrefixHit"):
        mgr.allocate("c", [1, 2, 3, 4, 5], hit, 1)
    assert "c" not in mgr and mgr.usage() == 0.0
    mgr.check_invariants()


@pytest.mark.parametrize(
    "call, error",
    [
        (lambda m: m.allocate("a", [1, 2], PrefixHit(), 1), "already has blocks"),
        (lambda m: m.allocate("z", [1, 2], PrefixHit(), 3), "token_ids has 2"),
        (lambda m: m.allocate("z", [1, 2], PrefixHit(), -1), ">= 0"),
        (lambda m: m.allocate("z", [1, 2, 3], PrefixHit((0,), 3), 0), "malformed"),
        (lambda m: m.append("a", [1, 2], 5), "token_ids has 2"),
    ],
)
def test_caller_bugs_raise_value_error(call, error):
    mgr = KVCacheManager(num_blocks=4, block_size=2)
    start(mgr, "a", [1, 2])
    with pytest.raises(ValueError, match=error):
        call(mgr)
    mgr.check_invariants()


def test_unknown_request():
    mgr = KVCacheManager(num_blocks=4, block_size=2)
    mgr.free("ghost")  # abort of a request that never got blocks: no-op
    for call in (lambda: mgr.block_table("ghost"), lambda: mgr.num_tokens("ghost"), lambda: mgr.can_append("ghost", 1)):
        with pytest.raises(KeyError, match="ghost"):
            call()


# ---- sharing, eviction, reset -----------------------------------------------------------------


def test_concurrent_duplicate_prefix_keeps_the_first_mapping():
    mgr = KVCacheManager(num_blocks=8, block_size=2)
    prompt = [3, 3, 4, 4, 5]
    hit_b = mgr.get_prefix_hit(prompt)  # looked up before "a" computed anything: empty
    table_a = start(mgr, "a", prompt)
    table_b = mgr.allocate("b", prompt, hit_b, len(prompt))
    assert set(table_a).isdisjoint(table_b)
    assert mgr.get_prefix_hit(prompt).block_ids == tuple(table_a[:2])
    mgr.free("a")
    assert mgr.get_prefix_hit(prompt).block_ids == tuple(table_a[:2])  # still a's, now free-cached
    mgr.free("b")
    mgr.check_invariants()
    assert mgr.num_free_blocks == 8


def test_free_evicts_tail_blocks_first():
    mgr = KVCacheManager(num_blocks=4, block_size=2)
    prompt = [1, 2, 3, 4, 5, 6, 7]
    start(mgr, "a", prompt)  # 4 blocks, 3 full
    mgr.free("a")
    assert mgr.get_prefix_hit(prompt + [0]).num_tokens == 6
    start(mgr, "b", [9])  # takes the partial block (recycled first, nothing cached there)
    assert mgr.get_prefix_hit(prompt + [0]).num_tokens == 6
    mgr.append("b", [9, 9, 9], 2)  # one more block: evicts a's deepest cached block
    assert mgr.get_prefix_hit(prompt + [0]).num_tokens == 4
    mgr.check_invariants()


def test_preempted_request_resumes_from_its_own_cached_blocks():
    mgr = KVCacheManager(num_blocks=8, block_size=4)
    tokens = list(range(11))
    table = start(mgr, "a", tokens)
    mgr.free("a")  # preempted
    hit = mgr.get_prefix_hit(tokens)
    assert list(hit.block_ids) == table[:2]
    assert start(mgr, "a", tokens)[:2] == table[:2]
    mgr.check_invariants()


def test_reset_prefix_cache():
    mgr = KVCacheManager(num_blocks=8, block_size=2)
    start(mgr, "a", [1, 2, 3, 4, 5])
    start(mgr, "b", [7, 7, 7])
    mgr.free("b")
    assert mgr.reset_prefix_cache() == 3
    assert mgr.cached_block_hashes() == [] and mgr.get_prefix_hit([1, 2, 3, 4, 5]) == PrefixHit()
    assert mgr.block_table("a") == [0, 1, 2]  # running requests keep their blocks
    mgr.append("a", [1, 2, 3, 4, 5, 6], 1)  # and keep caching what they complete
    assert mgr.cached_block_hashes() == hash_full_blocks([1, 2, 3, 4, 5, 6], 2)[2:]
    mgr.check_invariants()


def test_cached_block_hashes_most_recently_used_first():
    mgr = KVCacheManager(num_blocks=8, block_size=2)
    old = hash_full_blocks([1, 1, 2, 2, 0], 2)
    new = hash_full_blocks([3, 3, 0], 2)
    start(mgr, "old", [1, 1, 2, 2, 0])
    mgr.free("old")  # tail first, so the root block [1, 1] is the most recently freed
    start(mgr, "running", [3, 3, 0])
    assert mgr.cached_block_hashes() == new + [old[0], old[1]]
    assert mgr.cached_block_hashes(limit=2) == new + [old[0]]


def test_usage_counts_used_blocks_only():
    mgr = KVCacheManager(num_blocks=4, block_size=2)
    start(mgr, "a", [1, 2, 3])
    assert mgr.usage() == 0.5
    mgr.free("a")
    assert mgr.usage() == 0.0 and mgr.num_free_blocks == 4  # cached blocks are still free


# ---- protected requests ----------------------------------------------------------------------


def cached_prompt(mgr: KVCacheManager, req_id: str, first: int, *, protect: bool) -> list[int]:
    """Run and free a 2-block prompt (one full, cached block and one partial); its tokens."""
    tokens = [first] * mgr.block_size + [0]
    start(mgr, req_id, tokens)
    mgr.free(req_id, protect=protect)
    return tokens


def is_cached(mgr: KVCacheManager, tokens: list[int]) -> bool:
    return mgr.get_prefix_hit(tokens).num_tokens > 0


def test_protected_requests_blocks_are_evicted_after_every_unprotected_one():
    mgr = KVCacheManager(num_blocks=8, block_size=2)
    vip1 = cached_prompt(mgr, "vip1", 1, protect=True)  # freed first: the oldest
    plain1 = cached_prompt(mgr, "plain1", 2, protect=False)
    vip2 = cached_prompt(mgr, "vip2", 3, protect=True)
    plain2 = cached_prompt(mgr, "plain2", 4, protect=False)  # freed last: the newest
    assert mgr.num_free_blocks == 8 and mgr.usage() == 0.0
    start(mgr, "big", [9] * 11)  # 6 blocks: 4 partial (unhashed) ones, then plain1's, then plain2's
    assert not is_cached(mgr, plain1) and not is_cached(mgr, plain2)
    assert is_cached(mgr, vip1) and is_cached(mgr, vip2)
    mgr.append("big", [9] * 13, 2)  # one more: the oldest protected block goes
    assert not is_cached(mgr, vip1) and is_cached(mgr, vip2)
    mgr.check_invariants()


def test_protected_blocks_hit_by_an_unprotected_request_follow_its_tier():
    mgr = KVCacheManager(num_blocks=6, block_size=2)
    vip = cached_prompt(mgr, "vip", 1, protect=True)
    other = cached_prompt(mgr, "other", 2, protect=True)
    (shared,) = mgr.get_prefix_hit(vip).block_ids
    assert mgr.pool.blocks[shared].protected
    assert start(mgr, "reader", vip)[0] == shared  # resurrected from the protected tier
    mgr.free("reader")  # the last freer is unprotected: the block becomes ordinary
    assert not mgr.pool.blocks[shared].protected and mgr.num_free_blocks == 6
    mgr.check_invariants()
    start(mgr, "big", [9] * 9)  # 5 blocks: the 4 holding nothing, then the once protected one
    assert not is_cached(mgr, vip) and is_cached(mgr, other)
    mgr.check_invariants()


def test_free_protect_applies_to_blocks_it_frees_last():
    mgr = KVCacheManager(num_blocks=6, block_size=2)
    prompt = [1, 1, 0]
    start(mgr, "plain", prompt)
    start(mgr, "vip", prompt)  # shares the full block
    (shared,) = mgr.get_prefix_hit(prompt).block_ids
    mgr.free("vip", protect=True)  # plain still holds it
    assert mgr.pool.blocks[shared].ref_count == 1
    mgr.free("plain")
    assert not mgr.pool.blocks[shared].protected
    start(mgr, "plain", prompt)
    start(mgr, "vip", prompt)
    mgr.free("plain")
    mgr.free("vip", protect=True)  # now vip frees last
    assert mgr.pool.blocks[shared].protected
    mgr.check_invariants()


def test_reset_prefix_cache_forgets_protected_blocks_too():
    mgr = KVCacheManager(num_blocks=8, block_size=2)
    vip = cached_prompt(mgr, "vip", 1, protect=True)
    plain = cached_prompt(mgr, "plain", 2, protect=False)
    assert mgr.reset_prefix_cache() == 2
    assert not is_cached(mgr, vip) and not is_cached(mgr, plain) and mgr.cached_block_hashes() == []
    assert not any(b.protected for b in mgr.pool.blocks) and mgr.num_free_blocks == 8
    mgr.check_invariants()


def test_usage_and_num_free_blocks_count_both_tiers():
    mgr = KVCacheManager(num_blocks=8, block_size=2)
    start(mgr, "vip", [1, 1, 2, 2, 0])  # 3 blocks
    start(mgr, "plain", [3, 3, 0])  # 2 blocks
    assert mgr.num_free_blocks == 3 and mgr.usage() == 5 / 8
    mgr.free("vip", protect=True)
    assert mgr.num_free_blocks == 6 and mgr.usage() == 2 / 8
    mgr.free("plain")
    assert mgr.num_free_blocks == 8 and mgr.usage() == 0.0
    assert mgr.can_allocate(PrefixHit(), 16) and not mgr.can_allocate(PrefixHit(), 17)
    start(mgr, "all", [5] * 16)  # every block, protected ones included
    assert mgr.num_free_blocks == 0 and mgr.usage() == 1.0
    assert set(mgr.cached_block_hashes()) == set(hash_full_blocks([5] * 16, 2))  # every old hash evicted
    mgr.check_invariants()


def test_cached_block_hashes_put_protected_free_blocks_before_ordinary_ones():
    mgr = KVCacheManager(num_blocks=8, block_size=2)
    vip = cached_prompt(mgr, "vip", 1, protect=True)
    plain = cached_prompt(mgr, "plain", 2, protect=False)  # freed later, but evicted sooner
    start(mgr, "running", [3, 3, 0])
    running = hash_full_blocks([3, 3], 2)
    assert mgr.cached_block_hashes() == running + hash_full_blocks(vip, 2) + hash_full_blocks(plain, 2)


# ---- random scheduling against a simulated KV cache -------------------------------------------

TOKENS = st.lists(st.integers(0, 1), min_size=1, max_size=12)


class SchedulerMachine(RuleBasedStateMachine):
    """Plays scheduler; ``kv[block][slot]`` records the prefix whose KV a slot holds."""

    @initialize(
        block_size=st.integers(1, 4), num_blocks=st.integers(1, 12), caching=st.sampled_from([True, True, True, False])
    )
    def setup(self, block_size, num_blocks, caching):
        self.bs = block_size
        self.mgr = KVCacheManager(num_blocks, block_size, enable_prefix_caching=caching)
        self.kv: dict[int, list] = {i: [None] * block_size for i in range(num_blocks)}
        self.running: dict[str, list[int]] = {}  # req_id -> all its tokens
        self.waiting: dict[str, list[int]] = {}  # new or preempted
        self.next_id = 0
        self.history: list[list[int]] = []  # every prompt so far, to share prefixes with

    # -- scheduler actions --

    @rule(tokens=TOKENS)
    def arrive(self, tokens):
        self._add(tokens)

    @precondition(lambda self: self.history)
    @rule(data=st.data(), suffix=TOKENS)
    def arrive_sharing_a_prefix(self, data, suffix):
        # Same system prompt / next chat turn: the common case prefix caching is for.
        earlier = data.draw(st.sampled_from(self.history))
        self._add(earlier[: data.draw(st.integers(0, len(earlier)))] + suffix)

    @precondition(lambda self: self.waiting)
    @rule(data=st.data())
    def schedule_waiting(self, data):
        req_id = data.draw(st.sampled_from(sorted(self.waiting)))
        tokens = self.waiting[req_id]
        hit = self.mgr.get_prefix_hit(tokens)
        assert hit.num_tokens == len(hit.block_ids) * self.bs < len(tokens)
        num_new = data.draw(st.integers(1, len(tokens) - hit.num_tokens))  # chunked prefill
        event("prefix hit" if hit.block_ids else "no prefix hit")
        if not self.mgr.can_allocate(hit, num_new):
            assert self._blocks_for(hit, num_new) > self.mgr.num_free_blocks  # no false refusal
            event("allocation refused")
            return
        table = self.mgr.allocate(req_id, tokens, hit, num_new)
        assert tuple(table[: len(hit.block_ids)]) == hit.block_ids
        self.running[req_id] = self.waiting.pop(req_id)
        self._compute(req_id, hit.num_tokens)

    @precondition(lambda self: self.running)
    @rule(data=st.data(), token=st.integers(0, 1), protect=st.booleans())
    def step_running(self, data, token, protect):
        req_id = data.draw(st.sampled_from(sorted(self.running)))
        tokens = self.running[req_id]
        done = self.mgr.num_tokens(req_id)
        if done == len(tokens):
            tokens.append(token)  # sampled last step; decode it now
        num_new = data.draw(st.integers(1, len(tokens) - done))
        if not self.mgr.can_append(req_id, num_new):
            self._preempt(req_id, protect)  # what the scheduler does on shortage
            event("preempted on shortage")
            return
        old = self.mgr.block_table(req_id)
        new = self.mgr.append(req_id, tokens, num_new)
        assert self.mgr.block_table(req_id) == old + new
        self._compute(req_id, done)

    @precondition(lambda self: self.running)
    @rule(data=st.data(), protect=st.booleans())
    def preempt(self, data, protect):
        self._preempt(data.draw(st.sampled_from(sorted(self.running))), protect)

    @precondition(lambda self: self.running)
    @rule(data=st.data(), protect=st.booleans())
    def finish(self, data, protect):
        req_id = data.draw(st.sampled_from(sorted(self.running)))
        self._free(req_id, protect)
        del self.running[req_id]

    @precondition(lambda self: self.waiting)
    @rule(data=st.data(), protect=st.booleans())
    def abort_waiting(self, data, protect):
        req_id = data.draw(st.sampled_from(sorted(self.waiting)))
        self.mgr.free(req_id, protect=protect)  # never allocated (or already preempted): no-op
        del self.waiting[req_id]

    @rule()
    def reset_prefix_cache(self):
        self.mgr.reset_prefix_cache()

    # -- checks --

    @invariant()
    def bookkeeping(self):
        self.mgr.check_invariants()
        assert 0.0 <= self.mgr.usage() <= 1.0
        used = sum(b.ref_count > 0 for b in self.mgr.pool.blocks)
        assert self.mgr.usage() == used / self.mgr.num_blocks
        assert all(r in self.mgr for r in self.running)
        assert not any(r in self.mgr for r in self.waiting)

    @invariant()
    def every_table_reads_back_its_own_prefix(self):
        for req_id, tokens in self.running.items():
            table, n = self.mgr.block_table(req_id), self.mgr.num_tokens(req_id)
            assert len(table) == math.ceil(n / self.bs) and n <= len(tokens)
            for pos in range(n):
                assert self.kv[table[pos // self.bs]][pos % self.bs] == tuple(tokens[: pos + 1]), (req_id, pos)

    def teardown(self):
        if not hasattr(self, "mgr"):  # failed before setup
            return
        for req_id in list(self.running):
            self.mgr.free(req_id)
        self.mgr.check_invariants()
        assert self.mgr.usage() == 0.0 and self.mgr.num_free_blocks == self.mgr.num_blocks

    # -- helpers --

    def _compute(self, req_id: str, first: int) -> None:
        """The forward pass: write KV for positions ``first ..`` into blocks only this request holds."""
        tokens, table = self.running[req_id], self.mgr.block_table(req_id)
        for pos in range(first, self.mgr.num_tokens(req_id)):
            block = self.mgr.pool.blocks[table[pos // self.bs]]
            assert block.ref_count == 1, f"{req_id} writes into block {block.block_id} shared by others"
            self.kv[block.block_id][pos % self.bs] = tuple(tokens[: pos + 1])

    def _add(self, tokens: list[int]) -> None:
        self.waiting[f"r{self.next_id}"] = tokens
        self.history.append(list(tokens))
        self.next_id += 1

    def _preempt(self, req_id: str, protect: bool) -> None:
        self._free(req_id, protect)
        self.waiting[req_id] = self.running.pop(req_id)

    def _free(self, req_id: str, protect: bool) -> None:
        """Free and check the tier: a cached block this frees last follows ``protect``."""
        blocks = [self.mgr.pool.blocks[i] for i in self.mgr.block_table(req_id)]
        self.mgr.free(req_id, protect=protect)
        for block in blocks:
            if block.ref_count == 0:
                assert block.protected == (protect and block.block_hash is not None), block
                event("freed into the protected tier" if block.protected else "freed into the ordinary tier")

    def _blocks_for(self, hit: PrefixHit, num_new: int) -> int:
        needed = math.ceil((hit.num_tokens + num_new) / self.bs) - len(hit.block_ids)
        return needed + sum(self.mgr.pool.blocks[i].ref_count == 0 for i in hit.block_ids)


SchedulerMachine.TestCase.settings = settings(max_examples=300, stateful_step_count=50, deadline=None)
test_scheduler_state_machine = SchedulerMachine.TestCase
