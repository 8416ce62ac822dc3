"""bench/serving.py's pieces that decide what a run compares: variant specs, the shared workload, the summary."""

from __future__ import annotations

import asyncio
import itertools
import time

import pytest

from bench.serving import Variant, app_yaml, compare
from bench.serving_load import Sample, Workload, closed_loop, process_shares, summarize


def test_a_variant_splits_environment_config_and_checkout():
    v = Variant.parse("old:code=../before,RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD=1,engine.stream_interval=2")
    assert v.label == "old" and v.code == "../before"
    assert v.env == {"RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "1"}
    assert v.config == {"engine.stream_interval": 2}  # YAML-typed
    assert Variant.parse("plain:") == Variant("plain")


def test_variant_config_lands_in_its_section_of_the_app_yaml():
    app = app_yaml({"model": "m", "max_num_seqs": 8}, 2, "cpu", 2.0, Variant.parse("x:engine.stream_interval=3"))
    assert app["engine"]["stream_interval"] == 3 and app["engine"]["device"] == "cpu"
    assert app["deployment"]["num_replicas"] == 2 and app["deployment"]["cpus_per_replica"] == 2.0


def test_prompts_are_reproducible_and_each_sender_takes_its_own_range():
    work = Workload(prompt_len=16, max_tokens=4, vocab_size=100)
    assert work.prompt(3) == Workload(16, 4, 100).prompt(3)  # the same ids in every run
    later = work.starting_at(10)
    assert later.prompt(0) == work.prompt(10) and later.prompt(0) != work.prompt(0)


def test_load_processes_split_streams_and_requests_over_disjoint_prompt_ranges():
    shares = process_shares(concurrency=10, requests=20, procs=4, first=100)
    assert [s for s, _, _ in shares] == [3, 3, 2, 2] and sum(r for _, r, _ in shares) == 20
    ranges = [set(range(f, f + r)) for _, r, f in shares]
    assert set().union(*ranges) == set(range(100, 120)) and sum(map(len, ranges)) == 20  # disjoint, consecutive
    assert process_shares(concurrency=1, requests=5, procs=4, first=0) == [(1, 5, 0)]  # one process per stream at most


def test_summary_counts_tokens_over_the_wall_and_gaps_between_chunks():
    samples = [Sample(True, 0.0, [0.1, 0.2, 0.4], tokens=4), Sample(False, 0.0, error="HTTP 429")]
    row = summarize("http", 2, samples, wall_s=2.0)
    assert row["errors"] == 1 and row["first_error"] == "HTTP 429"
    assert row["output_tok_s"] == 2.0 and row["chunks_per_request"] == 3
    assert row["ttft_p50_ms"] == pytest.approx(100) and row["e2e_p50_ms"] == pytest.approx(400)
    assert sorted([row["itl_p50_ms"], row["itl_p99_ms"]]) == pytest.approx([100, 200])
    assert row["tpot_p50_ms"] == pytest.approx(100)  # (0.4 - 0.1) s over 3 later tokens


def test_throughput_is_compared_with_the_offline_engine_at_the_top_concurrency():
    rows = [{"system": "offline", "concurrency": 256, "output_tok_s": 1000.0},
            {"system": "http", "concurrency": 256, "output_tok_s": 900.0},
            {"system": "http", "concurrency": 1, "output_tok_s": 50.0}]
    compare(rows)
    assert rows[1]["vs_offline"] == pytest.approx(0.9) and "vs_offline" not in rows[2]


def test_a_stream_pauses_between_its_requests_not_before_its_first():
    sent: list[tuple[int, float]] = []

    async def send(i: int) -> Sample:
        sent.append((i, time.perf_counter()))
        return Sample(True, sent[-1][1], [sent[-1][1]], tokens=1)

    samples, wall = asyncio.run(closed_loop(send, concurrency=1, requests=3, pause_s=0.05))
    assert [i for i, _ in sent] == [0, 1, 2] and len(samples) == 3
    gaps = [b - a for (_, a), (_, b) in itertools.pairwise(sent)]
    assert min(gaps) >= 0.045 and wall >= 0.09  # two pauses (the loop's timers may fire a tick early), none before the first request
    assert Workload(16, 4, 100, pause_s=0.05).starting_at(8).pause_s == 0.05  # every sender's range keeps it
