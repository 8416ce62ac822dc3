"""Where a lone request's first token spends its time: the offline engine against the async engine's paths.

At concurrency 1 the served path's TTFT is the async engine's plus the server's; this finds the engine's
share. One prompt, one request at a time, the same token ids everywhere, median of ``--repeats``:

- ``offline``: ``LLM.generate(max_tokens=1)``, synchronous steps (the latency bench's TTFT);
- ``engine_sync`` / ``engine_async``: an ``LLMEngine`` stepped by hand until its first ``CoreOutput``,
  with async scheduling off and on, every phase timed (schedule, submit or execute, take_output, update);
- ``async_thread`` / ``async_process``: ``AsyncLLMEngine.generate`` until its first item, per core.

    python -m bench.first_token --shape qwen3-0.6b --prompt-len 256      # GPU
    python -m bench.first_token --shape qwen3-cpu-tiny --device cpu       # CPU
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import time
from collections import defaultdict
from pathlib import Path

from bench.offline import _free
from bench.random_models import make_random_model
from bench.report import environment, markdown_table, write_report


def _prompt(n: int, vocab: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(10, vocab) for _ in range(n)]


def _sync(device: str) -> None:
    if device == "cuda":
        import torch

        torch.cuda.synchronize()


def offline(kwargs: dict, prompts: list[list[int]]) -> list[float]:
    from pagoda import LLM, SamplingParams

    llm = LLM(**kwargs)
    params = SamplingParams(temperature=0.0, max_tokens=1)
    times = []
    for prompt in prompts:
        start = time.perf_counter()
        llm.generate([{"prompt_token_ids": prompt}], params, use_tqdm=False)
        times.append(time.perf_counter() - start)
    llm.engine.shutdown()
    return times


def stepped(kwargs: dict, prompts: list[list[int]], async_scheduling: bool) -> tuple[list[float], dict]:
    """Time to the first CoreOutput of an LLMEngine stepped here, and the mean ms of each phase on the way."""
    from pagoda import SamplingParams
    from pagoda.engine.config import EngineConfig
    from pagoda.engine.llm_engine import LLMEngine

    engine = LLMEngine(EngineConfig.from_kwargs(**kwargs, async_scheduling=async_scheduling))
    phases: dict[str, float] = defaultdict(float)
    for obj, name in ((engine.scheduler, "schedule"), (engine.scheduler, "update_from_output"),
                      (engine.executor, "submit"), (engine.executor, "take_output"),
                      (engine.executor, "execute_model"), (engine, "_news")):
        _time_calls(obj, name, phases)
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    times = []
    for i, prompt in enumerate(prompts):
        if i == 1:
            phases.clear()  # the first request warms up: phases of the others only
        start = time.perf_counter()
        engine.add_request(f"r{i}", {"prompt_token_ids": prompt}, params, output_kind=None)
        while not engine.step_core():
            pass
        times.append(time.perf_counter() - start)
        engine.abort_request(f"r{i}")
        while engine.has_unfinished_requests():
            engine.step_core()
    engine.shutdown()
    return times, {k: 1e3 * v / max(1, len(prompts) - 1) for k, v in phases.items()}


def _time_calls(obj, name: str, into: dict) -> None:
    inner = getattr(obj, name)

    def timed(*args, **kwargs):
        start = time.perf_counter()
        try:
            return inner(*args, **kwargs)
        finally:
            into[name] += time.perf_counter() - start

    setattr(obj, name, timed)


def through_async(kwargs: dict, prompts: list[list[int]], core: str) -> list[float]:
    from pagoda import AsyncLLMEngine, SamplingParams

    engine = AsyncLLMEngine.from_kwargs(core=core, **kwargs)
    params = SamplingParams(temperature=0.0, max_tokens=2, ignore_eos=True)

    async def run() -> list[float]:
        times = []
        for i, prompt in enumerate(prompts):
            start = time.perf_counter()
            stream = engine.generate({"prompt_token_ids": prompt}, params, f"a{i}")
            await anext(stream)
            times.append(time.perf_counter() - start)
            await stream.aclose()
            await asyncio.sleep(0.05)  # the abort lands; the next request meets an idle engine, as at c=1
        return times

    try:
        return asyncio.run(run())
    finally:
        engine.shutdown()


def plot(rows: list[dict], title: str, png: Path) -> None:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3))
    ax.barh([r["system"] for r in rows], [r["ttft_p50_ms"] for r in rows])
    ax.invert_yaxis()
    ax.set_xlabel("TTFT p50, ms (concurrency 1)")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(png, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="qwen3-0.6b")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--prompt-len", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--model-dir", type=Path, default=Path("/tmp/pagoda-models"))
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    ap.add_argument("--name", default=None)
    args = ap.parse_args()

    from pagoda.engine.loader import load_hf_config

    path = make_random_model(args.shape, args.model_dir / args.shape)
    vocab = load_hf_config(path).vocab_size
    prompts = [_prompt(args.prompt_len, vocab, seed) for seed in range(args.repeats + 1)]  # the first warms up
    kwargs = {"model": str(path), "device": args.device, "max_model_len": 4096}
    if args.device == "cpu":
        kwargs["cpu_kv_cache_gib"] = 0.5
    rows, phases = [], {}
    for system, run in (("offline", lambda: offline(kwargs, prompts)),
                        ("engine_sync", lambda: stepped(kwargs, prompts, False)),
                        ("engine_async", lambda: stepped(kwargs, prompts, True)),
                        ("async_thread", lambda: through_async(kwargs, prompts, "thread")),
                        ("async_process", lambda: through_async(kwargs, prompts, "process"))):
        result = run()
        _free()  # every system builds its own engine in this process: the next one needs the memory back
        times, phase_ms = result if isinstance(result, tuple) else (result, None)
        times = times[1:]
        rows.append({"system": system, "ttft_p50_ms": 1e3 * statistics.median(times),
                     "ttft_min_ms": 1e3 * min(times), "ttft_max_ms": 1e3 * max(times)})
        if phase_ms is not None:
            phases[system] = phase_ms
        print(rows[-1], phase_ms, flush=True)
    phase_rows = [{"system": s, **{k: round(v, 3) for k, v in p.items()}} for s, p in phases.items()]
    phase_cols = ["system", *sorted({k for p in phases.values() for k in p})]
    table = (markdown_table(rows, ["system", "ttft_p50_ms", "ttft_min_ms", "ttft_max_ms"])
             + "\n\nms per request until its first token, by phase (LLMEngine stepped by hand):\n\n"
             + markdown_table(phase_rows, phase_cols))
    name = args.name or f"first_token_{args.shape}"
    result = {"benchmark": name, "environment": environment(), "prompt_len": args.prompt_len, "rows": rows,
              "phases_ms": phases}
    env = result["environment"]
    title = f"{args.shape}, {args.prompt_len}-token prompt, {env.get('gpu') or args.device}"
    write_report(args.out, name, result, table, lambda png: plot(rows, title, png))


if __name__ == "__main__":
    main()
