"""Vision-language serving on a GPU: a random-weight GLM-4.1V-9B on phone-agent workloads, pagoda vs
transformers `generate` on the same weights in the same run.

1. Agent step, one request: one 1080x2400 screenshot (1092x2408 after the resize = 3,354 image tokens)
   and 1,500 text tokens in, 200 tokens out (EOS ignored). TTFT counts from the moment the request is
   handed over, image preprocessing included, and is split into preprocessing, vision encoder (device
   time) and the rest; then ms per output token. Targets (printed, never asserted): TTFT <= 250 ms,
   <= 7.5 ms/token.
2. Throughput: 64 such requests (each its own screenshot and text) in flight; output tokens/s, against
   transformers' static batches (left padding; --hf-batch-size).
3. Agent sessions (Open-AutoGLM's loop), pagoda only: 16 concurrent sessions of 5 steps; a step's prompt
   is the system prompt, the history as text and one NEW screenshot (earlier screenshots dropped), and
   its reply joins the history. A session's next step is sent when its previous one finished. Prefix-
   cache hit rate and TTFT (median, p90, from the moment a step is sent) per step index; "ideal" is the
   hit rate of a cache holding every earlier prompt (block-rounded, text before the new image only);
   "queued" is the time until the engine took the request (preprocessing on a worker thread included).

Images are preprocessed on the caller's thread in phase 1 (inside TTFT) and on worker threads in
phases 2 and 3, as the asyncio engine does; throughput is given without and with preprocessing.
Floors, from ceilings measured in this run: TTFT >= (matmul + attention FLOPs of the vision tower and
the prefill) / matmul TFLOP/s, preprocessing excluded; ms/token >= (decoder weights + the request's KV)
bytes / copy GB/s. A phase that fails is recorded as an error and the others still run; the report is
written after pagoda's phases and again at the end.

    python -m bench.vlm                  # GPU, GLM-4.1V-9B shape (or: bash bench/gpu_suite.sh vlm)
    # CPU smoke run (one line): the tiny shape, small screenshots and counts
    python -m bench.vlm --shape tiny --screenshot 112x224 --text-len 48 --output-len 8 --latency-reps 2
        --num-requests 4 --hf-batch-size 2 --sessions 3 --session-steps 3 --session-system-len 40
        --session-turn-len 8 --session-output-len 6 --model-dir /tmp/vlm --out /tmp/vlm/out
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import statistics
import time
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from pathlib import Path

import numpy as np

from bench.offline import _free
from bench.random_models import make_random_glm4v
from bench.vlm_harness import CUDA, DEVICE, elapsed, guard, restart_clock, sync
from bench.vlm_hf import run_hf
from bench.vlm_report import floors, print_targets, report, vlm_environment
from bench.vlm_workload import image_tokens, make_work, max_model_len


# ------------------------------------------------------------------------------------------ pagoda
def run_pagoda(path: Path, work: dict, args) -> dict:
    from pagoda.engine.llm_engine import LLMEngine

    t = time.perf_counter()
    engine = LLMEngine.from_kwargs(
        model=str(path), dtype="bfloat16" if CUDA else "float32", device=DEVICE, max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens, max_model_len=work["max_model_len"],
        enable_prefix_caching=True, gpu_memory_utilization=args.gpu_memory_utilization,
    )
    result = {"init_s": time.perf_counter() - t, "num_kv_blocks": engine.num_blocks}
    runner = getattr(getattr(engine.executor, "worker", None), "runner", None)  # TP = 1: the in-process runner
    try:
        result["latency"] = guard("pagoda latency", pagoda_latency, engine, runner, work, args)
        if "throughput" not in args.skip:
            result["throughput"] = guard("pagoda throughput", pagoda_throughput, engine, work, args)
        if "sessions" not in args.skip:
            result["sessions"] = guard("pagoda sessions", pagoda_sessions, engine, work, args)
        if runner is not None:
            result["encoder_stats"] = dataclasses.asdict(runner.encoder_stats)
    finally:
        engine.shutdown()
    return result


def _agent_step(engine, runner, request_id: str, prompt: dict, params) -> dict:
    """One request alone: times (s) from hand-over to preprocessed, first token, each token."""
    from pagoda.engine.output_processor import OutputKind

    encoded = runner.encoder_stats.encode_seconds if runner is not None else math.nan
    t0 = time.perf_counter()
    prepared = engine.inputs.process(request_id, prompt, params)
    preprocess = time.perf_counter() - t0
    engine.add_prepared(prepared, OutputKind.DELTA)
    stamps: list[float] = []
    while engine.has_unfinished_requests():
        for out in engine.step():
            stamps += [time.perf_counter() - t0] * len(out.outputs[0].token_ids)
            cached = out.num_cached_tokens
    encoder = runner.encoder_stats.encode_seconds - encoded if runner is not None else math.nan
    return {"prompt_tokens": len(prepared.prompt_token_ids), "cached_tokens": cached, "preprocess_s": preprocess,
            "encoder_s": encoder, "ttft_s": stamps[0], "output_tokens": len(stamps),
            "ms_per_token": 1000 * (stamps[-1] - stamps[0]) / max(len(stamps) - 1, 1)}


def pagoda_latency(engine, runner, work: dict, args) -> dict:
    from pagoda import SamplingParams

    sp = work["special"]
    params = SamplingParams(temperature=0.0, max_tokens=args.output_len, ignore_eos=True)
    warm = work["warmup"]
    _agent_step(engine, runner, "warm", {"prompt_token_ids": warm.ids(sp), "multi_modal_data": {"image": warm.image}},
                SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True))
    runs = [_agent_step(engine, runner, f"lat{i}", {"prompt_token_ids": r.ids(sp), "multi_modal_data": {"image": r.image}}, params)
            for i, r in enumerate(work["latency"])]
    out = {k: statistics.median(r[k] for r in runs) for k in ("preprocess_s", "encoder_s", "ttft_s", "ms_per_token")}
    out["rest_s"] = out["ttft_s"] - out["preprocess_s"] - (0.0 if math.isnan(out["encoder_s"]) else out["encoder_s"])
    out["prompt_tokens"] = runs[0]["prompt_tokens"]
    out["runs"] = runs
    return out


def pagoda_throughput(engine, work: dict, args) -> dict:
    from pagoda import SamplingParams
    from pagoda.engine.output_processor import OutputKind

    sp, reqs = work["special"], work["throughput"]
    params = SamplingParams(temperature=0.0, max_tokens=args.output_len, ignore_eos=True)
    before = engine.stats()
    t0 = time.perf_counter()
    with ThreadPoolExecutor(args.preprocess_threads) as pool:  # as the asyncio engine's worker threads
        prepared = list(pool.map(lambda ir: engine.inputs.process(
            f"tp{ir[0]}", {"prompt_token_ids": ir[1].ids(sp), "multi_modal_data": {"image": ir[1].image}}, params),
            enumerate(reqs)))
    preprocess = time.perf_counter() - t0
    sync()
    t1 = time.perf_counter()
    for p in prepared:
        engine.add_prepared(p, OutputKind.FINAL)
    tokens = 0
    while engine.has_unfinished_requests():
        tokens += sum(len(o.outputs[0].token_ids) for o in engine.step() if o.finished)
    sync()
    run = time.perf_counter() - t1
    return {"requests": len(reqs), "output_tokens": tokens, "preprocess_s": preprocess, "engine_s": run,
            "tok_per_s": tokens / run, "tok_per_s_with_preprocess": tokens / (run + preprocess),
            "preemptions": engine.stats().num_preemptions - before.num_preemptions,
            "prefix_cache_hits": engine.stats().prefix_cache_hits - before.prefix_cache_hits}


def pagoda_sessions(engine, work: dict, args) -> dict:
    """Drive the engine step by step; a session's next request is sent when its previous one finished."""
    from pagoda import SamplingParams
    from pagoda.engine.output_processor import OutputKind

    sp, sessions = work["special"], work["sessions"]
    block = engine.config.cache.block_size
    params = SamplingParams(temperature=0.0, max_tokens=args.session_output_len, ignore_eos=True)
    before = engine.stats()
    records: dict[str, dict] = {}
    seen: list[np.ndarray] = []  # every prompt sent so far (for the ideal hit rate)
    pending = {}  # future -> request id
    pool = ThreadPoolExecutor(args.preprocess_threads)

    def send(s: int, k: int) -> None:
        ids = sessions[s].prompt(k, sp)
        arr, first_image = np.asarray(ids), ids.index(sp.image)
        ideal = max((_common_prefix(arr, prev) for prev in seen), default=0)
        seen.append(arr)
        rid = f"s{s}k{k}"
        records[rid] = {"session": s, "step": k, "ready": time.perf_counter(), "ideal": min(ideal, first_image) // block * block}
        prompt = {"prompt_token_ids": ids, "multi_modal_data": {"image": sessions[s].images[k]}}
        pending[pool.submit(engine.inputs.process, rid, prompt, params)] = rid

    for s in range(len(sessions)):
        send(s, 0)
    while pending or engine.has_unfinished_requests():
        if not engine.has_unfinished_requests():
            wait(list(pending), return_when=FIRST_COMPLETED)
        for fut in [f for f in pending if f.done()]:
            rid = pending.pop(fut)
            records[rid]["queued_s"] = time.perf_counter() - records[rid]["ready"]
            engine.add_prepared(fut.result(), OutputKind.CUMULATIVE)
        for out in engine.step():
            rec = records[out.request_id]
            if "ttft_s" not in rec and out.outputs[0].token_ids:
                rec["ttft_s"] = time.perf_counter() - rec["ready"]
            if out.finished:
                rec.update(prompt_tokens=len(out.prompt_token_ids), cached_tokens=out.num_cached_tokens)
                sessions[rec["session"]].finish(rec["step"], list(out.outputs[0].token_ids))
                if rec["step"] + 1 < args.session_steps:
                    send(rec["session"], rec["step"] + 1)
    pool.shutdown()
    after = engine.stats()
    per_step = [_step_row(k, [r for r in records.values() if r["step"] == k]) for k in range(args.session_steps)]
    total = _step_row("all", list(records.values()))
    queries = after.prefix_cache_queries - before.prefix_cache_queries
    hits = after.prefix_cache_hits - before.prefix_cache_hits
    return {"per_step": per_step, "all": total, "engine_hit_rate": hits / queries if queries else math.nan,
            "requests": list(records.values())}


def _common_prefix(a: np.ndarray, b: np.ndarray) -> int:
    n = min(len(a), len(b))
    diff = np.nonzero(a[:n] != b[:n])[0]
    return int(diff[0]) if len(diff) else n


def _step_row(step, recs: list[dict]) -> dict:
    ttft = sorted(1000 * r["ttft_s"] for r in recs)
    prompt = sum(r["prompt_tokens"] for r in recs)
    return {"step": step, "requests": len(recs), "prompt tok": prompt / len(recs),
            "cached tok": sum(r["cached_tokens"] for r in recs) / len(recs),
            "hit rate": sum(r["cached_tokens"] for r in recs) / prompt, "ideal": sum(r["ideal"] for r in recs) / prompt,
            "TTFT p50 ms": statistics.median(ttft), "TTFT p90 ms": ttft[math.ceil(0.9 * len(ttft)) - 1],
            "queued p50 ms": statistics.median(1000 * r["queued_s"] for r in recs)}


# ------------------------------------------------------------------------------------ transformers
def _size(text: str) -> tuple[int, int]:
    w, _, h = text.partition("x")
    return int(w), int(h)


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="glm-4.1v-9b", choices=["glm-4.1v-9b", "tiny"])
    ap.add_argument("--screenshot", type=_size, default=(1080, 2400), help="WIDTHxHEIGHT")
    ap.add_argument("--text-len", type=int, default=1500, help="text tokens of an agent-step request")
    ap.add_argument("--output-len", type=int, default=200)
    ap.add_argument("--latency-reps", type=int, default=3, help="agent-step requests timed one at a time (>= 1; medians)")
    ap.add_argument("--num-requests", type=int, default=64, help="throughput: requests in flight")
    ap.add_argument("--hf-batch-size", type=int, default=16, help="transformers' static batch (halves on OOM; 0 skips)")
    ap.add_argument("--hf-num-requests", type=int, default=None, help="throughput requests given to transformers (default all)")
    ap.add_argument("--sessions", type=int, default=16)
    ap.add_argument("--session-steps", type=int, default=5)
    ap.add_argument("--session-system-len", type=int, default=1400, help="system prompt tokens, shared by all sessions")
    ap.add_argument("--session-turn-len", type=int, default=40, help="user text tokens of each step")
    ap.add_argument("--session-output-len", type=int, default=100, help="reply tokens of each step (joins the history)")
    ap.add_argument("--skip", nargs="*", default=[], choices=["throughput", "sessions", "hf"],
                    help="phases to leave out (the agent step always runs: it warms the engine up)")
    ap.add_argument("--max-num-seqs", type=int, default=64)
    ap.add_argument("--max-num-batched-tokens", type=int, default=8192)
    ap.add_argument("--gpu-memory-utilization", type=float, default=0.85, help="leaves room for the vision tower")
    ap.add_argument("--preprocess-threads", type=int, default=8)
    ap.add_argument("--deadline-s", type=float, default=520.0,
                    help="seconds after start past which transformers' throughput starts no new batch")
    ap.add_argument("--model-dir", type=Path, default=Path(os.environ.get("PAGODA_MODEL_DIR", "/tmp/pagoda-models")))
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    ap.add_argument("--name", default=None)
    args = ap.parse_args(argv)
    if args.latency_reps < 1:
        ap.error("--latency-reps must be >= 1 (the agent step also warms the engine up)")
    if "throughput" in args.skip:
        args.num_requests = 0
    if "sessions" in args.skip:
        args.sessions = 0
    if args.hf_num_requests is None:
        args.hf_num_requests = args.num_requests
    args.hf_num_requests = min(args.hf_num_requests, args.num_requests) if args.hf_batch_size else 0
    return args


def main() -> None:
    from pagoda.engine.loader import load_hf_config

    restart_clock()  # --deadline-s and the phase times count from here, not from the import
    args = parse_args()
    phases = {}
    t = time.perf_counter()
    path = make_random_glm4v(args.shape, args.model_dir / f"glm4v-{args.shape}")
    phases["model folder"] = time.perf_counter() - t
    cfg = load_hf_config(path)
    t = time.perf_counter()
    work = make_work(args, cfg)
    phases["screenshots"] = time.perf_counter() - t
    image = image_tokens(path, work, args)
    work["max_model_len"] = max_model_len(args, image["tokens"])
    ceilings = {}
    if CUDA:
        from pagoda.kernels.bench import _warm_up_gpu, measure_ceilings

        _warm_up_gpu()
        ceilings = measure_ceilings()
    prompt_tokens = args.text_len + 2 + image["tokens"]
    result = {"benchmark": args.name or f"vlm_{args.shape}", "shape": args.shape,
              "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
              "environment": vlm_environment(), "ceilings": ceilings, "image": image, "prompt_tokens": prompt_tokens,
              "floors": floors(cfg, prompt_tokens, image, args.output_len, ceilings), "phase_seconds": phases}
    result["pagoda"] = guard("pagoda", run_pagoda, path, work, args)
    phases["pagoda"] = result["pagoda"]["seconds"]
    _free()
    report(args, result)  # now, in case transformers' part is cut off
    if "hf" not in args.skip:
        result["hf"] = guard("hf", run_hf, path, work, args)
        phases["hf"] = result["hf"]["seconds"]
    phases["total"] = elapsed()
    print("phase seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in phases.items()), flush=True)
    print_targets(result)
    report(args, result)


if __name__ == "__main__":
    main()
