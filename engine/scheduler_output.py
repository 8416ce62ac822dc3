"""The contract between the scheduler (driver) and the model runners (every TP rank).

A request travels in full once (``NewRequestData``), then only as deltas (``CachedRequestData``).
Runners keep their own copy of each request's tokens and block table, append the tokens they
sampled (or received from rank 0), and drop a request when its id shows up in
``finished_req_ids``. A request resumed after preemption is sent in full again.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from pagoda.engine.multimodal.inputs import MultiModalInputs
from pagoda.engine.sampling_params import SamplingParams


@dataclass(frozen=True)
class NewRequestData:
    req_id: str
    token_ids: list[int]  # prompt + outputs so far (outputs are non-empty only after preemption)
    num_prompt_tokens: int  # token_ids[:num_prompt_tokens] is the prompt (for penalties)
    sampling_params: SamplingParams
    block_ids: list[int]  # the full block table, prefix-cache hits first
    num_computed_tokens: int  # tokens already in the cache (prefix-cache hits)
    mm: MultiModalInputs | None = None  # the prompt's images: pixels for the vision encoder, M-RoPE positions


@dataclass(frozen=True)
class CachedRequestData:
    req_id: str
    new_block_ids: list[int]  # blocks appended to the table this step
    num_computed_tokens: int  # tokens in the cache before this step


@dataclass(frozen=True)
class SchedulerOutput:
    new_reqs: list[NewRequestData]
    cached_reqs: list[CachedRequestData]
    num_scheduled_tokens: dict[str, int]  # req_id -> tokens to compute this step, in batch order
    total_num_scheduled_tokens: int
    finished_req_ids: frozenset[str] = field(default_factory=frozenset)  # drop state (finished, aborted, preempted)

    @property
    def is_empty(self) -> bool:
        return self.total_num_scheduled_tokens == 0


@dataclass(frozen=True)
class TokenLogprobs:
    """Logprobs of one sampled token: its own, and the top ones."""

    token_logprob: float
    token_rank: int  # 1 is the most likely
    top_ids: list[int]
    top_logprobs: list[float]


@dataclass(frozen=True)
class ModelRunnerOutput:
    req_ids: list[str]  # batch order
    sampled_token_ids: list[list[int]]  # per request: [] when the step ended mid-prompt (chunked prefill)
    logprobs: list[TokenLogprobs | None]  # per request: None unless asked for and a token was sampled
    device_seconds: float | None = None  # the step's time on a CUDA device (``DeviceSpan``); None elsewhere

    @staticmethod
    def empty() -> "ModelRunnerOutput":
        return ModelRunnerOutput([], [], [])
