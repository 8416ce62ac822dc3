"""Vision-encoder outputs on the device, keyed by image content hash.

A prompt's image is encoded when the first chunk that reaches one of its placeholder tokens is
scheduled; with chunked prefill the image's later chunks need the same rows again, so the request
*holds* the entry until its prefill has passed the image. Released entries stay, least recently
used first out, while they fit in ``capacity_tokens``: an image seen again (the same screenshot
in another request, a preempted request recomputed) is not encoded again.

Invariant: an entry some request holds is never evicted; ``tokens_unheld`` <= ``capacity_tokens``
after every ``release``.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch


@dataclass
class EncoderStats:
    images_encoded: int = 0
    tokens_encoded: int = 0
    images_reused: int = 0  # found in the cache instead of encoded
    encode_seconds: float = 0.0  # host wall time of encoder calls (device-synchronised on CUDA)


class EncoderCache:
    def __init__(self, capacity_tokens: int) -> None:
        self.capacity_tokens = capacity_tokens
        self._entries: OrderedDict[int, torch.Tensor] = OrderedDict()  # hash -> (num_tokens, hidden); LRU order
        self._holders: dict[int, set[str]] = {}  # hash -> requests that still need it
        self._held_by: dict[str, set[int]] = {}  # request -> hashes it holds
        self.stats = EncoderStats()

    def __contains__(self, content_hash: int) -> bool:
        return content_hash in self._entries

    def get(self, content_hash: int) -> torch.Tensor | None:
        emb = self._entries.get(content_hash)
        if emb is not None:
            self._entries.move_to_end(content_hash)
        return emb

    def put(self, content_hash: int, embeddings: torch.Tensor) -> None:
        self._entries[content_hash] = embeddings
        self._entries.move_to_end(content_hash)

    def hold(self, req_id: str, content_hash: int) -> None:
        """``req_id`` needs the entry until it releases it (its prefill passed the image, or it was dropped)."""
        self._holders.setdefault(content_hash, set()).add(req_id)
        self._held_by.setdefault(req_id, set()).add(content_hash)

    def release(self, req_id: str, content_hash: int | None = None) -> None:
        """Drop ``req_id``'s hold on one entry, or on all of them (``content_hash`` None); then evict
        unheld entries beyond capacity."""
        hashes = self._held_by.get(req_id, set())
        for h in [content_hash] if content_hash is not None else list(hashes):
            hashes.discard(h)
            holders = self._holders.get(h)
            if holders is not None:
                holders.discard(req_id)
                if not holders:
                    del self._holders[h]
        if not hashes:
            self._held_by.pop(req_id, None)
        self._evict()

    def holds(self, req_id: str) -> set[int]:
        return set(self._held_by.get(req_id, ()))

    @property
    def tokens_unheld(self) -> int:
        return sum(len(e) for h, e in self._entries.items() if h not in self._holders)

    def _evict(self) -> None:
        unheld = [h for h in self._entries if h not in self._holders]  # least recently used first
        excess = sum(len(self._entries[h]) for h in unheld) - self.capacity_tokens
        for h in unheld:
            if excess <= 0:
                break
            excess -= len(self._entries.pop(h))
