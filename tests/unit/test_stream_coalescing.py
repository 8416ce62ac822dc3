"""Fewer, fuller stream messages, same tokens: ``RequestOutput.followed_by`` joins two deltas of one
request; ``stream_interval`` makes the engine emit every k steps (first token and end at once); the
asyncio engine hands a consumer that fell behind what queued up in one item.

Every engine here runs a tiny random-weight llama on CPU, greedy with ignore_eos, so a run's tokens
are fixed and every way of streaming them must concatenate to the same list.
"""

from __future__ import annotations

import asyncio
import time

import pytest

from pagoda import AsyncLLMEngine, SamplingParams
from pagoda.engine.config import EngineConfig, SchedulerConfig
from pagoda.engine.llm_engine import LLMEngine
from pagoda.engine.output_processor import OutputKind
from pagoda.engine.request import CompletionOutput, Logprob, RequestOutput

PROMPT = "Once upon a time, in a quiet village by the sea,"
GREEDY = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True)


def engine_kwargs(path) -> dict:
    return {"model": str(path), "dtype": "float32", "device": "cpu", "max_model_len": 512, "cpu_kv_cache_gib": 0.05}


def delta(text: str, token_ids: list[int], index: int = 0, logprobs=None, finish_reason=None, cumulative=None):
    return CompletionOutput(index, text, token_ids, cumulative, logprobs, finish_reason)


def tokens_of(outputs: list[RequestOutput], index: int = 0) -> list[int]:
    return [t for out in outputs for t in out.outputs[index].token_ids]


# ---- RequestOutput.followed_by ------------------------------------------------------------------------


def test_followed_by_concatenates_one_completion():
    first = RequestOutput("r", "p", [7, 8], [delta("He", [1, 2])], False, 0)
    later = RequestOutput("r", None, [], [delta("llo", [3], finish_reason="length")], True, 2)
    joined = first.followed_by(later)
    (c,) = joined.outputs
    assert (c.text, c.token_ids, c.finish_reason) == ("Hello", [1, 2, 3], "length")
    assert joined.finished and joined.num_cached_tokens == 2
    assert (joined.request_id, joined.prompt, joined.prompt_token_ids) == ("r", "p", [7, 8])  # the earlier's prompt


def test_followed_by_joins_each_of_n_completions_by_index():
    first = RequestOutput("r", "p", [7], [delta("a", [1], 0), delta("x", [9], 1)], False)
    later = RequestOutput("r", "p", [7], [delta("b", [2], 0, finish_reason="stop"), delta("", [], 1)], False)
    joined = first.followed_by(later)
    assert [(c.index, c.text, c.token_ids) for c in joined.outputs] == [(0, "ab", [1, 2]), (1, "x", [9])]
    assert [c.finish_reason for c in joined.outputs] == ["stop", None]
    assert not joined.finished  # completion 1 still runs


def test_followed_by_keeps_logprobs_none_when_neither_has_them():
    joined = RequestOutput("r", None, [1], [delta("a", [1])], False).followed_by(
        RequestOutput("r", None, [1], [delta("b", [2])], False))
    assert joined.outputs[0].logprobs is None and joined.outputs[0].cumulative_logprob is None


def test_followed_by_concatenates_logprobs_and_takes_the_later_cumulative():
    lp1, lp2, lp3 = {1: Logprob(-0.1, 1, "a")}, {2: Logprob(-0.2, 1, "b")}, {3: Logprob(-0.3, 2, "c")}
    first = RequestOutput("r", None, [1], [delta("a", [1], logprobs=[lp1], cumulative=-0.1)], False)
    later = RequestOutput("r", None, [1], [delta("bc", [2, 3], logprobs=[lp2, lp3], cumulative=-0.6)], False)
    (c,) = first.followed_by(later).outputs
    assert c.logprobs == [lp1, lp2, lp3] and c.cumulative_logprob == -0.6


def test_followed_by_takes_finished_from_the_later_output():
    running = RequestOutput("r", None, [1], [delta("a", [1])], False)
    done = RequestOutput("r", None, [1], [delta("", [], finish_reason="length")], True)
    assert running.followed_by(done).finished
    assert not running.followed_by(running).finished


# ---- stream_interval in the engine ----------------------------------------------------------------------


def test_stream_interval_below_one_is_refused_naming_the_field():
    with pytest.raises(ValueError, match="stream_interval must be >= 1, got 0"):
        SchedulerConfig(stream_interval=0)
    with pytest.raises(ValueError, match="stream_interval"):
        EngineConfig.from_kwargs(model="m", stream_interval=0)


@pytest.fixture(scope="module")
def engines(tiny_models):
    """stream_interval -> an offline engine on the tiny llama."""
    built = {k: LLMEngine.from_kwargs(**engine_kwargs(tiny_models["llama"]), stream_interval=k) for k in (1, 3)}
    yield built
    for engine in built.values():
        engine.shutdown()


def run_to_end(engine: LLMEngine, request_id: str, kind: OutputKind) -> list[RequestOutput]:
    engine.add_request(request_id, PROMPT, GREEDY, output_kind=kind)
    outputs = []
    while engine.has_unfinished_requests():
        outputs += [out for out in engine.step() if out.request_id == request_id]
    return outputs


def test_interval_3_streams_the_same_tokens_as_every_step_and_as_one_final_output(engines):
    every_step = run_to_end(engines[1], "every-step", OutputKind.DELTA)
    every_third = run_to_end(engines[3], "every-third", OutputKind.DELTA)
    (final,) = run_to_end(engines[3], "final", OutputKind.FINAL)
    assert len(final.outputs[0].token_ids) == GREEDY.max_tokens
    assert tokens_of(every_third) == tokens_of(every_step) == final.outputs[0].token_ids
    assert "".join(o.outputs[0].text for o in every_third) == final.outputs[0].text
    assert len(every_step) == GREEDY.max_tokens and len(every_third) < len(every_step)


def test_interval_3_sends_the_first_token_alone_then_at_most_3_and_finishes_last(engines):
    outputs = run_to_end(engines[3], "shape", OutputKind.DELTA)
    sizes = [len(out.outputs[0].token_ids) for out in outputs]
    assert sizes == [1, 3, 3, 3]  # the first token alone (TTFT is not held back), then every third step
    assert outputs[-1].finished and outputs[-1].outputs[0].finish_reason == "length"
    assert not any(out.finished for out in outputs[:-1])


def test_interval_3_cumulative_outputs_grow_to_all_tokens(engines):
    outputs = run_to_end(engines[3], "cumulative", OutputKind.CUMULATIVE)
    want = tokens_of(run_to_end(engines[1], "cumulative-ref", OutputKind.DELTA))
    assert outputs[0].outputs[0].token_ids == want[:1]
    assert outputs[-1].finished and outputs[-1].outputs[0].token_ids == want
    assert len(outputs) < len(want)


# ---- a consumer that falls behind the asyncio engine ----------------------------------------------------


def idle(engine: AsyncLLMEngine) -> bool:
    stats = engine.stats()
    return (stats.num_running, stats.num_waiting, stats.kv_cache_usage) == (0, 0, 0)


@pytest.fixture(scope="module")
def async_engine(tiny_models):
    engine = AsyncLLMEngine.from_kwargs(**engine_kwargs(tiny_models["llama"]))
    yield engine
    engine.shutdown()


async def consume(engine: AsyncLLMEngine, request_id: str, params: SamplingParams, kind: OutputKind,
                  stall: bool) -> list[RequestOutput]:
    """All outputs of one stream; with ``stall`` the consumer takes the first item, then does not ask
    for more until the engine has finished the request (everything else queues up meanwhile)."""
    outputs = []
    async for out in engine.generate(PROMPT, params, request_id, output_kind=kind):
        outputs.append(out)
        if stall and len(outputs) == 1:
            while not idle(engine):
                await asyncio.sleep(0.01)
    return outputs


def test_a_slow_delta_consumer_gets_fewer_items_with_the_same_tokens(async_engine):
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    fast = asyncio.run(consume(async_engine, "fast", params, OutputKind.DELTA, stall=False))
    slow = asyncio.run(consume(async_engine, "slow", params, OutputKind.DELTA, stall=True))
    assert len(tokens_of(fast)) == params.max_tokens
    assert tokens_of(slow) == tokens_of(fast)
    assert "".join(o.outputs[0].text for o in slow) == "".join(o.outputs[0].text for o in fast)
    assert len(slow) < len(fast)
    assert slow[-1].finished and not any(o.finished for o in slow[:-1])


def test_a_slow_cumulative_consumer_gets_the_latest_output_holding_every_token(async_engine):
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    fast = asyncio.run(consume(async_engine, "fast-cum", params, OutputKind.DELTA, stall=False))
    slow = asyncio.run(consume(async_engine, "slow-cum", params, OutputKind.CUMULATIVE, stall=True))
    assert slow[-1].finished and slow[-1].outputs[0].token_ids == tokens_of(fast)
    assert len(slow) < params.max_tokens


def test_leaving_a_stream_that_fell_behind_frees_its_blocks(async_engine):
    params = SamplingParams(temperature=0.0, max_tokens=480, ignore_eos=True)

    async def walk_away() -> RequestOutput:
        seen = []
        async for out in async_engine.generate(PROMPT, params, "walk-away", output_kind=OutputKind.DELTA):
            seen.append(out)
            if len(seen) == 2:
                break  # the second item held what queued up during the sleep
            await asyncio.sleep(0.05)
        return seen[-1]

    last = asyncio.run(walk_away())
    assert not last.finished  # left mid-request: there was something to abort
    for _ in range(500):  # the abort lands at the engine thread's next turn
        if idle(async_engine):
            break
        time.sleep(0.01)
    assert idle(async_engine), async_engine.stats()
