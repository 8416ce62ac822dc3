"""Prompt in, validated request out — before anything touches engine state.

``process`` is free of side effects, so the asyncio engine runs it on the caller's thread and a
bad request fails right there with a ValueError naming the field and the limit; only valid
requests reach the scheduler.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Union

from pagoda.engine.sampling_params import SamplingParams

PromptType = Union[str, list[int], dict]  # text, token ids, or {"prompt": ...} / {"prompt_token_ids": ...}


@dataclass(frozen=True)
class PreparedRequest:
    request_id: str
    prompt: str | None  # the text, when the prompt came as text
    prompt_token_ids: list[int]
    params: SamplingParams
    priority: int  # lower runs first
    arrival_time: float  # time.monotonic() at arrival


class InputProcessor:
    def __init__(self, tokenizer, vocab_size: int, max_model_len: int) -> None:
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.max_model_len = max_model_len

    def process(
        self,
        request_id: str,
        prompt: PromptType,
        params: SamplingParams | None = None,
        priority: int = 0,
        arrival_time: float | None = None,
    ) -> PreparedRequest:
        params = params if params is not None else SamplingParams()
        if not isinstance(params, SamplingParams):
            raise ValueError(f"sampling_params must be a SamplingParams, got {type(params).__name__}")
        if not isinstance(request_id, str) or not request_id:
            raise ValueError("request_id must be a non-empty string")
        if not isinstance(priority, int) or isinstance(priority, bool):
            raise ValueError(f"priority must be an integer, got {priority!r}")
        text, token_ids = self._tokenize(prompt)
        self._check_token_ids(token_ids)
        params.validate_for_model(len(token_ids), self.vocab_size, self.max_model_len)
        arrival = time.monotonic() if arrival_time is None else arrival_time
        return PreparedRequest(request_id, text, token_ids, params, priority, arrival)

    def _tokenize(self, prompt: PromptType) -> tuple[str | None, list[int]]:
        if isinstance(prompt, dict):
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
    def _as_ids(ids) -> list[int]:
        if not isinstance(ids, (list, tuple)) or not all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
            raise ValueError("prompt_token_ids must be a list of integers")
        return list(ids)

    def _check_token_ids(self, token_ids: list[int]) -> None:
        if not token_ids:
            raise ValueError("prompt must not be empty")
        bad = next((t for t in token_ids if not 0 <= t < self.vocab_size), None)
        if bad is not None:
            raise ValueError(f"prompt_token_ids must be in [0, vocab_size={self.vocab_size}), got {bad}")
