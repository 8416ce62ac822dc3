"""AsyncLLMEngine: per-request streams, concurrency, cancellation that frees KV blocks — with the engine on a
thread of this process and in a process of its own (the stream tests run on both cores)."""

from __future__ import annotations

import asyncio
import time

import pytest

from pagoda import AsyncLLMEngine, SamplingParams
from pagoda.engine.output_processor import OutputKind


@pytest.fixture(scope="module", params=["thread", "process"])
def async_engine(embedded_path, request):
    engine = AsyncLLMEngine.from_kwargs(model=str(embedded_path), dtype="float32", device="cpu", max_model_len=1024,
                                        core=request.param)
    yield engine
    engine.shutdown()


async def _collect(engine, prompt, params, rid, kind=OutputKind.CUMULATIVE):
    return [out async for out in engine.generate(prompt, params, rid, output_kind=kind)]


def _wait_idle(engine, timeout=1.0) -> float:
    """Until the engine's snapshot shows no work (the engine thread then waits on its command queue)."""
    start = time.monotonic()
    while engine.snapshot().has_work and time.monotonic() - start < timeout:
        time.sleep(0.01)
    return time.monotonic() - start


def test_streams_match_offline_greedy(async_engine, embedded_llm):
    params = SamplingParams(temperature=0.0, max_tokens=16)
    prompts = [f"Fact number {i} about the moon:" for i in range(8)]
    expected = [o.outputs[0] for o in embedded_llm.generate(prompts, params, use_tqdm=False)]

    async def main():
        return await asyncio.gather(*[_collect(async_engine, p, params, f"s{i}") for i, p in enumerate(prompts)])

    streams = asyncio.run(main())
    for stream, want in zip(streams, expected):
        assert stream[-1].finished and not any(o.finished for o in stream[:-1])
        assert stream[-1].outputs[0].token_ids == want.token_ids
        assert stream[-1].outputs[0].text == want.text
        assert all(o.prompt == stream[0].prompt and o.prompt_token_ids == stream[0].prompt_token_ids for o in stream)
        texts = [o.outputs[0].text for o in stream]
        assert all(texts[i + 1].startswith(texts[i]) for i in range(len(texts) - 1))  # cumulative


def test_delta_outputs_concatenate_to_the_text(async_engine, embedded_llm):
    params = SamplingParams(temperature=0.0, max_tokens=20)
    want = embedded_llm.generate(["Describe rain."], params, use_tqdm=False)[0].outputs[0]
    stream = asyncio.run(_collect(async_engine, "Describe rain.", params, "delta", OutputKind.DELTA))
    assert "".join(o.outputs[0].text for o in stream) == want.text
    assert sum((o.outputs[0].token_ids for o in stream), []) == want.token_ids


def test_cancel_mid_stream_aborts_and_frees_blocks(async_engine):
    params = SamplingParams(temperature=0.0, max_tokens=500, ignore_eos=True)

    async def consume_some():
        seen = 0
        async for _ in async_engine.generate("Write a long essay.", params, "cancel-me"):
            seen += 1
            if seen == 3:
                break  # the consumer walks away
        return seen

    assert asyncio.run(consume_some()) == 3
    waited = _wait_idle(async_engine)
    assert waited < 1.0 and not async_engine.snapshot().has_work
    assert async_engine.stats().kv_cache_usage == 0


def test_task_cancellation_aborts(async_engine):
    params = SamplingParams(temperature=0.0, max_tokens=500, ignore_eos=True)

    async def main():
        task = asyncio.create_task(_collect(async_engine, "Another long essay.", params, "task-cancel"))
        await asyncio.sleep(0.3)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())
    assert _wait_idle(async_engine) < 1.0
    assert async_engine.stats().kv_cache_usage == 0


def test_stop_strings_found_by_the_front_end_their_completion_in_the_core(async_engine, embedded_llm):
    """The core hands on token ids; the front detokenizes, finds a stop string and aborts the completion that
    hit it. With n=2 only that completion ends: the streamed text and tokens equal the offline engine's (which
    finds stop strings itself), and the core frees every block and forgets both completions."""
    free = SamplingParams(temperature=0.8, seed=7, n=2, max_tokens=24, ignore_eos=True)
    first, second = (c.text for c in embedded_llm.generate(["Name three rivers."], free, use_tqdm=False)[0].outputs)
    stop = next(first[i:i + 3] for i in range(4, len(first) - 3) if first[i:i + 3] not in second)
    params = SamplingParams(temperature=0.8, seed=7, n=2, max_tokens=24, ignore_eos=True, stop=[stop])
    want = embedded_llm.generate(["Name three rivers."], params, use_tqdm=False)[0].outputs
    assert [c.finish_reason for c in want] == ["stop", "length"]  # the stop string ends completion 0 only

    stream = asyncio.run(_collect(async_engine, "Name three rivers.", params, "stops", OutputKind.DELTA))
    assert stream[-1].finished
    for index, expected in enumerate(want):
        got = [c for out in stream for c in out.outputs if c.index == index]
        assert "".join(c.text for c in got) == expected.text and stop not in expected.text
        assert sum((c.token_ids for c in got), []) == expected.token_ids
        assert got[-1].finish_reason == expected.finish_reason and got[-1].stop_reason == expected.stop_reason
    assert _wait_idle(async_engine, timeout=5.0) < 5.0 and async_engine.stats().kv_cache_usage == 0
    if async_engine.core.__class__.__name__ == "ThreadCore":  # its engine is reachable: nothing left behind
        assert not async_engine.engine._children and not async_engine.engine._parent_of


def test_bad_input_raises_from_generate(async_engine):
    async def main():
        with pytest.raises(ValueError, match="top_p must be in"):
            await _collect(async_engine, "hi", SamplingParams(top_p=0.0), "bad")
        with pytest.raises(ValueError, match="prompt must not be empty"):
            await _collect(async_engine, "", SamplingParams(), "bad2")

    asyncio.run(main())
    assert async_engine.is_running


def test_a_burst_between_two_steps_fills_the_free_places_before_the_queue(embedded_path):
    """Requests that arrive before the next step are not refused for places that step will fill: with
    max_num_seqs=2 and max_waiting=1, three fit (two to run, one to wait) and the fourth is refused."""
    from pagoda.engine.errors import QueueFullError
    from pagoda.engine.llm_engine import LLMEngine

    engine = LLMEngine.from_kwargs(model=str(embedded_path), dtype="float32", device="cpu", max_model_len=256,
                                   max_num_seqs=2, max_waiting=1)
    try:
        for rid in "abc":
            engine.add_request(rid, "Hello", SamplingParams(max_tokens=2))
        with pytest.raises(QueueFullError, match=r"max_waiting=1"):
            engine.add_request("d", "Hello", SamplingParams(max_tokens=2))
        while engine.has_unfinished_requests():
            engine.step()
        assert engine.kv.usage() == 0
    finally:
        engine.shutdown()


def test_a_full_waiting_queue_is_refused_by_the_one_engine_check(embedded_path):
    """max_waiting is checked in one place, LLMEngine.add_prepared: the asyncio engine refuses exactly
    what the synchronous one does, and a refused request leaves nothing behind."""
    from pagoda.engine.errors import QueueFullError
    from pagoda.engine.llm_engine import LLMEngine

    kwargs = dict(model=str(embedded_path), dtype="float32", device="cpu", max_model_len=1024, max_num_seqs=1,
                  max_waiting=1)
    long = SamplingParams(temperature=0.0, max_tokens=900, ignore_eos=True)

    sync = LLMEngine.from_kwargs(**kwargs)
    try:
        sync.add_request("a", "Count to a thousand:", long)
        sync.step()  # a runs (max_num_seqs=1)
        sync.add_request("b", "Count to a thousand:", long)  # b waits: the queue is full
        with pytest.raises(QueueFullError, match=r"max_waiting=1"):
            sync.add_request("c", "Count to a thousand:", long)
        sync.abort_request(["a", "b", "c"])
        while sync.has_unfinished_requests():  # the step still in flight (async scheduling) drains
            sync.step()
        sync.kv.check_invariants()
        assert sync.kv.usage() == 0
    finally:
        sync.shutdown()

    engine = AsyncLLMEngine.from_kwargs(**kwargs)

    async def main():
        a = engine.generate("Count to a thousand:", long, "a")
        await anext(a)  # a is running
        b_task = asyncio.create_task(anext(engine.generate("Count to a thousand:", long, "b")))
        while engine.stats().num_waiting < 1:  # b reached the engine's queue
            await asyncio.sleep(0.01)
        with pytest.raises(QueueFullError, match=r"max_waiting=1"):
            await anext(engine.generate("Count to a thousand:", long, "c"))
        b_task.cancel()
        await a.aclose()

    try:
        asyncio.run(main())
        _wait_idle(engine, timeout=10.0)
        assert not engine.snapshot().has_work and engine.stats().kv_cache_usage == 0
        engine.engine.kv.check_invariants()  # no snapshot has it; the idle engine thread waits on its queue
    finally:
        engine.shutdown()


def _process_engine(embedded_path, **kwargs) -> AsyncLLMEngine:
    return AsyncLLMEngine.from_kwargs(model=str(embedded_path), dtype="float32", device="cpu", max_model_len=256,
                                      core="process", **kwargs)


def test_a_dead_core_process_fails_every_stream_and_the_engine(embedded_path):
    """Killing the core process mid-stream: each open stream ends with EngineDeadError (none hangs), the
    engine reports itself not running, and new requests are refused the same way."""
    from pagoda.engine.errors import EngineDeadError

    engine = _process_engine(embedded_path)
    params = SamplingParams(temperature=0.0, max_tokens=200, ignore_eos=True)

    async def main():
        streams = [engine.generate("Tell a long story.", params, f"k{i}") for i in range(3)]
        for s in streams:
            await anext(s)  # each has a token: the requests run
        engine.core._process.kill()
        for s in streams:
            with pytest.raises(EngineDeadError, match="engine core process exited"):
                async for _ in s:
                    pass
        with pytest.raises(EngineDeadError):
            await anext(engine.generate("again", params, "after"))

    try:
        asyncio.run(asyncio.wait_for(main(), timeout=30))
        assert not engine.is_running
    finally:
        engine.shutdown()


def test_shutdown_ends_open_streams_and_the_core_process(embedded_path):
    from pagoda.engine.errors import EngineDeadError

    engine = _process_engine(embedded_path)
    params = SamplingParams(temperature=0.0, max_tokens=200, ignore_eos=True)

    async def main():
        stream = engine.generate("Tell a long story.", params, "open")
        await anext(stream)
        await asyncio.to_thread(engine.shutdown)
        with pytest.raises(EngineDeadError, match="shut down"):
            async for _ in stream:
                pass

    asyncio.run(asyncio.wait_for(main(), timeout=60))
    assert engine.core._process.poll() == 0  # it ended by itself, after the stop
    assert not engine.is_running


def test_a_start_failure_in_the_core_process_raises_in_the_front(embedded_path):
    """The core's start-up error comes back as itself: a KV cache too small for max_model_len is a ValueError."""
    with pytest.raises(ValueError, match="max_model_len"):
        _process_engine(embedded_path, num_blocks=4)


def test_a_script_without_a_main_guard_can_start_a_process_core(tmp_path, embedded_path):
    """The core is a fresh interpreter, not a multiprocessing spawn (which re-runs the caller's main module:
    a script without ``if __name__ == "__main__"`` would start engines without end)."""
    import subprocess
    import sys

    script = tmp_path / "serve_one.py"
    script.write_text(
        "import asyncio\n"
        "from pagoda import AsyncLLMEngine, SamplingParams\n"
        f"engine = AsyncLLMEngine.from_kwargs(model={str(embedded_path)!r}, dtype='float32', device='cpu', "
        "max_model_len=256, core='process')\n"
        "async def main():\n"
        "    return [o async for o in engine.generate('Hi', SamplingParams(temperature=0, max_tokens=4), 'a')]\n"
        "outs = asyncio.run(main())\n"
        "engine.shutdown()\n"
        "print('tokens', len(outs[-1].outputs[0].token_ids))\n"
    )
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().endswith("tokens 4")
