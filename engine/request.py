"""One request's state inside the engine, and what the engine hands back (vLLM names).

State machine::

    WAITING ──schedule──► RUNNING ──stop / length──► FINISHED_STOPPED / FINISHED_LENGTH
       ▲                     │
       └──── PREEMPTED ◄─────┘  (blocks freed; recomputed from its tokens when rescheduled)
    any state ──abort──► FINISHED_ABORTED

Invariant: ``num_computed_tokens <= num_tokens + num_pending_outputs``; the KV of the first
``num_computed_tokens`` tokens is in the request's blocks, or being written by a scheduled step,
while it is RUNNING. ``num_pending_outputs`` counts tokens that scheduled steps will sample but
whose ids the engine has not seen yet (at most 2: with async scheduling a step is scheduled
while the previous one runs).
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from pagoda.engine.sampling_params import SamplingParams

if TYPE_CHECKING:
    from pagoda.engine.kv_cache.block_hash import ExtraKeys
    from pagoda.engine.multimodal.inputs import MultiModalInputs


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    PREEMPTED = "preempted"
    FINISHED_STOPPED = "stop"
    FINISHED_LENGTH = "length"
    FINISHED_ABORTED = "abort"

    @property
    def is_finished(self) -> bool:
        return self in (RequestStatus.FINISHED_STOPPED, RequestStatus.FINISHED_LENGTH, RequestStatus.FINISHED_ABORTED)

    @property
    def finish_reason(self) -> str | None:
        """OpenAI's finish_reason for a finished status, else None."""
        return self.value if self.is_finished else None


@dataclass(eq=False)
class Request:
    """A single sequence being generated. A prompt with ``n > 1`` becomes n Requests."""

    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    eos_token_ids: tuple[int, ...]  # the model's end-of-sequence ids (several for Llama 3)
    arrival_time: float = field(default_factory=time.monotonic)
    priority: int = 0  # lower value runs first (vLLM convention)
    mm: MultiModalInputs | None = None  # the prompt's images (placeholders already expanded in prompt_token_ids)
    tenant: str | None = None  # whose share it spends under the fair-share policy
    status: RequestStatus = RequestStatus.WAITING
    output_token_ids: list[int] = field(default_factory=list)
    output_logprobs: list = field(default_factory=list)  # one entry per output token when logprobs were asked
    num_computed_tokens: int = 0  # tokens whose KV is in the cache or scheduled to be written
    num_pending_outputs: int = 0  # tokens scheduled steps will sample, not yet known here
    num_cached_tokens: int = -1  # prefix-cache hit at first scheduling; -1 until then
    num_preemptions: int = 0
    num_reported_tokens: int = 0  # output tokens already handed on (``CoreOutput``)
    stop_reason: int | str | None = None  # the stop token id or stop string that ended it
    first_token_time: float | None = None
    _all_token_ids: list[int] = field(init=False, repr=False)  # prompt + output, kept in step (no concat per step)

    def __post_init__(self) -> None:
        self._all_token_ids = list(self.prompt_token_ids) + list(self.output_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def all_token_ids(self) -> list[int]:
        """Prompt and output tokens; the engine's own list: read it, don't mutate it."""
        return self._all_token_ids

    @property
    def is_finished(self) -> bool:
        return self.status.is_finished

    @property
    def extra_keys(self) -> ExtraKeys:
        """What its KV blocks' prefix-cache keys hold besides tokens: its images' content hashes."""
        return self.mm.extra_keys if self.mm is not None else None

    def append_output_token(self, token_id: int, logprobs=None) -> None:
        self.output_token_ids.append(token_id)
        self._all_token_ids.append(token_id)
        if logprobs is not None:
            self.output_logprobs.append(logprobs)
        if self.first_token_time is None:
            self.first_token_time = time.monotonic()

    def ends_with_pending_outputs(self, max_model_len: int) -> bool:
        """Whether the tokens already being sampled take it to max_tokens or the context end, so a
        further step would be wasted (async scheduling: nothing more is scheduled for it)."""
        pending = self.num_pending_outputs
        return pending > 0 and (
            self.num_output_tokens + pending >= self.sampling_params.max_tokens
            or self.num_tokens + pending >= max_model_len
        )

    def check_token_stop(self, max_model_len: int) -> RequestStatus | None:
        """Token-level stops after the newest token: EOS, stop_token_ids, max_tokens, context end."""
        params = self.sampling_params
        last = self.output_token_ids[-1]
        if params.structured is not None and last in self.eos_token_ids:
            # Its grammar allowed EOS, so the output is a complete match and the matcher has terminated: it
            # allows nothing but EOS from here, so it stops whatever ignore_eos and min_tokens ask.
            return RequestStatus.FINISHED_STOPPED
        if self.num_output_tokens >= params.min_tokens:
            if last in self.eos_token_ids and not params.ignore_eos:
                return RequestStatus.FINISHED_STOPPED
            if last in params.stop_token_ids:
                self.stop_reason = last
                return RequestStatus.FINISHED_STOPPED
        if self.num_output_tokens >= params.max_tokens or self.num_tokens >= max_model_len:
            return RequestStatus.FINISHED_LENGTH
        return None


@dataclass
class Logprob:
    logprob: float
    rank: int | None = None  # 1 is the most likely token
    decoded_token: str | None = None


@dataclass
class CompletionOutput:
    index: int  # which of the n completions
    text: str  # everything generated so far (the delta when streaming with delta output)
    token_ids: list[int]
    cumulative_logprob: float | None = None
    logprobs: list[dict[int, Logprob]] | None = None  # per output token: token id -> Logprob
    finish_reason: str | None = None  # "stop", "length", "abort", or None while running
    stop_reason: int | str | None = None  # the stop string or token id that ended it

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache

    def followed_by(self, later: RequestOutput) -> RequestOutput:
        """This delta output and the next one of the same request as one delta (a stream that fell
        behind sends what is queued in one message): text, tokens and logprobs concatenated per
        completion; finish state, cumulative logprob and cached count from ``later``."""
        mine = {c.index: c for c in self.outputs}
        theirs = {c.index for c in later.outputs}
        outputs = [c for c in self.outputs if c.index not in theirs]  # news only in the earlier output
        for c in later.outputs:
            before = mine.get(c.index)
            if before is None:
                outputs.append(c)
                continue
            logprobs = None if before.logprobs is None and c.logprobs is None else [*(before.logprobs or ()),
                                                                                   *(c.logprobs or ())]
            outputs.append(CompletionOutput(c.index, before.text + c.text, before.token_ids + c.token_ids,
                                            c.cumulative_logprob, logprobs, c.finish_reason, c.stop_reason))
        outputs.sort(key=lambda c: c.index)
        return RequestOutput(self.request_id, self.prompt, self.prompt_token_ids, outputs, later.finished,
                             later.num_cached_tokens)
