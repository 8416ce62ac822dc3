"""StructuredOutputState (engine/worker/structured_state.py): the sampling rank's matchers, on the embedded
tokenizer's compiled vocabulary (the ``grammar_compiler`` fixture). Rows without a grammar stay all-allowed;
matchers advance in step order, replay a resumed request's outputs, and a broken grammar ends its request."""

from __future__ import annotations

import pytest
import torch

from pagoda.engine.sampling_params import SamplingParams
from pagoda.engine.structured import StructuredOutputSpec
from pagoda.engine.worker.structured_state import StructuredOutputState

DIGITS = StructuredOutputSpec(regex="[0-9]{2}")
JSON_PAIR = StructuredOutputSpec(json_schema={"type": "object", "properties": {"x": {"type": "integer"}},
                                              "required": ["x"], "additionalProperties": False},
                                 any_whitespace=False)
PLAIN = SamplingParams(temperature=0.0)


def make_state(grammar_compiler, made: list | None = None) -> StructuredOutputState:
    def make():
        if made is not None:
            made.append(1)
        return grammar_compiler

    return StructuredOutputState(make, grammar_compiler.vocab_size, grammar_compiler.stop_token_ids)


def allowed(bitmask: torch.Tensor, row: int, vocab_size: int) -> set[int]:
    bits = (bitmask[row].unsqueeze(1) >> torch.arange(32, dtype=torch.int32)) & 1  # (W, 32)
    return {t for t in torch.nonzero(bits.flatten()).flatten().tolist() if t < vocab_size}


def ids(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False).input_ids


def test_without_a_structured_row_nothing_is_built(grammar_compiler):
    made = []
    state = make_state(grammar_compiler, made)
    assert state.mask(["a", "b"], [PLAIN, SamplingParams(temperature=0.7)], [[], [5]]) is None
    assert not made and len(state) == 0


def test_only_rows_with_a_grammar_are_masked(grammar_compiler):
    made = []
    state = make_state(grammar_compiler, made)
    mask = state.mask(["a", "b", "c"], [PLAIN, SamplingParams(structured=DIGITS), PLAIN], [[], [], []])
    assert len(made) == 1 and mask.rows == (1,) and mask.completed == (False, False, False)
    assert mask.bitmask.shape[0] == 1  # one mask row per constrained row
    fresh = torch.full_like(mask.bitmask, -1)
    grammar_compiler.matcher(DIGITS).fill_bitmask(fresh, 0)
    assert torch.equal(mask.bitmask[0], fresh[0])
    state.mask(["b"], [SamplingParams(structured=DIGITS)], [[]])
    assert len(made) == 1  # one compiler for every request


def test_accepted_tokens_advance_to_completion_then_eos_only(grammar_compiler, grammar_tok):
    state = make_state(grammar_compiler)
    params = [SamplingParams(structured=DIGITS)]
    eos = grammar_compiler.stop_token_ids
    for token in ids(grammar_tok, "42"):
        state.mask(["a"], params, [[]])
        assert state.accept(["a"], [token]) == [token]
    mask = state.mask(["a"], params, [[]])
    assert mask.completed == (True,)
    assert allowed(mask.bitmask, 0, grammar_compiler.vocab_size) == set(eos)
    assert state.accept(["a"], [eos[0]]) == [eos[0]]  # terminates it; it still allows EOS only
    assert allowed(state.mask(["a"], params, [[]]).bitmask, 0, grammar_compiler.vocab_size) == set(eos)


def test_a_dropped_request_forgets_its_queued_ids(grammar_compiler, grammar_tok):
    state = make_state(grammar_compiler)
    params = [SamplingParams(structured=JSON_PAIR)]
    brace = ids(grammar_tok, '{"x": 1')[:1]
    state.mask(["a"], params, [[]])
    state.accept(["a"], brace)  # queued, then the request is preempted before the next step
    state.drop("a")
    mask = state.mask(["a"], params, [[]])  # back with no outputs (recomputed): a fresh matcher, nothing replayed
    fresh = torch.full_like(mask.bitmask, -1)
    grammar_compiler.matcher(JSON_PAIR).fill_bitmask(fresh, 0)
    assert torch.equal(mask.bitmask, fresh)
    assert brace[0] in allowed(mask.bitmask, 0, grammar_compiler.vocab_size)  # had it been accepted: not the start


def test_a_resumed_request_replays_its_outputs(grammar_compiler, grammar_tok):
    state = make_state(grammar_compiler)
    params = [SamplingParams(structured=JSON_PAIR)]
    so_far = ids(grammar_tok, '{"x": 1')
    state.mask(["a"], params, [[]])
    state.accept(["a"], [so_far[0]])
    state.drop("a")  # preempted; it comes back in full with its outputs
    mask = state.mask(["a"], params, [so_far])
    expected = torch.full_like(mask.bitmask, -1)
    grammar_compiler.matcher(JSON_PAIR, so_far).fill_bitmask(expected, 0)
    assert torch.equal(mask.bitmask, expected)
    assert ids(grammar_tok, "}")[0] in allowed(mask.bitmask, 0, grammar_compiler.vocab_size)


def test_a_refused_token_ends_the_request_with_eos(grammar_compiler, grammar_tok):
    state = make_state(grammar_compiler)
    params = [PLAIN, SamplingParams(structured=DIGITS)]
    letter = ids(grammar_tok, "x")[0]
    state.mask(["p", "a"], params, [[], []])
    eos = grammar_compiler.stop_token_ids[0]
    assert state.accept(["p", "a"], [letter, letter]) == [letter, letter]  # queued: advanced at the next mask
    mask = state.mask(["p", "a"], params, [[letter], [letter]])
    assert mask.rows == (1,) and mask.completed == (False, True)  # completed: min_tokens must not ban EOS
    assert allowed(mask.bitmask, 0, grammar_compiler.vocab_size) == set(grammar_compiler.stop_token_ids)
    assert state.accept(["p", "a"], [letter, letter]) == [letter, eos]  # the plain row keeps its token


def test_outputs_that_break_the_grammar_on_replay_end_the_request(grammar_compiler, grammar_tok):
    state = make_state(grammar_compiler)
    mask = state.mask(["a"], [SamplingParams(structured=DIGITS)], [ids(grammar_tok, "ab")])
    assert mask.completed == (True,)
    assert allowed(mask.bitmask, 0, grammar_compiler.vocab_size) == set(grammar_compiler.stop_token_ids)


def test_without_a_tokenizer_structured_requests_end_at_once(grammar_compiler):
    state = StructuredOutputState.for_tokenizer(None, grammar_compiler.vocab_size, grammar_compiler.stop_token_ids)
    mask = state.mask(["a", "b"], [SamplingParams(structured=DIGITS), PLAIN], [[], []])
    assert mask.rows == (0,) and mask.bitmask.shape[0] == 1
    assert allowed(mask.bitmask, 0, grammar_compiler.vocab_size) == set(grammar_compiler.stop_token_ids)


def test_a_step_rewrites_every_row_an_earlier_step_left_in_the_buffer(grammar_compiler, grammar_tok):
    state = make_state(grammar_compiler)
    eos = set(grammar_compiler.stop_token_ids)
    letter = ids(grammar_tok, "x")[0]
    two = [SamplingParams(structured=DIGITS)] * 2
    state.mask(["a", "b"], two, [[], []])
    state.accept(["a", "b"], [letter, letter])  # both broken: their rows allow EOS only
    assert all(allowed(state.mask(["a", "b"], two, [[], []]).bitmask, j, grammar_compiler.vocab_size) == eos
               for j in (0, 1))
    mask = state.mask(["p", "c", "b"], [PLAIN, SamplingParams(structured=JSON_PAIR), two[1]], [[], [], []])
    assert mask.rows == (1, 2) and mask.completed == (False, False, True)
    fresh = torch.full_like(mask.bitmask, -1)
    grammar_compiler.matcher(JSON_PAIR).fill_bitmask(fresh, 0)
    assert torch.equal(mask.bitmask[0], fresh[0])  # the new request's row, where "a"'s EOS-only row was
    assert allowed(mask.bitmask, 1, grammar_compiler.vocab_size) == eos


def test_sampling_params_carry_a_validated_spec():
    assert SamplingParams(structured=DIGITS).structured is DIGITS
    assert PLAIN.plain_greedy and not SamplingParams(temperature=0.0, structured=DIGITS).plain_greedy
    with pytest.raises(ValueError, match="structured must be a StructuredOutputSpec or None, got dict"):
        SamplingParams(structured={"regex": "a"})
