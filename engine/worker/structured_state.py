"""The grammar matchers of the structured requests one sampling rank serves (``engine/structured/``'s
contract, steps 2 to 4, kept out of the model runner).

Per step that samples, the runner asks ``mask`` for the rows' bitmask before the sampler, then hands
the sampled ids to ``accept`` in step order. A request's matcher is made the first time one of its
rows is sampled here, replaying the output tokens the runner already holds for it (a request resumed
after preemption arrives again in full with its outputs), and ``drop``ped when the request leaves the
runner (finished, aborted, preempted) or arrives anew. The compiler (a tokenizer's vocabulary) is
built with the first structured request, so engines that never see one never import xgrammar.

Only the rank that samples uses this (tensor-parallel ranks other than the first receive rank 0's
ids), and only on the host: every tensor here is a CPU tensor, whatever device the logits are on.

A request whose grammar fails on this rank (a compile error that only the tokenizer reveals, a
replayed output that does not match, a sampled id the grammar refuses) cannot be failed from here:
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
    from pagoda.engine.structured.grammar import GrammarCompiler, GrammarMatcher

logger = logging.getLogger(__name__)

_FAILED = object()  # a request's entry once its grammar failed: EOS only from then on


class StructuredOutputState:
    """Matchers by request id, and the ``GrammarCompiler`` they come from, made by ``make_compiler``
    when the first structured row is sampled. ``vocab_size`` is the logits width (the compiler's);
    ``stop_token_ids`` are the model's EOS ids."""

    def __init__(self, make_compiler: Callable[[], GrammarCompiler], vocab_size: int,
                 stop_token_ids: Sequence[int]) -> None:
        self._make_compiler = make_compiler
        self.vocab_size = vocab_size
        self.stop_token_ids = tuple(stop_token_ids)
        self._compiler: GrammarCompiler | None = None
        self._matchers: dict[str, GrammarMatcher | object] = {}  # req_id -> its matcher, or _FAILED

    @classmethod
    def for_tokenizer(cls, load_tokenizer: Callable[[], Any] | None, vocab_size: int,
                      stop_token_ids: Sequence[int]) -> StructuredOutputState:
        """Compiles against ``load_tokenizer()`` (loaded with the first structured request) for logits
        ``vocab_size`` wide; None: structured requests end at once (logged)."""
        def make_compiler() -> GrammarCompiler:
            from pagoda.engine.structured.grammar import GrammarCompiler

            if load_tokenizer is None:
                raise ValueError("this runner was built without a tokenizer, so it cannot serve structured output")
            return GrammarCompiler(load_tokenizer(), vocab_size, stop_token_ids)

        return cls(make_compiler, vocab_size, stop_token_ids)

    def __len__(self) -> int:
        return len(self._matchers)

    @property
    def compiler(self) -> GrammarCompiler:
        if self._compiler is None:
            self._compiler = self._make_compiler()
        return self._compiler

    def drop(self, req_id: str) -> None:
        """Forget a request's matcher (it finished, was aborted or preempted, or arrives again in full)."""
        self._matchers.pop(req_id, None)

    def mask(self, req_ids: Sequence[str], params: Sequence[SamplingParams],
             outputs: Sequence[Sequence[int]]) -> GrammarMask | None:
        """The bitmask for one step's sampled rows (row i is ``req_ids[i]``, its parameters and its
        output tokens so far), or None when no row has a grammar. Fill it after the rows' previous
        tokens were accepted and before sampling."""
        if all(p.structured is None for p in params):
            return None
        from pagoda.engine.structured.grammar import allocate_bitmask, fill_bitmasks

        rows = [self._matcher(r, p, out) if p.structured is not None else None
                for r, p, out in zip(req_ids, params, outputs, strict=True)]
        bitmask = allocate_bitmask(len(rows), self.vocab_size)  # (S, ceil(V / 32)) int32, all allowed
        failed = [i for i, m in enumerate(rows) if m is _FAILED and self.stop_token_ids]  # none: max_tokens ends it
        for i in failed:
            _stop_tokens_only(bitmask, i, self.stop_token_ids)
        live = [None if m is _FAILED else m for m in rows]
        filled = fill_bitmasks(live, bitmask)
        completed = tuple(i in failed or (m is not None and m.is_completed()) for i, m in enumerate(live))
        return GrammarMask(bitmask, tuple(sorted(filled + failed)), completed)

    def accept(self, req_ids: Sequence[str], token_ids: Sequence[int]) -> list[int]:
        """Advance each row's matcher past its sampled id, in step order; returns the ids to keep:
        the sampled ones, except EOS where a grammar refused its id (cannot happen once the mask was
        applied; the request is then ended)."""
        kept = list(token_ids)
        for i, (req_id, token_id) in enumerate(zip(req_ids, token_ids, strict=True)):
            matcher = self._matchers.get(req_id)
            if matcher is None:
                continue
            if matcher is not _FAILED and not matcher.accept(token_id):
                logger.error("request %s: sampled token %d breaks its grammar; ending it", req_id, token_id)
                self._matchers[req_id] = matcher = _FAILED
            if matcher is _FAILED and self.stop_token_ids:
                kept[i] = self.stop_token_ids[0]
        return kept

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


def _stop_tokens_only(bitmask, row: int, stop_token_ids: Sequence[int]) -> None:
    """Row ``row`` of a bitmask allows only the stop tokens."""
    bitmask[row].zero_()
    for token_id in stop_token_ids:
        word, bit = divmod(token_id, 32)
        bitmask[row, word] |= -(1 << 31) if bit == 31 else 1 << bit
