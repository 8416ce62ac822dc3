"""Grammars compiled for one tokenizer, per-request matchers, and the token bitmasks between them.

A bitmask row is ``ceil(V / 32)`` int32 words; bit ``t % 32`` of word ``t // 32`` set means token
``t`` is allowed. V is the logits width (the model's vocabulary, which may exceed the tokenizer's:
the extra ids are never allowed). Masks are filled on the host (xgrammar's matchers are CPU code)
and applied to the logits wherever those live; ``apply_bitmask`` copies a host mask to the logits'
device first (non-blocking from pinned memory).

Termination: once the output is a complete match and the grammar cannot go on, a matcher allows only
the stop tokens (EOS), so the sampler picks EOS and the engine stops the request as for any EOS;
accepting EOS terminates the matcher. If the grammar may go on (``a+``), EOS is allowed beside the
continuations. A terminated matcher keeps allowing only EOS.

xgrammar is imported when the first ``GrammarCompiler`` is built, not at module import.
"""

from __future__ import annotations

import functools
import threading
from collections import OrderedDict
from collections.abc import Sequence

import torch
from torch import Tensor

from pagoda.engine.structured.spec import StructuredOutputError, StructuredOutputSpec, xgrammar_message


def bitmask_width(vocab_size: int) -> int:
    """int32 words per bitmask row."""
    return (vocab_size + 31) // 32


def allocate_bitmask(batch_size: int, vocab_size: int, pin_memory: bool = False) -> Tensor:
    """(batch_size, ceil(vocab_size / 32)) int32 on the host with every token allowed (all bits set).

    Rows that no matcher fills stay all-allowed; ``pin_memory`` (CUDA only) makes the copy to the
    device asynchronous.
    """
    return torch.full((batch_size, bitmask_width(vocab_size)), -1, dtype=torch.int32, pin_memory=pin_memory)


def apply_bitmask(logits: Tensor, bitmask: Tensor, rows: Sequence[int] | None = None) -> None:
    """In place: ``logits[r, t] = -inf`` wherever bit t of ``bitmask[r]`` is clear, for r in ``rows``
    (every row when None). Other rows are not touched.

    ``logits`` (B, V) on any device (float32/16, bfloat16); ``bitmask`` (B, >= ceil(V / 32)) int32 on
    the host or that device. In place, so a sampler applies it to its own copy of the logits. From a
    pinned host buffer the copy is asynchronous: refill that buffer only after the step's sampled ids
    reached the host (which orders it after the copy).
    """
    import xgrammar

    if rows is not None and len(rows) == 0:
        return
    if logits.dim() != 2 or bitmask.dim() != 2 or bitmask.shape[0] != logits.shape[0]:
        raise ValueError(f"logits (B, V) and bitmask (B, W) must have the same B, got {tuple(logits.shape)} "
                         f"and {tuple(bitmask.shape)}")
    if bitmask.shape[1] * 32 < logits.shape[1]:
        raise ValueError(f"a bitmask of {bitmask.shape[1]} words covers {bitmask.shape[1] * 32} tokens, "
                         f"fewer than the {logits.shape[1]} logits")
    bitmask = bitmask.to(logits.device, non_blocking=True)
    target = logits if logits.is_contiguous() else logits.contiguous()  # xgrammar's CPU path ignores strides
    indices = None if rows is None else [int(r) for r in rows]
    xgrammar.apply_token_bitmask_inplace(target, bitmask, vocab_size=logits.shape[1], indices=indices)
    if target is not logits:
        logits.copy_(target)


class GrammarCompiler:
    """Compiles specs against one tokenizer; build one per engine (on the sampling rank), when the
    first structured request arrives. Thread-safe, so compiling can run off the engine loop.

    ``vocab_size`` is the logits width (the model's vocabulary, >= the tokenizer's);
    ``stop_token_ids`` are the ids that end a request (EOS), defaulting to the tokenizer's.
    """

    def __init__(self, tokenizer, vocab_size: int, stop_token_ids: Sequence[int] | None = None,
                 cache_size: int = 64, max_threads: int = 8) -> None:
        import xgrammar

        if vocab_size < len(tokenizer):
            raise ValueError(f"vocab_size {vocab_size} is smaller than the tokenizer's {len(tokenizer)} tokens")
        self.vocab_size = vocab_size
        stops = list(stop_token_ids) if stop_token_ids is not None else None
        self._info = xgrammar.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size, stop_token_ids=stops)
        self.stop_token_ids: tuple[int, ...] = tuple(self._info.stop_token_ids)
        if not self.stop_token_ids:
            raise ValueError("the tokenizer has no EOS token: pass stop_token_ids")
        self._compiler = xgrammar.GrammarCompiler(self._info, max_threads=max_threads, cache_enabled=False)
        self._cache: OrderedDict[StructuredOutputSpec, object] = OrderedDict()  # LRU: spec -> CompiledGrammar
        self._cache_size = cache_size
        self._lock = threading.Lock()

    def compile(self, spec: StructuredOutputSpec):
        """The ``xgrammar.CompiledGrammar`` for ``spec``, from the LRU cache when it was compiled lately."""
        with self._lock:
            if spec in self._cache:
                self._cache.move_to_end(spec)
                return self._cache[spec]
        try:
            compiled = self._compiler.compile_grammar(spec.to_grammar())
        except Exception as e:  # noqa: BLE001 - xgrammar raises RuntimeError; this is the tokenizer-dependent stage
            raise StructuredOutputError(f"structured_outputs.{spec.kind}", xgrammar_message(e)) from None
        with self._lock:
            self._cache[spec] = compiled
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        return compiled

    def matcher(self, spec: StructuredOutputSpec, output_token_ids: Sequence[int] = ()) -> GrammarMatcher:
        """A fresh matcher for one request, advanced over ``output_token_ids`` (a resumed request's
        tokens so far); ValueError if they leave the grammar."""
        matcher = GrammarMatcher(self.compile(spec), self.stop_token_ids, self.vocab_size)
        for i, token_id in enumerate(output_token_ids):
            if not matcher.accept(token_id):
                raise ValueError(f"output token {i} (id {token_id}) does not match the request's {spec.kind}")
        return matcher


class GrammarMatcher:
    """One request's position in its grammar (host side, one thread at a time).

    Per step: ``fill_bitmask`` before sampling, ``accept`` the sampled token once it is on the host.
    """

    def __init__(self, compiled, stop_token_ids: Sequence[int], vocab_size: int) -> None:
        import xgrammar

        self._matcher = xgrammar.GrammarMatcher(compiled)
        self.stop_token_ids = tuple(stop_token_ids)
        self.vocab_size = vocab_size

    def fill_bitmask(self, bitmask: Tensor, row: int) -> None:
        """Writes the tokens allowed next into ``bitmask[row]`` (a host int32 tensor)."""
        if self._matcher.is_terminated():
            bitmask[row].zero_()
            for token_id in self.stop_token_ids:
                bitmask[row, token_id // 32] |= _bit(token_id % 32)
        else:
            self._matcher.fill_next_token_bitmask(bitmask, row)

    def accept(self, token_id: int) -> bool:
        """Advances past ``token_id``; False (state unchanged) if the grammar does not allow it."""
        if self._matcher.is_terminated():
            return token_id in self.stop_token_ids
        if not 0 <= token_id < self.vocab_size:
            return False
        return self._matcher.accept_token(token_id)

    def is_terminated(self) -> bool:
        """A stop token was accepted after a complete match: the request is done."""
        return self._matcher.is_terminated()

    def is_completed(self) -> bool:
        """The output so far is a complete match (EOS would be accepted now)."""
        return self._matcher.is_terminated() or self._matcher.is_completed()


def _bit(index: int) -> int:
    """Bit ``index`` of an int32 word, as a Python int in int32 range (bit 31 is the sign bit)."""
    return -(1 << 31) if index == 31 else 1 << index


def fill_bitmasks(matchers: Sequence[GrammarMatcher | None], bitmask: Tensor) -> list[int]:
    """Fills row i of ``bitmask`` from ``matchers[i]`` for every row that has one (None: unconstrained
    row, left as it is) and returns those rows: the ``rows`` argument of ``apply_bitmask``.

    Live matchers are filled together by xgrammar's batch matcher (threads); terminated ones allow EOS.
    """
    rows = [i for i, m in enumerate(matchers) if m is not None]
    live = [i for i in rows if not matchers[i].is_terminated()]
    if len(live) < 2:
        for i in rows:
            matchers[i].fill_bitmask(bitmask, i)
        return rows
    for i in set(rows) - set(live):
        matchers[i].fill_bitmask(bitmask, i)
    _batch_matcher().batch_fill_next_token_bitmask([matchers[i]._matcher for i in live], bitmask, indices=live)
    return rows


@functools.cache
def _batch_matcher():
    """xgrammar's batch matcher (a thread pool), made on first use."""
    import xgrammar

    return xgrammar.BatchGrammarMatcher()
