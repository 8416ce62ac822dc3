"""GLM-4.1V (``Glm4vForConditionalGeneration``; AutoGLM-Phone-9B): GLM-4's decoder with M-RoPE, plus a
vision tower (``glm4v_vision.py``).

The decoder is ``Glm4ForCausalLM``'s (sandwich norms, interleaved partial RoPE, q/k/v biased), split
over tensor-parallel ranks the same way; its only difference is the rotary embedding: M-RoPE
(``MRotaryEmbedding``, chosen from ``ModelSpec.rope``'s ``mrope_section``), so ``forward`` takes
positions (3, T) for prompts with images, or (T,) for text-only prompts and decode steps. The vision
tower is replicated on every rank.

A prompt with images goes in as ``inputs_embeds``: ``embed_input_ids(prompt)`` with the rows at
``image_token_id`` replaced by ``encode_images``' rows, in prompt order.

Checkpoints: transformers 5 names the parts ``model.language_model.*``, ``model.visual.*`` and
``lm_head.weight``; the older layout (``model.layers.*``, ``model.embed_tokens.*``, ``model.norm.*``,
``visual.*``) loads too.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import ClassVar

import torch

from pagoda.engine.distributed import SINGLE_RANK, TPGroup
from pagoda.engine.models.base import SupportsImages
from pagoda.engine.models.glm4 import GlmForCausalLM
from pagoda.engine.models.glm4v_vision import Glm4vVisionModel
from pagoda.engine.models.spec import ModelSpec


def parameter_name(checkpoint_name: str) -> str:
    """A checkpoint name, in either layout, -> the name of our parameter (before packed-module routing):
    the decoder under ``model.``, the vision tower under ``visual.``."""
    if checkpoint_name.startswith("model.language_model."):
        return "model." + checkpoint_name.removeprefix("model.language_model.")
    if checkpoint_name.startswith("model.visual."):
        return checkpoint_name.removeprefix("model.")
    return checkpoint_name


class Glm4vForConditionalGeneration(GlmForCausalLM, SupportsImages):
    uses_mrope: ClassVar[bool] = True
    unquantized_modules: ClassVar[tuple[str, ...]] = ("visual",)  # the vision tower stays in the model's dtype

    def __init__(self, spec: ModelSpec, tp: TPGroup = SINGLE_RANK):
        if spec.vision is None or spec.image_token_id is None or spec.mrope_section is None:
            raise ValueError(
                f"{spec.architecture} needs a config with vision_config, image_token_id and rope mrope_section"
            )
        super().__init__(spec, tp)
        self.visual = Glm4vVisionModel(spec.vision)
        self.image_token_id = spec.image_token_id

    def encode_images(self, pixel_values: torch.Tensor, grid_thw: Sequence[tuple[int, int, int]]) -> list[torch.Tensor]:
        """See ``SupportsImages.encode_images``."""
        return self.visual(pixel_values, grid_thw)

    def dummy_image(self, num_tokens: int) -> tuple[torch.Tensor, tuple[int, int, int]]:
        """See ``SupportsImages.dummy_image``: a near-square grid of merged tokens, one frame."""
        vision, param = self.spec.vision, next(self.visual.parameters())
        rows = max(1, math.isqrt(num_tokens))
        cols = max(1, num_tokens // rows)
        grid = (1, rows * vision.spatial_merge_size, cols * vision.spatial_merge_size)
        patch = vision.in_channels * vision.temporal_patch_size * vision.patch_size**2
        return torch.zeros(grid[1] * grid[2], patch, dtype=param.dtype, device=param.device), grid

    def parameter_for(self, checkpoint_name: str) -> tuple[str, object]:
        """See ``CausalLM.parameter_for``: either checkpoint layout (``parameter_name``), then GLM's routes."""
        return super().parameter_for(parameter_name(checkpoint_name))
