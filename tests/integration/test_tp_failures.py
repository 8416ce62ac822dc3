"""A dead or hung tensor-parallel rank surfaces as EngineDeadError within 30 s, the group is torn
down (processes reaped, the rendezvous port freed), and a new engine starts afterwards.
Impossible setups are refused before any process starts."""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time

import pytest

from pagoda import LLM, SamplingParams
from pagoda.engine.errors import EngineDeadError

DETECT_WITHIN_S = 30.0


def _tp2(path, **kwargs) -> LLM:
    return LLM(model=str(path), tensor_parallel_size=2, device="cpu", dtype="float32", **kwargs)


def _add_requests(llm: LLM, first: int, count: int = 2) -> None:
    params = SamplingParams(temperature=0.0, max_tokens=400, ignore_eos=True)
    for i in range(first, first + count):
        llm.engine.add_request(f"r{i}", {"prompt_token_ids": list(range(100, 140))}, params)


def _generate_until_dead(llm: LLM) -> float:
    """Step (adding work whenever it runs out) until the engine raises; returns when it raised."""
    added = 0
    while True:
        if not llm.engine.has_unfinished_requests():
            _add_requests(llm, added)
            added += 2
        try:
            llm.engine.step()
        except EngineDeadError:
            return time.monotonic()


def _assert_torn_down(executor, port: int) -> None:
    for proc in executor.procs:
        assert not proc.is_alive()
        assert proc.exitcode is not None  # reaped: no zombie
        with pytest.raises(ChildProcessError):
            os.waitpid(proc.pid, os.WNOHANG)
    with socket.socket() as s:  # the driver's rendezvous port is free again
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", port))


def _assert_engine_works(path) -> None:
    llm = _tp2(path)
    try:
        out = llm.generate([{"prompt_token_ids": [5, 6, 7]}], SamplingParams(temperature=0.0, max_tokens=4), use_tqdm=False)
        assert len(out[0].outputs[0].token_ids) == 4
    finally:
        llm.engine.shutdown()


def test_killed_rank_surfaces_within_30s_and_a_new_engine_starts(tiny_models):
    path = tiny_models["llama"]
    llm = _tp2(path)
    executor = llm.engine.executor
    port, victim = executor.store_port, executor.rank_pids[1]
    _add_requests(llm, 100)
    for _ in range(3):
        llm.engine.step()
    killed_at: list[float] = []

    def kill() -> None:
        killed_at.append(time.monotonic())
        os.kill(victim, signal.SIGKILL)

    timer = threading.Timer(0.3, kill)  # lands mid-generation: inside a step or between two
    timer.start()
    raised_at = _generate_until_dead(llm)
    timer.join()
    assert raised_at - killed_at[0] < DETECT_WITHIN_S
    reason = executor._dead
    assert f"rank 1 (pid {victim}) was killed by SIGKILL" in reason
    _assert_torn_down(executor, port)
    with pytest.raises(EngineDeadError, match="tensor-parallel group failed"):
        llm.engine.step()  # stays dead, answers at once
    llm.engine.shutdown()  # safe after a failure
    _assert_engine_works(path)


def test_hung_rank_is_detected_by_the_step_timeout(tiny_models, monkeypatch):
    monkeypatch.setenv("PAGODA_STEP_TIMEOUT_S", "3")
    path = tiny_models["llama"]
    llm = _tp2(path)
    executor = llm.engine.executor
    port = executor.store_port
    _add_requests(llm, 0)
    llm.engine.step()
    stuck = executor.rank_pids[1]
    os.kill(stuck, signal.SIGSTOP)  # rank 1 stops answering, as if stuck in a driver call; rank 0 waits in a collective
    try:
        start = time.monotonic()
        no_reply = r"no reply to '(execute_model|launch)' from rank\(s\) \[0, 1\] within 3.0 s"
        with pytest.raises(EngineDeadError, match=no_reply):
            while True:  # the next step that needs rank 1 times out
                llm.engine.step()
        assert time.monotonic() - start < DETECT_WITHIN_S
        _assert_torn_down(executor, port)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(stuck, signal.SIGCONT)
    _assert_engine_works(path)


def test_dead_rank_fails_the_health_check(tiny_models):
    llm = _tp2(tiny_models["llama"])
    executor = llm.engine.executor
    executor.check_health()
    os.kill(executor.rank_pids[0], signal.SIGKILL)
    executor.procs[0].join(timeout=10)
    with pytest.raises(EngineDeadError, match=r"rank 0 .* killed by SIGKILL"):
        executor.check_health()
    llm.engine.shutdown()


def test_ranks_exit_when_the_driver_dies(tiny_models, tmp_path):
    import psutil

    script = tmp_path / "driver.py"
    script.write_text(textwrap.dedent(f"""
        import sys, time
        from pagoda import LLM
        if __name__ == "__main__":
            llm = LLM(model={str(tiny_models["llama"])!r}, tensor_parallel_size=2, device="cpu", dtype="float32")
            print(*llm.engine.executor.rank_pids, flush=True)
            time.sleep(600)
    """))
    driver = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True, cwd=os.getcwd(),
                              env={**os.environ, "PYTHONPATH": os.getcwd()})
    try:
        pids = [int(p) for p in driver.stdout.readline().split()]
        assert len(pids) == 2
        driver.kill()
        driver.wait(timeout=10)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and any(_running(pid, psutil) for pid in pids):
            time.sleep(0.2)
        assert not any(_running(pid, psutil) for pid in pids), "a rank outlived its driver"
    finally:
        driver.kill()


def _running(pid: int, psutil) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


# ---------------------------------------------------------------- refused before anything starts


def test_heads_not_divisible_are_refused_before_any_process(tiny_models):
    with pytest.raises(ValueError, match=r"num_attention_heads \(4\) must be divisible by tensor_parallel_size \(3\)"):
        LLM(model=str(tiny_models["llama"]), tensor_parallel_size=3, device="cpu")
    assert multiprocessing.active_children() == []


@pytest.mark.skipif(__import__("torch").cuda.device_count() >= 4, reason="needs fewer than 4 CUDA devices")
def test_more_ranks_than_devices_are_refused_before_any_process(tiny_models):
    with pytest.raises(ValueError, match=r"tensor_parallel_size \(4\) is larger than the number of CUDA devices"):
        LLM(model=str(tiny_models["llama"]), tensor_parallel_size=4, device="cuda")
    assert multiprocessing.active_children() == []
