"""bench/tp.py keeps working: the CPU smoke run (gloo, tiny model) writes its JSON, table and rows."""

from __future__ import annotations

import json
import subprocess
import sys


def test_tp_bench_cpu_smoke(tmp_path):
    cmd = [sys.executable, "-m", "bench.tp", "--device", "cpu", "--model", "tiny", "--tp", "1", "2",
           "--repeats", "1", "--tokens", "8", "--batch", "2", "--model-dir", str(tmp_path / "models"),
           "--out", str(tmp_path / "out"), "--scheduling", "sync", "async"]
    subprocess.run(cmd, check=True, timeout=300, capture_output=True)
    result = json.loads((tmp_path / "out" / "tp_tiny_cpu.json").read_text())
    tp1, tp1_async, tp2, tp2_async = result["rows"]
    assert [(r["tp"], r["scheduling"]) for r in result["rows"]] == [(1, "sync"), (1, "async"), (2, "sync"), (2, "async")]
    assert tp1["collective_share"] == 0.0
    for row in (tp2, tp2_async):
        assert row["all_reduces_per_step"] == 1 + 2 * 4  # the embedding, then attention and MLP of 4 layers
        assert 0.0 < row["collective_share"] < 1.0
    assert tp2_async["latency_ratio"] == tp2_async["decode_ms_per_token"] / tp1_async["decode_ms_per_token"]
    assert (tmp_path / "out" / "tp_tiny_cpu.md").read_text().startswith("| tp |")
