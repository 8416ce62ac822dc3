"""``bench.vlm``'s baseline: transformers' GLM-4.1V ``generate`` on the same weights and requests
(left-padded static batches, the processor's own preprocessing)."""

from __future__ import annotations

import math
import statistics
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from bench.offline import _free
from bench.vlm_harness import DEVICE, DTYPE, elapsed, guard, sync
from bench.vlm_workload import AgentRequest, Special


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
    sync()
    return inputs, time.perf_counter() - t0


def _generate(model, inputs: dict, new: int) -> float:
    sync()
    t0 = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(**inputs, max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0)
    sync()
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
    result["latency"] = guard("hf latency", hf_latency, model, processor, merge, work, args)
    if args.hf_num_requests:
        result["throughput"] = guard("hf throughput", hf_throughput, model, processor, merge, work, args)
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
        sync()
        t0 = time.perf_counter()
        with torch.inference_mode():
            model.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"])
        sync()
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
            if elapsed() + last > args.deadline_s:
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
