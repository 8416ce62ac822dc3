"""GLM-4.1V (``Glm4vForConditionalGeneration``, AutoGLM-Phone-9B): images through transformers' own
GLM-4.1V image processor (PIL backend, settings from the model folder's preprocessor_config.json),
placeholders and M-RoPE positions as transformers' ``Glm4vProcessor`` and ``Glm4vModel.get_rope_index``
make them.

An image is resized to multiples of patch * merge (28) pixels with at most ``size["longest_edge"]``
pixels (counted over the two temporal frames an image is repeated into), cut into 14x14 patches,
and expands to (h / 2) * (w / 2) ``<|image|>`` tokens after the 2x2 merge. The chat template writes
``<|begin_of_image|><|image|><|end_of_image|>``; the single ``<|image|>`` is what gets expanded.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from pagoda.engine.config import MultiModalConfig
from pagoda.engine.multimodal.image_io import to_rgb
from pagoda.engine.multimodal.inputs import ImageInput, MultiModalInputs
from pagoda.engine.multimodal.processor import (
    MultiModalProcessor,
    check_placeholders,
    content_hash,
    expand_placeholders,
    image_field,
)


class Glm4vMultiModalProcessor(MultiModalProcessor):
    """GLM-4.1V's images: transformers' PIL image processor for the patches, its smart resize capped at
    ``MultiModalConfig.image_resize_max_pixels`` (default: the folder's ``size["longest_edge"]``)."""

    def __init__(self, path: str | Path, hf_config: Any, config: MultiModalConfig) -> None:
        self.image_token_id = int(hf_config.image_token_id)
        self._hf = load_pil_image_processor(path)
        vision = hf_config.vision_config
        self.merge = int(vision.spatial_merge_size)
        theirs = (self._hf.patch_size, self._hf.temporal_patch_size, self._hf.merge_size)
        ours = (vision.patch_size, vision.temporal_patch_size, vision.spatial_merge_size)
        if tuple(theirs) != tuple(ours):
            raise ValueError(
                f"{path}: preprocessor_config.json (patch, temporal patch, merge) = {theirs} disagrees with "
                f"config.json's vision_config {ours}"
            )
        longest = config.image_resize_max_pixels or _size_value(self._hf.size, "longest_edge")
        # passed on every call rather than set on the processor: the same on every transformers version
        self._kwargs = {"size": {"shortest_edge": _size_value(self._hf.size, "shortest_edge"), "longest_edge": longest}}
        self._settings = self._settings_key()

    def num_image_tokens(self, width: int, height: int) -> int:
        # a ValueError for a size the resize refuses (aspect ratio over 200); the caller names the image
        return self._hf.get_number_of_image_patches(height, width, dict(self._kwargs)) // self.merge**2

    def process(self, token_ids: list[int], images: Sequence[Image.Image]) -> tuple[list[int], MultiModalInputs]:
        check_placeholders(token_ids, self.image_token_id, len(images))
        encoded = [self._encode(i, image) for i, image in enumerate(images)]
        counts = [t * h * w // self.merge**2 for _, _, (t, h, w) in encoded]
        ids, offsets = expand_placeholders(token_ids, self.image_token_id, counts)
        inputs = tuple(
            ImageInput(content_hash=key, offset=offset, num_tokens=n, grid_thw=grid, pixel_values=pixels)
            for (key, pixels, grid), offset, n in zip(encoded, offsets, counts)
        )
        positions, delta = mrope_positions(len(ids), [(im.offset, im.grid_thw) for im in inputs], self.merge)
        return ids, MultiModalInputs(inputs, positions, delta)

    def _encode(self, index: int, image: Image.Image) -> tuple[int, torch.Tensor, tuple[int, int, int]]:
        """(content hash, pixel_values (t*h*w, 3*2*14*14) float32, grid (t, h, w)) of the prompt's image ``index``."""
        field = image_field(index)
        image = to_rgb(image, field)
        try:
            out = self._hf(images=[image], return_tensors="pt", **self._kwargs)
        except ValueError as e:  # smart_resize refuses an aspect ratio over 200
            raise ValueError(f"{field} ({image.width}x{image.height}): {e}") from None
        grid = tuple(int(x) for x in out["image_grid_thw"][0])
        pixels = out["pixel_values"].to(torch.float32).contiguous()
        return content_hash(image, self._settings), pixels, grid

    def _settings_key(self) -> bytes:
        """Everything besides the pixels that changes an image's encoder input."""
        hf = self._hf
        settings = {
            "model": "glm4v", "size": self._kwargs["size"], "patch": hf.patch_size, "temporal": hf.temporal_patch_size,
            "merge": hf.merge_size, "resample": str(hf.resample), "rescale": [hf.do_rescale, hf.rescale_factor],
            "normalize": [hf.do_normalize, list(hf.image_mean), list(hf.image_std)],
        }
        return json.dumps(settings, sort_keys=True).encode()


def mrope_positions(
    num_tokens: int, images: Sequence[tuple[int, tuple[int, int, int]]], merge: int
) -> tuple[np.ndarray, int]:
    """``(positions (3, num_tokens) int64, delta)`` as ``Glm4vModel.get_rope_index`` computes them for
    a prompt whose images sit at ``(offset, grid_thw)``.

    Text tokens count up on all three rows. An image starting at rope position s puts its
    merged-grid token (t, row, col) at (s + t, s + row, s + col); the text after it resumes at
    s + max(rows, cols). ``delta`` = max position + 1 - num_tokens: token i >= num_tokens sits at i + delta.
    """
    positions = np.empty((3, num_tokens), dtype=np.int64)
    cursor = pos = 0  # next token index, next rope position
    for offset, (t, h, w) in images:
        positions[:, cursor:offset] = pos + np.arange(offset - cursor)
        pos += offset - cursor
        rows, cols = h // merge, w // merge
        grid = np.indices((t, rows, cols)).reshape(3, -1)  # (3, t*rows*cols): t, row, col of each token
        positions[:, offset : offset + grid.shape[1]] = pos + grid
        cursor, pos = offset + grid.shape[1], pos + max(rows, cols)
    positions[:, cursor:] = pos + np.arange(num_tokens - cursor)
    delta = int(positions.max()) + 1 - num_tokens if num_tokens else 0
    return positions, delta


def load_pil_image_processor(path: str | Path) -> Any:
    """transformers' GLM-4.1V image processor with the model folder's preprocessor_config.json, PIL
    backend (the reference implementation; no torchvision needed)."""
    import transformers

    # Named, not found through AutoImageProcessor(backend="pil"): transformers 5.17 refuses
    # AutoImageProcessor altogether without torchvision. Before the backend split the slow
    # Glm4vImageProcessor was the PIL one.
    cls = getattr(transformers, "Glm4vImageProcessorPil", None) or transformers.Glm4vImageProcessor
    try:
        return cls.from_pretrained(str(path))
    except OSError as e:
        raise ValueError(f"{path}: cannot load the image processor (preprocessor_config.json): {e}") from e


def _size_value(size: Any, key: str) -> int:
    """``size[key]`` of a processor's size, a dict or a SizeDict depending on the transformers version."""
    value = size.get(key) if isinstance(size, dict) else getattr(size, key, None)
    if value is None:
        raise ValueError(f"the image processor's size has no {key!r}: {size}")
    return int(value)
