"""SchedulerOutput → flat tensors → model → sampler → sampled token ids.

The runner keeps its own copy of every scheduled request (tokens, block table, computed count):
a request arrives in full once (``NewRequestData``) and afterwards only as deltas
(``CachedRequestData``), and the runner appends the tokens it samples itself. This is what lets
the same runner run on every tensor-parallel rank in another process.

Batch layout: the scheduled requests are concatenated in ``num_scheduled_tokens`` order into T
tokens; logits are computed only for the last token of each request whose scheduled chunk
reaches the end of its known tokens (a mid-prompt chunk samples nothing).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from engine.attention_metadata import AttentionMetadata
from engine.layers.sampler import Sampler, SamplingBatch
from engine.sampling_params import SamplingParams
from engine.scheduler_output import ModelRunnerOutput, SchedulerOutput
from engine.worker.cuda_graph import DecodeGraphs


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

    def __post_init__(self) -> None:
        self.prompt_token_ids = self.token_ids[: self.num_prompt_tokens]
        self.output_token_ids = self.token_ids[self.num_prompt_tokens :]
        self.plain_greedy = _is_plain_greedy(self.sampling_params)

    def append(self, token_id: int) -> None:
        self.token_ids.append(token_id)
        self.output_token_ids.append(token_id)


def _is_plain_greedy(params: SamplingParams) -> bool:
    """Temperature 0 and nothing that changes or reports the logits: no penalties, bans, logprobs."""
    return (
        params.temperature == 0.0 and params.repetition_penalty == 1.0 and params.frequency_penalty == 0.0
        and params.presence_penalty == 0.0 and params.min_tokens == 0 and params.logprobs is None
    )


@dataclass(frozen=True)
class HostBatch:
    """One step's flat batch as host arrays, before any device copy (B requests, T tokens)."""

    req_ids: list[str]  # (B,) batch order
    input_ids: np.ndarray  # (T,) int64
    positions: np.ndarray  # (T,) int64
    slot_mapping: np.ndarray  # (T,) int64
    query_lens: np.ndarray  # (B,) int64
    context_lens: np.ndarray  # (B,) int64
    seq_lens: np.ndarray  # (B,) int64
    block_tables: np.ndarray  # (B, max_blocks) int32, padded with 0
    rows_to_sample: np.ndarray  # (S,) rows whose chunk reaches the end of their known tokens

    @property
    def is_decode_only(self) -> bool:
        return len(self.input_ids) == len(self.req_ids)


@dataclass(frozen=True)
class ModelInputs:
    input_ids: torch.Tensor  # (T,) int64
    positions: torch.Tensor  # (T,) int64
    attn: AttentionMetadata
    logits_indices: torch.Tensor  # (S,) int64: rows of the hidden states to sample from


class ModelRunner:
    def __init__(
        self,
        model: nn.Module,
        kv_caches: list[torch.Tensor],
        block_size: int,
        vocab_size: int,
        eos_token_ids: tuple[int, ...],
        device: torch.device,
        max_model_len: int = 0,
        cuda_graph_max_seqs: int = 0,
    ) -> None:
        """``cuda_graph_max_seqs`` > 0 on CUDA captures decode graphs for batches up to that size."""
        self.model = model
        self.kv_caches = kv_caches
        self.block_size = block_size
        self.vocab_size = vocab_size
        self.eos_token_ids = eos_token_ids
        self.device = device
        self.max_model_len = max_model_len
        self.sampler = Sampler()
        self.requests: dict[str, CachedRequestState] = {}
        self.graphs: DecodeGraphs | None = None
        if device.type == "cuda" and cuda_graph_max_seqs > 0:
            self.graphs = DecodeGraphs(model, kv_caches, block_size, max_model_len, cuda_graph_max_seqs, device)
            self.graphs.capture()

    @torch.inference_mode()
    def execute(self, scheduled: SchedulerOutput) -> ModelRunnerOutput:
        self._update_states(scheduled)
        if scheduled.is_empty:
            return ModelRunnerOutput.empty()
        host = self._host_batch(scheduled)
        sample_req_ids = [host.req_ids[i] for i in host.rows_to_sample]
        greedy = bool(sample_req_ids) and all(self.requests[r].plain_greedy for r in sample_req_ids)
        if self.graphs is not None and self.graphs.fits(host):
            every_row = len(host.rows_to_sample) == len(host.req_ids)  # else a one-token chunk mid-prompt
            # hidden (B, H): one token per request; ids (B,): the greedy head replayed too, else None
            hidden, ids = self.graphs.run(host, greedy_head=greedy and every_row)
            if ids is not None:
                return self._sample(scheduled, sample_req_ids, greedy_ids=ids)
            if not every_row:
                hidden = hidden[torch.from_numpy(host.rows_to_sample).to(self.device)]
        else:
            inputs = self._device_inputs(host)
            hidden = self.model(inputs.input_ids, inputs.positions, self.kv_caches, inputs.attn)  # (T, H)
            hidden = hidden[inputs.logits_indices]
        if greedy:
            return self._sample(scheduled, sample_req_ids, greedy_ids=self.model.greedy_tokens(hidden))
        return self._sample(scheduled, sample_req_ids, logits=self.model.compute_logits(hidden))  # (S, V) float32

    @torch.inference_mode()
    def warm_up(self, max_num_tokens: int, max_num_seqs: int) -> None:
        """Run each kernel variant a step can need once, so Triton compiles them at start-up and not
        while the first requests wait: the prefill kernel's long- and short-chunk tile configs (a
        mixed batch with a decode row), and eager decode with and without split-K. Nothing is
        written to the KV cache."""
        max_len = self.max_model_len or max_num_tokens
        long_chunk = min(max_num_tokens, max_len, 512)
        decode_rows = max(1, min(max_num_seqs, max_num_tokens))
        batches = [
            ([long_chunk], [0]),
            ([min(16, long_chunk), 1], [0, min(32, max_len - 1)]),
            ([1], [max_len - 1]),
            ([1] * decode_rows, [0] * decode_rows),
        ]
        for query_lens, context_lens in batches:
            attn = AttentionMetadata.dummy(query_lens, context_lens, self.block_size, self.device)
            num_tokens = sum(query_lens)
            ids = torch.zeros(num_tokens, dtype=torch.long, device=self.device)
            positions = torch.cat(
                [torch.arange(c, c + q, device=self.device) for q, c in zip(query_lens, context_lens, strict=True)]
            )
            hidden = self.model(ids, positions, self.kv_caches, attn)
            last = hidden[attn.query_start_loc[1:] - 1]
            self.model.greedy_tokens(last)
            logits = self.model.compute_logits(last)
            if logits is not None:  # None on tensor-parallel ranks other than the first
                logits.argmax(dim=-1)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _update_states(self, scheduled: SchedulerOutput) -> None:
        for req_id in scheduled.finished_req_ids:
            self.requests.pop(req_id, None)
        for new in scheduled.new_reqs:
            self.requests[new.req_id] = CachedRequestState(
                list(new.token_ids), new.num_prompt_tokens, new.sampling_params, list(new.block_ids),
                new.num_computed_tokens,
            )
        for delta in scheduled.cached_reqs:
            state = self.requests[delta.req_id]
            state.block_ids.extend(delta.new_block_ids)
            state.num_computed_tokens = delta.num_computed_tokens

    def _host_batch(self, scheduled: SchedulerOutput) -> HostBatch:
        req_ids = list(scheduled.num_scheduled_tokens)
        states = [self.requests[r] for r in req_ids]
        query_lens = np.fromiter(scheduled.num_scheduled_tokens.values(), dtype=np.int64, count=len(req_ids))
        context_lens = np.array([s.num_computed_tokens for s in states], dtype=np.int64)
        seq_lens = context_lens + query_lens
        cu = np.cumsum(query_lens)
        if int(cu[-1]) == len(req_ids):  # pure decode: one token per request, at position context_len
            seq_of_token = np.arange(len(req_ids))
            positions = context_lens
            input_ids = np.array([s.token_ids[c] for s, c in zip(states, context_lens.tolist())], dtype=np.int64)
        else:
            # positions: for each request, context_len .. context_len + query_len - 1, flattened.  # (T,)
            seq_of_token = np.repeat(np.arange(len(req_ids)), query_lens)
            positions = np.arange(cu[-1]) - (cu - query_lens)[seq_of_token] + context_lens[seq_of_token]
            input_ids = np.concatenate(
                [np.asarray(s.token_ids[c : c + q], dtype=np.int64)
                 for s, c, q in zip(states, context_lens, query_lens, strict=True)]
            )
        max_blocks = max(len(s.block_ids) for s in states)
        block_tables = np.zeros((len(req_ids), max_blocks), dtype=np.int32)
        for row, state in enumerate(states):
            block_tables[row, : len(state.block_ids)] = state.block_ids
        slot_mapping = (
            block_tables[seq_of_token, positions // self.block_size].astype(np.int64) * self.block_size
            + positions % self.block_size
        )
        reaches_end = seq_lens == np.array([len(s.token_ids) for s in states])
        return HostBatch(
            req_ids=req_ids, input_ids=input_ids, positions=positions, slot_mapping=slot_mapping,
            query_lens=query_lens, context_lens=context_lens, seq_lens=seq_lens, block_tables=block_tables,
            rows_to_sample=np.nonzero(reaches_end)[0],
        )

    def _device_inputs(self, host: HostBatch) -> ModelInputs:
        dev = self.device
        cu = np.cumsum(host.query_lens)
        attn = AttentionMetadata(
            slot_mapping=torch.from_numpy(host.slot_mapping).to(dev),
            query_start_loc=torch.from_numpy(np.concatenate([[0], cu]).astype(np.int32)).to(dev),
            seq_lens=torch.from_numpy(host.seq_lens.astype(np.int32)).to(dev),
            context_lens=torch.from_numpy(host.context_lens.astype(np.int32)).to(dev),
            block_tables=torch.from_numpy(host.block_tables).to(dev),
            query_lens_cpu=host.query_lens.tolist(),
            seq_lens_cpu=host.seq_lens.tolist(),
            max_query_len=int(host.query_lens.max()),
            max_seq_len=int(host.seq_lens.max()),
            block_size=self.block_size,
        )
        return ModelInputs(
            input_ids=torch.from_numpy(host.input_ids).to(dev),
            positions=torch.from_numpy(host.positions).to(dev),
            attn=attn,
            logits_indices=torch.from_numpy(cu[host.rows_to_sample] - 1).to(dev),
        )

    def _sample(
        self,
        scheduled: SchedulerOutput,
        sample_req_ids: list[str],
        logits: torch.Tensor | None = None,
        greedy_ids: torch.Tensor | None = None,
    ) -> ModelRunnerOutput:
        """Sample from ``logits`` (S, V) — or take ``greedy_ids`` (S,), the argmax every rank already
        has when all S rows are plain greedy — and append the tokens to the runner's requests."""
        for req_id, num_tokens in scheduled.num_scheduled_tokens.items():
            self.requests[req_id].num_computed_tokens += num_tokens
        if greedy_ids is not None:
            by_req = {}
            for req_id, token_id in zip(sample_req_ids, greedy_ids.tolist(), strict=True):
                self.requests[req_id].append(token_id)
                by_req[req_id] = (token_id, None)
        else:
            by_req = self.sample_rows(sample_req_ids, logits) if sample_req_ids else {}
        req_ids = list(scheduled.num_scheduled_tokens)
        return ModelRunnerOutput(
            req_ids,
            [[by_req[r][0]] if r in by_req else [] for r in req_ids],
            [by_req[r][1] if r in by_req else None for r in req_ids],
        )

    def sample_rows(self, sample_req_ids: list[str], logits: torch.Tensor) -> dict:
        """Sample one token per row of ``logits`` (S, V) and append it to the runner's copy of its
        request; returns {req_id: (token_id, TokenLogprobs | None)}. The extension point for runners
        that sample differently (``TPModelRunner``: rank 0 samples, the other ranks receive)."""
        states = [self.requests[r] for r in sample_req_ids]
        batch = SamplingBatch.build(
            [s.sampling_params for s in states],
            [s.prompt_token_ids for s in states],
            [s.output_token_ids for s in states],
            self.eos_token_ids,
            self.vocab_size,
            logits.device,
        )
        token_ids, logprobs = self.sampler(logits, batch)
        for state, token_id in zip(states, token_ids):
            state.append(token_id)
        return dict(zip(sample_req_ids, zip(token_ids, logprobs)))
