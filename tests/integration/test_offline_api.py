"""The offline API on the embedded model: answers, sampling, stops, n, logprobs, chat."""

from __future__ import annotations

import math

from pagoda import SamplingParams
from pagoda.engine.request import RequestOutput


def _text(out: RequestOutput, i: int = 0) -> str:
    return out.outputs[i].text


def test_chat_answers_capital_of_france(embedded_llm):
    out = embedded_llm.chat([{"role": "user", "content": "What is the capital of France?"}],
                            SamplingParams(temperature=0.0, max_tokens=32), use_tqdm=False)[0]
    assert "Paris" in _text(out)
    assert out.finished and out.outputs[0].finish_reason in ("stop", "length")


def test_chat_text_parts_render_like_a_string_on_a_text_only_model(embedded_llm):
    """As the HTTP front end does: one template, one rendering, whichever way the text was given."""
    params = SamplingParams(temperature=0.0, max_tokens=8)
    parts = [{"type": "text", "text": "What is"}, {"type": "text", "text": "the capital of France?"}]
    as_parts = embedded_llm.chat([{"role": "user", "content": parts}], params, use_tqdm=False)[0]
    as_text = embedded_llm.chat([{"role": "user", "content": "What is\nthe capital of France?"}], params,
                                use_tqdm=False)[0]
    assert as_parts.prompt_token_ids == as_text.prompt_token_ids
    assert as_parts.outputs[0].token_ids == as_text.outputs[0].token_ids


def test_seeded_sampling_is_reproducible_across_batches(embedded_llm):
    params = SamplingParams(temperature=0.9, top_p=0.95, seed=1234, max_tokens=20, ignore_eos=True)
    prompt = "Tell me a story about a cat."
    alone = embedded_llm.generate([prompt], params, use_tqdm=False)[0].outputs[0].token_ids
    others = [f"Question {i}: what is {i} plus {i}?" for i in range(5)]
    batched = embedded_llm.generate(others[:3] + [prompt] + others[3:], [SamplingParams(temperature=1.0, max_tokens=20)] * 3
                                    + [params] + [SamplingParams(temperature=1.0, max_tokens=20)] * 2, use_tqdm=False)
    assert batched[3].outputs[0].token_ids == alone
    other_seed = embedded_llm.generate([prompt], SamplingParams(temperature=0.9, top_p=0.95, seed=99, max_tokens=20, ignore_eos=True),
                                       use_tqdm=False)[0].outputs[0].token_ids
    assert other_seed != alone


def test_n_completions_are_grouped_and_distinct(embedded_llm):
    out = embedded_llm.generate(["Name a color:"], SamplingParams(n=3, temperature=1.0, seed=7, max_tokens=12),
                                use_tqdm=False)[0]
    assert [c.index for c in out.outputs] == [0, 1, 2]
    assert len({tuple(c.token_ids) for c in out.outputs}) > 1
    again = embedded_llm.generate(["Name a color:"], SamplingParams(n=3, temperature=1.0, seed=7, max_tokens=12),
                                  use_tqdm=False)[0]
    assert [c.token_ids for c in again.outputs] == [c.token_ids for c in out.outputs]


def test_stop_string_is_cut_from_text(embedded_llm):
    prompt = "Count: 1, 2, 3, 4, 5, 6,"
    free = _text(embedded_llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=30), use_tqdm=False)[0])
    stop = free.strip()[2:5]  # a piece from the middle of what the model says
    assert stop and stop in free
    out = embedded_llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=30, stop=[stop]), use_tqdm=False)[0]
    completion = out.outputs[0]
    assert stop not in completion.text
    assert completion.text == free[: free.index(stop)]
    assert completion.finish_reason == "stop" and completion.stop_reason == stop


def test_max_tokens_ignore_eos_and_min_tokens(embedded_llm):
    out = embedded_llm.generate(["Hi"], SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True), use_tqdm=False)[0]
    assert len(out.outputs[0].token_ids) == 40 and out.outputs[0].finish_reason == "length"
    eos = embedded_llm.engine.eos_token_id
    out = embedded_llm.generate(["Hi"], SamplingParams(temperature=0.0, max_tokens=40, min_tokens=10), use_tqdm=False)[0]
    assert eos not in out.outputs[0].token_ids[:10]


def test_stop_token_ids_end_generation(embedded_llm):
    greedy = embedded_llm.generate(["The days of the week are"], SamplingParams(temperature=0.0, max_tokens=20),
                                   use_tqdm=False)[0].outputs[0].token_ids
    stop_id = greedy[5]
    out = embedded_llm.generate(["The days of the week are"], SamplingParams(temperature=0.0, max_tokens=20,
                                stop_token_ids=[stop_id]), use_tqdm=False)[0].outputs[0]
    assert out.token_ids == greedy[: greedy.index(stop_id) + 1]
    assert out.finish_reason == "stop" and out.stop_reason == stop_id


def test_logprobs_are_returned_per_token(embedded_llm):
    out = embedded_llm.generate(["The sky is"], SamplingParams(temperature=0.0, max_tokens=6, logprobs=3),
                                use_tqdm=False)[0].outputs[0]
    assert len(out.logprobs) == len(out.token_ids) == 6
    for token, entry in zip(out.token_ids, out.logprobs):
        assert token in entry and entry[token].rank == 1  # greedy picks the top token
        assert len(entry) >= 3 and all(lp.logprob <= 0 for lp in entry.values())
    assert math.isclose(out.cumulative_logprob, sum(e[t].logprob for t, e in zip(out.token_ids, out.logprobs)), rel_tol=1e-5)


def test_token_id_prompts_and_progress_bar(embedded_llm, capsys):
    tok = embedded_llm.get_tokenizer()
    ids = tok("Hello there").input_ids
    by_ids = embedded_llm.generate({"prompt_token_ids": ids}, SamplingParams(temperature=0.0, max_tokens=5), use_tqdm=False)
    by_text = embedded_llm.generate("Hello there", SamplingParams(temperature=0.0, max_tokens=5), use_tqdm=False)
    assert by_ids[0].outputs[0].token_ids == by_text[0].outputs[0].token_ids
    outs = embedded_llm.generate([f"Number {i}" for i in range(10)], SamplingParams(temperature=0.0, max_tokens=2))
    assert [o.prompt for o in outs] == [f"Number {i}" for i in range(10)]
    assert "Processed prompts" in capsys.readouterr().err
