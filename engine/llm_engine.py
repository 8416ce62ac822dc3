"""LLMEngine: requests in, RequestOutputs out, one ``step()`` at a time.

    step_core = schedule → execute on the ranks → update requests → CoreOutputs (token ids)
    step      = step_core → detokenize and emit (OutputProcessor) → RequestOutputs

Engine cores (``pagoda.engine.engine_core``) drive ``add_prepared(prepared)`` and ``step_core``: their
front detokenizes, in its own thread or process (``pagoda.engine.core_output``). ``LLM`` and tests
drive ``add_prepared(prepared, kind)`` and ``step``, which detokenizes here. One engine is driven one
way: a request added without an output kind never shows up in ``step``'s outputs.

With ``async_scheduling`` a step keeps one step in flight: it schedules and submits step n+1,
then takes step n's result (which the ranks send once step n+1 is queued behind it on the
device), so everything the host does between two forwards overlaps the device's work. Left at
None it is on where the executor's steps run apart from the engine's thread (``overlaps_host``):
a CUDA device or TP ranks, not a single CPU rank.

The engine is synchronous and single-threaded; ``AsyncLLMEngine`` drives it from one thread and
``LLM`` drives it in a loop. Values resolved at start-up (context length, KV block count) live in
a resolved copy of the config, never by mutating the one passed in.
"""

from __future__ import annotations

import dataclasses
import time
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass

from pagoda.engine.config import EngineConfig, resolve_max_model_len
from pagoda.engine.core_output import CoreOutput
from pagoda.engine.errors import EngineDeadError, QueueFullError
from pagoda.engine.executor import Executor, make_executor
from pagoda.engine.input_processor import InputProcessor, PreparedRequest, PromptType
from pagoda.engine.kv_cache.manager import KVCacheManager
from pagoda.engine.loader import ResolvedModel, open_model
from pagoda.engine.multimodal.processor import make_mm_processor
from pagoda.engine.output_processor import OutputKind, OutputProcessor, check_ids_free, child_ids
from pagoda.engine.request import Request, RequestOutput, RequestStatus
from pagoda.engine.sampling_params import SamplingParams
from pagoda.engine.scheduler import Scheduler
from pagoda.engine.scheduler_output import SchedulerOutput


@dataclass(frozen=True)
class EngineStats:
    """A snapshot for routers, metrics and `pagoda status`."""

    num_running: int
    num_waiting: int
    kv_cache_usage: float  # fraction of KV blocks in use
    num_blocks: int
    num_preemptions: int  # since start
    prefix_cache_queries: int  # prompt tokens looked up, since start
    prefix_cache_hits: int  # of which found in the cache
    max_running: int  # this step's limits (engine/slo.py): the configured ones, or what the SLO controller set
    prefill_budget: int


class LLMEngine:
    def __init__(self, config: EngineConfig) -> None:
        self.model, self.tokenizer = open_model(config.model)  # the executor and every rank get self.model
        self.config = resolve_config(config, self.model.hf_config)
        self.max_model_len = self.config.model.max_model_len
        self.eos_token_id = self.model.eos_token_ids[0] if self.model.eos_token_ids else None
        self.executor = make_executor(self.config, self.model)
        self.config = _resolve_async_scheduling(self.config, self.executor)
        self._dead: EngineDeadError | None = None  # set when the executor failed; every later step re-raises it
        try:
            self.num_blocks = self.executor.initialize()
            _check_capacity(self.config, self.num_blocks)
        except BaseException:
            self.executor.shutdown()  # TP ranks must not outlive a failed start
            raise
        cache = self.config.cache
        self.kv = KVCacheManager(self.num_blocks, cache.block_size, cache.enable_prefix_caching)
        self.scheduler = Scheduler(self.config.scheduler, self.kv, self.max_model_len)
        self.inputs = make_input_processor(self.config, self.model, self.tokenizer)
        self.outputs = OutputProcessor(self.tokenizer, config.scheduler.stream_interval)  # for step() only
        self._children: dict[str, list[str]] = {}  # prompt id -> its scheduler requests not finished yet
        self._parent_of: dict[str, str] = {}  # scheduler request id -> its prompt's id
        self._in_flight: deque[tuple[SchedulerOutput, float]] = deque()  # submitted (and when), result not taken yet
        self._last_result_at = 0.0  # when the previous step's result was taken: a step runs from max(submit, this)

    @classmethod
    def from_kwargs(cls, **kwargs) -> LLMEngine:
        return cls(EngineConfig.from_kwargs(**kwargs))

    # ------------------------------------------------------------------ requests
    def add_request(
        self,
        request_id: str,
        prompt: PromptType,
        params: SamplingParams | None = None,
        priority: int = 0,
        arrival_time: float | None = None,
        output_kind: OutputKind = OutputKind.CUMULATIVE,
        tenant: str | None = None,
    ) -> None:
        """Validate and queue a prompt; raises ValueError (bad input) or QueueFullError."""
        self.add_prepared(self.inputs.process(request_id, prompt, params, priority, arrival_time, tenant), output_kind)

    def add_prepared(self, prepared: PreparedRequest, output_kind: OutputKind | None = OutputKind.CUMULATIVE) -> None:
        """Queue a validated request. The one admission check of every front end (offline, asyncio, Serve):
        QueueFullError when ``max_waiting`` requests already wait beyond the running batch's free places.
        ``output_kind`` None: the caller turns ``step_core``'s tokens into outputs itself (an engine core's front)."""
        ids = child_ids(prepared.request_id, prepared.params.n)
        # Checked before anything is registered: a refused request must touch nobody else's
        check_ids_free(prepared.request_id, prepared.params.n, lambda i: i in self._children or i in self._parent_of)
        sched = self.config.scheduler
        # The queue is what waits beyond the places the next step can fill: a burst that arrives between two
        # steps is not refused for seats that are free (a replica takes max_num_seqs + max_waiting requests).
        queued = self.scheduler.num_waiting - max(0, sched.max_num_seqs - self.scheduler.num_running)
        if sched.max_waiting is not None and queued >= sched.max_waiting:
            raise QueueFullError(f"waiting queue is full (max_waiting={sched.max_waiting})")
        children = [
            Request(child, list(prepared.prompt_token_ids), _child_params(prepared.params, i), self.model.eos_token_ids,
                    prepared.arrival_time, prepared.priority, prepared.mm, prepared.tenant)
            for i, child in enumerate(ids)
        ]
        if output_kind is not None:
            self.outputs.add(prepared, output_kind)
        self._children[prepared.request_id] = list(ids)
        for child in children:
            self._parent_of[child.request_id] = prepared.request_id
            self.scheduler.add_request(child)

    def abort_request(self, request_ids: str | Iterable[str]) -> None:
        """Drop prompts wherever they are, every completion of each; their KV blocks go back to the pool.
        Unknown ids are ignored (a refused request's id never touches the request it clashed with)."""
        for request_id in [request_ids] if isinstance(request_ids, str) else request_ids:
            self.outputs.remove(request_id)
            for child in list(self._children.get(request_id, ())):
                self._end_child(child, RequestStatus.FINISHED_ABORTED)

    def stop_completions(self, completion_ids: Iterable[str]) -> None:
        """End single completions (``child_ids``' names) that a stop string ended in the front; their prompts'
        other completions go on. Unknown ids are ignored."""
        for child in completion_ids:
            if child in self._parent_of:
                self._end_child(child, RequestStatus.FINISHED_STOPPED)

    def _end_child(self, child: str, status: RequestStatus | None) -> None:
        """Forget a finished scheduler request (``status`` None: the scheduler already finished it)."""
        if status is not None:
            self.scheduler.finish_request(child, status)
        parent = self._parent_of.pop(child, None)
        siblings = self._children.get(parent)
        if siblings is not None:
            siblings.remove(child)
            if not siblings:
                del self._children[parent]

    def has_unfinished_requests(self) -> bool:
        """Requests to serve, or a submitted step whose result is not taken yet."""
        return self.scheduler.has_unfinished_requests() or bool(self._in_flight)

    # ------------------------------------------------------------------ one step
    def step(self) -> list[RequestOutput]:
        """One step, detokenized: the outputs of the requests added with an output kind."""
        outputs, stopped = self.outputs.process(self.step_core())
        self.stop_completions(stopped)
        return outputs

    def step_core(self) -> list[CoreOutput]:
        """One step: every request that got tokens, as token ids (``CoreOutput``)."""
        if self._dead is not None:
            raise EngineDeadError(str(self._dead))
        scheduled = self.scheduler.schedule()
        if not self.config.scheduler.async_scheduling:
            started = time.perf_counter()
            result = self._guarded(self.executor.execute_model, scheduled)
            self.scheduler.step_done(scheduled, time.perf_counter() - started, result.device_seconds)
            return self._news(self.scheduler.update_from_output(scheduled, result))
        self._guarded(self.executor.submit, scheduled)
        self._in_flight.append((scheduled, time.perf_counter()))
        keep = 0 if scheduled.is_empty else 1  # nothing new to overlap with: drain
        news: list[CoreOutput] = []
        while len(self._in_flight) > keep:
            done, submitted_at = self._in_flight.popleft()
            result = self._guarded(self.executor.take_output)
            now = time.perf_counter()
            self.scheduler.step_done(done, now - max(submitted_at, self._last_result_at), result.device_seconds)
            self._last_result_at = now
            news += self._news(self.scheduler.update_from_output(done, result))
        return news

    def _guarded(self, call, *args):
        try:
            return call(*args)
        except EngineDeadError as exc:  # the scheduler already counted this step: its state is now unusable
            self._dead = exc
            raise

    def _news(self, updated: list[Request]) -> list[CoreOutput]:
        news = []
        for request in updated:
            start, request.num_reported_tokens = request.num_reported_tokens, request.num_output_tokens
            logprobs = request.output_logprobs[start:] if request.sampling_params.logprobs is not None else None
            finish_reason = request.status.finish_reason
            news.append(CoreOutput(request.request_id, request.output_token_ids[start:], logprobs, finish_reason,
                                   request.stop_reason, request.num_cached_tokens))
            if finish_reason is not None:
                self._end_child(request.request_id, None)
        return news

    def stats(self) -> EngineStats:
        queries, hits = self.kv.prefix_cache_stats
        return EngineStats(
            self.scheduler.num_running, self.scheduler.num_waiting, self.kv.usage(), self.num_blocks,
            self.scheduler.num_preemptions, queries, hits, self.scheduler.limits.max_running,
            self.scheduler.limits.prefill_budget,
        )

    def shutdown(self) -> None:
        """Release the executor's ranks (processes and ports with TP > 1); safe to call twice."""
        self.executor.shutdown()


def _child_params(params: SamplingParams, index: int) -> SamplingParams:
    """Completion i of n draws from seed + i, so the n completions differ but stay reproducible."""
    if params.seed is None or params.n == 1:
        return params
    return dataclasses.replace(params, seed=(params.seed + index) % 2**63)


def make_input_processor(config: EngineConfig, model: ResolvedModel, tokenizer) -> InputProcessor:
    """The validation and tokenization an engine applies to ``model``'s requests; ``config`` is resolved
    (``resolve_config``). A front in another process than the engine builds its own with this."""
    mm = make_mm_processor(model.path, model.hf_config, config.multimodal)
    return InputProcessor(tokenizer, model.text_config.vocab_size, config.model.max_model_len, mm, config.multimodal)


def resolve_config(config: EngineConfig, hf_config) -> EngineConfig:
    resolved = dataclasses.replace(config.model, max_model_len=resolve_max_model_len(config.model, hf_config))
    return dataclasses.replace(config, model=resolved)


def _resolve_async_scheduling(config: EngineConfig, executor: Executor) -> EngineConfig:
    """``async_scheduling=None`` decided: on where the executor's steps run apart from this thread."""
    if config.scheduler.async_scheduling is not None:
        return config
    scheduler = dataclasses.replace(config.scheduler, async_scheduling=executor.overlaps_host)
    return dataclasses.replace(config, scheduler=scheduler)


def _check_capacity(config: EngineConfig, num_blocks: int) -> None:
    """A request of max_model_len tokens must fit alone, or it could never finish."""
    capacity = num_blocks * config.cache.block_size
    if capacity < config.model.max_model_len:
        raise ValueError(
            f"max_model_len ({config.model.max_model_len}) must be <= the KV cache capacity "
            f"({num_blocks} blocks x {config.cache.block_size} = {capacity} tokens); lower max_model_len or give the cache more memory"
        )
    sched = config.scheduler
    if not sched.enable_chunked_prefill and sched.max_num_batched_tokens < config.model.max_model_len:
        raise ValueError(
            f"max_num_batched_tokens ({sched.max_num_batched_tokens}) must be >= max_model_len "
            f"({config.model.max_model_len}) when chunked prefill is off"
        )
