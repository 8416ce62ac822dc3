"""Where a step's time goes: host phases and GPU kernels of the offline engine loop.

Runs an offline workload through ``LLMEngine`` one phase at a time, synchronizing the GPU after
each phase so that every millisecond lands in exactly one row:

    schedule | execute (inputs, forward, logits, sample, D2H) | update | core_out | detokenize

``core_out`` is what the engine core does to hand a step on (``CoreOutput``s); ``detokenize`` is the
front's share (``OutputProcessor``: text, stop strings), which an engine core leaves to its front.

then profiles a few pure-decode steps with ``torch.profiler`` and lists the top kernels by GPU time.
``--output-kind delta`` emits what a stream gets (every request's new text every step, as
``AsyncLLMEngine`` and the served path ask) instead of ``LLM.generate``'s final outputs.
Not a throughput benchmark (the synchronizations cost time): use it to see what to fix.

    python -m bench.profile_step --shape llama-3.1-8b --num-requests 128 --input-len 512 --output-len 64
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from bench.offline import make_workload
from bench.random_models import make_random_model
from bench.report import environment, markdown_table


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _phase_breakdown(engine, params, workload, kind: str = "final") -> dict:
    from pagoda.engine.output_processor import OutputKind

    for i, (prompt, _) in enumerate(workload):
        engine.add_request(f"p{i}", {"prompt_token_ids": prompt}, params[i], output_kind=OutputKind(kind))
    totals = {"schedule": 0.0, "execute": 0.0, "update": 0.0, "core_out": 0.0, "detokenize": 0.0}
    decode = dict(totals)
    steps = decode_steps = 0
    other_steps: list[dict] = []  # every step that is not pure decode: tokens and execute ms
    while engine.has_unfinished_requests():
        t0 = time.perf_counter()
        scheduled = engine.scheduler.schedule()
        t1 = time.perf_counter()
        result = engine.executor.execute_model(scheduled)
        _sync()
        t2 = time.perf_counter()
        updated = engine.scheduler.update_from_output(scheduled, result)
        t3 = time.perf_counter()
        news = engine._news(updated)
        t4 = time.perf_counter()
        _, stopped = engine.outputs.process(news)
        engine.stop_completions(stopped)
        t5 = time.perf_counter()
        times = dict(zip(totals, (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t5 - t4)))
        steps += 1
        num_seqs = len(scheduled.num_scheduled_tokens)
        is_decode = not scheduled.new_reqs and scheduled.total_num_scheduled_tokens == num_seqs
        decode_steps += is_decode
        if not is_decode:
            other_steps.append({"tokens": scheduled.total_num_scheduled_tokens, "seqs": num_seqs,
                                "new": len(scheduled.new_reqs), "execute_ms": 1e3 * (t2 - t1)})
        for k, v in times.items():
            totals[k] += v
            if is_decode:
                decode[k] += v
    return {
        "steps": steps, "decode_steps": decode_steps,
        "ms_per_step_all": {k: 1e3 * v / steps for k, v in totals.items()},
        "ms_per_decode_step": {k: 1e3 * v / max(1, decode_steps) for k, v in decode.items()},
        "seconds_total": sum(totals.values()),
        "non_decode_steps": other_steps,
    }


def _kernel_table(engine, params, workload, num_steps: int, prefill: bool = False) -> list[dict]:
    from torch.profiler import ProfilerActivity, profile

    from pagoda.engine.output_processor import OutputKind

    for i, (prompt, _) in enumerate(workload):
        engine.add_request(f"k{i}", {"prompt_token_ids": prompt}, params[i], output_kind=OutputKind.FINAL)
    while not prefill and (engine.scheduler.num_waiting or any(
        r.num_tokens - r.num_computed_tokens > 1 for r in engine.scheduler.running
    )):
        engine.step()  # through every prefill: what follows is pure decode
    _sync()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(num_steps):
            engine.step()
        _sync()
    engine.abort_request([f"k{i}" for i in range(len(workload))])
    rows = []
    for e in prof.key_averages():
        gpu_us = getattr(e, "device_time_total", 0.0)
        cpu_us = e.self_cpu_time_total
        if gpu_us > 0 or cpu_us > 200 * num_steps:
            rows.append({"name": e.key[:90], "calls_per_step": e.count / num_steps,
                         "gpu_ms_per_step": gpu_us / 1e3 / num_steps,
                         "self_cpu_ms_per_step": cpu_us / 1e3 / num_steps})
    rows.sort(key=lambda r: -(r["gpu_ms_per_step"] + r["self_cpu_ms_per_step"]))
    return rows[:40]


KERNEL_COLUMNS = ["name", "calls_per_step", "gpu_ms_per_step", "self_cpu_ms_per_step"]


def _report(cold: dict, warm: dict, decode_kernels: list[dict], prefill_kernels: list[dict]) -> str:
    phase_rows = [
        {"phase": k, "ms/step (all)": warm["ms_per_step_all"][k], "ms/decode step": warm["ms_per_decode_step"][k]}
        for k in warm["ms_per_step_all"]
    ]
    parts = [
        markdown_table(phase_rows, ["phase", "ms/step (all)", "ms/decode step"]),
        "decode steps:\n" + markdown_table(decode_kernels, KERNEL_COLUMNS),
        "first two steps (prefill):\n" + markdown_table(prefill_kernels, KERNEL_COLUMNS),
        markdown_table(warm["non_decode_steps"], ["tokens", "seqs", "new", "execute_ms"]),
        f"cold pass: {cold['seconds_total']:.2f} s, warm pass: {warm['seconds_total']:.2f} s",
    ]
    return "\n\n".join(parts)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="llama-3.1-8b")
    ap.add_argument("--model", type=Path, default=None, help="an existing HF folder instead of a random --shape")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--num-requests", type=int, default=128)
    ap.add_argument("--input-len", type=int, default=512)
    ap.add_argument("--output-len", type=int, default=64)
    ap.add_argument("--profile-steps", type=int, default=5)
    ap.add_argument("--output-kind", choices=["final", "delta", "cumulative"], default="final",
                    help="what the phase breakdown emits: final (LLM.generate) or a stream's delta outputs")
    ap.add_argument("--model-dir", type=Path, default=Path("/tmp/pagoda-models"))
    ap.add_argument("--out", type=Path, default=Path("/tmp/pagoda-out"))
    args = ap.parse_args()

    from pagoda import LLM, SamplingParams
    from pagoda.engine.loader import load_hf_config

    path = args.model or make_random_model(args.shape, args.model_dir / args.shape)
    vocab = load_hf_config(path).vocab_size
    llm = LLM(model=str(path), dtype="bfloat16" if args.device == "cuda" else "float32", device=args.device,
              max_num_seqs=max(args.num_requests, 16), max_num_batched_tokens=8192,
              max_model_len=args.input_len + args.output_len + 16)
    # Every pass gets its own prompts: repeated ones would hit the prefix cache and skip their prefill.
    cold_w, warm_w, prefill_w, decode_w, start_w = (
        make_workload("fixed", args.num_requests, args.input_len, args.output_len, vocab, seed) for seed in range(5)
    )
    params = [SamplingParams(temperature=0.0, max_tokens=o, ignore_eos=True) for _, o in cold_w]
    llm.generate([{"prompt_token_ids": p} for p, _ in start_w[:4]], params[:4], use_tqdm=False)
    cold = _phase_breakdown(llm.engine, params, cold_w, args.output_kind)  # the first batch a user sends
    warm = _phase_breakdown(llm.engine, params, warm_w, args.output_kind)
    prefill_kernels = _kernel_table(llm.engine, params, prefill_w, 2, prefill=True)
    decode_kernels = _kernel_table(llm.engine, params, decode_w, args.profile_steps)

    name = f"profile_{args.shape}_{args.num_requests}x{args.input_len}" + (
        "" if args.output_kind == "final" else f"_{args.output_kind}")
    config = vars(args) | {"model_dir": None, "out": None, "model": str(args.model) if args.model else None}
    result = {"benchmark": name, "workload": config, "environment": environment(), "cold_phases": cold,
              "phases": warm, "kernels": decode_kernels, "prefill_kernels": prefill_kernels}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{name}.json").write_text(json.dumps(result, indent=2))
    report = _report(cold, warm, decode_kernels, prefill_kernels)
    (args.out / f"{name}.md").write_text(report + "\n")
    print(f"{warm['steps']} steps ({warm['decode_steps']} decode), {warm['seconds_total']:.2f} s")
    print(report)


if __name__ == "__main__":
    main()
