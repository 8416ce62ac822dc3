"""The grammar matchers of the structured requests one sampling rank serves (``engine/structured/``'s
contract, steps 2 to 4, kept out of the model runner).

Per step that samples, the runner asks ``mask`` for the rows' bitmask before the sampler, then hands
the sampled ids to ``accept`` in step order. ``accept`` only queues them: the matchers advance at the
start of the next ``mask`` call, which the runner makes while the device runs that step's forward
pass, so advancing them is off the path between one step's sampled ids and the next step's launch
(0.4 ms for 128 JSON rows on the H100 host, the largest host cost of a constrained step left there).
A request's matcher is made the first time one of its rows is sampled here, replaying the output
tokens the runner already holds for it (a request resumed after preemption arrives again in full
with its outputs), and ``drop``ped when the request leaves the runner (finished, aborted, preempted)
or arrives anew. The compiler (a tokenizer's vocabulary) is built with the first structured request,
so engines that never see one never import xgrammar.

Only the rank that samples uses this (tensor-parallel ranks other than the first receive rank 0's
ids), and only on the host: every tensor here is a CPU tensor, whatever device the logits are on.
A step's mask has one row per constrained row (``GrammarMask.rows``), in one host buffer reused from
step to step (pinned when the logits live on a GPU, so the copy to the device does not hold up the
host): a mask is valid until the next ``mask`` call, which comes after the step's sampled ids reached
the host, so after the copy.

A request whose grammar fails on this rank (a compile error that only the tokenizer reveals, a
replayed output that does not match, a queued id the grammar refuses: cannot happen once its mask
was applied, but it would already be in the output) cannot be failed from here:
the runner's output has no per-request error. Its rows then allow only EOS, which ends it as a stop
(structured requests stop on EOS whatever ``ignore_eos`` and ``min_tokens`` say), and the reason is
logged.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from pagoda.engine.layers.sampler import GrammarMask
from pagoda.engine.sampling_params import SamplingParams

if TYPE_CHECKING:
    from torch import Tensor

    from pagoda.engine.structured.grammar import GrammarCompiler, GrammarMatcher

logger = logging.getLogger(__name__)

_FAILED = object()  # a request's entry once its grammar failed: EOS only from then on


class StructuredOutputState:
    """Matchers by request id, and the ``GrammarCompiler`` they come from, made by ``make_compiler``
    when the first structured row is sampled. ``vocab_size`` is the logits width (the compiler's);
    ``stop_token_ids`` are the model's EOS ids."""

    def __init__(self, make_compiler: Callable[[], GrammarCompiler], vocab_size: int,
                 stop_token_ids: Sequence[int], pin_memory: bool = False) -> None:
        self._make_compiler = make_compiler
        self.vocab_size = vocab_size
        self.stop_token_ids = tuple(stop_token_ids)
        self.pin_memory = pin_memory
        self._compiler: GrammarCompiler | None = None
        self._matchers: dict[str, GrammarMatcher | object] = {}  # req_id -> its matcher, or _FAILED
        self._buffer: Tensor | None = None  # the masks' rows, grown in powers of two
        self._queued: list[tuple[str, int]] = []  # (req_id, sampled id) not yet accepted, in step order

    @classmethod
    def for_tokenizer(cls, load_tokenizer: Callable[[], Any] | None, vocab_size: int,
                      stop_token_ids: Sequence[int], pin_memory: bool = False) -> StructuredOutputState:
        """Compiles against ``load_tokenizer()`` (loaded with the first structured request) for logits
        ``vocab_size`` wide; None: structured requests end at once (logged). ``pin_memory``: the
        logits live on a GPU."""
        def make_compiler() -> GrammarCompiler:
            from pagoda.engine.structured.grammar import GrammarCompiler

            if load_tokenizer is None:
                raise ValueError("this runner was built without a tokenizer, so it cannot serve structured output")
            return GrammarCompiler(load_tokenizer(), vocab_size, stop_token_ids)

        return cls(make_compiler, vocab_size, stop_token_ids, pin_memory)

    def __len__(self) -> int:
        return len(self._matchers)

    @property
    def compiler(self) -> GrammarCompiler:
        if self._compiler is None:
            self._compiler = self._make_compiler()
        return self._compiler

    def drop(self, req_id: str) -> None:
        """Forget a request's matcher and its queued ids (it finished, was aborted or preempted, or
        arrives again in full: a fresh matcher replays its outputs)."""
        if self._matchers.pop(req_id, None) is not None and self._queued:
            self._queued = [q for q in self._queued if q[0] != req_id]

    def mask(self, req_ids: Sequence[str], params: Sequence[SamplingParams],
             outputs: Sequence[Sequence[int]]) -> GrammarMask | None:
        """The bitmask for one step's sampled rows (row i is ``req_ids[i]``, its parameters and its
        output tokens so far), or None when no row has a grammar. Call it before sampling, once the
        forward pass is queued: the queued ids are accepted first."""
        self._advance()
        rows = [i for i, p in enumerate(params) if p.structured is not None]
        if not rows:
            return None
        from pagoda.engine.structured.grammar import allow_only, fill_bitmasks

        matchers = [self._matcher(req_ids[i], params[i], outputs[i]) for i in rows]
        bitmask = self._rows(len(rows))  # (R, ceil(V / 32)) int32: row j is for rows[j]
        for j in (j for j, m in enumerate(matchers) if m is _FAILED):
            if self.stop_token_ids:
                allow_only(bitmask, j, self.stop_token_ids)
            else:  # no stop token: all allowed, max_tokens ends it
                bitmask[j].fill_(-1)
        fill_bitmasks([None if m is _FAILED else m for m in matchers], bitmask)
        completed = dict(zip(rows, (m is _FAILED or m.is_completed() for m in matchers)))
        return GrammarMask(bitmask, tuple(rows), tuple(completed.get(i, False) for i in range(len(params))))

    def accept(self, req_ids: Sequence[str], token_ids: Sequence[int]) -> list[int]:
        """Queues each row's sampled id for its matcher, in step order (see the module docstring);
        returns the ids to keep: the sampled ones, except EOS for a request whose grammar failed."""
        kept = list(token_ids)
        for i, (req_id, token_id) in enumerate(zip(req_ids, token_ids, strict=True)):
            matcher = self._matchers.get(req_id)
            if matcher is _FAILED:
                if self.stop_token_ids:
                    kept[i] = self.stop_token_ids[0]
            elif matcher is not None:
                self._queued.append((req_id, token_id))
        return kept

    def _advance(self) -> None:
        """Advance the matchers past their queued ids; one that refuses its id fails."""
        queued, self._queued = self._queued, []
        for req_id, token_id in queued:
            matcher = self._matchers.get(req_id)
            if matcher is not None and matcher is not _FAILED and not matcher.accept(token_id):
                logger.error("request %s: sampled token %d breaks its grammar; ending it", req_id, token_id)
                self._matchers[req_id] = _FAILED

    def _rows(self, count: int) -> Tensor:
        """The first ``count`` rows of the reused mask buffer (contents left from earlier steps)."""
        from pagoda.engine.structured.grammar import allocate_bitmask

        if self._buffer is None or self._buffer.shape[0] < count:
            self._buffer = allocate_bitmask(1 << (count - 1).bit_length(), self.vocab_size, self.pin_memory)
        return self._buffer[:count]

    def _matcher(self, req_id: str, params: SamplingParams, outputs: Sequence[int]):
        matcher = self._matchers.get(req_id)
        if matcher is None:
            try:
                matcher = self.compiler.matcher(params.structured, outputs)  # a resumed request replays its outputs
            except ValueError as e:  # also StructuredOutputError (tokenizer-dependent compile) and no tokenizer
                logger.error("request %s: its grammar cannot be served (%s); ending it", req_id, e)
                matcher = _FAILED
            self._matchers[req_id] = matcher
        return matcher
