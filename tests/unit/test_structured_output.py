"""Structured output (engine/structured): specs, OpenAI mappings, and grammar masks on a random model.

The random model draws seeded N(0, 1) logits over the whole vocabulary every step (64 ids wider than
the embedded SmolLM2 tokenizer, like a model with a padded vocabulary), masks them with each row's
grammar, picks a token (row i: argmax, or sampling at temperature 0.7 or 1.0, for i % 3 = 0, 1, 2) and
feeds it back, until EOS or 200 tokens. Whatever the logits, every output must match. (pagoda's
Sampler on masked logits has a test of its own: its exponential race over the whole vocabulary would
make these loops slow.)
"""

from __future__ import annotations

import json
import pickle
import re
import subprocess
import sys

import pytest
import torch

from pagoda.engine.layers.sampler import Sampler, SamplingBatch
from pagoda.engine.sampling_params import SamplingParams
from pagoda.engine.structured import StructuredOutputError, StructuredOutputSpec, from_openai
from pagoda.engine.structured.grammar import (
    GrammarCompiler,
    allocate_bitmask,
    apply_bitmask,
    fill_bitmasks,
)

TEMPERATURES = (0.0, 0.7, 1.0)
# A diagnosis, as a clinical assistant might be asked for. Strings and the list are bounded so that a
# random model (which picks a closing quote about once in 200 tokens) ends within 200 tokens.
DIAGNOSIS_SCHEMA = {
    "type": "object",
    "properties": {
        "diagnosis": {"type": "string", "maxLength": 40},
        "confidence": {"type": "number", "minimum": 0, "maximum": 1},
        "explanation": {"type": "string", "maxLength": 80},
        "drugs": {"type": "array", "items": {"type": "string", "maxLength": 20}, "maxItems": 3},
    },
    "required": ["diagnosis", "confidence", "explanation", "drugs"],
    "additionalProperties": False,
}
CONTACT_REGEX = r"[a-z]{1,12}@[a-z]{1,8}\.(com|org)|\+[0-9]{1,3} [0-9]{3}-[0-9]{4}"


def random_model(grammar_compiler, grammar_tok, spec, n=50, seed=0, max_tokens=200) -> list[str]:
    """n outputs of the random model (see the module docstring); each must have ended on EOS."""
    gen = torch.Generator().manual_seed(seed)
    temperature = torch.tensor([TEMPERATURES[i % 3] or 1.0 for i in range(n)]).unsqueeze(1)  # (n, 1)
    greedy = torch.tensor([TEMPERATURES[i % 3] == 0 for i in range(n)])
    matchers = [grammar_compiler.matcher(spec) for _ in range(n)]
    outputs: list[list[int]] = [[] for _ in range(n)]
    bitmask = allocate_bitmask(n, grammar_compiler.vocab_size)
    for _ in range(max_tokens):
        live = [None if m.is_terminated() else m for m in matchers]
        if not any(live):
            break
        logits = torch.randn(n, grammar_compiler.vocab_size, generator=gen)
        rows = fill_bitmasks(live, bitmask)
        apply_bitmask(logits, bitmask[rows], rows)  # mask row j for logits row rows[j]
        cdf = (logits / temperature).softmax(-1).cumsum(-1)  # inverse-CDF sampling: multinomial is 20x slower
        u = torch.rand(n, 1, generator=gen) * cdf[:, -1:]
        sampled = torch.searchsorted(cdf, u, right=True).squeeze(1)  # first token whose mass passes u
        tokens = torch.where(greedy, logits.argmax(-1), sampled).tolist()
        for row in rows:
            assert matchers[row].accept(tokens[row]), f"row {row}: the mask allowed {tokens[row]}, the matcher not"
            if not matchers[row].is_terminated():
                outputs[row].append(tokens[row])
    unfinished = [i for i, m in enumerate(matchers) if not m.is_terminated()]
    assert not unfinished, f"rows {unfinished} did not end within {max_tokens} tokens"
    return [grammar_tok.decode(out) for out in outputs]


def accepts(grammar_compiler, grammar_tok, spec, text: str) -> bool:
    """Whether the grammar takes ``text`` as a complete output (tokenization does not matter: the
    matcher works on the bytes)."""
    matcher = grammar_compiler.matcher(spec)
    return all(matcher.accept(t) for t in grammar_tok.encode(text, add_special_tokens=False)) and matcher.is_completed()


def allowed_ids(matcher, vocab_size: int) -> list[int]:
    bitmask = allocate_bitmask(1, vocab_size)
    matcher.fill_bitmask(bitmask, 0)
    logits = torch.zeros(1, vocab_size)
    apply_bitmask(logits, bitmask)
    return torch.isfinite(logits[0]).nonzero().flatten().tolist()


def check_diagnosis(value) -> None:
    try:
        import jsonschema
    except ImportError:  # the same checks by hand
        assert isinstance(value, dict) and set(value) == set(DIAGNOSIS_SCHEMA["required"]), value
        assert isinstance(value["diagnosis"], str) and len(value["diagnosis"]) <= 40
        assert type(value["confidence"]) in (int, float) and 0 <= value["confidence"] <= 1
        assert isinstance(value["explanation"], str) and len(value["explanation"]) <= 80
        assert isinstance(value["drugs"], list) and len(value["drugs"]) <= 3
        assert all(isinstance(d, str) and len(d) <= 20 for d in value["drugs"])
    else:
        jsonschema.validate(value, DIAGNOSIS_SCHEMA)


# ---------------------------------------------------------------------------------- random model


def test_random_model_outputs_validate_against_a_json_schema(grammar_compiler, grammar_tok):
    outputs = random_model(grammar_compiler, grammar_tok, StructuredOutputSpec(json_schema=DIAGNOSIS_SCHEMA))
    for text in outputs:
        check_diagnosis(json.loads(text))  # strict: a raw control character in a string fails here
    assert len(set(outputs)) > 40  # the rows really sampled different outputs


def test_random_model_outputs_match_a_regex(grammar_compiler, grammar_tok):
    outputs = random_model(grammar_compiler, grammar_tok, StructuredOutputSpec(regex=CONTACT_REGEX), seed=1)
    assert all(re.fullmatch(CONTACT_REGEX, text) for text in outputs), outputs


def test_random_model_outputs_are_one_of_the_choices(grammar_compiler, grammar_tok):
    choices = ["benign", "malignant", "needs a biopsy", 'say "ah"']
    spec = from_openai({"structured_outputs": {"choice": choices}})
    assert set(random_model(grammar_compiler, grammar_tok, spec, n=30, seed=2)) <= set(choices)


def test_compact_json_has_no_whitespace_between_tokens(grammar_compiler, grammar_tok):
    spec = StructuredOutputSpec(json_schema=DIAGNOSIS_SCHEMA, any_whitespace=False)
    for text in random_model(grammar_compiler, grammar_tok, spec, n=9, seed=3):
        check_diagnosis(json.loads(text))
        outside_strings = re.sub(r'"[^"\\]*"', '""', text)  # these strings have no escapes
        assert not re.search(r"[\n\r\t]|  ", outside_strings), text  # only xgrammar's ", " and ": "


def test_json_object_takes_any_object_and_nothing_else(grammar_compiler, grammar_tok):
    spec = StructuredOutputSpec(json_object=True)
    assert accepts(grammar_compiler, grammar_tok, spec, '{"a": [1, 2.5, "x\\ny"], "b": {"c": null}}')
    assert not accepts(grammar_compiler, grammar_tok, spec, "[1, 2]")
    assert not accepts(grammar_compiler, grammar_tok, spec, '{"a": 1')


def test_length_bounded_json_strings_take_no_raw_control_characters(grammar_compiler, grammar_tok):
    # xgrammar 0.2.9 lets them through (mlc-ai/xgrammar#800); spec.py narrows the character class.
    spec = StructuredOutputSpec(json_schema={"type": "object", "properties": {"a": {"type": "string", "maxLength": 8}}})
    assert accepts(grammar_compiler, grammar_tok, spec, '{"a": "x y"}')
    assert not accepts(grammar_compiler, grammar_tok, spec, '{"a": "x\ty"}')
    assert not accepts(grammar_compiler, grammar_tok, spec, '{"a": "x\x1fy"}')
    assert not accepts(grammar_compiler, grammar_tok, spec, '{"a": "123456789"}')


# ---------------------------------------------------------------------------------------- masks


def test_a_mixed_batch_masks_only_the_constrained_rows(grammar_compiler):
    vocab = grammar_compiler.vocab_size
    matchers = [grammar_compiler.matcher(StructuredOutputSpec(regex="[0-9]+")), None,
                grammar_compiler.matcher(StructuredOutputSpec(json_object=True)), None]
    logits = torch.randn(4, vocab, generator=torch.Generator().manual_seed(0))
    original = logits.clone()
    bitmask = allocate_bitmask(4, vocab)
    rows = fill_bitmasks(matchers, bitmask)
    apply_bitmask(logits, bitmask[rows], rows)
    assert rows == [0, 2]
    assert torch.equal(logits[[1, 3]], original[[1, 3]])  # bit for bit
    for row in rows:
        allowed = torch.isfinite(logits[row])
        assert allowed.nonzero().flatten().tolist() == allowed_ids(matchers[row], vocab)
        assert torch.equal(logits[row][allowed], original[row][allowed])
        assert 0 < int(allowed.sum()) < len(allowed)


def test_the_sampler_picks_only_allowed_tokens_from_masked_logits(grammar_compiler, grammar_tok):
    spec = StructuredOutputSpec(regex=CONTACT_REGEX)
    params = [SamplingParams(temperature=0.0), SamplingParams(temperature=0.8, top_k=50, seed=1),
              SamplingParams(temperature=1.0, top_p=0.9, min_p=0.05, repetition_penalty=1.3, seed=2),
              SamplingParams(temperature=1.0, presence_penalty=1.0, logprobs=2, seed=3), SamplingParams(seed=4)]
    matchers = [grammar_compiler.matcher(spec) for _ in params[:-1]] + [None]  # the last row is unconstrained
    outputs: list[list[int]] = [[] for _ in params]
    gen = torch.Generator().manual_seed(5)
    for _ in range(30):
        logits = torch.randn(len(params), grammar_compiler.vocab_size, generator=gen) * 3
        bitmask = allocate_bitmask(len(params), grammar_compiler.vocab_size)
        rows = fill_bitmasks([m if m and not m.is_terminated() else None for m in matchers], bitmask)
        apply_bitmask(logits, bitmask[rows], rows)  # mask row j for logits row rows[j]
        batch = SamplingBatch.build(params, [[11, 12, 13]] * len(params), outputs, grammar_compiler.stop_token_ids,
                                    grammar_compiler.vocab_size, torch.device("cpu"))
        tokens, _ = Sampler()(logits, batch)
        for row in rows:
            assert matchers[row].accept(tokens[row])
            outputs[row].append(tokens[row])
    for row, matcher in enumerate(matchers[:-1]):
        assert matcher.is_terminated(), row
        assert re.fullmatch(CONTACT_REGEX, grammar_tok.decode(outputs[row][:-1]))


def test_padded_vocabulary_ids_are_never_allowed(grammar_compiler, grammar_tok):
    matcher = grammar_compiler.matcher(StructuredOutputSpec(regex=".{1,5}"))
    allowed = allowed_ids(matcher, grammar_compiler.vocab_size)
    assert len(allowed) > 1000 and max(allowed) < len(grammar_tok)
    assert not matcher.accept(len(grammar_tok) + 1) and not matcher.accept(grammar_compiler.vocab_size + 5)


def test_after_a_complete_match_only_eos_is_allowed(grammar_compiler, grammar_tok):
    matcher = grammar_compiler.matcher(StructuredOutputSpec(regex="yes|no"))
    for token in grammar_tok.encode("yes", add_special_tokens=False):
        assert matcher.accept(token)
    eos = grammar_compiler.stop_token_ids[0]
    assert matcher.is_completed() and not matcher.is_terminated()
    assert allowed_ids(matcher, grammar_compiler.vocab_size) == sorted(grammar_compiler.stop_token_ids)
    assert matcher.accept(eos) and matcher.is_terminated()
    assert allowed_ids(matcher, grammar_compiler.vocab_size) == sorted(grammar_compiler.stop_token_ids)  # stays so
    assert matcher.accept(eos) and not matcher.accept(grammar_tok.encode("no", add_special_tokens=False)[0])


def test_a_rejected_token_leaves_the_matcher_where_it_was(grammar_compiler, grammar_tok):
    matcher = grammar_compiler.matcher(StructuredOutputSpec(regex="[0-9]{3}"))
    before = allowed_ids(matcher, grammar_compiler.vocab_size)
    assert not matcher.accept(grammar_tok.encode("x", add_special_tokens=False)[0])
    assert not matcher.accept(grammar_compiler.stop_token_ids[0])  # EOS before the match is complete
    assert allowed_ids(matcher, grammar_compiler.vocab_size) == before


def test_a_resumed_request_replays_its_tokens(grammar_compiler, grammar_tok):
    spec = StructuredOutputSpec(json_schema=DIAGNOSIS_SCHEMA)
    tokens = grammar_tok.encode('{"diagnosis": "flu", "confidence": 0.', add_special_tokens=False)
    stepped = grammar_compiler.matcher(spec)
    assert all(stepped.accept(t) for t in tokens)
    resumed = grammar_compiler.matcher(spec, output_token_ids=tokens)
    assert allowed_ids(resumed, grammar_compiler.vocab_size) == allowed_ids(stepped, grammar_compiler.vocab_size)
    with pytest.raises(ValueError, match="does not match"):
        grammar_compiler.matcher(spec, output_token_ids=grammar_tok.encode("[1]", add_special_tokens=False))


def test_compiled_grammars_are_cached_least_recently_used_first(grammar_tok):
    grammar_compiler = GrammarCompiler(grammar_tok, vocab_size=len(grammar_tok), cache_size=2, max_threads=1)
    a, b, c = (StructuredOutputSpec(regex=r) for r in ("a+", "b+", "c+"))
    first_a = grammar_compiler.compile(a)
    assert grammar_compiler.compile(StructuredOutputSpec(regex="a+")) is first_a  # equal spec, same entry
    grammar_compiler.compile(b)
    grammar_compiler.compile(a)  # a is now the most recent
    grammar_compiler.compile(c)  # evicts b
    assert grammar_compiler.compile(a) is first_a


def test_apply_bitmask_handles_non_contiguous_logits(grammar_compiler):
    # xgrammar's CPU kernel ignores strides: a transposed view came out half unmasked.
    matcher = grammar_compiler.matcher(StructuredOutputSpec(regex="[0-9]"))
    bitmask = allocate_bitmask(1, grammar_compiler.vocab_size)  # for logits row 1
    matcher.fill_bitmask(bitmask, 0)
    logits = torch.randn(grammar_compiler.vocab_size, 2).t()
    assert not logits.is_contiguous()
    apply_bitmask(logits, bitmask, [1])
    assert torch.isfinite(logits[1]).nonzero().flatten().tolist() == allowed_ids(matcher, grammar_compiler.vocab_size)
    assert torch.isfinite(logits[0]).all()


def test_apply_bitmask_refuses_a_bitmask_narrower_than_the_logits(grammar_compiler):
    with pytest.raises(ValueError, match="fewer than"):
        apply_bitmask(torch.zeros(1, grammar_compiler.vocab_size + 64), allocate_bitmask(1, grammar_compiler.vocab_size))


@pytest.mark.gpu
def test_apply_bitmask_on_the_gpu_matches_the_cpu(grammar_compiler):
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    matchers = [grammar_compiler.matcher(StructuredOutputSpec(regex="[a-z]+")), None, grammar_compiler.matcher(
        StructuredOutputSpec(json_object=True))]
    bitmask = allocate_bitmask(3, grammar_compiler.vocab_size, pin_memory=True)
    rows = fill_bitmasks(matchers, bitmask)
    logits = torch.randn(3, grammar_compiler.vocab_size)
    on_gpu = logits.cuda()
    apply_bitmask(logits, bitmask[rows], rows)
    apply_bitmask(on_gpu, bitmask[rows].pin_memory(), rows)  # the host mask is copied to the device
    assert torch.equal(on_gpu.cpu(), logits)


# ----------------------------------------------------------------------------------------- specs


@pytest.mark.parametrize(
    "kwargs, field, words",
    [
        ({"regex": "a(b"}, "structured_outputs.regex", "parenthesis is not closed"),
        ({"ebnf": "root ::= missing"}, "structured_outputs.ebnf", 'Rule "missing" is not defined'),
        ({"json_schema": {"type": "strin"}}, "structured_outputs.json_schema", 'Unsupported type "strin"'),
        ({"json_schema": "{not json"}, "structured_outputs.json_schema", "not valid JSON"),
        ({"json_schema": [1]}, "structured_outputs.json_schema", "must be a JSON schema object"),
        ({"grammar": "no-such-grammar"}, "structured_outputs.grammar", "unknown grammar"),
        ({"regex": ""}, "structured_outputs.regex", "non-empty string"),
        ({"regex": "a" * 70000}, "structured_outputs.regex", "the limit is 65536"),
        ({"json_object": "yes"}, "structured_outputs.json_object", "must be true"),
        ({"regex": "a", "ebnf": 'root ::= "a"'}, "structured_outputs", "exactly one of"),
        ({}, "structured_outputs", "got none"),
    ],
)
def test_spec_errors_name_the_field(kwargs, field, words):
    with pytest.raises(ValueError, match=re.escape(words)) as info:
        StructuredOutputSpec(**kwargs)
    assert info.value.field == field and str(info.value).startswith(field + ": ")


def test_spec_is_canonical_hashable_and_picklable():
    as_dict = StructuredOutputSpec(json_schema={"type": "object", "properties": {"b": {}, "a": {}}})
    as_text = StructuredOutputSpec(json_schema='{"type": "object",  "properties": {"b": {}, "a": {}}}')
    assert as_dict == as_text and hash(as_dict) == hash(as_text)
    assert as_dict.json_schema == '{"type":"object","properties":{"b":{},"a":{}}}'  # key order is output order
    assert pickle.loads(pickle.dumps(as_dict)) == as_dict
    error = pickle.loads(pickle.dumps(StructuredOutputError("response_format.type", "bad")))
    assert error.field == "response_format.type" and str(error) == "response_format.type: bad"


def test_importing_the_package_loads_neither_torch_nor_xgrammar():
    code = ("import sys, pagoda.engine.structured as s; s.grammar_names(); "
            "print(sorted(m for m in ('torch', 'xgrammar') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


# ------------------------------------------------------------------------------------ from_openai


@pytest.mark.parametrize(
    "body, expected",
    [
        ({}, None),
        ({"response_format": {"type": "text"}}, None),
        ({"response_format": {"type": "json_object"}}, StructuredOutputSpec(json_object=True)),
        ({"response_format": {"type": "json_schema", "json_schema": {
            "name": "dx", "strict": True, "schema": DIAGNOSIS_SCHEMA}}},
         StructuredOutputSpec(json_schema=DIAGNOSIS_SCHEMA)),
        ({"structured_outputs": {"json": DIAGNOSIS_SCHEMA}}, StructuredOutputSpec(json_schema=DIAGNOSIS_SCHEMA)),
        ({"structured_outputs": {"json": json.dumps(DIAGNOSIS_SCHEMA), "disable_any_whitespace": True}},
         StructuredOutputSpec(json_schema=DIAGNOSIS_SCHEMA, any_whitespace=False)),
        ({"structured_outputs": {"json_object": True}}, StructuredOutputSpec(json_object=True)),
        ({"structured_outputs": {"regex": "[0-9]+", "disable_fallback": True}}, StructuredOutputSpec(regex="[0-9]+")),
        ({"structured_outputs": {"choice": ["yes", 'a "b"\n']}},
         StructuredOutputSpec(ebnf='root ::= "yes" | "a \\"b\\"\\n"')),
        ({"structured_outputs": {"grammar": "autoglm-action"}}, StructuredOutputSpec(grammar="autoglm-action")),
        ({"structured_outputs": {"grammar": 'root ::= "x"'}}, StructuredOutputSpec(ebnf='root ::= "x"')),
        ({"response_format": {"type": "text"}, "structured_outputs": {"regex": "x"}}, StructuredOutputSpec(regex="x")),
    ],
)
def test_from_openai_maps_request_fields(body, expected):
    assert from_openai(body) == expected


@pytest.mark.parametrize(
    "body, field",
    [
        ({"response_format": "json"}, "response_format"),
        ({"response_format": {"type": "xml"}}, "response_format.type"),
        ({"response_format": {"type": "json_schema"}}, "response_format.json_schema"),
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, "response_format.json_schema.schema"),
        ({"response_format": {"type": "json_schema", "json_schema": {"name": 3, "schema": {}}}},
         "response_format.json_schema.name"),
        ({"response_format": {"type": "json_schema", "json_schema": {"schema": {"type": "strin"}}}},
         "response_format.json_schema.schema"),
        ({"structured_outputs": {"json": {"type": "strin"}}}, "structured_outputs.json"),
        ({"structured_outputs": {"regex": "("}}, "structured_outputs.regex"),
        ({"structured_outputs": {"choice": []}}, "structured_outputs.choice"),
        ({"structured_outputs": {"choice": ["a", 1]}}, "structured_outputs.choice"),
        ({"structured_outputs": {"grammar": "no-such-grammar"}}, "structured_outputs.grammar"),
        ({"structured_outputs": {"grammar": "root ::= nothing"}}, "structured_outputs.grammar"),
        ({"structured_outputs": {"json_object": "yes"}}, "structured_outputs.json_object"),
        ({"structured_outputs": {"regex": "a", "choice": ["a"]}}, "structured_outputs"),
        ({"structured_outputs": {}}, "structured_outputs"),
        ({"structured_outputs": {"whitespace_pattern": " *"}}, "structured_outputs.whitespace_pattern"),
        ({"structured_outputs": {"regex": "a", "disable_any_whitespace": "no"}},
         "structured_outputs.disable_any_whitespace"),
        ({"structured_outputs": ["regex"]}, "structured_outputs"),
        ({"response_format": {"type": "json_object"}, "structured_outputs": {"regex": "a"}}, "structured_outputs"),
    ],
)
def test_from_openai_errors_name_the_field(body, field):
    with pytest.raises(StructuredOutputError) as info:
        from_openai(body)
    assert info.value.field == field, str(info.value)
