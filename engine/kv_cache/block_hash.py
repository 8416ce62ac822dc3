"""Chained content hashes of KV blocks, the keys of the prefix cache.

A full block's KV depends on every token before it, not only on its own tokens, so its key is
``hash(parent_key, own tokens)``: equal keys mean equal prefixes. Partial blocks have no key.

Invariants:
- Deterministic across processes, machines and Python versions (the router process computes the
  same keys from a prompt): blake2b over a fixed little-endian layout, never Python's ``hash()``.
- ``hash_full_blocks(t, bs)[i] == hash_block_tokens(key of block i-1, t[i*bs:(i+1)*bs])``, so a
  chain can be continued from any block with ``start_block`` and ``parent_hash``.
- A block whose KV depends on more than its tokens (an image's placeholder tokens stand for the
  image's pixels) adds ``extra`` keys, the content hashes of those inputs; a block with none hashes
  exactly as before, so text-only keys do not depend on whether a model takes images.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Callable, Sequence

_NO_PARENT = b"\x00"  # first block of a sequence
_HAS_PARENT = b"\x01"  # a tag byte keeps "no parent" distinct from any parent key
_EXTRA = b"\x02"  # after the tokens: the block's extra keys follow

# (start, end) token range of a block -> the content hashes of the non-text inputs its tokens stand
# for (``MultiModalInputs.extra_keys``); None for a text-only request
ExtraKeys = Callable[[int, int], tuple[int, ...]] | None


def hash_block_tokens(parent_hash: int | None, token_ids: Sequence[int], extra: Sequence[int] = ()) -> int:
    """Key of one block: 64-bit blake2b of (parent key, token ids, extra keys), as an unsigned int."""
    h = hashlib.blake2b(digest_size=8)
    h.update(_NO_PARENT if parent_hash is None else _HAS_PARENT + struct.pack("<Q", parent_hash))
    h.update(struct.pack(f"<{len(token_ids)}q", *token_ids))
    if extra:
        h.update(_EXTRA + struct.pack(f"<{len(extra)}Q", *extra))
    return int.from_bytes(h.digest(), "little")


def hash_full_blocks(
    token_ids: Sequence[int],
    block_size: int,
    start_block: int = 0,
    parent_hash: int | None = None,
    extra_keys: ExtraKeys = None,
) -> list[int]:
    """Keys of the full blocks ``start_block, start_block + 1, ...`` of ``token_ids``.

    ``parent_hash`` is the key of block ``start_block - 1`` (None when starting at block 0).
    A trailing partial block gets no key.
    """
    if start_block > 0 and parent_hash is None:
        raise ValueError(f"start_block={start_block} needs the parent_hash of block {start_block - 1}")
    hashes: list[int] = []
    for block in range(start_block, len(token_ids) // block_size):
        parent_hash = hash_block(token_ids, block_size, block, parent_hash, extra_keys)
        hashes.append(parent_hash)
    return hashes


def hash_block(
    token_ids: Sequence[int], block_size: int, block: int, parent_hash: int | None, extra_keys: ExtraKeys = None
) -> int:
    """Key of the full block ``block`` of ``token_ids``, whose parent (block - 1) has key ``parent_hash``."""
    start, end = block * block_size, (block + 1) * block_size
    extra = extra_keys(start, end) if extra_keys is not None else ()
    return hash_block_tokens(parent_hash, token_ids[start:end], extra)
