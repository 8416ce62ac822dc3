"""The model runner's data: what it keeps per request (``CachedRequestState``) and what one step is on its
way through it: the flat batch on the host (``HostBatch``), its device inputs (``ModelInputs``) and the
launched step (``StepHandle``, with greedy ids still on their way to the host: ``IdsToHost``, and its device time:
``DeviceSpan``)."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from pagoda.engine.attention_metadata import AttentionMetadata
from pagoda.engine.multimodal.inputs import MultiModalInputs
from pagoda.engine.sampling_params import SamplingParams
from pagoda.engine.scheduler_output import ModelRunnerOutput, SchedulerOutput
from pagoda.engine.worker.image_inputs import ImageSlice


@dataclass
class CachedRequestState:
    token_ids: list[int]  # prompt + sampled tokens, as far as this runner knows
    num_prompt_tokens: int
    sampling_params: SamplingParams
    block_ids: list[int]
    num_computed_tokens: int
    prompt_token_ids: list[int] = field(init=False)  # views the sampler reads every step, kept
    output_token_ids: list[int] = field(init=False)  # in step with token_ids instead of sliced per step
    plain_greedy: bool = field(init=False)  # argmax of the raw logits is all its sampling needs
    pending: tuple[StepHandle, int] | None = None  # its newest token, not on the host yet: (step, row in last_ids)
    mm: MultiModalInputs | None = None  # its prompt's images

    @property
    def position_delta(self) -> int:
        """Rope position minus token index past the prompt (M-RoPE compresses an image's positions)."""
        return self.mm.mrope_delta if self.mm is not None else 0

    def needs_position_table(self, num_computed: int) -> bool:
        """Whether tokens from ``num_computed`` on include prompt tokens with M-RoPE positions."""
        table = self.mm.mrope_positions if self.mm is not None else None
        return table is not None and num_computed < table.shape[1]

    def __post_init__(self) -> None:
        self.prompt_token_ids = self.token_ids[: self.num_prompt_tokens]
        self.output_token_ids = self.token_ids[self.num_prompt_tokens :]
        self.plain_greedy = self.sampling_params.plain_greedy

    def append(self, token_id: int) -> None:
        self.token_ids.append(token_id)
        self.output_token_ids.append(token_id)


@dataclass(frozen=True)
class HostBatch:
    """One step's flat batch as host arrays, before any device copy (B requests, T tokens)."""

    req_ids: list[str]  # (B,) batch order
    input_ids: np.ndarray  # (T,) int64
    positions: np.ndarray  # (T,) int64 rope positions; (3, T) for an M-RoPE step with image prompt tokens
    slot_mapping: np.ndarray  # (T,) int64
    query_lens: np.ndarray  # (B,) int64
    context_lens: np.ndarray  # (B,) int64
    seq_lens: np.ndarray  # (B,) int64
    block_tables: np.ndarray  # (B, max_blocks) int32, padded with 0
    rows_to_sample: np.ndarray  # (S,) rows whose chunk reaches the end of their known tokens
    pending_src: np.ndarray | None  # (T,) int64: index into the last step's device ids, -1 for host ids; None if none
    images: tuple[ImageSlice, ...] = ()  # image placeholder tokens in this step (then inputs are embedded here)

    @property
    def is_decode_only(self) -> bool:
        return len(self.input_ids) == len(self.req_ids)


class IdsToHost:
    """Sampled ids (S,) on their way to the host: on CUDA an asynchronous copy into pinned memory
    and an event; elsewhere the tensor itself."""

    def __init__(self, ids: torch.Tensor, pinned: torch.Tensor | None) -> None:
        self.ids, self.pinned, self.event = ids, pinned, None
        if pinned is not None:
            pinned[: len(ids)].copy_(ids, non_blocking=True)
            self.event = torch.cuda.Event()
            self.event.record()

    def tolist(self) -> list[int]:
        if self.event is None:
            return self.ids.tolist()
        self.event.synchronize()
        return self.pinned[: len(self.ids)].tolist()


class DeviceSpan:
    """A step's time on the device: from when the device reaches its first work (or the host queues it, if
    later) to its last. Its sampled ids reach the host after the end, so ``seconds`` never waits.

    This is what the step costs the requests in it: the time the device spends waiting for the step's
    own host work (an eager prefill launching kernel by kernel) is in, the previous step's is not. The
    host's clock cannot tell them apart with async scheduling, where step n + 1 is launched before step
    n's result is taken."""

    def __init__(self) -> None:
        self.start, self.end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        self.start.record()

    @classmethod
    def begin(cls, device: torch.device) -> DeviceSpan | None:
        """A span started now on ``device``'s current stream; None off CUDA (the host's clock is the device's)."""
        return cls() if device.type == "cuda" else None

    def stop(self) -> None:
        self.end.record()

    def seconds(self) -> float:
        """Waits for the end (a step that sampled nothing may still be running)."""
        self.end.synchronize()
        return self.start.elapsed_time(self.end) / 1000


@dataclass(eq=False)
class StepHandle:
    """A launched step: its result, or the greedy ids it waits for (``ModelRunner.finish``)."""

    scheduled: SchedulerOutput
    sample_req_ids: list[str]
    output: ModelRunnerOutput | None = None  # set once the tokens are on the host
    ids: IdsToHost | None = None  # greedy ids still on their way
    span: DeviceSpan | None = None  # its device time, read when it is finished


@dataclass(frozen=True)
class ModelInputs:
    input_ids: torch.Tensor  # (T,) int64
    positions: torch.Tensor  # (T,) or (3, T) int64
    attn: AttentionMetadata
    logits_indices: torch.Tensor  # (S,) int64: rows of the hidden states to sample from
