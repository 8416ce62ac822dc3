"""bench/offline_cpu.py's pieces that decide what a run reports: the plan of systems, token agreement, the summary."""

from __future__ import annotations

import argparse

from bench.offline_cpu import agreement, make_workload, summarize, systems


def _args(**kw):
    base = dict(before=None, hf_batch_size=8, vllm_python=None)
    return argparse.Namespace(**(base | kw))


def test_pagoda_runs_first_and_vllm_only_with_its_python():
    names = [s["system"] for s in systems(_args())]
    assert names == ["pagoda", "hf generate (static batch 8)"]  # the first of a round is the token reference
    plan = systems(_args(vllm_python="/venv/bin/python"))
    assert plan[-1]["system"] == "vllm-cpu" and plan[-1]["cmd"][0] == "/venv/bin/python"
    assert plan[-1]["env"] == {"PYTHONPATH": ""}  # vLLM's environment never imports this checkout


def test_workload_is_seeded_and_within_its_ranges():
    work = make_workload(5, seed=3, vocab=1000)
    assert work == make_workload(5, seed=3, vocab=1000)
    assert all(16 <= len(p) <= 512 and 16 <= m <= 256 and min(p) >= 100 for p, m in work)


def test_agreement_counts_whole_requests():
    assert agreement([[1, 2], [3, 4]], [[1, 2], [3, 5]]) == 0.5


def test_summary_takes_medians_per_dtype_and_divides_by_vllm():
    runs = [{"system": s, "dtype": d, "output_tok_per_s": r, "same_tokens_as_pagoda": 1.0}
            for s, d, r in [("pagoda", "float32", 10.0), ("pagoda", "float32", 14.0), ("pagoda", "float32", 12.0),
                            ("vllm-cpu", "float32", 8.0), ("vllm-cpu", "float32", 6.0), ("pagoda", "bfloat16", 5.0)]]
    rows = summarize(runs, ["pagoda", "vllm-cpu"], ["float32", "bfloat16"])
    fp32 = {r["system"]: r for r in rows if r["dtype"] == "float32"}
    assert fp32["pagoda"]["tok_per_s_median"] == 12.0 and fp32["pagoda"]["rounds"] == 3
    assert (fp32["pagoda"]["tok_per_s_min"], fp32["pagoda"]["tok_per_s_max"]) == (10.0, 14.0)
    assert fp32["pagoda"]["vs_vllm"] == 12.0 / 7.0
    bf16 = [r for r in rows if r["dtype"] == "bfloat16"]
    assert len(bf16) == 1 and "vs_vllm" not in bf16[0]  # no vLLM run in that dtype: no ratio
