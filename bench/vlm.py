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
import traceback
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from pathlib import Path

import numpy as np
import torch

from bench.offline import _free
from bench.random_models import make_random_glm4v
from bench.report import environment, markdown_table, write_report
from bench.vlm_workload import AgentRequest, Special, agent_requests, make_sessions

START = time.monotonic()  # reset by main()
TARGET_TTFT_MS, TARGET_MS_PER_TOKEN = 250.0, 7.5
CUDA = torch.cuda.is_available()
DEVICE, DTYPE = ("cuda", torch.bfloat16) if CUDA else ("cpu", torch.float32)


def _sync() -> None:
    if CUDA:
        torch.cuda.synchronize()


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
        result["latency"] = _guard("pagoda latency", pagoda_latency, engine, runner, work, args)
        if "throughput" not in args.skip:
            result["throughput"] = _guard("pagoda throughput", pagoda_throughput, engine, work, args)
        if "sessions" not in args.skip:
            result["sessions"] = _guard("pagoda sessions", pagoda_sessions, engine, work, args)
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
    _sync()
    t1 = time.perf_counter()
    for p in prepared:
        engine.add_prepared(p, OutputKind.FINAL)
    tokens = 0
    while engine.has_unfinished_requests():
        tokens += sum(len(o.outputs[0].token_ids) for o in engine.step() if o.finished)
    _sync()
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
def hf_inputs(reqs: list[AgentRequest], processor, sp: Special, merge: int, pool=None) -> tuple[dict, float]:
    """A left-padded batch as transformers' Glm4vProcessor would make it (each placeholder expanded to
    its image's tokens, mm_token_type_ids 1 on them), on the device; and the seconds it took."""
    t0 = time.perf_counter()
    feats = list((pool.map if pool else map)(lambda r: processor(images=[r.image], return_tensors="pt"), reqs))
    rows = [r.ids(sp, int(f["image_grid_thw"][0].prod()) // merge**2) for r, f in zip(reqs, feats)]
    width = max(map(len, rows))
    ids = torch.tensor([[0] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    inputs = {
        "input_ids": ids.to(DEVICE), "attention_mask": mask.to(DEVICE),
        "mm_token_type_ids": (ids == sp.image).int().to(DEVICE),
        "pixel_values": torch.cat([f["pixel_values"] for f in feats]).to(DEVICE, DTYPE),
        "image_grid_thw": torch.cat([f["image_grid_thw"] for f in feats]).to(DEVICE),
    }
    _sync()
    return inputs, time.perf_counter() - t0


def _generate(model, inputs: dict, new: int) -> float:
    _sync()
    t0 = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(**inputs, max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0)
    _sync()
    elapsed = time.perf_counter() - t0
    if out.shape[1] != inputs["input_ids"].shape[1] + new:
        raise RuntimeError(f"generate made {out.shape[1] - inputs['input_ids'].shape[1]} tokens, not {new}")
    return elapsed


def run_hf(path: Path, work: dict, args) -> dict:
    from transformers import Glm4vForConditionalGeneration

    from pagoda.engine.multimodal.glm4v import load_pil_image_processor

    t = time.perf_counter()
    model = Glm4vForConditionalGeneration.from_pretrained(path, dtype=DTYPE, device_map=DEVICE).eval()
    processor = load_pil_image_processor(path)  # transformers' GLM-4.1V image processor, the folder's settings
    merge = model.config.vision_config.spatial_merge_size
    result = {"init_s": time.perf_counter() - t}
    result["latency"] = _guard("hf latency", hf_latency, model, processor, merge, work, args)
    if args.hf_num_requests:
        result["throughput"] = _guard("hf throughput", hf_throughput, model, processor, merge, work, args)
    del model
    _free()
    return result


def hf_latency(model, processor, merge: int, work: dict, args) -> dict:
    sp = work["special"]
    inputs, _ = hf_inputs([work["warmup"]], processor, sp, merge)
    _generate(model, inputs, 4)  # warm-up
    runs = []
    for r in work["latency"]:  # TTFT = preprocessing + generate(max_new_tokens=1)
        inputs, preprocess = hf_inputs([r], processor, sp, merge)
        _sync()
        t0 = time.perf_counter()
        with torch.inference_mode():
            model.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"])
        _sync()
        encoder = time.perf_counter() - t0
        first = _generate(model, inputs, 1)
        runs.append({"prompt_tokens": inputs["input_ids"].shape[1], "preprocess_s": preprocess, "encoder_s": encoder,
                     "generate1_s": first, "ttft_s": preprocess + first})
    out = {k: statistics.median(r[k] for r in runs) for k in ("preprocess_s", "encoder_s", "generate1_s", "ttft_s")}
    out["rest_s"] = out["generate1_s"] - out["encoder_s"]
    inputs, _ = hf_inputs([work["latency"][0]], processor, sp, merge)
    first, full = _generate(model, inputs, 1), _generate(model, inputs, args.output_len)  # back to back, like bench.latency
    out["ms_per_token"] = 1000 * (full - first) / (args.output_len - 1)
    out["prompt_tokens"] = runs[0]["prompt_tokens"]
    out["runs"] = runs
    return out


def hf_throughput(model, processor, merge: int, work: dict, args) -> dict:
    """Static batches of --hf-batch-size; on out-of-memory the batch halves. Stops early (and says so)
    when the next batch would pass --deadline-s."""
    sp, reqs = work["special"], work["throughput"][: args.hf_num_requests]
    batch, done, tokens, preprocess, run, last = args.hf_batch_size, 0, 0, 0.0, 0.0, 0.0
    with ThreadPoolExecutor(args.preprocess_threads) as pool:
        while done < len(reqs):
            if time.monotonic() - START + last > args.deadline_s:
                print(f"hf throughput: stopping after {done} requests (--deadline-s {args.deadline_s})", flush=True)
                break
            chunk = reqs[done : done + batch]
            inputs, prep = hf_inputs(chunk, processor, sp, merge, pool)
            try:
                last = _generate(model, inputs, args.output_len)
            except torch.cuda.OutOfMemoryError:
                last = None
            if last is None:  # outside the except: its traceback no longer holds generate's tensors
                inputs = None
                _free()
                batch //= 2
                print(f"hf throughput: out of memory, batch -> {batch}", flush=True)
                if batch == 0:
                    raise RuntimeError("out of memory at batch 1")
                last = 0.0
                continue
            done, tokens, preprocess, run = done + len(chunk), tokens + len(chunk) * args.output_len, preprocess + prep, run + last
    return {"requests": done, "batch_size": batch, "output_tokens": tokens, "preprocess_s": preprocess, "engine_s": run,
            "tok_per_s": tokens / run if run else math.nan,
            "tok_per_s_with_preprocess": tokens / (run + preprocess) if run else math.nan}


# ----------------------------------------------------------------------------------------- harness
def _guard(name: str, fn, *args) -> dict:
    """``fn(*args)`` timed; an exception is printed and recorded so the other phases still run (one
    device call has to bring back everything)."""
    print(f"--- {name} (t={time.monotonic() - START:.0f} s)", flush=True)
    t = time.perf_counter()
    try:
        out = fn(*args)
    except Exception as e:  # noqa: BLE001 - record and go on
        traceback.print_exc()
        out = {"error": f"{type(e).__name__}: {e}"}
        _free()
    out["seconds"] = time.perf_counter() - t
    print(f"--- {name} done in {out['seconds']:.1f} s" + (f": {out['error']}" if "error" in out else ""), flush=True)
    return out


def make_work(args, cfg) -> dict:
    sp = Special.of(cfg)
    size = args.screenshot
    work = {
        "special": sp,
        "warmup": agent_requests(1, args.text_len, size, sp, seed=1)[0],
        "latency": agent_requests(args.latency_reps, args.text_len, size, sp, seed=2),
        "throughput": agent_requests(args.num_requests, args.text_len, size, sp, seed=3),
        "sessions": make_sessions(args, sp),
    }
    return work


def image_tokens(path: Path, work: dict, args) -> dict:
    """The screenshot size after GLM-4.1V's resize and its image tokens, from transformers' processor."""
    from pagoda.engine.multimodal.glm4v import load_pil_image_processor

    processor = load_pil_image_processor(path)
    t, h, w = processor(images=[work["warmup"].image], return_tensors="pt")["image_grid_thw"][0].tolist()
    patch, merge = processor.patch_size, processor.merge_size
    out = {"screenshot": list(args.screenshot), "resized": [w * patch, h * patch], "patches": t * h * w,
           "tokens": t * h * w // merge**2}
    note = ""
    if args.shape == "glm-4.1v-9b" and tuple(args.screenshot) == (1080, 2400):
        note = " (expected 1092x2408 = 3,354: " + ("ok)" if (out["resized"], out["tokens"]) == ([1092, 2408], 3354) else "MISMATCH)")
    print(f"screenshot {args.screenshot[0]}x{args.screenshot[1]} -> {out['resized'][0]}x{out['resized'][1]} = "
          f"{out['tokens']} image tokens{note}", flush=True)
    return out


def max_model_len(args, tokens: int) -> int:
    agent = args.text_len + 2 + tokens + args.output_len
    turn = args.session_turn_len + 2 + args.session_output_len
    session = args.session_system_len + args.session_steps * turn + 3 + tokens
    return max(agent, session) + 16


def floors(cfg, prompt_tokens: int, image: dict, output_len: int, ceilings: dict) -> dict:
    """TTFT and ms/token floors of one agent step (see the module docstring); {} without ceilings."""
    from transformers import Glm4vForConditionalGeneration

    if not ceilings:
        return {}
    with torch.device("meta"):
        model = Glm4vForConditionalGeneration(cfg)
    count = lambda module: sum(p.numel() for p in module.parameters())
    tc, vc, vis = cfg.text_config, cfg.vision_config, model.model.visual
    layers, head = count(model.model.language_model.layers), count(model.lm_head)
    per_patch = count(vis.blocks) + count(vis.patch_embed)
    per_token = count(vis) - per_patch - count(vis.embeddings)  # downsample + merger, on merged tokens
    head_dim = getattr(tc, "head_dim", None) or tc.hidden_size // tc.num_attention_heads
    T, P = prompt_tokens, image["patches"]
    flops = (2 * layers * T + 2 * head + 2 * tc.num_hidden_layers * tc.num_attention_heads * head_dim * T * T  # causal
             + 2 * per_patch * P + 2 * per_token * image["tokens"] + 4 * vc.depth * vc.hidden_size * P * P)
    kv_per_token = 2 * tc.num_hidden_layers * tc.num_key_value_heads * head_dim * 2
    decode_bytes = 2 * (layers + head) + kv_per_token * (T + output_len / 2)
    return {"prefill_tflop": flops / 1e12, "ttft_ms": 1000 * flops / (ceilings["TFLOP/s"] * 1e12),
            "ms_per_token": 1000 * decode_bytes / (ceilings["GB/s"] * 1e9)}


def summary(result: dict, args) -> tuple[list[dict], list[dict]]:
    p, h, fl = result.get("pagoda", {}), result.get("hf", {}), result.get("floors", {})
    pl, hl, pt, ht = p.get("latency", {}), h.get("latency", {}), p.get("throughput", {}), h.get("throughput", {})
    ms = lambda d, k: 1000 * d[k] if isinstance(d.get(k), float) and not math.isnan(d[k]) else ""

    def row(metric, ours, theirs, faster_is_lower=True, floor="", target=None):
        r = {"metric": metric, "pagoda": ours, "hf generate": theirs, "floor": floor}
        if isinstance(ours, float) and isinstance(theirs, float) and ours and theirs:
            r["speedup"] = theirs / ours if faster_is_lower else ours / theirs
        if target is not None and isinstance(ours, float):
            r["target"], r["met"] = f"<= {target:g}", "yes" if ours <= target else "NO"
        return r

    n_tok = result["image"]["tokens"]
    rows = [
        row(f"agent step TTFT ms ({n_tok} image + {args.text_len} text tokens)", ms(pl, "ttft_s"), ms(hl, "ttft_s"),
            floor=fl.get("ttft_ms", ""), target=TARGET_TTFT_MS),
        row("  preprocessing ms", ms(pl, "preprocess_s"), ms(hl, "preprocess_s")),
        row("  vision encoder ms", ms(pl, "encoder_s"), ms(hl, "encoder_s")),
        row("  rest (prefill, scheduling) ms", ms(pl, "rest_s"), ms(hl, "rest_s")),
        row(f"ms / output token ({args.output_len} out)", pl.get("ms_per_token", ""), hl.get("ms_per_token", ""),
            floor=fl.get("ms_per_token", ""), target=TARGET_MS_PER_TOKEN),
        row(f"out tok/s, {args.num_requests} requests (hf: {ht.get('requests', '-')} in batches of {ht.get('batch_size', '-')})",
            pt.get("tok_per_s", ""), ht.get("tok_per_s", ""), faster_is_lower=False),
        row("  same, preprocessing included", pt.get("tok_per_s_with_preprocess", ""),
            ht.get("tok_per_s_with_preprocess", ""), faster_is_lower=False),
    ]
    rows = [r for r in rows if r["pagoda"] != "" or r["hf generate"] != ""]  # phases skipped or failed
    sessions = p.get("sessions", {})
    if "all" in sessions:
        a = sessions["all"]
        rows += [row(f"sessions ({args.sessions} x {args.session_steps} steps): prefix-cache hit rate", a["hit rate"], "",
                     floor=f"ideal {a['ideal']:.2f}"),
                 row("sessions: TTFT p50 / p90 ms", f"{a['TTFT p50 ms']:,.1f} / {a['TTFT p90 ms']:,.1f}", "")]
    return rows, sessions.get("per_step", []) + ([sessions["all"]] if "all" in sessions else [])


def plot(result: dict, png: Path) -> None:
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 3.6))
    for i, key in enumerate(("pagoda", "hf")):
        lat, bottom = result.get(key, {}).get("latency", {}), 0.0
        for part, color in (("preprocess_s", "tab:gray"), ("encoder_s", "tab:orange"), ("rest_s", "tab:blue")):
            value = 1000 * lat.get(part, 0.0) if not math.isnan(lat.get(part, 0.0)) else 0.0
            a.bar(i, value, bottom=bottom, color=color, label=part.removesuffix("_s") if i == 0 else None)
            bottom += value
    a.axhline(TARGET_TTFT_MS, ls="--", color="k", lw=0.8, label="target")
    a.set_xticks([0, 1], ["pagoda", "hf generate"])
    a.set_ylabel("agent-step TTFT ms")
    a.legend(fontsize=7)
    steps = result.get("pagoda", {}).get("sessions", {}).get("per_step", [])
    if steps:
        x = [s["step"] for s in steps]
        b.plot(x, [s["TTFT p50 ms"] for s in steps], "o-", label="TTFT p50")
        b.plot(x, [s["TTFT p90 ms"] for s in steps], "s--", label="TTFT p90")
        b.set_xticks(x)
        b.set_ylim(bottom=0)
        b.set_xlabel("session step")
        b.set_ylabel("TTFT ms")
        b.legend(fontsize=7, loc="upper left")
        hit = b.twinx()
        hit.bar(x, [s["hit rate"] for s in steps], alpha=0.25, color="tab:green")
        hit.set_ylabel("prefix-cache hit rate")
        hit.set_ylim(0, 1)
    fig.suptitle(f"{result['benchmark']}, {result['environment'].get('gpu', 'cpu')}")
    fig.tight_layout()
    fig.savefig(png, dpi=120)


def report(args, result: dict) -> None:
    rows, steps = summary(result, args)
    result["rows"], result["session_rows"] = rows, steps
    table = markdown_table(rows, ["metric", "pagoda", "hf generate", "speedup", "floor", "target", "met"])
    if steps:
        table += "\n\n" + markdown_table(steps, ["step", "requests", "prompt tok", "cached tok", "hit rate", "ideal",
                                                 "TTFT p50 ms", "TTFT p90 ms", "queued p50 ms"])
    write_report(args.out, result["benchmark"], result, table, lambda png: plot(result, png))


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

    global START
    START = time.monotonic()  # --deadline-s and the phase times count from here, not from the import
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
              "environment": _environment(), "ceilings": ceilings, "image": image, "prompt_tokens": prompt_tokens,
              "floors": floors(cfg, prompt_tokens, image, args.output_len, ceilings), "phase_seconds": phases}
    result["pagoda"] = _guard("pagoda", run_pagoda, path, work, args)
    phases["pagoda"] = result["pagoda"]["seconds"]
    _free()
    report(args, result)  # now, in case transformers' part is cut off
    if "hf" not in args.skip:
        result["hf"] = _guard("hf", run_hf, path, work, args)
        phases["hf"] = result["hf"]["seconds"]
    phases["total"] = time.monotonic() - START
    print("phase seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in phases.items()), flush=True)
    _print_targets(result)
    report(args, result)


def _environment() -> dict:
    import PIL

    env = environment() | {"pillow": PIL.__version__, "cuda": torch.version.cuda}
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        pass
    return env


def _print_targets(result: dict) -> None:
    lat = result.get("pagoda", {}).get("latency", {})
    if "ttft_s" in lat:
        ttft, per = 1000 * lat["ttft_s"], lat["ms_per_token"]
        print(f"targets: TTFT {ttft:.1f} ms (<= {TARGET_TTFT_MS:g}: {'met' if ttft <= TARGET_TTFT_MS else 'NOT met'}), "
              f"{per:.2f} ms/token (<= {TARGET_MS_PER_TOKEN:g}: {'met' if per <= TARGET_MS_PER_TOKEN else 'NOT met'})",
              flush=True)


if __name__ == "__main__":
    main()
