"""Grammars compiled for one tokenizer, per-request matchers, and the token bitmasks between them.

A bitmask row is ``ceil(V / 32)`` int32 words; bit ``t % 32`` of word ``t // 32`` set means token
``t`` is allowed. V is the logits width (the model's vocabulary, which may exceed the tokenizer's:
the extra ids are never allowed). Masks are filled on the host (xgrammar's matchers are CPU code)
and applied to the logits wherever those live; ``apply_bitmask`` copies a host mask to the logits'
device first (non-blocking from pinned memory). A step's mask holds only its constrained rows (row j
for logits row ``rows[j]``): what crosses to the device grows with the constrained rows, not the batch.

Host-side work on a whole mask uses numpy, not torch: torch splits an op over 32k elements
(``torch.full``, ``masked_fill_``) across its intra-op threads, and on a busy CPU waiting for them
costs milliseconds per op. Measured inside the engine on a loaded 2-core host, 32 rows of the embedded
model's vocabulary: allocating the mask took 3.6 ms per step with torch, 0.08 ms with numpy.
``bench/structured.py`` measures what constrained decoding costs as a whole.

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

import numpy as np
import torch
from torch import Tensor

from pagoda.engine.structured.spec import StructuredOutputError, StructuredOutputSpec, xgrammar_message


def bitmask_width(vocab_size: int) -> int:
    """int32 words per bitmask row."""
    return (vocab_size + 31) // 32


def allocate_bitmask(batch_size: int, vocab_size: int, pin_memory: bool = False) -> Tensor:
    """(batch_size, ceil(vocab_size / 32)) int32 on the host with every token allowed (all bits set).

    Rows that no matcher fills stay all-allowed; ``pin_memory`` (CUDA only) makes the copy to the
    device asynchronous. Pageable masks are made by numpy (see the module docstring).
    """
    shape = (batch_size, bitmask_width(vocab_size))
    if pin_memory:
        return torch.full(shape, -1, dtype=torch.int32, pin_memory=True)
    return torch.from_numpy(np.full(shape, -1, dtype=np.int32))


def apply_bitmask(logits: Tensor, bitmask: Tensor, rows: Sequence[int] | None = None) -> None:
    """Sets the logits of disallowed tokens to -inf, in place. ``rows``: the logits rows the mask is
    for, row j of ``bitmask`` holding the allowed tokens of logits row ``rows[j]`` (None: every row,
    row for row); the other rows are untouched. Mask words past the logits' width are ignored.

    ``bitmask`` may live on the host or on the logits' device. From a reused (pinned) host buffer
    the copy is asynchronous: refill that buffer only after the step's sampled ids reached the host
    (which orders it after the copy).
    """
    num_rows = logits.shape[0] if rows is None else len(rows)
    if num_rows == 0:
        return
    if logits.dim() != 2 or bitmask.dim() != 2 or bitmask.shape[0] != num_rows:
        raise ValueError(f"a bitmask of shape {tuple(bitmask.shape)} does not fit {num_rows} rows of logits "
                         f"{tuple(logits.shape)}")
    if bitmask.shape[1] * 32 < logits.shape[1]:
        raise ValueError(f"a bitmask of {bitmask.shape[1]} words covers {bitmask.shape[1] * 32} tokens, "
                         f"fewer than the {logits.shape[1]} logits")
    indices = list(range(logits.shape[0])) if rows is None else [int(r) for r in rows]
    if logits.device.type == "cpu":
        _apply_bitmask_on_host(logits, bitmask, indices)
        return
    import xgrammar

    bitmask = bitmask.to(logits.device, non_blocking=True)
    if rows is not None:  # xgrammar reads row r of the mask for logits row r: spread the rows out
        spread = bitmask.new_empty((logits.shape[0], bitmask.shape[1]))
        spread[torch.as_tensor(indices, device=logits.device)] = bitmask
        bitmask = spread
    target = logits if logits.is_contiguous() else logits.contiguous()  # xgrammar's kernels ignore strides
    xgrammar.apply_token_bitmask_inplace(target, bitmask, vocab_size=logits.shape[1],
                                         indices=None if rows is None else indices)
    if target is not logits:
        logits.copy_(target)


_SAME_SIZE_INT = {2: torch.int16, 4: torch.int32, 8: torch.int64}  # bytes per logit -> an integer dtype


def _apply_bitmask_on_host(logits: Tensor, bitmask: Tensor, rows: list[int]) -> None:
    """``apply_bitmask`` for CPU logits, in numpy on the logits' own memory (any strides, any float dtype).

    Why not xgrammar's CPU kernel: it writes each banned logit on its own, about 0.19 ms per row of 49k
    tokens where a JSON grammar allows a handful (most steps of a JSON output), against 0.07 ms here
    (and 0.04 against 0.02 ms per row where nearly everything is allowed); why not torch: see the
    module docstring. The logits are seen as integers of their width so that bfloat16 (which numpy
    lacks) takes the same path: -inf is written as its bit pattern.
    """
    bits = logits.view(_SAME_SIZE_INT[logits.element_size()]).numpy()  # (B, V): shares memory with the logits
    minus_inf = _minus_inf_bits(logits.dtype)
    words = np.ascontiguousarray(bitmask.cpu().numpy(), dtype="<i4")  # (R, W), little-endian on any host
    # bit t of a row is bit t % 8 of its byte t // 8 once the little-endian words are read as bytes
    allowed = np.unpackbits(words.view(np.uint8), axis=1, count=logits.shape[1], bitorder="little")  # (R, V)
    for row, row_allowed in zip(rows, allowed):
        np.copyto(bits[row], minus_inf, where=row_allowed == 0)


@functools.cache
def _minus_inf_bits(dtype: torch.dtype) -> int:
    """-inf of a float dtype, read as the integer of the same width."""
    return torch.tensor(float("-inf"), dtype=dtype).view(_SAME_SIZE_INT[dtype.itemsize]).item()


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
            allow_only(bitmask, row, self.stop_token_ids)
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


def allow_only(bitmask: Tensor, row: int, token_ids: Sequence[int]) -> None:
    """Row ``row`` of a host bitmask allows exactly ``token_ids``."""
    bitmask[row].zero_()
    for token_id in token_ids:
        bitmask[row, token_id // 32] |= _bit(token_id % 32)


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
