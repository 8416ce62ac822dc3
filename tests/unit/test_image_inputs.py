"""The image pieces of a runner step and of the KV cache, in pure Python: prefix-cache keys with
image hashes, the encoder cache's holds and eviction, where a step's image tokens fall, and M-RoPE
positions of a step."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import torch

from pagoda.engine.kv_cache.block_hash import hash_block_tokens, hash_full_blocks
from pagoda.engine.kv_cache.manager import KVCacheManager
from pagoda.engine.multimodal.inputs import ImageInput, MultiModalInputs
from pagoda.engine.sampling_params import SamplingParams
from pagoda.engine.worker.encoder_cache import EncoderCache
from pagoda.engine.worker.image_inputs import image_slices, rope_positions
from pagoda.engine.worker.runner_data import CachedRequestState

IMG = 99  # the image placeholder id in these prompts


def _image(content_hash: int, offset: int, num_tokens: int) -> ImageInput:
    return ImageInput(content_hash, offset, num_tokens, (1, 2, 2 * num_tokens), torch.zeros(4 * num_tokens, 8))


def _prompt(image_hash: int, before: int = 10, image: int = 8, after: int = 6) -> tuple[list[int], MultiModalInputs]:
    ids = list(range(1, before + 1)) + [IMG] * image + list(range(50, 50 + after))
    return ids, MultiModalInputs((_image(image_hash, before, image),))


def test_text_only_keys_do_not_change():
    ids = list(range(40))
    assert hash_full_blocks(ids, 8, extra_keys=None) == hash_full_blocks(ids, 8)
    assert hash_block_tokens(None, ids[:8], ()) == hash_block_tokens(None, ids[:8])
    assert hash_block_tokens(None, ids[:8], (5,)) != hash_block_tokens(None, ids[:8])


def test_blocks_holding_an_image_are_keyed_by_it():
    """Same ids, other pixels: the blocks before the image are shared, none from the image's first block on."""
    kv = KVCacheManager(num_blocks=32, block_size=4)
    ids, first = _prompt(image_hash=1)
    _, second = _prompt(image_hash=2)
    hit = kv.get_prefix_hit(ids, first.extra_keys)
    kv.allocate("a", ids, hit, len(ids), first.extra_keys)
    assert kv.get_prefix_hit(ids, second.extra_keys).num_tokens == 8  # blocks 0, 1; block 2 holds image tokens
    assert kv.get_prefix_hit(ids, first.extra_keys).num_tokens == 20  # the same image: all but the last block
    assert kv.get_prefix_hit(ids).num_tokens == 8  # no image keys (the router's view): text only
    kv.allocate("b", ids, kv.get_prefix_hit(ids, second.extra_keys), len(ids) - 8, second.extra_keys)
    kv.check_invariants()
    assert len(set(kv.block_table("a")[2:]) & set(kv.block_table("b")[2:])) == 0


def test_appended_blocks_keep_the_requests_image_keys():
    kv = KVCacheManager(num_blocks=32, block_size=4)
    ids, mm = _prompt(image_hash=7)
    kv.allocate("a", ids, kv.get_prefix_hit(ids, mm.extra_keys), 12, mm.extra_keys)  # a chunk: blocks 0-2
    kv.append("a", ids, len(ids) - 12)  # the rest, keyed with the table's image keys
    kv.free("a")
    assert kv.get_prefix_hit(ids, mm.extra_keys).num_tokens == 20


def test_encoder_cache_keeps_held_entries_and_evicts_released_ones_lru():
    cache = EncoderCache(capacity_tokens=10)
    for h, n in ((1, 6), (2, 6), (3, 6)):
        cache.put(h, torch.zeros(n, 2))
        cache.hold(f"r{h}", h)
    assert cache.tokens_unheld == 0 and all(h in cache for h in (1, 2, 3))  # held: nothing evicted
    cache.release("r1")
    cache.release("r2")
    assert 1 not in cache and 2 in cache  # 12 unheld tokens > 10: the least recently used went
    cache.get(2)  # now more recently used than 3
    cache.release("r3", 3)
    assert 2 in cache and 3 not in cache and cache.tokens_unheld == 6
    assert cache.holds("r3") == set()


def _state(ids: list[int], mm: MultiModalInputs | None, computed: int) -> CachedRequestState:
    return CachedRequestState(list(ids), len(ids), SamplingParams(), [0], computed, mm=mm)


def test_image_slices_cover_exactly_the_image_tokens_in_the_step():
    ids, mm = _prompt(image_hash=3, before=10, image=8)
    states = [_state([1, 2, 3], None, 2), _state(ids, mm, 6)]  # row 1 computes tokens 6..13: image 10..13
    query_lens = np.array([1, 8])
    cu = np.cumsum(query_lens)
    (piece,) = image_slices(["t", "m"], states, [1], np.array([2, 6]), query_lens, cu)
    assert (piece.req_id, piece.row, piece.start, piece.count) == ("m", 1 + 4, 0, 4)
    (piece,) = image_slices(["t", "m"], states, [1], np.array([2, 14]), np.array([1, 8]), np.array([1, 9]))
    assert (piece.row, piece.start, piece.count) == (1, 4, 4)  # the image's second half, then text


def test_rope_positions_read_the_prompt_table_then_add_the_delta():
    table = np.array([[0, 1, 2, 2, 2, 4], [0, 1, 2, 2, 3, 4], [0, 1, 2, 3, 2, 4]])  # a 2x2-ish image at 2..4
    mm = MultiModalInputs((), mrope_positions=table, mrope_delta=-1)
    states = [_state([1] * 6, mm, 4), _state([1, 2, 3], None, 1)]
    query_lens = np.array([3, 2])  # row 0: tokens 4, 5 of the prompt, then 6 (a sampled token); row 1: 1, 2
    token_idx = np.array([4, 5, 6, 1, 2])
    seq_of_token = np.array([0, 0, 0, 1, 1])
    positions = rope_positions(states, [0], token_idx, seq_of_token, np.array([4, 1]), query_lens, np.cumsum(query_lens))
    np.testing.assert_array_equal(positions, [[2, 4, 5, 1, 2], [3, 4, 5, 1, 2], [2, 4, 5, 1, 2]])
    decode = rope_positions(states, [0], np.array([7, 3]), np.array([0, 1]), np.array([7, 3]), np.array([1, 1]),
                            np.array([1, 2]))
    np.testing.assert_array_equal(decode, [6, 3])  # one row past the prompt: index + delta


def test_rope_positions_without_images_are_the_token_indices():
    states = [SimpleNamespace(mm=None)]
    idx = np.arange(5)
    assert rope_positions(states, [], idx, np.zeros(5, dtype=np.int64), np.array([0]), np.array([5]), np.array([5])) is idx
