"""Sampler: one row of logits in, one token (and optionally its logprobs) out, with vLLM's semantics.

Per row, in this order:

1. min_tokens: while fewer than ``min_tokens`` tokens were generated, EOS and ``stop_token_ids``
   get -inf (EOS is spared on a row whose grammar is complete: it may allow nothing else).
   Grammar (structured output, ``GrammarMask``): tokens the row's grammar does not allow get -inf,
   so everything below (the nucleus included) picks among allowed tokens only. Rows without a
   grammar are not touched.
2. Penalties: ``repetition_penalty`` over prompt + output tokens (positive logits divided by it,
   negative ones multiplied); ``frequency_penalty * count + presence_penalty * (count > 0)``
   subtracted for output tokens only.
3. Greedy rows (temperature 0) take the argmax of the penalized logits.
4. Other rows: divide by temperature, then top-k, top-p (the smallest set of best tokens whose
   mass is >= top_p; the best token always stays), min-p (drop tokens whose prob is below
   ``min_p * max prob``), then sample by the exponential race ``argmax(probs / Exponential(1))``.
5. Logprobs come from ``log_softmax`` of the RAW logits (before penalties and temperature).

Reproducibility: a row with a ``seed`` draws its exponential noise from its own generator seeded
by ``step_seed(seed, number of output tokens so far)``. Its token therefore depends only on its
own logits, its seed and its step: not on batch composition, batch position or preemption.
Rows without a seed share the global RNG and stay vectorized.

Nothing here modifies the caller's logits.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from pagoda.engine.sampling_params import SamplingParams
from pagoda.engine.scheduler_output import TokenLogprobs
from pagoda.engine.structured.grammar import apply_bitmask

_MASK64 = (1 << 64) - 1


def step_seed(seed: int, step: int) -> int:
    """A 63-bit generator seed for one (request seed, output position) pair (splitmix64 mix)."""
    z = (seed + (step + 1) * 0x9E3779B97F4A7C15) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return (z ^ (z >> 31)) >> 1


@dataclass(frozen=True)
class GrammarMask:
    """The allowed tokens of a step's rows that have a grammar (``engine/worker/structured_state.py``)."""

    bitmask: Tensor  # (R, ceil(V / 32)) int32, bit t of row j set: token t allowed in row rows[j] (``structured.grammar``)
    rows: tuple[int, ...]  # (R,) the batch rows the mask applies to; the others are left as they are
    completed: tuple[bool, ...]  # (B,) the row's output already matches in full: min_tokens must not ban EOS


@dataclass(frozen=True)
class SamplingBatch:
    """Per-step sampling tensors for B rows; built once per step by the model runner.

    Flags let the hot path skip work no row asked for. Tensors live on the logits' device.
    """

    temperature: Tensor  # (B,) float32; 1.0 on greedy rows so dividing by it is always safe
    greedy: Tensor  # (B,) bool; temperature == 0
    top_k: Tensor  # (B,) int64; vocab_size where disabled
    top_p: Tensor  # (B,) float32; 1.0 where disabled
    min_p: Tensor  # (B,) float32; 0.0 where disabled
    repetition_penalty: Tensor  # (B,) float32; 1.0 where disabled
    frequency_penalty: Tensor  # (B,) float32
    presence_penalty: Tensor  # (B,) float32
    all_greedy: bool
    all_random: bool  # no greedy row
    any_top_k: bool
    max_top_k: int  # largest enabled top_k (0 when none)
    any_top_p: bool
    any_min_p: bool
    any_penalties: bool
    penalty_rows: Tensor | None  # (P,) int64: rows with any penalty, when any_penalties
    prompt_mask: Tensor | None  # (P, V) bool: token occurs in the row's prompt
    output_counts: Tensor | None  # (P, V) float32: occurrences in the row's output so far
    seeds: tuple[int | None, ...]  # per row; None samples from the global RNG
    steps: tuple[int, ...]  # per row: output tokens generated so far (the seeded stream's position)
    ban_rows: Tensor | None  # (N,) int64 \ (row, token) pairs masked by min_tokens
    ban_token_ids: Tensor | None  # (N,) int64 /
    num_logprobs: tuple[int | None, ...]  # per row: top logprobs wanted, None for no logprobs
    vocab_size: int
    grammar: GrammarMask | None = None  # structured rows' allowed tokens; None when no row has a grammar

    @property
    def batch_size(self) -> int:
        return len(self.seeds)

    @classmethod
    def build(
        cls,
        params: list[SamplingParams],
        prompt_token_ids: list[list[int]],
        output_token_ids: list[list[int]],
        eos_token_id: int | Sequence[int] | None,
        vocab_size: int,
        device: torch.device,
        grammar: GrammarMask | None = None,
    ) -> SamplingBatch:
        """Gathers per-row parameters into tensors. ``eos_token_id`` may also be several ids."""
        if not (len(params) == len(prompt_token_ids) == len(output_token_ids)):
            raise ValueError("params, prompt_token_ids and output_token_ids must have the same length")

        greedy = [p.temperature == 0.0 for p in params]
        top_ks = [p.top_k if 0 < p.top_k < vocab_size else vocab_size for p in params]
        penalized = [
            i
            for i, p in enumerate(params)
            if p.repetition_penalty != 1.0 or p.frequency_penalty != 0.0 or p.presence_penalty != 0.0
        ]
        # Greedy rows skip top-k/top-p/min-p entirely, so their settings do not switch paths on.
        sampled = [p for p, g in zip(params, greedy) if not g]
        floats = _per_row_numbers(params, greedy, top_ks, device)
        prompt_mask, output_counts = None, None
        if penalized:
            prompt_mask = _token_mask([prompt_token_ids[i] for i in penalized], vocab_size, device)
            output_counts = _token_counts([output_token_ids[i] for i in penalized], vocab_size, device)
        completed = grammar.completed if grammar is not None else (False,) * len(params)
        ban_rows, ban_ids = _min_tokens_bans(params, output_token_ids, eos_token_id, device, completed)
        return cls(
            temperature=floats[0].float(),
            greedy=floats[1].bool(),
            top_k=floats[2].long(),
            top_p=floats[3].float(),
            min_p=floats[4].float(),
            repetition_penalty=floats[5].float(),
            frequency_penalty=floats[6].float(),
            presence_penalty=floats[7].float(),
            all_greedy=all(greedy),
            all_random=not any(greedy),
            any_top_k=any(0 < p.top_k < vocab_size for p in sampled),
            max_top_k=max((k for k in top_ks if k < vocab_size), default=0),
            any_top_p=any(p.top_p < 1.0 for p in sampled),
            any_min_p=any(p.min_p > 0.0 for p in sampled),
            any_penalties=bool(penalized),
            penalty_rows=torch.tensor(penalized, dtype=torch.int64).to(device) if penalized else None,
            prompt_mask=prompt_mask,
            output_counts=output_counts,
            seeds=tuple(p.seed for p in params),
            steps=tuple(len(out) for out in output_token_ids),
            ban_rows=ban_rows,
            ban_token_ids=ban_ids,
            num_logprobs=tuple(p.logprobs for p in params),
            vocab_size=vocab_size,
            grammar=grammar,
        )


def _per_row_numbers(params: list[SamplingParams], greedy: list[bool], top_ks: list[int], device) -> Tensor:
    """One host-to-device copy for all per-row numbers: (8, B) float64 (exact for every top_k)."""
    return torch.tensor(
        [
            [1.0 if g else p.temperature for p, g in zip(params, greedy)],
            [float(g) for g in greedy],
            [float(k) for k in top_ks],
            [p.top_p for p in params],
            [p.min_p for p in params],
            [p.repetition_penalty for p in params],
            [p.frequency_penalty for p in params],
            [p.presence_penalty for p in params],
        ],
        dtype=torch.float64,
    ).to(device)


def _flat_indices(token_lists: list[list[int]], vocab_size: int, device: torch.device) -> Tensor:
    """Indices into a flattened (len(token_lists), vocab_size) tensor, one per token."""
    lengths = np.fromiter((len(t) for t in token_lists), dtype=np.int64, count=len(token_lists))
    ids = np.fromiter(itertools.chain.from_iterable(token_lists), dtype=np.int64, count=int(lengths.sum()))
    rows = np.repeat(np.arange(len(token_lists), dtype=np.int64), lengths)
    return torch.from_numpy(rows * vocab_size + ids).to(device)


def _token_mask(token_lists: list[list[int]], vocab_size: int, device: torch.device) -> Tensor:
    """(len(token_lists), vocab_size) bool: the token occurs in the row's list."""
    mask = torch.zeros(len(token_lists), vocab_size, dtype=torch.bool, device=device)
    mask.view(-1)[_flat_indices(token_lists, vocab_size, device)] = True
    return mask


def _token_counts(token_lists: list[list[int]], vocab_size: int, device: torch.device) -> Tensor:
    """(len(token_lists), vocab_size) float32 occurrence counts."""
    index = _flat_indices(token_lists, vocab_size, device)
    counts = torch.zeros(len(token_lists), vocab_size, dtype=torch.float32, device=device)
    counts.view(-1).scatter_add_(0, index, torch.ones(len(index), dtype=torch.float32, device=device))
    return counts


def _min_tokens_bans(params, output_token_ids, eos_token_id, device, completed) -> tuple[Tensor | None, Tensor | None]:
    if eos_token_id is None:
        eos_ids: tuple[int, ...] = ()
    elif isinstance(eos_token_id, int):
        eos_ids = (eos_token_id,)
    else:
        eos_ids = tuple(eos_token_id)
    rows, ids = [], []
    for i, (p, out, done) in enumerate(zip(params, output_token_ids, completed)):
        if len(out) < p.min_tokens:
            banned = set(p.stop_token_ids) - set(eos_ids) if done else set(eos_ids) | set(p.stop_token_ids)
            rows += [i] * len(banned)
            ids += sorted(banned)
    if not rows:
        return None, None
    return torch.tensor([rows, ids], dtype=torch.int64).to(device).unbind(0)


def apply_penalties(logits: Tensor, batch: SamplingBatch) -> Tensor:
    """Returns a copy of (B, V) ``logits`` with repetition/frequency/presence penalties applied."""
    rows = batch.penalty_rows
    x = logits[rows]  # (P, V)
    counts = batch.output_counts
    rep = batch.repetition_penalty[rows].unsqueeze(1)
    seen = batch.prompt_mask | (counts > 0)
    x = torch.where(seen, torch.where(x > 0, x / rep, x * rep), x)
    x = x - batch.frequency_penalty[rows].unsqueeze(1) * counts
    x = x - batch.presence_penalty[rows].unsqueeze(1) * (counts > 0).float()
    return logits.index_copy(0, rows, x)


def apply_top_k_top_p(logits: Tensor, top_k: Tensor | None, top_p: Tensor | None) -> Tensor:
    """Masks (B, V) logits to -inf outside each row's top-k, then outside its top-p nucleus.

    ``top_k`` (B,) int64 holds V on rows without top-k; ``top_p`` (B,) holds 1.0 on rows without.
    Ties with the k-th logit are kept (as in vLLM).
    """
    vocab = logits.shape[-1]
    sorted_logits, order = logits.sort(dim=-1)  # ascending: the best token is last
    if top_k is not None:
        kth = sorted_logits.gather(1, (vocab - top_k).clamp(min=0).unsqueeze(1))  # (B, 1)
        sorted_logits = sorted_logits.masked_fill(sorted_logits < kth, float("-inf"))
    if top_p is not None:
        cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)  # mass of this token and all worse ones
        drop = cum <= (1.0 - top_p).unsqueeze(1)
        drop[:, -1] = False
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.empty_like(logits).scatter_(1, order, sorted_logits)


def apply_top_k_only(logits: Tensor, top_k: Tensor, max_top_k: int) -> Tensor:
    """top-k without a full sort: one ``topk(max_top_k)`` gives every row's k-th logit."""
    vocab = logits.shape[-1]
    if max_top_k >= vocab:
        return apply_top_k_top_p(logits, top_k, None)
    values = logits.topk(max_top_k, dim=-1).values  # (B, max_top_k), descending
    kth = values.gather(1, (top_k.clamp(max=max_top_k) - 1).unsqueeze(1))
    threshold = torch.where(top_k.unsqueeze(1) < vocab, kth, torch.full_like(kth, float("-inf")))
    return logits.masked_fill(logits < threshold, float("-inf"))


def apply_min_p(logits: Tensor, min_p: Tensor) -> Tensor:
    """Drops tokens with prob < min_p * max prob, i.e. logit < max logit + log(min_p)."""
    max_logit = logits.max(dim=-1, keepdim=True).values
    return logits.masked_fill(logits < max_logit + min_p.log().unsqueeze(1), float("-inf"))


def _exponential_race(probs: Tensor, batch: SamplingBatch) -> Tensor:
    """argmax(probs / q), q ~ Exponential(1): an exact draw from ``probs`` per row."""
    q = torch.empty_like(probs)
    if any(s is None for s in batch.seeds):
        q.exponential_()
    for row, (seed, step) in enumerate(zip(batch.seeds, batch.steps)):
        if seed is not None:
            gen = torch.Generator(device=probs.device)
            gen.manual_seed(step_seed(seed, step))
            q[row].exponential_(generator=gen)
    # q == 0 would turn a zero-probability token into NaN, which argmax would pick.
    q.clamp_(min=torch.finfo(q.dtype).tiny)
    return (probs / q).argmax(dim=-1)


def _random_sample(logits: Tensor, batch: SamplingBatch) -> Tensor:
    logits = logits / batch.temperature.unsqueeze(1)
    if batch.any_top_p:
        logits = apply_top_k_top_p(logits, batch.top_k if batch.any_top_k else None, batch.top_p)
    elif batch.any_top_k:
        logits = apply_top_k_only(logits, batch.top_k, batch.max_top_k)
    if batch.any_min_p:
        logits = apply_min_p(logits, batch.min_p)
    return _exponential_race(logits.softmax(dim=-1), batch)


def _gather_logprobs(raw_logits: Tensor, tokens: Tensor, batch: SamplingBatch) -> list[TokenLogprobs | None]:
    rows = [i for i, n in enumerate(batch.num_logprobs) if n is not None]
    result: list[TokenLogprobs | None] = [None] * batch.batch_size
    if not rows:
        return result
    index = torch.tensor(rows, dtype=torch.int64, device=raw_logits.device)
    logprobs = torch.log_softmax(raw_logits[index].float(), dim=-1)  # (R, V)
    token_lp = logprobs.gather(1, tokens[index].unsqueeze(1))  # (R, 1)
    ranks = (logprobs > token_lp).sum(dim=-1) + 1  # 1 = best; ties share the better rank
    top_lp, top_ids = logprobs.topk(max(batch.num_logprobs[i] for i in rows), dim=-1)  # (R, max_n)
    token_lp_l, ranks_l = token_lp.squeeze(1).tolist(), ranks.tolist()
    top_lp_l, top_ids_l = top_lp.tolist(), top_ids.tolist()
    for j, row in enumerate(rows):
        n = batch.num_logprobs[row]
        result[row] = TokenLogprobs(token_lp_l[j], ranks_l[j], top_ids_l[j][:n], top_lp_l[j][:n])
    return result


class Sampler:
    """Picks the next token of every row; see the module docstring for the exact semantics."""

    def __call__(self, logits: Tensor, batch: SamplingBatch) -> tuple[list[int], list[TokenLogprobs | None]]:
        """``logits`` (B, V) float32 (left untouched) → (token id per row, logprobs per row or None)."""
        raw_logits = logits
        if batch.ban_rows is not None:
            logits = logits.index_put((batch.ban_rows, batch.ban_token_ids), logits.new_full((), float("-inf")))
        if batch.grammar is not None:
            logits = logits.clone() if logits is raw_logits else logits  # the mask is written in place
            apply_bitmask(logits, batch.grammar.bitmask, batch.grammar.rows)
        if batch.any_penalties:
            logits = apply_penalties(logits, batch)
        if batch.all_greedy:
            tokens = logits.argmax(dim=-1)
        elif batch.all_random:
            tokens = _random_sample(logits, batch)
        else:
            tokens = torch.where(batch.greedy, logits.argmax(dim=-1), _random_sample(logits, batch))
        return tokens.tolist(), _gather_logprobs(raw_logits, tokens, batch)
