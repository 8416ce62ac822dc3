"""What a model-runner step adds for prompts with images: where their placeholder tokens fall in the
flat batch, the M-RoPE positions of their prompt tokens, and the embeddings that replace the
placeholders (the vision encoder's output, kept in the ``EncoderCache``).

``image_slices`` and ``rope_positions`` are pure functions of the step's host arrays;
``ImageEmbedder`` owns the encoder cache and runs the vision tower (``SupportsImages.encode_images``)
for the images a step reaches that no cache entry holds, all of them in one call.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch

from pagoda.engine.multimodal.inputs import ImageInput
from pagoda.engine.worker.encoder_cache import EncoderCache, EncoderStats


@dataclass(frozen=True)
class ImageSlice:
    """Placeholder tokens of one image that a step computes: batch rows ``row:row + count`` take the
    encoder's output rows ``start:start + count``."""

    req_id: str
    image: ImageInput
    row: int  # first token of the slice in the step's flat batch
    start: int  # first of the image's tokens in the slice
    count: int


def image_slices(req_ids, states, mm_rows, context_lens, query_lens, cu) -> tuple[ImageSlice, ...]:
    """The image placeholder tokens among the step's tokens: request ``states[row]`` computes tokens
    ``context_lens[row] : + query_lens[row]``, at batch rows ending before ``cu[row]``; ``mm_rows``
    are the rows whose request has images."""
    pieces = []
    for row in mm_rows:
        begin, end = int(context_lens[row]), int(context_lens[row] + query_lens[row])
        first = int(cu[row] - query_lens[row])
        for image in states[row].mm.images:
            lo, hi = max(begin, image.offset), min(end, image.end)
            if lo < hi:
                pieces.append(ImageSlice(req_ids[row], image, first + lo - begin, lo - image.offset, hi - lo))
    return tuple(pieces)


def rope_positions(states, mm_rows, token_idx, seq_of_token, context_lens, query_lens, cu) -> np.ndarray:
    """M-RoPE positions of a step's tokens (T,): the token index plus the request's ``mrope_delta``;
    (3, T) when a request's prompt tokens with table positions are in the step (read from
    ``MultiModalInputs.mrope_positions``; the other rows repeat the one-row position)."""
    if not mm_rows:
        return token_idx
    deltas = np.zeros(len(states), dtype=np.int64)
    deltas[mm_rows] = [states[row].position_delta for row in mm_rows]
    positions = token_idx + deltas[seq_of_token]
    table_rows = [row for row in mm_rows if states[row].needs_position_table(int(context_lens[row]))]
    if not table_rows:
        return positions
    positions = np.repeat(positions[None, :], 3, axis=0)  # (3, T)
    for row in table_rows:
        table, start = states[row].mm.mrope_positions, int(context_lens[row])
        first = int(cu[row] - query_lens[row])
        count = min(int(query_lens[row]), table.shape[1] - start)
        positions[:, first : first + count] = table[:, start : start + count]
    return positions


class ImageEmbedder:
    def __init__(self, model, device: torch.device, cache_tokens: int) -> None:
        """``model``: a ``SupportsImages`` model (only called when a step has image tokens);
        ``cache_tokens``: encoder output kept for reuse once no request needs it."""
        self.model = model
        self.device = device
        self.cache = EncoderCache(cache_tokens)
        self._events: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []  # encoder calls not yet timed

    def embed(self, pieces: tuple[ImageSlice, ...], input_ids: torch.Tensor) -> torch.Tensor:
        """The step's token embeddings (T, H) with each slice's rows replaced by its image's encoder output."""
        self._encode_missing(pieces)
        embeds = self.model.embed_input_ids(input_ids)  # (T, H)
        for piece in pieces:
            rows = self.cache.get(piece.image.content_hash)[piece.start : piece.start + piece.count]
            embeds[piece.row : piece.row + piece.count] = rows
        return embeds

    def release_done(self, pieces: tuple[ImageSlice, ...], requests: Mapping) -> None:
        """After a step: an image whose last placeholder token is computed is no longer needed by its request."""
        for piece in pieces:
            if requests[piece.req_id].num_computed_tokens >= piece.image.end:
                self.cache.release(piece.req_id, piece.image.content_hash)

    def drop(self, req_id: str) -> None:
        """The request left the runner (finished, aborted, preempted): it holds no image any more."""
        self.cache.release(req_id)

    @property
    def stats(self) -> EncoderStats:
        """Encodes and reuses so far, with the device time of every finished encoder call added in."""
        for start, end in self._events:
            end.synchronize()
            self.cache.stats.encode_seconds += start.elapsed_time(end) / 1000
        self._events.clear()
        return self.cache.stats

    def _encode_missing(self, pieces: tuple[ImageSlice, ...]) -> None:
        missing: dict[int, ImageInput] = {}
        stats = self.cache.stats
        for piece in pieces:
            content_hash = piece.image.content_hash
            first_use = content_hash not in self.cache.holds(piece.req_id)
            self.cache.hold(piece.req_id, content_hash)
            if content_hash in self.cache:
                stats.images_reused += first_use
            else:
                missing[content_hash] = piece.image
        if not missing:
            return
        images = list(missing.values())
        pixels = torch.cat([im.pixel_values for im in images]).to(self.device, non_blocking=True)
        started = self._start_timer()
        outputs = self.model.encode_images(pixels, [im.grid_thw for im in images])  # one (N_i, H) per image
        self._stop_timer(started)
        for image, out in zip(images, outputs, strict=True):
            self.cache.put(image.content_hash, out)
            stats.images_encoded += 1
            stats.tokens_encoded += image.num_tokens

    def _start_timer(self):
        """On CUDA a pair of events, read when the stats are (no sync inside a step); else a clock."""
        if self.device.type != "cuda":
            return time.perf_counter()
        events = (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
        events[0].record()
        return events

    def _stop_timer(self, started) -> None:
        if isinstance(started, float):
            self.cache.stats.encode_seconds += time.perf_counter() - started
            return
        started[1].record()
        self._events.append(started)
        if len(self._events) > 32:  # long finished: fold them into the stats
            _ = self.stats
