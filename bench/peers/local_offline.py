"""Run one offline workload on pagoda or on HF transformers and print the timing as JSON.

The same protocol as ``vllm_offline.py``, so ``bench/offline_cpu.py`` runs every system alike, each
in a fresh process::

    python bench/peers/local_offline.py pagoda MODEL_DIR WORKLOAD.json DTYPE
    python bench/peers/local_offline.py hf MODEL_DIR WORKLOAD.json DTYPE --batch-size 8

It imports ``pagoda`` from ``sys.path``: with ``PYTHONPATH=/tmp/before`` (a worktree of an older
commit) the same script measures that commit's engine. The workload is a list of
``[prompt_token_ids, max_tokens]``; greedy, EOS ignored, so every system emits exactly the requested
tokens. Only ``generate`` is timed, after a two-request warm-up. The last line is
``PAGODA_PEER_RESULT {json}``: seconds, output tokens, torch threads and every request's output ids.
"""

from __future__ import annotations

import argparse
import json
import time

import torch


def run_pagoda(model_dir: str, workload: list, dtype: str) -> tuple[float, list[list[int]]]:
    from pagoda import LLM, SamplingParams

    llm = LLM(model=model_dir, dtype=dtype, device="cpu", max_model_len=1024)
    prompts = [{"prompt_token_ids": p} for p, _ in workload]
    params = [SamplingParams(temperature=0.0, max_tokens=m, ignore_eos=True) for _, m in workload]
    llm.generate(prompts[:2], params[:2], use_tqdm=False)  # warm-up
    start = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    return time.perf_counter() - start, [list(o.outputs[0].token_ids) for o in outs]


def run_hf(model_dir: str, workload: list, dtype: str, batch_size: int) -> tuple[float, list[list[int]]]:
    """``generate`` on left-padded static batches: each batch computes its padding and runs every row
    to the batch's longest max_tokens (the cost continuous batching removes); a row's extra tokens
    are cut off, not counted."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype)).eval()
    pad = model.generation_config.pad_token_id or 0

    def generate(batch):
        width = max(len(p) for p, _ in batch)
        ids = torch.tensor([[pad] * (width - len(p)) + p for p, _ in batch])  # left padding
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p, _ in batch])
        new = max(m for _, m in batch)
        with torch.no_grad():
            out = model.generate(ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new, do_sample=False,
                                 pad_token_id=pad)
        return [out[i, width : width + m].tolist() for i, (_, m) in enumerate(batch)]

    generate(workload[:2])  # warm-up
    start = time.perf_counter()
    tokens = [t for i in range(0, len(workload), batch_size) for t in generate(workload[i : i + batch_size])]
    return time.perf_counter() - start, tokens


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("system", choices=["pagoda", "hf"])
    ap.add_argument("model_dir")
    ap.add_argument("workload")
    ap.add_argument("dtype", choices=["float32", "bfloat16"])
    ap.add_argument("--batch-size", type=int, default=8, help="hf: requests per static batch")
    args = ap.parse_args()
    workload = json.load(open(args.workload))
    if args.system == "pagoda":
        seconds, tokens = run_pagoda(args.model_dir, workload, args.dtype)
    else:
        seconds, tokens = run_hf(args.model_dir, workload, args.dtype, args.batch_size)
    result = {"seconds": seconds, "output_tokens": sum(map(len, tokens)), "threads": torch.get_num_threads(),
              "token_ids": tokens}
    print("PAGODA_PEER_RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
