"""bench/structured.py's pieces that decide what a run counts: the validity check of a constrained
output, which rows each mode constrains, and the stand-in tokenizer that random-weight runs compile
their grammar against (JSON must be spellable with it, and only valid JSON)."""

from __future__ import annotations

import json

import pytest
import torch

from bench.structured import SCHEMA, _byte_char, byte_level_tokenizer, constrained_rows, is_valid

GOOD = {"name": "Ann", "age": 31, "color": "red", "tags": ["a", "bb"]}


def test_is_valid_takes_what_the_schema_admits():
    assert is_valid(json.dumps(GOOD))
    assert is_valid(json.dumps(GOOD, separators=(",", ":")))


@pytest.mark.parametrize("change", [
    {"age": 121}, {"age": 3.0}, {"age": True}, {"color": "pink"}, {"name": ""}, {"name": "x" * 25},
    {"tags": []}, {"tags": ["a"] * 4}, {"tags": ["x" * 13]}, {"tags": [1]}, {"extra": 1},
])
def test_is_valid_refuses_what_the_schema_does_not(change):
    assert not is_valid(json.dumps(GOOD | change))


def test_is_valid_refuses_broken_json_and_missing_fields():
    assert not is_valid(json.dumps(GOOD)[:-1])
    assert not is_valid(json.dumps({k: v for k, v in GOOD.items() if k != "tags"}))
    assert not is_valid("[1, 2]")


def test_modes_constrain_none_half_and_all():
    assert [len(constrained_rows(m, 6)) for m in ("unconstrained", "mixed", "constrained")] == [0, 3, 6]


def test_the_byte_alphabet_is_gpt2s():
    from tokenizers import pre_tokenizers

    assert {_byte_char(b) for b in range(256)} == set(pre_tokenizers.ByteLevel.alphabet())


def test_random_sampling_under_the_schema_with_the_stand_in_tokenizer_gives_valid_json():
    from pagoda.engine.structured import StructuredOutputSpec
    from pagoda.engine.structured.grammar import GrammarCompiler, allocate_bitmask, apply_bitmask

    tok = byte_level_tokenizer(3000)
    assert len(tok) == 3000 and tok.eos_token_id == 2
    compiler = GrammarCompiler(tok, vocab_size=3000, max_threads=1)
    spec = StructuredOutputSpec(json_schema=SCHEMA, any_whitespace=False)
    gen = torch.Generator().manual_seed(0)
    for _ in range(4):
        matcher, out = compiler.matcher(spec), []
        bitmask = allocate_bitmask(1, 3000)
        while not matcher.is_terminated() and len(out) < 300:  # a random model: uniform over allowed tokens
            logits = torch.zeros(1, 3000)
            matcher.fill_bitmask(bitmask, 0)
            apply_bitmask(logits, bitmask)
            token = int(torch.multinomial(logits.softmax(-1)[0], 1, generator=gen))
            assert matcher.accept(token)
            out.append(token)
        assert matcher.is_terminated()
        assert is_valid(tok.decode(out[:-1])), tok.decode(out)  # the last token is EOS
