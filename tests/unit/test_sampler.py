"""Sampler: filters against direct torch computations, seeded reproducibility, logprobs, distribution."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from pagoda.engine.layers.sampler import (
    GrammarMask,
    Sampler,
    SamplingBatch,
    apply_min_p,
    apply_penalties,
    apply_top_k_only,
    apply_top_k_top_p,
    step_seed,
)
from pagoda.engine.sampling_params import SamplingParams
from pagoda.engine.structured.grammar import allocate_bitmask

CPU = torch.device("cpu")
NEG_INF = float("-inf")


def make_batch(params, outputs=None, prompts=None, eos=None, vocab=None) -> SamplingBatch:
    n = len(params)
    return SamplingBatch.build(
        params,
        prompts if prompts is not None else [[0]] * n,
        outputs if outputs is not None else [[]] * n,
        eos,
        vocab,
        CPU,
    )


def random_logits(b: int, v: int, seed: int, scale: float = 3.0) -> torch.Tensor:
    return torch.randn(b, v, generator=torch.Generator().manual_seed(seed)) * scale


def kept(logits: torch.Tensor) -> list[set[int]]:
    return [set(torch.nonzero(row > NEG_INF).flatten().tolist()) for row in logits]


# ---------------------------------------------------------------- references (plain, row by row)


def ref_top_k(row: torch.Tensor, k: int) -> set[int]:
    return set(row.topk(k).indices.tolist()) if k > 0 else set(range(len(row)))


def ref_top_p(row: torch.Tensor, allowed: set[int], p: float) -> set[int]:
    """Smallest set of best tokens (among ``allowed``) whose renormalized mass is >= p."""
    masked = torch.full_like(row, NEG_INF, dtype=torch.float64)
    idx = torch.tensor(sorted(allowed))
    masked[idx] = row[idx].double()
    probs = masked.softmax(-1)
    order = probs.argsort(descending=True).tolist()
    chosen, mass = set(), 0.0
    for t in order:
        chosen.add(t)
        mass += probs[t].item()
        if mass >= p:
            break
    return chosen


def ref_min_p(row: torch.Tensor, allowed: set[int], min_p: float) -> set[int]:
    masked = torch.full_like(row, NEG_INF, dtype=torch.float64)
    idx = torch.tensor(sorted(allowed))
    masked[idx] = row[idx].double()
    probs = masked.softmax(-1)
    return {t for t in allowed if probs[t] >= min_p * probs.max()}


def ref_filtered_probs(row: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    row = row.double() / p.temperature
    allowed = ref_top_k(row, max(0, p.top_k))
    allowed = ref_top_p(row, allowed, p.top_p)
    allowed = ref_min_p(row, allowed, p.min_p)
    masked = torch.full_like(row, NEG_INF)
    idx = torch.tensor(sorted(allowed))
    masked[idx] = row[idx]
    return masked.softmax(-1)


# ---------------------------------------------------------------- filters


@pytest.mark.parametrize("ks", [[1, 5, 50, 7, 300, 300], [1, 5, 50, 299, 300, 2]])  # 300 == V: disabled
def test_top_k_matches_torch_topk(ks):
    logits = random_logits(6, 300, seed=1)
    top_k = torch.tensor(ks)
    max_top_k = max(k for k in ks if k < 300)
    for out in (apply_top_k_top_p(logits, top_k, None), apply_top_k_only(logits, top_k, max_top_k)):
        for row, k, got in zip(logits, ks, kept(out)):
            assert got == ref_top_k(row, k)
        survivors = out > NEG_INF
        assert torch.equal(out[survivors], logits[survivors])  # values of kept tokens unchanged


def test_top_p_matches_reference():
    logits = random_logits(8, 400, seed=2)
    ps = [0.05, 0.3, 0.5, 0.7, 0.9, 0.95, 0.999, 1.0]
    out = apply_top_k_top_p(logits, None, torch.tensor(ps))
    for row, p, got in zip(logits, ps, kept(out)):
        assert got == ref_top_p(row, set(range(400)), p)
    assert all(len(s) >= 1 for s in kept(out))


def test_top_p_always_keeps_the_best_token():
    logits = torch.tensor([[5.0, 0.0, 0.0, 0.0]])  # p(best) ~ 0.95 > top_p: only the best stays
    assert kept(apply_top_k_top_p(logits, None, torch.tensor([0.01]))) == [{0}]


def test_top_k_then_top_p_matches_reference():
    logits = random_logits(5, 200, seed=3)
    ks, ps = [3, 10, 200, 40, 1], [0.5, 0.8, 0.6, 0.95, 0.2]
    out = apply_top_k_top_p(logits, torch.tensor(ks), torch.tensor(ps))
    for row, k, p, got in zip(logits, ks, ps, kept(out)):
        assert got == ref_top_p(row, ref_top_k(row, k), p)


def test_min_p_matches_reference():
    logits = random_logits(5, 200, seed=4)
    mps = [0.0, 0.01, 0.1, 0.5, 1.0]
    out = apply_min_p(logits, torch.tensor(mps))
    for row, mp, got in zip(logits, mps, kept(out)):
        assert got == ref_min_p(row, set(range(200)), mp)


def test_penalties_match_direct_computation():
    v = 40
    logits = random_logits(3, v, seed=5)
    prompts = [[1, 2, 3, 3], [4, 5], [6]]
    outputs = [[3, 7, 7, 7, 9], [], [6, 6, 8]]
    params = [
        SamplingParams(repetition_penalty=1.3, frequency_penalty=0.4, presence_penalty=0.2),
        SamplingParams(repetition_penalty=0.7),
        SamplingParams(frequency_penalty=-0.5, presence_penalty=1.5),
    ]
    batch = make_batch(params, outputs, prompts, vocab=v)
    expected = logits.clone()
    for r, p in enumerate(params):
        for t in range(v):
            x = expected[r, t].item()
            if t in prompts[r] or t in outputs[r]:
                x = x / p.repetition_penalty if x > 0 else x * p.repetition_penalty
            count = outputs[r].count(t)
            x -= p.frequency_penalty * count + p.presence_penalty * (count > 0)
            expected[r, t] = x
    torch.testing.assert_close(apply_penalties(logits, batch), expected)
    greedy = [replace(p, temperature=0.0) for p in params]
    tokens, _ = Sampler()(logits, make_batch(greedy, outputs, prompts, vocab=v))
    assert tokens == expected.argmax(-1).tolist()


def test_penalty_rows_only_touch_their_rows():
    logits = random_logits(3, 30, seed=6)
    params = [SamplingParams(), SamplingParams(presence_penalty=2.0), SamplingParams()]
    batch = make_batch(params, [[1], [1, 2], [1]], vocab=30)
    out = apply_penalties(logits, batch)
    assert torch.equal(out[0], logits[0]) and torch.equal(out[2], logits[2])
    assert not torch.equal(out[1], logits[1])


# ---------------------------------------------------------------- greedy, min_tokens


def test_greedy_is_argmax_and_logits_untouched():
    logits = random_logits(16, 500, seed=7)
    before = logits.clone()
    tokens, logprobs = Sampler()(logits, make_batch([SamplingParams(temperature=0.0)] * 16, vocab=500))
    assert tokens == logits.argmax(-1).tolist()
    assert logprobs == [None] * 16
    assert torch.equal(logits, before)


def test_mixed_greedy_and_random_rows():
    logits = random_logits(6, 500, seed=8, scale=0.5)  # flat: random rows rarely hit the argmax
    params = [SamplingParams(temperature=0.0 if i % 2 == 0 else 1.0, seed=i, top_k=50) for i in range(6)]
    tokens, _ = Sampler()(logits, make_batch(params, vocab=500))
    argmax = logits.argmax(-1).tolist()
    assert [tokens[i] for i in (0, 2, 4)] == [argmax[i] for i in (0, 2, 4)]
    assert [tokens[i] for i in (1, 3, 5)] != [argmax[i] for i in (1, 3, 5)]


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_min_tokens_bans_eos_and_stop_token_ids(temperature):
    v, eos, stop = 50, 5, 7
    logits = random_logits(3, v, seed=9)
    logits[:, eos] = 100.0
    logits[:, stop] = 50.0
    params = [SamplingParams(temperature=temperature, min_tokens=3, stop_token_ids=[stop], seed=1)] * 3
    outputs = [[1], [1, 2], [1, 2, 3]]  # the last row reached min_tokens
    for _ in range(20):
        tokens, _ = Sampler()(logits, make_batch(params, outputs, eos=eos, vocab=v))
        assert tokens[0] not in (eos, stop) and tokens[1] not in (eos, stop)
        assert tokens[2] == eos
    # without an EOS id only the stop token ids are banned
    tokens, _ = Sampler()(logits, make_batch(params, outputs, eos=None, vocab=v))
    assert tokens == [eos, eos, eos]


# ---------------------------------------------------------------- grammar masks


def only(bitmask: torch.Tensor, row: int, tokens: list[int]) -> None:
    """Row ``row`` of a bitmask allows exactly ``tokens`` (ids < 31, so no sign bit)."""
    bitmask[row].zero_()
    for t in tokens:
        bitmask[row, t // 32] |= 1 << (t % 32)


def test_a_grammar_mask_narrows_its_rows_before_sampling_and_leaves_the_others():
    v = 100
    logits = random_logits(4, v, seed=21)
    raw = logits.clone()
    params = [SamplingParams(temperature=0.0), SamplingParams(temperature=0.0, logprobs=1),
              SamplingParams(temperature=1.0, seed=5), SamplingParams(temperature=1.0, seed=6, top_p=0.5, top_k=3)]
    bitmask = allocate_bitmask(2, v)  # row j for batch row (1, 3)[j]
    allowed = [3, 17, 29]
    only(bitmask, 0, allowed)
    only(bitmask, 1, allowed)
    grammar = GrammarMask(bitmask, (1, 3), (False,) * 4)
    masked, logprobs = Sampler()(logits, SamplingBatch.build(params, [[0]] * 4, [[]] * 4, None, v, CPU, grammar))
    plain, _ = Sampler()(logits, make_batch(params, vocab=v))
    assert torch.equal(logits, raw)  # the caller's logits are untouched
    assert [masked[0], masked[2]] == [plain[0], plain[2]]  # rows without a grammar sample as before
    assert masked[1] == max(allowed, key=lambda t: raw[1, t].item())  # greedy over allowed tokens only
    assert masked[3] in allowed
    assert logprobs[1].token_logprob == pytest.approx(raw[1].log_softmax(-1)[masked[1]].item())  # raw logits


def test_min_tokens_spares_eos_where_the_grammar_is_complete():
    v, eos = 40, 5
    logits = random_logits(2, v, seed=22)
    logits[:, eos] = 100.0
    params = [SamplingParams(temperature=0.0, min_tokens=10)] * 2
    bitmask = allocate_bitmask(2, v)
    only(bitmask, 0, [eos, 9])
    only(bitmask, 1, [eos, 9])
    grammar = GrammarMask(bitmask, (0, 1), (True, False))
    tokens, _ = Sampler()(logits, SamplingBatch.build(params, [[0]] * 2, [[1]] * 2, eos, v, CPU, grammar))
    assert tokens == [eos, 9]


# ---------------------------------------------------------------- seeding


def sample_row(logits_row, params, step, others: list, position: int) -> int:
    """Samples the row at ``position`` in a batch padded with ``others`` (logits, params) rows."""
    rows = [(torch.randn(logits_row.shape), p) for p in others]
    rows.insert(position, (logits_row, params))
    outputs = [[0] * (step if i == position else 3) for i in range(len(rows))]
    batch = make_batch([p for _, p in rows], outputs, vocab=len(logits_row))
    tokens, _ = Sampler()(torch.stack([lg for lg, _ in rows]), batch)
    return tokens[position]


def test_seeded_row_ignores_batch_composition_and_position():
    row = random_logits(1, 1000, seed=10, scale=0.5)[0]
    params = SamplingParams(temperature=0.9, top_p=0.95, seed=1234)
    alone = [sample_row(row, params, step, [], 0) for step in range(12)]
    crowd = [
        SamplingParams(seed=7),
        SamplingParams(),
        SamplingParams(temperature=0.0),
        SamplingParams(top_k=3, seed=99),
        SamplingParams(min_p=0.2),
    ]
    for step in range(12):
        others = crowd[: step % 5 + 1]
        assert sample_row(row, params, step, others, position=step % (len(others) + 1)) == alone[step]
    assert len(set(alone)) > 6  # steps draw fresh noise: the sequence is not constant


def test_different_seeds_give_different_tokens():
    logits = random_logits(1, 1000, seed=11, scale=0.5).expand(64, -1)
    batch = make_batch([SamplingParams(seed=s) for s in range(64)], vocab=1000)
    tokens, _ = Sampler()(logits, batch)
    assert len(set(tokens)) > 40  # near-uniform over ~1000 tokens: collisions are rare


def test_unseeded_rows_are_random():
    torch.manual_seed(0)
    logits = random_logits(1, 1000, seed=12, scale=0.5).expand(32, -1)
    batch = make_batch([SamplingParams()] * 32, vocab=1000)
    first, _ = Sampler()(logits, batch)
    second, _ = Sampler()(logits, batch)
    assert len(set(first)) > 20 and first != second


def test_step_seed_differs_per_seed_and_step():
    seeds = {step_seed(s, t) for s in range(50) for t in range(50)}
    assert len(seeds) == 2500 and all(0 <= s < 2**63 for s in seeds)


# ---------------------------------------------------------------- logprobs


def test_logprobs_come_from_raw_logits():
    v = 300
    logits = random_logits(4, v, seed=13)
    params = [
        SamplingParams(temperature=0.5, logprobs=5, repetition_penalty=2.0, seed=1),
        SamplingParams(temperature=1.3, logprobs=0, top_k=20, seed=2),
        SamplingParams(logprobs=None),
        SamplingParams(temperature=0.0, logprobs=20, presence_penalty=2.0),
    ]
    tokens, logprobs = Sampler()(logits, make_batch(params, [[1, 2], [3], [], [int(logits[3].argmax())]], vocab=v))
    raw = torch.log_softmax(logits, -1)
    assert logprobs[2] is None
    for r in (0, 1, 3):
        lp = logprobs[r]
        assert lp.token_logprob == pytest.approx(raw[r, tokens[r]].item(), abs=1e-5)
        assert lp.token_rank == int((raw[r] > raw[r, tokens[r]]).sum()) + 1
        n = params[r].logprobs
        ref = raw[r].topk(n)
        assert lp.top_ids == ref.indices.tolist()
        assert lp.top_logprobs == pytest.approx(ref.values.tolist(), abs=1e-5)
    # the greedy row's argmax was penalized away, so it did not sample rank 1
    assert logprobs[3].token_rank > 1


# ---------------------------------------------------------------- distribution


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(temperature=1.0, top_k=8, top_p=0.97),  # both cut: 7 tokens left (8 / 9 with one alone)
        SamplingParams(temperature=0.7, min_p=0.05),
        SamplingParams(temperature=1.5),
    ],
)
@pytest.mark.parametrize("seeded", [True, False])
def test_empirical_distribution_matches_filtered(params, seeded):
    v, rows, steps = 12, 4000, 5
    row = random_logits(1, v, seed=14, scale=1.5)[0]
    expected = ref_filtered_probs(row, params)
    counts = torch.zeros(v)
    torch.manual_seed(1)
    for step in range(steps):
        row_params = [
replace(params, seed=s if seeded else None) for s in range(rows)]
        batch = make_batch(row_params, [[0] * step] * rows, vocab=v)
        tokens, _ = Sampler()(row.expand(rows, -1), batch)
        counts += torch.bincount(torch.tensor(tokens), minlength=v)
    n = rows * steps
    assert counts[expected == 0].sum() == 0  # filtered tokens are never drawn
    support = expected > 0
    chi2 = (((counts[support] - n * expected[support]) ** 2) / (n * expected[support])).sum().item()
    assert chi2 < 35.0  # df <= 11; p(chi2 > 35) < 3e-4
