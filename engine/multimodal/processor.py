"""A vision-language model's image processing: decoded images and a prompt's token ids in, the
expanded token ids and ``MultiModalInputs`` (patches, placeholder ranges, content hashes, rope
positions) out.

Each model family has one ``MultiModalProcessor``, found by the HF ``architectures`` name in a lazy
string registry (the same shape as ``engine/models/registry.py``); a text-only architecture has
none. The helpers below are what every family shares: checking and expanding the placeholders,
and hashing an image's content.
"""

from __future__ import annotations

import abc
import hashlib
import importlib
import struct
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from PIL import Image

from pagoda.engine.config import MultiModalConfig
from pagoda.engine.multimodal.inputs import MultiModalInputs

# HF architecture -> its processor class as "module:Class", imported on first use
_PROCESSORS: dict[str, str] = {
    "Glm4vForConditionalGeneration": "pagoda.engine.multimodal.glm4v:Glm4vMultiModalProcessor",  # GLM-4.1V
}


class MultiModalProcessor(abc.ABC):
    """Turns a prompt's images into model inputs. Stateless after construction (thread-safe): the
    asyncio engine runs ``process`` on worker threads."""

    image_token_id: int  # the placeholder token: one per image in a prompt, ``num_tokens`` of them after ``process``

    @abc.abstractmethod
    def num_image_tokens(self, width: int, height: int) -> int:
        """Placeholder tokens an image of ``width x height`` pixels expands to (after the model's resize);
        ValueError for a size the model cannot take."""

    @abc.abstractmethod
    def process(
        self, token_ids: list[int], images: Sequence[Image.Image]
    ) -> tuple[list[int], MultiModalInputs]:
        """``token_ids`` with each image's single placeholder expanded to its ``num_tokens``, and the
        images' inputs. ``token_ids`` hold exactly one ``image_token_id`` per image, in order;
        ValueError naming both counts otherwise, or naming the image a model cannot take
        (``image_field(i)``, e.g. an aspect ratio the model's resize refuses)."""


def make_mm_processor(path: str | Path, hf_config: Any, config: MultiModalConfig) -> MultiModalProcessor | None:
    """The processor of the model in HF folder ``path`` (config ``hf_config``), or None for a text-only
    architecture."""
    architectures = getattr(hf_config, "architectures", None) or [None]
    entry = _PROCESSORS.get(architectures[0])
    if entry is None:
        return None
    module, _, name = entry.partition(":")
    return getattr(importlib.import_module(module), name)(path, hf_config, config)


def image_field(index: int) -> str:
    """How an error names a prompt's image ``index``: the engine's request field for it."""
    return f"multi_modal_data.image[{index}]"


def check_placeholders(token_ids: Sequence[int], image_token_id: int, num_images: int) -> None:
    """ValueError unless ``token_ids`` hold exactly one ``image_token_id`` per image."""
    found = sum(1 for t in token_ids if t == image_token_id)
    if found != num_images:
        raise ValueError(
            f"the prompt has {found} image placeholder(s) (token id {image_token_id}) but {num_images} image(s) "
            f"were given; each image needs exactly one placeholder, in order"
        )


def expand_placeholders(
    token_ids: Sequence[int], image_token_id: int, counts: Sequence[int]
) -> tuple[list[int], list[int]]:
    """``(ids, offsets)``: each placeholder repeated ``counts[i]`` times, and where image i's run begins."""
    ids: list[int] = []
    offsets: list[int] = []
    for t in token_ids:
        if t == image_token_id:
            offsets.append(len(ids))
            ids.extend([image_token_id] * counts[len(offsets) - 1])
        else:
            ids.append(t)
    return ids, offsets


def content_hash(image: Image.Image, settings: bytes) -> int:
    """64-bit blake2b (unsigned, little-endian like the KV block keys) of an RGB image's mode, size
    and pixel bytes and of ``settings``, the processor settings that shape its model inputs: equal
    hashes mean equal encoder inputs."""
    h = hashlib.blake2b(digest_size=8)
    h.update(struct.pack("<I", len(settings)) + settings)
    h.update(image.mode.encode() + b"\x00" + struct.pack("<II", *image.size))
    h.update(image.tobytes())
    return int.from_bytes(h.digest(), "little")
