"""Every bad input is a ValueError naming the field and the limit; requests already running
finish correctly and no KV block leaks."""

from __future__ import annotations

import pytest

from pagoda import SamplingParams
from pagoda.engine.output_processor import OutputKind

GOOD_PROMPTS = ["The capital of Italy is", "List three fruits:", "def add(a, b):"]


def _bad_requests(vocab: int, max_len: int):
    """(description, callable building the arguments of add_request, expected message pattern)."""
    return [
        ("temperature < 0", lambda: ("x", SamplingParams(temperature=-0.5)), r"temperature must be in \[0, 100\]"),
        ("top_p = 0", lambda: ("x", SamplingParams(top_p=0.0)), r"top_p must be in \(0, 1\]"),
        ("top_p > 1", lambda: ("x", SamplingParams(top_p=1.5)), r"top_p must be in \(0, 1\]"),
        ("top_k = 0", lambda: ("x", SamplingParams(top_k=0)), r"top_k must be -1 \(disabled\) or >= 1"),
        ("top_k < -1", lambda: ("x", SamplingParams(top_k=-2)), r"top_k must be -1 \(disabled\) or >= 1"),
        ("max_tokens < 1", lambda: ("x", SamplingParams(max_tokens=0)), r"max_tokens must be >= 1"),
        ("prompt + max_tokens > max_model_len", lambda: ("x" * 10, SamplingParams(max_tokens=max_len)),
         rf"max_tokens \({max_len}\) must be <= max_model_len \({max_len}\)"),
        ("empty text prompt", lambda: ("", SamplingParams()), r"prompt must not be empty"),
        ("empty token prompt", lambda: ([], SamplingParams()), r"prompt must not be empty"),
        ("token id = vocab", lambda: ([1, vocab], SamplingParams()), rf"prompt_token_ids must be in \[0, vocab_size={vocab}\)"),
        ("negative token id", lambda: ([-1], SamplingParams()), rf"prompt_token_ids must be in \[0, vocab_size={vocab}\)"),
        ("n < 1", lambda: ("x", SamplingParams(n=0)), r"n must be in \[1, 64\]"),
        ("too many stop strings", lambda: ("x", SamplingParams(stop=[f"s{i}" for i in range(17)])),
         r"stop must have at most 16 strings, got 17"),
        ("stop token outside vocab", lambda: ("x", SamplingParams(stop_token_ids=[vocab + 5])),
         rf"stop_token_ids must be < vocab_size \({vocab}\)"),
    ]


def test_bad_inputs_are_rejected_while_others_run(embedded_llm):
    engine = embedded_llm.engine
    params = SamplingParams(temperature=0.0, max_tokens=24)
    expected = [o.outputs[0].token_ids for o in embedded_llm.generate(GOOD_PROMPTS, params, use_tqdm=False)]

    for i, prompt in enumerate(GOOD_PROMPTS):
        engine.add_request(f"good-{i}", prompt, params, output_kind=OutputKind.FINAL)
    engine.step()
    engine.step()
    vocab, max_len = engine.model.hf_config.vocab_size, engine.max_model_len
    for j, (what, build, pattern) in enumerate(_bad_requests(vocab, max_len)):
        with pytest.raises(ValueError, match=pattern):
            prompt, bad_params = build()
            engine.add_request(f"bad-{j}", prompt, bad_params)
        engine.step()  # the engine keeps going after every rejection
        engine.kv.check_invariants()

    finished = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            finished[out.request_id] = out.outputs[0].token_ids
    assert [finished[f"good-{i}"] for i in range(len(GOOD_PROMPTS))] == expected
    engine.kv.check_invariants()
    assert engine.kv.usage() == 0


def test_duplicate_request_id_is_rejected(embedded_llm):
    engine = embedded_llm.engine
    engine.add_request("dup", "hello", SamplingParams(max_tokens=2))
    with pytest.raises(ValueError, match="request_id 'dup' is already in use"):
        engine.add_request("dup", "hello", SamplingParams(max_tokens=2))
    engine.abort_request("dup")
    assert not engine.has_unfinished_requests()
    assert engine.kv.usage() == 0


@pytest.mark.parametrize(("first", "second"), [(("x", 3), ("x#1", 1)), (("y#1", 1), ("y", 3))],
                         ids=["then-child-id", "then-parent-id"])
def test_a_completion_id_clash_is_refused_without_touching_the_other_request(embedded_llm, first, second):
    """With n > 1 a request runs as <id>#0..<id>#n-1; a new request whose id or completion ids clash is refused
    before anything is registered, and the abort a refused stream sends afterwards leaves the first alone."""
    engine = embedded_llm.engine
    (first_id, first_n), (second_id, second_n) = first, second
    engine.add_request(first_id, "hello", SamplingParams(max_tokens=4, n=first_n, ignore_eos=True),
                       output_kind=OutputKind.FINAL)
    with pytest.raises(ValueError, match="is already in use"):
        engine.add_request(second_id, "hi", SamplingParams(max_tokens=2, n=second_n))
    engine.abort_request(second_id)  # the clean-up of a refused stream
    finished = {}
    while engine.has_unfinished_requests():
        finished.update({out.request_id: out for out in engine.step() if out.finished})
    assert list(finished) == [first_id] and [len(c.token_ids) for c in finished[first_id].outputs] == [4] * first_n
    assert engine.kv.usage() == 0
