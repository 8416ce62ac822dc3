"""Offline throughput on a GPU: pagoda (bf16, and FP8 with ``--quantizations none fp8``) vs transformers
`generate` (static batches) and `generate_batch` (its continuous batching), same random weights, same run.

Workloads:
- ``fixed``: N requests of exactly ``--input-len`` prompt tokens and ``--output-len`` output tokens.
- ``nano``: nano-vllm's benchmark — N requests, prompt and output lengths uniform in [100, 1024], seed 0.
EOS is ignored everywhere so every engine produces exactly the requested tokens.

The roofline column is the best a perfect engine could do on this card, from ceilings measured
in this run: the larger of (all FLOPs of prefill + decode) / matmul TFLOP/s and (weights read once
per decode step, with every request in one batch) / copy bandwidth.

    python -m bench.offline --shape llama-3.1-8b --workload fixed --num-requests 128
    python -m bench.offline --quantizations none fp8 --hf-batch-size 0 --hf-batch-requests 32
"""

from __future__ import annotations

import argparse
import gc
import random
import time
from pathlib import Path

import torch

from bench.random_models import make_random_model
from bench.report import environment, markdown_table, write_report


def make_workload(kind: str, n: int, input_len: int, output_len: int, vocab: int, seed: int = 0):
    rng = random.Random(seed)
    if kind == "fixed":
        lens = [(input_len, output_len)] * n
    else:
        lens = [(rng.randint(100, 1024), rng.randint(100, 1024)) for _ in range(n)]
    return [([rng.randrange(10, vocab) for _ in range(i)], o) for i, o in lens]


# --quantizations: what each pagoda row runs (weights, KV cache)
VARIANTS = {"none": {}, "fp8": {"quantization": "fp8"}, "fp8+kv": {"quantization": "fp8", "kv_cache_dtype": "fp8"}}


def run_pagoda(path: Path, workload, max_num_seqs: int, max_model_len: int, variant: str = "none") -> dict:
    from pagoda import LLM, SamplingParams

    llm = LLM(model=str(path), dtype="bfloat16", device="cuda", max_num_seqs=max_num_seqs,
              max_num_batched_tokens=8192, max_model_len=max_model_len, **VARIANTS[variant])
    prompts = [{"prompt_token_ids": p} for p, _ in workload]
    params = [SamplingParams(temperature=0.0, max_tokens=o, ignore_eos=True) for _, o in workload]
    llm.generate(prompts[:4], [SamplingParams(max_tokens=8, ignore_eos=True)] * 4, use_tqdm=False)  # warm-up
    torch.cuda.synchronize()
    start = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    stats = llm.engine.stats()
    del llm
    _free()
    return {"engine": "pagoda" if variant == "none" else f"pagoda {variant}", "requests": len(workload), "seconds": elapsed, "output_tokens": tokens,
            "preemptions": stats.num_preemptions, "kv_blocks": stats.num_blocks}


def run_hf_generate(path: Path, workload, batch_size: int) -> dict:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16, device_map="cuda").eval()
    start = time.perf_counter()
    for i in range(0, len(workload), batch_size):
        batch = workload[i : i + batch_size]
        width = max(len(p) for p, _ in batch)
        ids = torch.tensor([[0] * (width - len(p)) + p for p, _ in batch], device="cuda")  # left padding
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p, _ in batch], device="cuda")
        new = max(o for _, o in batch)
        with torch.no_grad():
            model.generate(ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0)
    torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    del model
    _free()
    return {"engine": f"hf generate (static batch {batch_size})", "requests": len(workload), "seconds": elapsed,
            "output_tokens": sum(o for _, o in workload)}


def run_hf_generate_batch(path: Path, workload) -> dict:
    from transformers import AutoModelForCausalLM, GenerationConfig

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16, device_map="cuda").eval()
    new = max(o for _, o in workload)
    config = GenerationConfig(max_new_tokens=new, do_sample=False, eos_token_id=-1, pad_token_id=0)
    start = time.perf_counter()
    outs = model.generate_batch([p for p, _ in workload], generation_config=config)
    torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    produced = sum(len(o.generated_tokens) for o in outs.values())
    del model
    _free()
    return {"engine": "hf generate_batch (continuous)", "requests": len(workload), "seconds": elapsed,
            "output_tokens": produced}


def roofline(path: Path, workload, ceilings: dict) -> float:
    """Output tokens/s of a perfect engine on this card (see module docstring)."""
    from pagoda.engine.loader import load_hf_config

    cfg = load_hf_config(path)
    params = sum(p.numel() for p in _param_shapes(cfg))
    tokens = sum(len(p) + o for p, o in workload)
    flop_time = 2 * params * tokens / (ceilings["TFLOP/s"] * 1e12)
    steps = max(o for _, o in workload)
    byte_time = steps * 2 * params / (ceilings["GB/s"] * 1e9)
    return sum(o for _, o in workload) / max(flop_time, byte_time)


def _param_shapes(cfg):
    """Meta-device model: parameter count without memory."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return list(AutoModelForCausalLM.from_config(cfg).parameters())


def _free() -> None:
    gc.collect()
    torch.cuda.empty_cache()


def plot(result: dict, png: Path) -> None:
    import matplotlib.pyplot as plt

    rows = result["results"]
    fig, ax = plt.subplots(figsize=(8, 3))
    ax.barh([r["engine"] for r in rows], [r["output_tok_per_s"] for r in rows])
    ax.set_xlabel("output tokens / s")
    ax.set_title(f"{result['shape']}, {result['workload']['workload']} workload, {result['environment'].get('gpu', 'cpu')}")
    fig.tight_layout()
    fig.savefig(png, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="llama-3.1-8b")
    ap.add_argument("--workload", choices=["fixed", "nano"], default="fixed")
    ap.add_argument("--num-requests", type=int, default=128)
    ap.add_argument("--input-len", type=int, default=512)
    ap.add_argument("--output-len", type=int, default=256)
    ap.add_argument("--max-num-seqs", type=int, default=256)
    ap.add_argument("--quantizations", nargs="+", choices=list(VARIANTS), default=["none"],
                    help="one pagoda row each (fp8+kv: FP8 weights and KV cache); the first is vs_pagoda's baseline")
    ap.add_argument("--hf-batch-size", type=int, default=64, help="static batch for generate; 0 skips it")
    ap.add_argument("--hf-batch-requests", type=int, default=None, help="requests given to generate_batch (default all; 0 skips)")
    ap.add_argument("--model-dir", type=Path, default=Path("/tmp/pagoda-models"))
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    ap.add_argument("--name", default=None)
    args = ap.parse_args()

    from pagoda.kernels.bench import _warm_up_gpu, measure_ceilings

    path = make_random_model(args.shape, args.model_dir / args.shape)
    from pagoda.engine.loader import load_hf_config

    workload = make_workload(args.workload, args.num_requests, args.input_len, args.output_len, load_hf_config(path).vocab_size)
    _warm_up_gpu()
    ceilings = measure_ceilings()
    max_len = max(len(p) + o for p, o in workload) + 16
    rows = [run_pagoda(path, workload, args.max_num_seqs, max_len, q) for q in args.quantizations]
    if args.hf_batch_size:
        rows.append(run_hf_generate(path, workload, args.hf_batch_size))
    subset = workload if args.hf_batch_requests is None else workload[: args.hf_batch_requests]
    if subset:
        rows.append(run_hf_generate_batch(path, subset))
    roof = roofline(path, workload, ceilings)
    for row in rows:
        row["output_tok_per_s"] = row["output_tokens"] / row["seconds"]
        row["vs_pagoda"] = row["output_tok_per_s"] / rows[0]["output_tok_per_s"]
    rows.append({"engine": "roofline (measured ceilings)", "requests": len(workload), "output_tok_per_s": roof,
                 "vs_pagoda": roof / rows[0]["output_tok_per_s"]})
    name = args.name or f"offline_{args.shape}_{args.workload}"
    result = {"benchmark": name, "shape": args.shape, "workload": vars(args) | {"model_dir": None, "out": None},
              "ceilings": ceilings, "environment": environment(), "results": rows}
    table = markdown_table(rows, ["engine", "requests", "seconds", "output_tokens", "output_tok_per_s", "vs_pagoda"])

    write_report(args.out, name, result, table, lambda png: plot(result, png))


if __name__ == "__main__":
    main()
