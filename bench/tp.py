"""Tensor parallelism: batch-1 decode latency, throughput, and the collectives' share of a step, TP 1/2/4.

For each TP size, in one run (TP=1 is the baseline):
- batch-1 decode ms/token after a ``--prompt``-token prompt (CUDA graphs on, the default engine);
- throughput: ``--batch`` requests of ``--prompt`` tokens, ``--tokens`` output tokens each;
- the collectives' share of a decode step, measured in an eager engine with synchronous steps
  (graph replays hide the collectives from any Python-side timer): each rank's group is a ``TimedTPGroup``
  (``PAGODA_TIME_COLLECTIVES=1``) that brackets every all-reduce / gather / broadcast with CUDA
  events (wall clock on CPU); rank 0's total over the decode steps / the steps' wall time.

    python -m bench.tp                                   # GPU, random Llama-3.1-8B shape, TP 1 2 4
    python -m bench.tp --device cpu --model tiny --tp 1 2   # CPU smoke over gloo

Writes bench/results/tp_<model>_<device>.{json,md,png}.
"""

from __future__ import annotations

import argparse
import gc
import os
import random
import statistics
import time
from pathlib import Path

import torch

from bench.report import environment, markdown_table, write_report

TINY = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=4,
            vocab_size=4096, max_position_embeddings=2048, rms_norm_eps=1e-5, tie_word_embeddings=False,
            bos_token_id=1, eos_token_id=2, pad_token_id=0)


def make_tiny(out: Path) -> Path:
    """A 4-layer random Llama with a word-level tokenizer (8 heads, 4 kv heads: TP 1/2/4 all work)."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    from bench.random_models import _word_tokenizer

    if (out / "config.json").exists():
        return out
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(LlamaConfig(**TINY), dtype=torch.float32)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    _word_tokenizer(TINY["vocab_size"]).save_pretrained(out)
    return out


def resolve(model: str, model_dir: Path) -> Path:
    from bench.random_models import SHAPES, make_random_model

    if model == "tiny":
        return make_tiny(model_dir / "tp-tiny")
    if model in SHAPES:
        return make_random_model(model, model_dir / model)
    return Path(model)


def _prompt(n: int, vocab: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(10, vocab) for _ in range(n)]


def _engine(path: Path, tp: int, args, eager: bool, timed: bool, custom_all_reduce: bool = False,
            async_scheduling: bool = False):
    from pagoda.engine.llm_engine import LLMEngine

    os.environ["PAGODA_TIME_COLLECTIVES"] = "1" if timed else "0"  # read by each rank at start
    return LLMEngine.from_kwargs(
        model=str(path), tensor_parallel_size=tp, device=args.device, dtype=args.dtype, max_num_seqs=args.batch,
        max_num_batched_tokens=max(args.prompt * 2, 512), max_model_len=args.prompt + args.tokens + 16,
        enable_prefix_caching=False, enforce_eager=eager, custom_all_reduce=custom_all_reduce,
        async_scheduling=async_scheduling,
    )


def _release(engine) -> None:
    engine.shutdown()
    del engine
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _run(engine, prompts: list[list[int]], tokens: int, after_first_step=None) -> list[float]:
    """Generate; wall-clock stamps of every step that emitted output, from the first such step
    (the first tokens: the prefill is done). With async scheduling a step emits the tokens of the
    step before it, so stamps of emitting steps, not of all steps, time the decode in both modes."""
    from pagoda import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=tokens, ignore_eos=True)
    for i, p in enumerate(prompts):
        engine.add_request(f"{time.perf_counter()}-{i}", {"prompt_token_ids": p}, params)
    stamps: list[float] = []
    while engine.has_unfinished_requests():
        if engine.step():
            stamps.append(time.perf_counter())
            if len(stamps) == 1 and after_first_step:
                after_first_step()
    return [t - stamps[0] for t in stamps]


def measure(path: Path, tp: int, args, vocab: int, custom_all_reduce: bool = False,
            async_scheduling: bool = False) -> dict:
    """Latency and throughput on the default engine; the collectives' share on an eager one.
    ``custom_all_reduce``: the symmetric-memory all-reduce kernels instead of NCCL (GPU, TP > 1);
    ``async_scheduling``: step n+1 scheduled while step n runs."""
    prompt = _prompt(args.prompt, vocab, 7)
    on_cuda = args.device == "cuda"
    batch = [_prompt(args.prompt, vocab, 100 + i) for i in range(args.batch)]
    engine = _engine(path, tp, args, eager=False, timed=not on_cuda, custom_all_reduce=custom_all_reduce,
                     async_scheduling=async_scheduling)
    _run(engine, [_prompt(32, vocab, 0)], 8)  # warm-up, single and batched
    _run(engine, batch, 4)
    per_token, seconds = [], []
    for _ in range(args.repeats):  # medians: a shared host is noisy
        stamps = _run(engine, [prompt], args.tokens)
        per_token.append(stamps[-1] / (len(stamps) - 1))
        begin = time.perf_counter()
        _run(engine, batch, args.tokens)
        seconds.append(time.perf_counter() - begin)
    label = "-" if tp == 1 else "gloo" if not on_cuda else "symm-mem" if custom_all_reduce else "nccl"
    row = {"tp": tp, "all_reduce": label, "scheduling": "async" if async_scheduling else "sync",
           "decode_ms_per_token": 1000 * statistics.median(per_token),
           "throughput_tok_s": args.batch * args.tokens / statistics.median(seconds)}
    if on_cuda and args.skip_collectives:
        _release(engine)
        return row
    if on_cuda or async_scheduling:
        # Graphs hide the collectives from the timer: measure them in an eager engine. Always with
        # synchronous steps, so that the counted collectives belong to the timed steps.
        _release(engine)
        engine = None  # the last reference: its GPU memory must be gone before the next engine sizes its cache
        gc.collect()
        if on_cuda:
            torch.cuda.empty_cache()
        engine = _engine(path, tp, args, eager=on_cuda, timed=True, custom_all_reduce=custom_all_reduce)
        _run(engine, [_prompt(32, vocab, 0)], 8)
    row.update(_collective_share(engine, prompt, args.tokens, tp))
    _release(engine)
    return row


def _collective_share(engine, prompt: list[int], tokens: int, tp: int) -> dict:
    """Batch-1 decode on an eager engine; for TP > 1, rank 0's time inside collectives per step."""
    reset = engine.executor.collective_stats if tp > 1 else None
    stamps = _run(engine, [prompt], tokens, after_first_step=reset)  # counters start after the prefill
    steps, wall = len(stamps) - 1, stamps[-1]
    stats = engine.executor.collective_stats()[0] if tp > 1 else {}
    total = sum(s["seconds"] for s in stats.values())
    return {
        "eager_decode_ms_per_token": 1000 * wall / steps,
        "all_reduce_ms_per_step": 1000 * stats.get("all_reduce", {}).get("seconds", 0.0) / steps,
        "all_reduces_per_step": stats.get("all_reduce", {}).get("calls", 0) / steps,
        "collective_ms_per_step": 1000 * total / steps,
        "collective_share": total / wall,
        "by_op": stats,
    }


def plot(result: dict, png: Path) -> None:
    import matplotlib.pyplot as plt

    rows = result["rows"]
    labels = [f"TP={r['tp']}" + (" symm" if r.get("all_reduce", "").startswith("symm") else "")
              + (" async" if r.get("scheduling") == "async" else "")
              + (" no-spin" if r.get("spin_wait_ms") == 0 else "") for r in rows]
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.2))
    left.bar(labels, [r["decode_ms_per_token"] for r in rows], label="decode step")
    coll = [r.get("all_reduce_ms_per_step") or 0.0 for r in rows]
    left.bar(labels, coll, label="all-reduce (eager)", color="tab:red")
    left.set_ylabel("ms / token, batch 1")
    left.legend()
    right.bar(labels, [r["throughput_tok_s"] for r in rows], color="tab:green")
    right.set_ylabel(f"output tok/s, batch {result['args']['batch']}")
    fig.suptitle(f"{result['benchmark']} {result['args']['dtype']}, {result['environment'].get('gpu', 'cpu')}")
    fig.tight_layout()
    fig.savefig(png, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="llama-3.1-8b", help="tiny, a shape of bench/random_models.py, or an HF folder")
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--dtype", default=None, help="default: bfloat16 on cuda, float32 on cpu")
    ap.add_argument("--tp", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--prompt", type=int, default=None, help="prompt tokens (default 512 on cuda, 32 on cpu)")
    ap.add_argument("--tokens", type=int, default=None, help="output tokens (default 128 on cuda, 16 on cpu)")
    ap.add_argument("--batch", type=int, default=None, help="throughput batch (default 64 on cuda, 4 on cpu)")
    ap.add_argument("--repeats", type=int, default=3, help="latency and throughput runs; medians are reported")
    ap.add_argument("--skip-collectives", action="store_true",
                    help="skip the eager engine that measures the collectives' share (GPU: saves a model load per TP size)")
    ap.add_argument("--all-reduce", nargs="+", default=["symm"], choices=["nccl", "symm"],
                    help="GPU, TP > 1: rows with NCCL and/or the symmetric-memory kernels (custom_all_reduce, "
                         "the engine's default)")
    ap.add_argument("--compare-custom-all-reduce", action="store_true", help="the same as --all-reduce nccl symm")
    ap.add_argument("--scheduling", nargs="+", default=["async"], choices=["sync", "async"],
                    help="rows per TP size: synchronous steps and/or async scheduling (SchedulerConfig.async_scheduling, "
                         "the engine's default)")
    ap.add_argument("--suffix", default="", help="appended to the report's name (keeps runs of one setup apart)")
    ap.add_argument("--model-dir", type=Path, default=Path("/tmp/pagoda-models"))
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = ap.parse_args()
    cuda = args.device == "cuda"
    args.dtype = args.dtype or ("bfloat16" if cuda else "float32")
    args.prompt = args.prompt or (512 if cuda else 32)
    args.tokens = args.tokens or (128 if cuda else 16)
    args.batch = args.batch or (64 if cuda else 4)
    if cuda:
        args.tp = [tp for tp in args.tp if tp <= torch.cuda.device_count()]

    from pagoda.engine.loader import load_hf_config

    path = resolve(args.model, args.model_dir)
    vocab = load_hf_config(path).vocab_size
    rows: list[dict] = []
    for tp in args.tp:  # the report is rewritten after every row: a run cut short keeps what it measured
        kinds = ["nccl", "symm"] if args.compare_custom_all_reduce else args.all_reduce
        kinds = kinds if tp > 1 and cuda else kinds[:1]  # TP=1 has no all-reduce; CPU has no symmetric memory
        for mode in args.scheduling:
            for kind in kinds:
                rows.append(measure(path, tp, args, vocab, custom_all_reduce=kind == "symm",
                                    async_scheduling=mode == "async"))
                _report(args, rows)


def _report(args, rows: list[dict]) -> None:
    for r in rows:  # each row against TP=1 with the same scheduling (the first row where there is none)
        base = next((b for b in rows if b["tp"] == 1 and b.get("scheduling") == r.get("scheduling")), rows[0])
        r["latency_speedup"] = base["decode_ms_per_token"] / r["decode_ms_per_token"]
        r["latency_ratio"] = r["decode_ms_per_token"] / base["decode_ms_per_token"]
        r["throughput_speedup"] = r["throughput_tok_s"] / base["throughput_tok_s"]
        if "collective_share" in r:
            r["collective_share_pct"] = 100 * r["collective_share"]
    name = f"tp_{Path(args.model).name}_{args.device}" + ("_latency" if args.skip_collectives else "") + args.suffix
    result = {"benchmark": name, "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
              "environment": environment(), "rows": rows}
    columns = ["tp", "all_reduce", "scheduling", "decode_ms_per_token", "latency_ratio", "latency_speedup", "throughput_tok_s", "throughput_speedup",
               "eager_decode_ms_per_token", "all_reduce_ms_per_step", "collective_share_pct"]
    write_report(args.out, name, result, markdown_table(rows, columns), lambda png: plot(result, png))

if __name__ == "__main__":
    main()
