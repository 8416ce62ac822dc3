"""``bench.chaos``'s bookkeeping without a cluster: how a failure is classed, which kill it is charged to,
recovery, the retry count read from logs, the killer's seeded schedule; and ``PagodaClient``'s retry
counter and log line, which the bench reads."""

from __future__ import annotations

import asyncio
import logging
from types import SimpleNamespace

import pytest

pytest.importorskip("ray")

from ray.exceptions import ActorDiedError

from bench.chaos import classify, kill_rows, recovery_s
from bench.chaos_cluster import RetryLog
from bench.chaos_killer import Kill, Killer
from bench.load_client import Outcome
from pagoda.cluster.client import RETRY_LOG, PagodaClient
from pagoda.cluster.protocol import ReplicaUnavailableError


@pytest.mark.parametrize("code, error, cls", [
    ("503", "engine is dead", "unavailable"),
    ("unavailable", "replica died after its first token", "unavailable"),
    ("UNAVAILABLE", "engine step failed: EngineDeadError(...)", "unavailable"),
    ("UNAVAILABLE", "failed to connect to all addresses; last error: ... Connection refused", "connection"),
    ("UNAVAILABLE", "Stream removed (recvmsg:Connection reset by peer (104))", "connection"),
    ("ClientConnectorError", "Cannot connect to host", "connection"),
    ("truncated", "stream ended after 3 chunks without [DONE]", "connection"),
    ("504", "deadline exceeded", "deadline"),
    ("DEADLINE_EXCEEDED", "Deadline Exceeded", "deadline"),
    ("429", "queue full", "refused"),
    ("500", "internal server error", "fault"),
    ("INTERNAL", "internal server error", "fault"),
    ("UNKNOWN", "Unexpected <class 'KeyError'>", "fault"),
])
def test_failures_are_classed_by_documented_status(code, error, cls):
    assert classify(Outcome("failed", 0.0, code=code, error=error)) == cls


def test_ok_and_hung_streams():
    assert classify(Outcome("ok", 0.0)) == "ok"
    assert classify(Outcome("hung", 0.0, error="no end after 16s")) == "fault"


def _record(protocol, start, end, cls="ok", ttft=0.1):
    code = "" if cls == "ok" else "503"
    return {"protocol": protocol, "start": start, "end": end, "class": cls, "ttft_s": ttft, "code": code, "error": ""}


def test_recovery_is_the_first_success_sent_after_the_kill_on_every_protocol():
    records = [_record("http", 9.0, 10.5),  # sent before the kill: does not count
               _record("http", 10.2, 11.0), _record("http", 10.1, 12.0),
               _record("grpc", 10.0, 10.4, "unavailable"), _record("grpc", 12.0, 13.0)]
    assert recovery_s(10.0, records) == pytest.approx(3.0)  # grpc was back last
    assert recovery_s(20.0, records) is None


def test_failures_and_retries_are_charged_to_the_latest_kill():
    kills = [Kill("replica", 10.0, "SERVE_REPLICA::bench#bench-engine#abc", 1, replaced_at=15.0),
             Kill("ingress", 20.0, "SERVE_REPLICA::bench#bench-api#def", 2, replaced_at=26.0)]
    records = [_record("http", 9.0, 10.2, "unavailable"), _record("grpc", 9.5, 10.3, "unavailable", ttft=None),
               _record("http", 10.5, 11.0), _record("grpc", 10.6, 11.2),
               _record("http", 19.9, 20.1, "connection", ttft=None),
               _record("grpc", 25.0, 25.5), _record("http", 26.0, 27.0)]
    marks = [(9.0, 0), (10.5, 3), (19.0, 3), (21.0, 3)]
    first, second = kill_rows(kills, {"t0": 0.0, "end": 30.0, "records": records, "marks": marks})
    assert (first["failed"], first["unavailable"], first["unavailable_no_token"], first["retried"]) == (2, 2, 1, 3)
    assert first["victim"] == "abc" and first["replaced_s"] == 5.0
    assert first["recovery_s"] == pytest.approx(1.2) and first["disrupted_s"] == pytest.approx(0.3)
    assert (second["failed"], second["connection"], second["retried"]) == (1, 1, 0)
    assert second["recovery_s"] == pytest.approx(7.0)  # http's first success sent after the kill ended at 27


def test_retry_log_counts_each_retry_once_across_files_and_partial_lines(tmp_path):
    logs = tmp_path / "logs"
    (logs / "serve").mkdir(parents=True)
    line = f"{RETRY_LOG} request 'r1': its replica died before the first token (ActorDiedError); attempt 2 of 3\n"
    (logs / "worker-a-1.err").write_text("noise\n" + line + line.replace("r1", "r2")[:20])  # r2 half written
    (logs / "serve" / "replica_bench_bench-api_x.log").write_text("INFO ... " + line)  # the same retry, twice logged
    retries = RetryLog(str(tmp_path))
    assert retries.count() == 1
    with open(logs / "worker-a-1.err", "a") as f:
        f.write(line.replace("r1", "r2")[20:])
    assert retries.count() == 2


def test_killer_schedule_is_seeded_and_cycles_targets():
    def killer(seed, order="random"):
        return Killer("bench", ("replica", "rank", "ingress"), 20.0, 5.0, {}, seed=seed, order=order)

    a, b = killer(1), killer(1)
    assert [a._interval() for _ in range(5)] == [b._interval() for _ in range(5)]
    assert all(15.0 <= a._interval() <= 25.0 for _ in range(50))
    cycle, order = killer(0, "cycle"), []
    for _ in range(4):
        order.append(cycle._next_target())
        cycle.kills.append(Kill(order[-1], 0.0))
    assert order == ["replica", "rank", "ingress", "replica"]


# ---- PagodaClient's retry counter --------------------------------------------------------------------------


class _Stream:
    """A Serve response stream: raises ``fail`` after ``chunks`` chunks, else ends after them."""

    def __init__(self, chunks: int, fail: BaseException | None) -> None:
        self.chunks, self.fail, self.cancelled = chunks, fail, False

    def __aiter__(self):
        return self._gen()

    async def _gen(self):
        for _ in range(self.chunks):
            yield SimpleNamespace(output=SimpleNamespace(finished=False))
        if self.fail is not None:
            raise self.fail

    def cancel(self) -> None:
        self.cancelled = True


class _Handle:
    """``handle.options(stream=True).generate.remote(request)`` handing out the given streams in turn."""

    def __init__(self, *streams: _Stream) -> None:
        self.streams = list(streams)
        self.generate = SimpleNamespace(remote=lambda request: self.streams.pop(0))

    def options(self, **_):
        return self


async def _drain(client: PagodaClient) -> int:
    return sum([1 async for _ in client.generate([1, 2, 3])])


def test_client_counts_and_logs_each_retry_before_the_first_token(caplog):
    client = PagodaClient(_Handle(_Stream(0, ActorDiedError()), _Stream(0, ActorDiedError()), _Stream(2, None)))
    with caplog.at_level(logging.WARNING, logger="pagoda.client"):
        assert asyncio.run(_drain(client)) == 2
    assert client.retries == 2
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2 and all(line.startswith(RETRY_LOG) for line in lines)
    assert "attempt 2 of 3" in lines[0] and "attempt 3 of 3" in lines[1]


def test_client_does_not_retry_after_a_token_or_past_max_retries():
    client = PagodaClient(_Handle(_Stream(1, ActorDiedError())))
    with pytest.raises(ReplicaUnavailableError) as exc:
        asyncio.run(_drain(client))
    assert exc.value.tokens_sent and client.retries == 0
    client = PagodaClient(_Handle(_Stream(0, ActorDiedError()), _Stream(0, ActorDiedError())), max_retries=1)
    with pytest.raises(ReplicaUnavailableError) as exc:
        asyncio.run(_drain(client))
    assert not exc.value.tokens_sent and client.retries == 1
