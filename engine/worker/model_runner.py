"""SchedulerOutput → flat tensors → model → sampler → sampled token ids.

The runner keeps its own copy of every scheduled request (tokens, block table, computed count):
a request arrives in full once (``NewRequestData``) and afterwards only as deltas
(``CachedRequestData``), and the runner appends the tokens it samples itself. This is what lets
the same runner run on every tensor-parallel rank in another process.

Batch layout: the scheduled requests are concatenated in ``num_scheduled_tokens`` order into T
tokens; logits are computed only for the last token of each request whose scheduled chunk
reaches the end of its known tokens (a mid-prompt chunk samples nothing).

Images (vision-language models): a request's ``MultiModalInputs`` arrive with it. A step whose
tokens include image placeholders embeds its tokens itself and writes the vision encoder's rows
over the placeholders (``inputs_embeds``); the encoder runs for an image the first time a step
reaches it, and its output waits in the ``EncoderCache`` for the image's later chunks. M-RoPE
models take (3, T) positions in such steps (the prompt's precomputed table); elsewhere a token's
position is its index plus the request's ``mrope_delta``, one row, so decode steps and their CUDA
graphs are unchanged.

A step is ``launch``ed, then ``finish``ed (``execute`` does both). A step whose sampled rows are
all plain greedy leaves its ids on the device (and on their way to pinned host memory), so the
next step can be launched before they reach the host: a request whose next input is such a
pending token gathers it from the device (``last_ids``) instead of the host list. The tokens are
appended to the runner's requests, in step order, when the step is finished; a launch first
finishes whatever it cannot run ahead of (a sampler step needs the tokens on the host). A structured
request is never plain greedy, so its grammar's mask is always filled after its previous token was
accepted (``structured_state.py``).
"""

from __future__ import annotations

import dataclasses
from collections import deque
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import nn

from pagoda.engine.attention_metadata import AttentionMetadata
from pagoda.engine.layers.sampler import Sampler, SamplingBatch
from pagoda.engine.scheduler_output import ModelRunnerOutput, SchedulerOutput
from pagoda.engine.worker.cuda_graph import DecodeGraphs
from pagoda.engine.worker.image_inputs import ImageEmbedder, image_slices, rope_positions
from pagoda.engine.worker.runner_data import (
    CachedRequestState, DeviceSpan, HostBatch, IdsToHost, ModelInputs, StepHandle,
)
from pagoda.engine.worker.structured_state import StructuredOutputState


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
        encoder_cache_tokens: int = 0,
        load_tokenizer: Callable[[], Any] | None = None,
    ) -> None:
        """``cuda_graph_max_seqs`` > 0 on CUDA captures decode graphs for batches up to that size;
        ``encoder_cache_tokens``: vision-encoder output kept for reuse once no request needs it;
        ``load_tokenizer``: the model's tokenizer, loaded with the first structured request."""
        self.model = model
        self.uses_mrope = bool(getattr(model, "uses_mrope", False))
        self.images = ImageEmbedder(model, device, encoder_cache_tokens)
        self.kv_caches = kv_caches
        self.block_size = block_size
        self.vocab_size = vocab_size
        self.eos_token_ids = eos_token_ids
        self.device = device
        self.max_model_len = max_model_len
        self.sampler = Sampler()
        self.grammars = StructuredOutputState.for_tokenizer(  # on the sampling rank
            load_tokenizer, vocab_size, eos_token_ids, pin_memory=torch.device(device).type == "cuda")
        self.requests: dict[str, CachedRequestState] = {}
        self._unresolved: deque[StepHandle] = deque()  # launched greedy steps whose ids are not on the host
        self._last_ids: torch.Tensor | None = None  # without graphs: the newest greedy step's ids
        self._pinned: list[torch.Tensor | None] = [None, None]
        self._pinned_flip = 0
        self.graphs: DecodeGraphs | None = None
        if device.type == "cuda" and cuda_graph_max_seqs > 0:
            self.graphs = DecodeGraphs(model, kv_caches, block_size, max_model_len, cuda_graph_max_seqs, device)
            self.graphs.capture()

    def execute(self, scheduled: SchedulerOutput) -> ModelRunnerOutput:
        return self.finish(self.launch(scheduled))

    @torch.inference_mode()
    def launch(self, scheduled: SchedulerOutput) -> StepHandle:
        """Queue one step's work on the device. Plain greedy steps return before their ids reach
        the host; any other step samples here (and so waits for the device)."""
        while len(self._unresolved) > 1 or (self._unresolved and not self._runs_ahead(scheduled)):
            self._resolve(self._unresolved[0])
        self._update_states(scheduled)
        if scheduled.is_empty:
            return StepHandle(scheduled, [], ModelRunnerOutput.empty())
        span = DeviceSpan.begin(self.device)  # before the host builds the batch: the device may wait for that too
        host = self._host_batch(scheduled)
        sample_req_ids = [host.req_ids[i] for i in host.rows_to_sample]
        greedy = bool(sample_req_ids) and all(self.requests[r].plain_greedy for r in sample_req_ids)
        ids = None
        if self.graphs is not None and not host.images and host.positions.ndim == 1 and self.graphs.fits(host):
            every_row = len(host.rows_to_sample) == len(host.req_ids)  # else a one-token chunk mid-prompt
            # hidden (B, H): one token per request; ids (B,): the greedy head replayed too, else None
            hidden, ids = self.graphs.run(host, greedy_head=greedy and every_row)
            if ids is None and not every_row:
                hidden = hidden[torch.from_numpy(host.rows_to_sample).to(self.device)]
        else:
            inputs = self._device_inputs(host)
            embeds = self.images.embed(host.images, inputs.input_ids) if host.images else None  # (T, H)
            hidden = self.model(inputs.input_ids, inputs.positions, self.kv_caches, inputs.attn, inputs_embeds=embeds)
            hidden = hidden[inputs.logits_indices]
        for req_id, num_tokens in scheduled.num_scheduled_tokens.items():
            self.requests[req_id].num_computed_tokens += num_tokens
        self.images.release_done(host.images, self.requests)
        if not greedy:  # the sampler (rank 0 under TP), now; or nothing to sample
            logits = self.model.compute_logits(hidden) if sample_req_ids else None  # (S, V) float32
            by_req = self.sample_rows(sample_req_ids, logits) if sample_req_ids else {}
            if span is not None:
                span.stop()
            return StepHandle(scheduled, sample_req_ids, self._output(scheduled, by_req), span=span)
        if ids is None:
            ids = self.model.greedy_tokens(hidden)  # (S,)
            if self.graphs is not None:
                self.graphs.last_ids[: len(ids)].copy_(ids)  # where the next step's graphs look
        if span is not None:
            span.stop()
        handle = StepHandle(scheduled, sample_req_ids, ids=IdsToHost(ids, self._pinned_ids(len(ids))), span=span)
        for row, req_id in enumerate(sample_req_ids):
            self.requests[req_id].pending = (handle, row)
        self._last_ids = ids
        self._unresolved.append(handle)
        return handle

    def finish(self, handle: StepHandle) -> ModelRunnerOutput:
        """The step's sampled tokens (waiting for the device if they are still there); steps are
        finished in launch order, each with its time on the device (waited for: a step that sampled nothing
        would otherwise return before it ran)."""
        while handle.output is None:
            self._resolve(self._unresolved[0])
        if handle.span is not None:
            handle.output = dataclasses.replace(handle.output, device_seconds=handle.span.seconds())
            handle.span = None
        return handle.output

    def _runs_ahead(self, scheduled: SchedulerOutput) -> bool:
        """Whether ``scheduled`` can launch before the unresolved step's tokens reach the host: only
        plain greedy requests (the sampler reads every row's output tokens on the host, and a grammar's
        mask needs its row's previous token accepted, so a step with a structured row never runs ahead)."""
        return all(new.sampling_params.plain_greedy for new in scheduled.new_reqs) and all(
            self.requests[d.req_id].plain_greedy for d in scheduled.cached_reqs if d.req_id in self.requests
        )

    def _resolve(self, handle: StepHandle) -> None:
        """Bring the oldest unresolved step's ids to the host and append them to its requests."""
        self._unresolved.popleft()
        by_req = {}
        for req_id, token_id in zip(handle.sample_req_ids, handle.ids.tolist(), strict=True):
            by_req[req_id] = (token_id, None)
            state = self.requests.get(req_id)
            if state is None:  # dropped since (finished, aborted, preempted): nothing to keep
                continue
            state.append(token_id)
            if state.pending is not None and state.pending[0] is handle:
                state.pending = None
        handle.output, handle.ids = self._output(handle.scheduled, by_req), None

    def _pinned_ids(self, num: int) -> torch.Tensor | None:
        """One of two pinned buffers, alternately: at most two steps are unresolved at once."""
        if self.device.type != "cuda":
            return None
        self._pinned_flip ^= 1
        buf = self._pinned[self._pinned_flip]
        if buf is None or len(buf) < num:
            buf = self._pinned[self._pinned_flip] = torch.empty(max(num, 64), dtype=torch.long, pin_memory=True)
        return buf

    @property
    def last_ids(self) -> torch.Tensor | None:
        """The newest greedy step's ids on the device, indexed by ``CachedRequestState.pending``."""
        return self.graphs.last_ids if self.graphs is not None else self._last_ids

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
            self.images.drop(req_id)
            self.grammars.drop(req_id)
        for new in scheduled.new_reqs:
            self.grammars.drop(new.req_id)  # resumed: a fresh matcher replays its outputs
            self.requests[new.req_id] = CachedRequestState(
                list(new.token_ids), new.num_prompt_tokens, new.sampling_params, list(new.block_ids),
                new.num_computed_tokens, mm=new.mm,
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
        # A pending token (a running-ahead step's sample) is a request's last and only scheduled token,
        # at position len(token_ids); its id is gathered on the device (pending_src), 0 stands in here.
        pending_rows = [row for row, s in enumerate(states) if s.pending is not None]
        if int(cu[-1]) == len(req_ids):  # pure decode: one token per request, at index context_len
            seq_of_token = np.arange(len(req_ids))
            token_idx = context_lens
            input_ids = np.array(
                [s.token_ids[c] if c < len(s.token_ids) else 0 for s, c in zip(states, context_lens.tolist())],
                dtype=np.int64,
            )
        else:
            # token indices: for each request, context_len .. context_len + query_len - 1, flattened.  # (T,)
            seq_of_token = np.repeat(np.arange(len(req_ids)), query_lens)
            token_idx = np.arange(cu[-1]) - (cu - query_lens)[seq_of_token] + context_lens[seq_of_token]
            input_ids = np.concatenate(
                [np.asarray(s.token_ids[c : c + q] or [0], dtype=np.int64)
                 for s, c, q in zip(states, context_lens.tolist(), query_lens.tolist(), strict=True)]
            )
        pending_src = None
        if pending_rows:
            pending_src = np.full(len(input_ids), -1, dtype=np.int64)
            for row in pending_rows:
                pending_src[cu[row] - 1] = states[row].pending[1]
        max_blocks = max(len(s.block_ids) for s in states)
        block_tables = np.zeros((len(req_ids), max_blocks), dtype=np.int32)
        for row, state in enumerate(states):
            block_tables[row, : len(state.block_ids)] = state.block_ids
        slot_mapping = (
            block_tables[seq_of_token, token_idx // self.block_size].astype(np.int64) * self.block_size
            + token_idx % self.block_size
        )
        known = np.array([len(s.token_ids) + (s.pending is not None) for s in states])
        mm_rows = [row for row, s in enumerate(states) if s.mm is not None]
        return HostBatch(
            req_ids=req_ids, input_ids=input_ids,
            positions=(
                rope_positions(states, mm_rows, token_idx, seq_of_token, context_lens, query_lens, cu)
                if self.uses_mrope else token_idx
            ),
            slot_mapping=slot_mapping, query_lens=query_lens, context_lens=context_lens, seq_lens=seq_lens,
            block_tables=block_tables, rows_to_sample=np.nonzero(seq_lens == known)[0], pending_src=pending_src,
            images=image_slices(req_ids, states, mm_rows, context_lens, query_lens, cu),
        )

    @property
    def encoder_stats(self):
        """The vision encoder's ``EncoderStats`` (images encoded, reused, device time)."""
        return self.images.stats

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
        input_ids = torch.from_numpy(host.input_ids).to(dev)
        if host.pending_src is not None:  # the previous step's samples, still on the device
            rows = np.nonzero(host.pending_src >= 0)[0]
            input_ids[torch.from_numpy(rows).to(dev)] = self.last_ids[torch.from_numpy(host.pending_src[rows]).to(dev)]
        return ModelInputs(
            input_ids=input_ids,
            positions=torch.from_numpy(host.positions).to(dev),
            attn=attn,
            logits_indices=torch.from_numpy(cu[host.rows_to_sample] - 1).to(dev),
        )

    def _output(self, scheduled: SchedulerOutput, by_req: dict) -> ModelRunnerOutput:
        """The step's result from {req_id: (token_id, logprobs)} of its sampled rows."""
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
        params, outputs = [s.sampling_params for s in states], [s.output_token_ids for s in states]
        # Filled on the host while the device may still run this step's forward (structured rows only).
        grammar = self.grammars.mask(sample_req_ids, params, outputs)
        batch = SamplingBatch.build(
            params, [s.prompt_token_ids for s in states], outputs, self.eos_token_ids, self.vocab_size,
            logits.device, grammar,
        )
        token_ids, logprobs = self.sampler(logits, batch)
        if grammar is not None:
            token_ids = self.grammars.accept(sample_req_ids, token_ids)
        for state, token_id in zip(states, token_ids):
            state.append(token_id)
        return dict(zip(sample_req_ids, zip(token_ids, logprobs)))
