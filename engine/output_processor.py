"""The engine core's token news → RequestOutputs: detokenize, cut stop strings, gather n completions.

The front of the engine runs this (``AsyncLLMEngine``; ``LLMEngine.step`` for offline use), fed the
core's ``CoreOutput``s (``pagoda.engine.core_output``): it keeps each completion's tokens itself and
never reads the scheduler's requests, so it can live in another thread or process than the core.

A prompt with ``n`` completions runs as n scheduler requests (``<id>`` when n == 1, else
``<id>#<i>``); this room keeps them together and reports them as one RequestOutput. Stop strings
are found here, on text; the caller then finishes the request in the core (``process`` returns
which), and news the core sends for it meanwhile is dropped.

Output kinds (vLLM's): ``cumulative`` — all text so far; ``delta`` — only what is new;
``final`` — one output when every completion has finished. Text that might be the start of a stop
string is held back until it is known not to be. Streams (delta, cumulative) emit on a request's
first token, at its end, and otherwise every ``stream_interval`` steps that touched it.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from pagoda.engine.core_output import CoreOutput
from pagoda.engine.detokenizer import IncrementalDetokenizer
from pagoda.engine.input_processor import PreparedRequest
from pagoda.engine.request import CompletionOutput, Logprob, RequestOutput
from pagoda.engine.scheduler_output import TokenLogprobs


class OutputKind(enum.Enum):
    CUMULATIVE = "cumulative"
    DELTA = "delta"
    FINAL = "final"


@dataclass
class _Completion:
    index: int
    detokenizer: IncrementalDetokenizer
    token_ids: list[int] = field(default_factory=list)  # every output token the core sent
    raw_logprobs: list[TokenLogprobs] = field(default_factory=list)  # one per token when logprobs were asked
    num_cached_tokens: int = -1  # the core's prefix-cache hit; -1 until its first news
    text: str = ""  # everything released so far (stop strings cut, possible stop prefixes held back)
    num_tokens_seen: int = 0  # output tokens already fed to the detokenizer
    text_sent: int = 0  # DELTA outputs: characters already emitted
    tokens_sent: int = 0  # DELTA outputs: tokens already emitted
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    lazy: bool = False  # nobody reads text before the end and no stop string needs it: decode once, at the end
    # Logprobs asked: per output token, converted once (tokens decoded once, not on every step).
    logprobs: list[dict[int, Logprob]] = field(default_factory=list)
    cumulative_logprob: float = 0  # token_logprob summed in token order; starts as sum()'s int 0


@dataclass
class _Parent:
    prepared: PreparedRequest
    kind: OutputKind
    completions: dict[str, _Completion] = field(default_factory=dict)  # child request id -> state
    steps_held: int = 0  # steps with news since the last output (stream_interval)
    emitted: bool = False  # an output with tokens went out

    @property
    def finished(self) -> bool:
        return all(c.finish_reason is not None for c in self.completions.values())


def child_ids(request_id: str, n: int) -> list[str]:
    return [request_id] if n == 1 else [f"{request_id}#{i}" for i in range(n)]


def check_ids_free(request_id: str, n: int, taken) -> None:
    """ValueError when the prompt's id or one of its completions' ids is ``taken(id)``. With n > 1 a
    completion's id ("x#1") may name another request ("x#1" sent as an id of its own), or vice versa."""
    clash = next((i for i in (request_id, *child_ids(request_id, n)) if taken(i)), None)
    if clash is not None:
        also = "" if clash == request_id else f" (its completion id {clash!r} is another request's)"
        raise ValueError(f"request_id {request_id!r} is already in use{also}")


class OutputProcessor:
    def __init__(self, tokenizer, stream_interval: int = 1) -> None:
        self.tokenizer = tokenizer
        self.stream_interval = stream_interval
        self._parents: dict[str, _Parent] = {}
        self._parent_of: dict[str, str] = {}

    def add(self, prepared: PreparedRequest, kind: OutputKind) -> None:
        """Track a prompt and its n scheduler requests (ids from ``child_ids``); ValueError, touching nothing,
        when one of those ids is tracked already."""
        check_ids_free(prepared.request_id, prepared.params.n, lambda i: i in self._parents or i in self._parent_of)
        parent = _Parent(prepared, kind)
        lazy = kind is OutputKind.FINAL and not prepared.params.stop
        for index, child in enumerate(child_ids(prepared.request_id, prepared.params.n)):
            detok = IncrementalDetokenizer(self.tokenizer, prepared.prompt_token_ids, prepared.params)
            parent.completions[child] = _Completion(index, detok, lazy=lazy)
            self._parent_of[child] = prepared.request_id
        self._parents[prepared.request_id] = parent

    def has(self, request_id: str) -> bool:
        return request_id in self._parents

    def parent_of(self, child_id: str) -> str | None:
        """The prompt a scheduler request belongs to (None: not tracked, or forgotten)."""
        return self._parent_of.get(child_id)

    def remove(self, request_id: str) -> list[str]:
        """Forget a prompt (finished or aborted); returns its scheduler request ids."""
        parent = self._parents.pop(request_id, None)
        if parent is None:
            return []
        for child in parent.completions:
            self._parent_of.pop(child, None)
        return list(parent.completions)

    def process(self, news: list[CoreOutput]) -> tuple[list[RequestOutput], list[str]]:
        """Returns the outputs to emit and the child ids that hit a stop string (to finish in the core).
        News of unknown requests (aborted, or past their stop string) is dropped."""
        stopped: list[str] = []
        touched: dict[str, _Parent] = {}
        for item in news:
            parent = self._parents.get(self._parent_of.get(item.request_id, ""))
            if parent is None:
                continue
            completion = parent.completions[item.request_id]
            if completion.finish_reason is not None:
                continue  # ended here by a stop string: the core's tokens after it are not output
            if self._advance(completion, item):
                stopped.append(item.request_id)
            touched[parent.prepared.request_id] = parent
        outputs = [out for parent in touched.values() if (out := self._make_output(parent)) is not None]
        for parent_id, parent in touched.items():
            if parent.finished:
                self.remove(parent_id)
        return outputs, stopped

    def _advance(self, completion: _Completion, item: CoreOutput) -> bool:
        """Take the core's news and feed new tokens to the detokenizer; True when a stop string ended it."""
        completion.token_ids += item.new_token_ids
        if item.new_logprobs:
            completion.raw_logprobs += item.new_logprobs
        completion.num_cached_tokens = item.num_cached_tokens
        finished = item.finish_reason is not None
        if completion.lazy and not finished:
            return False  # detokenizing every step would cost ~a decode per token for text nobody reads yet
        new_tokens = completion.token_ids[completion.num_tokens_seen :]
        completion.num_tokens_seen = len(completion.token_ids)
        stop = completion.detokenizer.update(new_tokens)
        if stop is not None:
            completion.finish_reason, completion.stop_reason = "stop", stop
        elif finished:
            completion.finish_reason, completion.stop_reason = item.finish_reason, item.stop_reason
        completion.text += completion.detokenizer.get_delta(completion.finish_reason is not None)
        return stop is not None

    def _make_output(self, parent: _Parent) -> RequestOutput | None:
        if parent.kind is OutputKind.FINAL and not parent.finished:
            return None
        parent.steps_held += 1
        if parent.emitted and not parent.finished and parent.steps_held < self.stream_interval:
            return None  # the tokens stay in the completions' state; the next output carries them
        parent.steps_held = 0
        parent.emitted = parent.emitted or any(c.token_ids for c in parent.completions.values())
        delta = parent.kind is OutputKind.DELTA
        want_logprobs = parent.prepared.params.logprobs is not None
        outputs = [self._completion_output(c, delta, want_logprobs) for c in parent.completions.values()]
        p = parent.prepared
        cached = max(0, min(c.num_cached_tokens for c in parent.completions.values()))
        return RequestOutput(p.request_id, p.prompt, p.prompt_token_ids, outputs, parent.finished, cached)

    def _completion_output(self, completion: _Completion, delta: bool, want_logprobs: bool) -> CompletionOutput:
        tokens = completion.token_ids
        if want_logprobs:
            self._convert_new_logprobs(completion)
        text_from, tokens_from = (completion.text_sent, completion.tokens_sent) if delta else (0, 0)
        completion.text_sent, completion.tokens_sent = len(completion.text), len(tokens)
        return CompletionOutput(
            index=completion.index,
            text=completion.text[text_from:],
            token_ids=list(tokens[tokens_from:]),
            cumulative_logprob=completion.cumulative_logprob if want_logprobs else None,
            logprobs=completion.logprobs[tokens_from:] if want_logprobs else None,  # a copy: ours keeps growing
            finish_reason=completion.finish_reason,
            stop_reason=completion.stop_reason,
        )

    def _convert_new_logprobs(self, completion: _Completion) -> None:
        """Convert the logprobs of the tokens not converted yet, so streaming them stays linear."""
        done = len(completion.logprobs)
        for entry, token_id in zip(completion.raw_logprobs[done:], completion.token_ids[done:]):
            completion.logprobs.append(self._to_logprobs(entry, token_id))
            completion.cumulative_logprob += entry.token_logprob

    def _to_logprobs(self, entry: TokenLogprobs, token_id: int) -> dict[int, Logprob]:
        """The top tokens plus the sampled one, each with its rank and text."""
        out = {
            tid: Logprob(lp, rank, self.tokenizer.decode([tid]))
            for rank, (tid, lp) in enumerate(zip(entry.top_ids, entry.top_logprobs), start=1)
        }
        if token_id not in out:  # not setdefault: that would decode the token even when it is among the top
            out[token_id] = Logprob(entry.token_logprob, entry.token_rank, self.tokenizer.decode([token_id]))
        return out
