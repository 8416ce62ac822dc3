"""Prompt in, validated request out — before anything touches engine state.

``process`` is free of side effects, so a bad request fails on the caller's side with a
ValueError naming the field and the limit; only valid requests reach the scheduler. A prompt with
images (``{"prompt": ..., "multi_modal_data": {"image": ...}}``, vLLM's shape) is decoded,
resized and cut into patches here by the model's ``MultiModalProcessor``: tens of milliseconds
for a phone screenshot, which is why the asyncio engine runs such prompts on a worker thread.
"""

from __future__ import annotations

import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Union

from pagoda.engine.config import MultiModalConfig
from pagoda.engine.multimodal.inputs import MultiModalInputs
from pagoda.engine.sampling_params import SamplingParams

# text, token ids, or {"prompt": ...} / {"prompt_token_ids": ...}, either with "multi_modal_data"
PromptType = Union[str, list[int], dict]
_PROMPT_KEYS = ("prompt", "prompt_token_ids", "multi_modal_data")
_MODALITIES = ("image",)


@dataclass(frozen=True)
class PreparedRequest:
    request_id: str
    prompt: str | None  # the text, when the prompt came as text
    prompt_token_ids: list[int]
    params: SamplingParams
    priority: int  # lower runs first
    arrival_time: float  # time.monotonic() at arrival
    mm: MultiModalInputs | None = None  # the prompt's images; prompt_token_ids hold their expanded placeholders
    tenant: str | None = None  # whose share of the engine it spends (the fair-share policy); None: the default tenant


MAX_TENANT_LEN = 128
_TENANT_CHARS = re.compile(r"[A-Za-z0-9._:@/-]+")


def check_tenant(tenant: str | None) -> None:
    """A tenant is None or a short printable name (it becomes a metrics tag and a scheduler key)."""
    if tenant is None:
        return
    if not isinstance(tenant, str) or not tenant:
        raise ValueError(f"tenant must be a non-empty string, got {tenant!r}"[:200])
    if len(tenant) > MAX_TENANT_LEN:
        raise ValueError(f"tenant must be at most {MAX_TENANT_LEN} characters, got {len(tenant)}")
    if not _TENANT_CHARS.fullmatch(tenant):
        raise ValueError("tenant may hold only letters, digits and . _ : @ / -")


def has_images(prompt: PromptType) -> bool:
    """Whether ``prompt`` carries multi-modal data (and so is worth processing off the event loop)."""
    return isinstance(prompt, dict) and bool(prompt.get("multi_modal_data"))


class InputProcessor:
    def __init__(
        self,
        tokenizer,
        vocab_size: int,
        max_model_len: int,
        mm_processor=None,
        mm_config: MultiModalConfig | None = None,
    ) -> None:
        """``mm_processor``: the model's ``MultiModalProcessor``, None for a text-only model."""
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.max_model_len = max_model_len
        self.mm_processor = mm_processor
        self.mm_config = mm_config or MultiModalConfig()

    def process(
        self,
        request_id: str,
        prompt: PromptType,
        params: SamplingParams | None = None,
        priority: int = 0,
        arrival_time: float | None = None,
        tenant: str | None = None,
    ) -> PreparedRequest:
        params = params if params is not None else SamplingParams()
        if not isinstance(params, SamplingParams):
            raise ValueError(f"sampling_params must be a SamplingParams, got {type(params).__name__}")
        if not isinstance(request_id, str) or not request_id:
            raise ValueError("request_id must be a non-empty string")
        if not isinstance(priority, int) or isinstance(priority, bool):
            raise ValueError(f"priority must be an integer, got {priority!r}")
        check_tenant(tenant)
        images = self._images(prompt)  # decoded first: a bad image is the cheapest error to find
        text, token_ids = self._tokenize(prompt)
        self._check_token_ids(token_ids)
        mm = None
        if images:
            token_ids, mm = self.mm_processor.process(token_ids, images)
        elif self.mm_processor is not None and self.mm_processor.image_token_id in token_ids:
            raise ValueError("prompt has an image placeholder token but multi_modal_data.image gives no image")
        params.validate_for_model(len(token_ids), self.vocab_size, self.max_model_len)
        arrival = time.monotonic() if arrival_time is None else arrival_time
        return PreparedRequest(request_id, text, token_ids, params, priority, arrival, mm, tenant)

    def _images(self, prompt: PromptType) -> list:
        """The prompt's images, decoded and within the limits; [] for a prompt without."""
        if not isinstance(prompt, dict) or prompt.get("multi_modal_data") is None:
            return []
        from pagoda.engine.multimodal.image_io import load_image

        data = prompt["multi_modal_data"]
        if not isinstance(data, dict):
            raise ValueError(f"multi_modal_data must be a dict like {{'image': ...}}, got {type(data).__name__}")
        unknown = sorted(set(data) - set(_MODALITIES))
        if unknown:
            raise ValueError(f"multi_modal_data: {unknown[0]!r} is not supported (supported: {', '.join(_MODALITIES)})")
        items = data.get("image")
        items = list(items) if isinstance(items, Sequence) and not isinstance(items, (str, bytes)) else [items]
        items = [item for item in items if item is not None]
        if items and self.mm_processor is None:
            raise ValueError("multi_modal_data.image: this model does not take images (a text-only architecture)")
        limit = self.mm_config.limit_images_per_prompt
        if len(items) > limit:
            raise ValueError(f"multi_modal_data.image: {len(items)} images, more than limit_images_per_prompt ({limit})")
        return [load_image(item, self.mm_config, f"multi_modal_data.image[{i}]") for i, item in enumerate(items)]

    def _tokenize(self, prompt: PromptType) -> tuple[str | None, list[int]]:
        if isinstance(prompt, dict):
            unknown = sorted(set(prompt) - set(_PROMPT_KEYS))
            if unknown:
                raise ValueError(f"prompt dict: unknown key {unknown[0]!r} (expected {', '.join(_PROMPT_KEYS)})")
            if "prompt_token_ids" in prompt:
                return prompt.get("prompt"), self._as_ids(prompt["prompt_token_ids"])
            if "prompt" in prompt:
                return self._tokenize(prompt["prompt"])
            raise ValueError("prompt dict must have 'prompt' or 'prompt_token_ids'")
        if isinstance(prompt, str):
            if not prompt:
                raise ValueError("prompt must not be empty")
            return prompt, list(self.tokenizer(prompt).input_ids)
        return None, self._as_ids(prompt)

    @staticmethod
    def _as_ids(ids: Any) -> list[int]:
        if not isinstance(ids, (list, tuple)) or not all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
            raise ValueError("prompt_token_ids must be a list of integers")
        return list(ids)

    def _check_token_ids(self, token_ids: list[int]) -> None:
        if not token_ids:
            raise ValueError("prompt must not be empty")
        bad = next((t for t in token_ids if not 0 <= t < self.vocab_size), None)
        if bad is not None:
            raise ValueError(f"prompt_token_ids must be in [0, vocab_size={self.vocab_size}), got {bad}")
