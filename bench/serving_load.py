"""The load side of ``bench.serving``: fixed token-id requests, streamed through the OpenAI HTTP API,
the gRPC API or an in-process ``AsyncLLMEngine``, stamped per chunk and summarised.

Every sender takes a request index and returns a ``Sample``. Prompts are token ids (the same ids
for every system measured), so no tokenizer or chat template sits between the systems compared.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import random
import time
from dataclasses import dataclass, field


@dataclass
class Sample:
    ok: bool
    start: float
    chunk_times: list[float] = field(default_factory=list)  # arrival of each chunk that carried tokens
    tokens: int = 0
    error: str = ""

    @property
    def ttft(self) -> float:
        return self.chunk_times[0] - self.start

    @property
    def e2e(self) -> float:
        return self.chunk_times[-1] - self.start

    @property
    def itls(self) -> list[float]:
        return [b - a for a, b in zip(self.chunk_times, self.chunk_times[1:])]

    @property
    def tpot(self) -> float:
        return (self.e2e - self.ttft) / max(1, self.tokens - 1)


@dataclass(frozen=True)
class Workload:
    """Random-id prompts of one length. Request i of a sender is prompt ``first + i``: whoever sends to one
    engine (load processes, levels, protocols, warm-ups) takes its own range of ``first``, so no prompt
    reaches an engine twice and none is served from the prefix cache of an earlier one (an HTTP level
    followed by a gRPC level on the same prompts measured gRPC with every prompt but its last block cached)."""

    prompt_len: int
    max_tokens: int
    vocab_size: int
    seed: int = 0
    first: int = 0
    pause_s: float = 0.0  # each stream's pause between a request's end and its next (think time; at c=1 every
    # request then meets an idle server, as a lone user's do, where back to back the engine is still warm)

    def prompt(self, i: int) -> list[int]:
        """Request i's prompt: random ids (no shared prefix beyond chance)."""
        rng = random.Random(self.seed * 1_000_003 + self.first + i)
        return [rng.randrange(10, self.vocab_size) for _ in range(self.prompt_len)]

    def starting_at(self, first: int) -> Workload:
        return dataclasses.replace(self, first=first)


def process_shares(concurrency: int, requests: int, procs: int, first: int) -> list[tuple[int, int, int]]:
    """(streams, requests, first prompt) of each of ``procs`` load processes (at most one per stream): the
    streams and requests split evenly, the prompts in consecutive ranges from ``first``."""
    procs = max(1, min(procs, concurrency))
    streams = [concurrency // procs + (k < concurrency % procs) for k in range(procs)]
    sent = [requests * s // concurrency for s in streams]
    return [(s, r, first + sum(sent[:k])) for k, (s, r) in enumerate(zip(streams, sent))]


# ---- senders ------------------------------------------------------------------------------------------


def http_sender(session, url: str, model: str, work: Workload):
    async def send(i: int) -> Sample:
        body = {"model": model, "prompt": work.prompt(i), "max_tokens": work.max_tokens, "temperature": 0.0,
                "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
        s = Sample(True, time.perf_counter())
        try:
            async with session.post(url + "/v1/completions", json=body) as r:
                if r.status != 200:
                    return Sample(False, s.start, error=f"HTTP {r.status}: {(await r.text())[:200]}")
                async for line in r.content:
                    if not line.startswith(b"data: {"):
                        continue
                    event = json.loads(line[6:])
                    if event.get("choices") and event["choices"][0].get("text") is not None:
                        s.chunk_times.append(time.perf_counter())
                    if event.get("usage"):
                        s.tokens = event["usage"]["completion_tokens"]
        except Exception as exc:  # noqa: BLE001 — a failed request is a data point, not a crash
            return Sample(False, s.start, error=f"{type(exc).__name__}: {exc}")
        s.ok = bool(s.chunk_times)
        return s

    return send


def grpc_sender(stubs, model: str, work: Workload):
    """``stubs``: one per channel; request i goes through ``stubs[i % len(stubs)]``."""
    from pagoda.cluster.api.gen.pagoda.v1 import pagoda_pb2 as pb

    async def send(i: int) -> Sample:
        stub = stubs[i % len(stubs)]
        request = pb.GenerateRequest(model=model, token_ids=pb.TokenIds(ids=work.prompt(i)), sampling=pb.SamplingParams(
            max_tokens=work.max_tokens, temperature=0.0, ignore_eos=True))
        s = Sample(True, time.perf_counter())
        try:
            async for r in stub.Generate(request):
                if r.token_ids:
                    s.chunk_times.append(time.perf_counter())
                    s.tokens += len(r.token_ids)
        except Exception as exc:  # noqa: BLE001
            return Sample(False, s.start, error=f"{type(exc).__name__}: {exc}")
        s.ok = bool(s.chunk_times)
        return s

    return send


def engine_sender(engine, work: Workload):
    """The in-process ``AsyncLLMEngine`` with delta outputs: what a replica gets before any wire."""
    from pagoda.engine.output_processor import OutputKind
    from pagoda.engine.sampling_params import SamplingParams

    params = SamplingParams(max_tokens=work.max_tokens, temperature=0.0, ignore_eos=True)
    counter = iter(range(10**9))

    async def send(i: int) -> Sample:
        s = Sample(True, time.perf_counter())
        rid = f"bench-{work.first + i}-{next(counter)}"
        async for out in engine.generate({"prompt_token_ids": work.prompt(i)}, params, rid, 0, OutputKind.DELTA):
            n = len(out.outputs[0].token_ids)
            if n:
                s.chunk_times.append(time.perf_counter())
                s.tokens += n
        s.ok = bool(s.chunk_times)
        return s

    return send


async def closed_loop(send, concurrency: int, requests: int, pause_s: float = 0.0) -> tuple[list[Sample], float]:
    """``concurrency`` workers, each sending its next request ``pause_s`` after its last one ended; (samples,
    wall s: pauses included)."""
    counter = iter(range(requests))
    samples: list[Sample] = []

    async def worker():
        for n, i in enumerate(counter):
            if n and pause_s:
                await asyncio.sleep(pause_s)
            samples.append(await send(i))

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return samples, time.perf_counter() - start


# ---- summary ------------------------------------------------------------------------------------------


def percentiles(values: list[float]) -> dict:
    if not values:
        return {"p50": float("nan"), "p90": float("nan"), "p99": float("nan")}
    v = sorted(values)
    pick = lambda q: v[min(len(v) - 1, round(q * (len(v) - 1)))]
    return {"p50": pick(0.50), "p90": pick(0.90), "p99": pick(0.99)}


def summarize(system: str, concurrency: int, samples: list[Sample], wall_s: float) -> dict:
    ok = [s for s in samples if s.ok]
    row = {"system": system, "concurrency": concurrency, "requests": len(samples), "errors": len(samples) - len(ok),
           "wall_s": wall_s, "output_tok_s": sum(s.tokens for s in ok) / wall_s,
           "chunks_per_request": sum(len(s.chunk_times) for s in ok) / max(1, len(ok))}
    for name, values in (("ttft", [s.ttft for s in ok]), ("itl", [x for s in ok for x in s.itls]),
                         ("tpot", [s.tpot for s in ok]), ("e2e", [s.e2e for s in ok])):
        for q, v in percentiles(values).items():
            row[f"{name}_{q}_ms"] = 1000 * v
    row["first_error"] = next((s.error for s in samples if not s.ok), "")
    return row
