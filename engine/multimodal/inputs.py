"""What an image becomes on its way into the engine: the contract between the input processor
(front end), the scheduler and KV cache (prefix keys), and the model runner (vision encoder).

A prompt with images carries, next to its token ids, one ``ImageInput`` per image: where its
placeholder tokens sit in the prompt, the patches the vision encoder eats, and a content hash.
The hash stands for the image everywhere an id is needed: a KV block that holds any of an image's
placeholder tokens is keyed by it too (so two screenshots never share blocks, and text before an
image still does), and the runner keeps encoder outputs under it (an image seen again is not
encoded again).

Invariants: images are in prompt order and their placeholder ranges do not overlap;
``prompt_token_ids[offset : offset + num_tokens]`` are all the model's image token id.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True, eq=False)
class ImageInput:
    content_hash: int  # 64-bit blake2b of the decoded pixels (mode, size, RGB bytes) and the processor settings
    offset: int  # index in the prompt of its first placeholder token
    num_tokens: int  # placeholder tokens, = rows of the vision encoder's output (t*h*w / merge**2)
    grid_thw: tuple[int, int, int]  # the patch grid (t, h, w) before the spatial merge
    pixel_values: torch.Tensor  # (t*h*w, C * temporal_patch * patch * patch), as transformers' processor gives them

    @property
    def end(self) -> int:
        """One past the last placeholder token."""
        return self.offset + self.num_tokens


@dataclass(frozen=True, eq=False)
class MultiModalInputs:
    """Everything a prompt's images add to its token ids."""

    images: tuple[ImageInput, ...]  # prompt order
    # (3, P) int64 rope positions (temporal, height, width) of the P prompt tokens, for M-RoPE models;
    # None when the model's rope is one-dimensional. Token i >= P sits at i + mrope_delta on all three.
    mrope_positions: np.ndarray | None = None
    mrope_delta: int = 0

    def extra_keys(self, start: int, end: int) -> tuple[int, ...]:
        """Content hashes of the images with a placeholder token in ``[start, end)`` (a KV block's range)."""
        return tuple(im.content_hash for im in self.images if im.offset < end and im.end > start)
