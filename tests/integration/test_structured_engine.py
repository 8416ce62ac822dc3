"""Structured output through the engine: the embedded model's outputs under a JSON schema, a regex, EBNF
and the autoglm-action grammar all match, whatever the temperature; rows without a grammar in the same
batch get exactly the tokens they get alone; greedy structured output does not depend on the batch;
preempted requests resume their grammar; the asyncio engine serves it too.

The engine runs with async scheduling (the default): steps with a structured row never run ahead.
"""

from __future__ import annotations

import asyncio
import json
import re

import pytest

from pagoda import LLM, AsyncLLMEngine, SamplingParams
from pagoda.engine.structured import StructuredOutputSpec, parse_action

COLORS = ["red", "green", "blue"]
PERSON_SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "color": {"enum": COLORS},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
    },
    "required": ["name", "color", "age"],
    "additionalProperties": False,
}
PERSON = StructuredOutputSpec(json_schema=PERSON_SCHEMA, any_whitespace=False)
PERSON_PROMPTS = [f"Person number {i} in the village, as a JSON record:" for i in range(50)]
PLATE_REGEX = r"[A-Z]{2}-[0-9]{3}( [a-z]{1,6})?"
SUM_EBNF = 'root ::= "(" num " " op " " num ") = " num\nnum ::= [0-9] | [1-9] [0-9]\nop ::= "+" | "-" | "*"'
SUM_PATTERN = r"\((\d+) ([+*-]) (\d+)\) = (\d+)"
AUTOGLM_SHOTS = (
    'Screen: home screen. Task: open the settings.\n<think>The settings icon is at the top.</think>'
    '<answer>do(action="Tap", element=[500,120])</answer>\n'
    'Screen: a chat app. Task: go back.\n<think>I should go back.</think><answer>do(action="Back")</answer>\n'
    'Screen: a search box. Task: search for pizza.\n<think>Type the query.</think>'
    '<answer>do(action="Type", text="pizza")</answer>\n'
)
TASKS = ["open the camera", "call mom", "scroll down", "send a message", "close the app", "open maps",
         "play music", "turn on wifi", "check the weather", "take a photo"]


def check_person(text: str) -> None:
    """``text`` is JSON that PERSON_SCHEMA admits (checked by hand: no jsonschema dependency)."""
    record = json.loads(text)
    assert list(record) == ["name", "color", "age"], text  # required, no others, in the schema's order
    assert isinstance(record["name"], str) and len(record["name"]) <= 12, text
    assert record["color"] in COLORS, text
    assert type(record["age"]) is int and 0 <= record["age"] <= 120, text


def completions(llm: LLM, prompts, params) -> list:
    return [o.outputs[0] for o in llm.generate(prompts, params, use_tqdm=False)]


@pytest.mark.parametrize("temperature", [0.0, 0.7, 1.0])
def test_json_schema_outputs_parse_and_validate(embedded_llm, temperature):
    outs = completions(embedded_llm, PERSON_PROMPTS, SamplingParams(temperature=temperature, max_tokens=64,
                                                                     structured=PERSON))
    for out in outs:
        assert out.finish_reason == "stop", out.text
        check_person(out.text)
    if temperature > 0:
        assert len({out.text for out in outs}) > 10  # really sampled, not one answer 50 times


def test_regex_and_ebnf_outputs_match(embedded_llm):
    prompts = [f"Car {i} has the number plate" for i in range(8)] + [f"Sum {i}, worked out:" for i in range(8)]
    regex = SamplingParams(temperature=0.8, max_tokens=32, structured=StructuredOutputSpec(regex=PLATE_REGEX))
    ebnf = SamplingParams(temperature=0.8, max_tokens=32, structured=StructuredOutputSpec(ebnf=SUM_EBNF))
    outs = completions(embedded_llm, prompts, [regex] * 8 + [ebnf] * 8)
    assert all(out.finish_reason == "stop" for out in outs)
    assert all(re.fullmatch(PLATE_REGEX, out.text) for out in outs[:8]), [out.text for out in outs[:8]]
    assert all(re.fullmatch(SUM_PATTERN, out.text) for out in outs[8:]), [out.text for out in outs[8:]]


def test_autoglm_action_outputs_parse(embedded_llm):
    prompts = [AUTOGLM_SHOTS + f"Screen: a phone screen. Task: {task}.\n" for task in TASKS] * 5
    grammar = StructuredOutputSpec(grammar="autoglm-action")
    # max_tokens covers the grammar's longest reply (a 1024-character thought, a 256-character string); the
    # seeds keep the run time steady (the longest of these replies is a few hundred tokens)
    params = [SamplingParams(temperature=0.7, seed=i, max_tokens=1400, structured=grammar) for i in range(50)]
    outs = completions(embedded_llm, prompts, params)
    for out in outs:
        assert out.finish_reason == "stop", out.text
        action = parse_action(out.text)
        assert action["_metadata"] in ("do", "finish"), out.text


def test_rows_without_a_grammar_are_untouched(embedded_llm):
    plain = [SamplingParams(temperature=0.0, max_tokens=24), SamplingParams(temperature=0.8, seed=7, max_tokens=24),
             SamplingParams(temperature=0.0, max_tokens=12, logprobs=2)]
    plain_prompts = ["The capital of France is", "Once upon a time", "def fibonacci(n):"]
    alone = completions(embedded_llm, plain_prompts, plain)
    structured = SamplingParams(temperature=0.7, max_tokens=64, structured=PERSON)
    mixed = completions(embedded_llm, PERSON_PROMPTS[:3] + plain_prompts + PERSON_PROMPTS[3:6],
                        [structured] * 3 + plain + [structured] * 3)
    assert [out.token_ids for out in mixed[3:6]] == [out.token_ids for out in alone]
    for out in mixed[:3] + mixed[6:]:
        check_person(out.text)


def test_greedy_structured_output_does_not_depend_on_the_batch(embedded_llm):
    params = SamplingParams(temperature=0.0, max_tokens=64, structured=PERSON)
    alone = [completions(embedded_llm, [prompt], params)[0].token_ids for prompt in PERSON_PROMPTS[:2]]
    others = SamplingParams(temperature=1.0, max_tokens=20)
    batch = completions(embedded_llm, PERSON_PROMPTS[:2] + ["Tell me a story."] * 3, [params] * 2 + [others] * 3)
    assert [out.token_ids for out in batch[:2]] == alone
    assert completions(embedded_llm, PERSON_PROMPTS[1:2], params)[0].token_ids == alone[1]  # and again


def test_ignore_eos_and_min_tokens_end_with_the_grammar(embedded_llm, caplog):
    """ignore_eos stops once the grammar ends; min_tokens beyond the match does not ban the only token left
    (else the row would have no allowed token, and the runner would end it for breaking its grammar)."""
    variants = [SamplingParams(temperature=0.0, max_tokens=64, structured=PERSON, ignore_eos=True),
                SamplingParams(temperature=0.7, max_tokens=64, structured=PERSON, min_tokens=60)]
    outs = completions(embedded_llm, PERSON_PROMPTS[:2] * 2, [variants[0]] * 2 + [variants[1]] * 2)
    for out in outs:
        assert out.finish_reason == "stop" and len(out.token_ids) < 60, out
        check_person(out.text)
    assert not [r for r in caplog.records if r.name.endswith("structured_state")]


def test_preempted_requests_resume_their_grammar(embedded_path):
    llm = LLM(model=str(embedded_path), dtype="float32", device="cpu", num_blocks=12, block_size=8,
              max_num_batched_tokens=32, max_model_len=96, max_num_seqs=4)
    params = SamplingParams(temperature=0.0, max_tokens=48, structured=PERSON)
    outs = completions(llm, PERSON_PROMPTS[:6], params)
    assert llm.engine.scheduler.num_preemptions > 0
    for out in outs:
        assert out.finish_reason == "stop", out.text
        check_person(out.text)
    llm.engine.kv.check_invariants()
    llm.engine.step()  # the runner hears of the last finished requests with the next step
    assert len(llm.engine.executor.worker.runner.grammars) == 0  # every matcher dropped with its request


def test_the_async_engine_serves_a_structured_request(embedded_path):
    engine = AsyncLLMEngine.from_kwargs(model=str(embedded_path), dtype="float32", device="cpu", max_model_len=1024)

    async def main():
        params = SamplingParams(temperature=0.7, max_tokens=64, structured=PERSON)
        plain = SamplingParams(temperature=0.0, max_tokens=16)
        async def collect(prompt, sampling, rid):
            return [out async for out in engine.generate(prompt, sampling, rid)]

        return await asyncio.gather(collect(PERSON_PROMPTS[0], params, "json"), collect("The sky is", plain, "plain"))

    try:
        json_stream, plain_stream = asyncio.run(main())
    finally:
        engine.shutdown()
    final = json_stream[-1].outputs[0]
    assert final.finish_reason == "stop"
    check_person(final.text)
    assert plain_stream[-1].outputs[0].finish_reason == "length"


def test_tensor_parallel_ranks_follow_rank_0s_grammar(tmp_path, embedded_path):
    """TP=2 (two gloo ranks, a tiny random Llama with the embedded tokenizer): rank 0 masks and samples,
    rank 1 appends its ids; the tokens equal TP=1's."""
    from tests.tiny_models import make_tiny_model

    path = make_tiny_model("llama", tmp_path / "llama", embedded_path)
    plate = StructuredOutputSpec(regex=PLATE_REGEX)
    params = [SamplingParams(temperature=0.0, max_tokens=20, structured=plate),
              SamplingParams(temperature=0.8, seed=3, max_tokens=20, structured=plate),
              SamplingParams(temperature=0.0, max_tokens=10)]
    kwargs = {"model": str(path), "device": "cpu", "dtype": "float32", "max_model_len": 104}
    prompts = ["a b c", "d e", "f"]
    reference = [out.token_ids for out in completions(LLM(**kwargs), prompts, params)]
    llm = LLM(tensor_parallel_size=2, **kwargs)
    try:
        outs = completions(llm, prompts, params)
    finally:
        llm.engine.shutdown()
    assert [out.token_ids for out in outs] == reference
    assert all(out.finish_reason == "stop" and re.fullmatch(PLATE_REGEX, out.text) for out in outs[:2])
