"""Single-request latency on a GPU: batch-1 decode ms/token and TTFT by prompt length, pagoda vs
transformers `generate` on the same random weights in the same run.

The bandwidth floor of batch-1 decode is (weight bytes) / (copy bandwidth measured in this run).

    python -m bench.latency --shape llama-3.1-8b
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
from pathlib import Path

import torch

from bench.offline import _free, _param_shapes
from bench.random_models import make_random_model
from bench.report import environment, markdown_table, write_report


def _prompt(n: int, vocab: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(10, vocab) for _ in range(n)]


def pagoda_latency(path: Path, prompt_lens: list[int], decode_prompt: int, decode_tokens: int, vocab: int) -> dict:
    from pagoda import SamplingParams
    from pagoda.engine.llm_engine import LLMEngine

    engine = LLMEngine.from_kwargs(model=str(path), dtype="bfloat16", device="cuda", max_num_seqs=8,
                                   max_num_batched_tokens=max(prompt_lens + [decode_prompt]) + 16,
                                   max_model_len=max(prompt_lens + [decode_prompt + decode_tokens]) + 16,
                                   enable_prefix_caching=False)

    def run(prompt: list[int], max_tokens: int) -> list[float]:
        """Wall time at which each token came out, from the request's arrival."""
        engine.add_request(str(time.perf_counter()), {"prompt_token_ids": prompt},
                           SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True))
        start, stamps = time.perf_counter(), []
        while engine.has_unfinished_requests():
            if engine.step():
                stamps.append(time.perf_counter() - start)
        return stamps

    run(_prompt(64, vocab, 0), 8)  # warm-up
    ttft = {n: statistics.median(run(_prompt(n, vocab, s), 1)[0] for s in range(3)) for n in prompt_lens}
    stamps = run(_prompt(decode_prompt, vocab, 7), decode_tokens)
    per_token = (stamps[-1] - stamps[0]) / (len(stamps) - 1)
    return {"ttft_s": ttft, "decode_ms_per_token": 1000 * per_token}


def hf_latency(path: Path, prompt_lens: list[int], decode_prompt: int, decode_tokens: int, vocab: int) -> dict:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16, device_map="cuda").eval()

    def timed(prompt: list[int], new: int) -> float:
        ids = torch.tensor([prompt], device="cuda")
        torch.cuda.synchronize()
        start = time.perf_counter()
        with torch.no_grad():
            model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, min_new_tokens=new,
                           do_sample=False, pad_token_id=0)
        torch.cuda.synchronize()
        return time.perf_counter() - start

    timed(_prompt(64, vocab, 0), 8)  # warm-up
    ttft = {n: statistics.median(timed(_prompt(n, vocab, s), 1) for s in range(3)) for n in prompt_lens}
    prompt = _prompt(decode_prompt, vocab, 7)
    per_token = (timed(prompt, decode_tokens) - timed(prompt, 1)) / (decode_tokens - 1)
    return {"ttft_s": ttft, "decode_ms_per_token": 1000 * per_token}


def plot(result: dict, png: Path) -> None:
    import matplotlib.pyplot as plt

    lens = sorted(int(n) for n in result["pagoda"]["ttft_s"])
    fig, ax = plt.subplots(figsize=(6, 3))
    for key, marker in (("pagoda", "o-"), ("hf", "s-")):
        ttft = {int(n): v for n, v in result[key]["ttft_s"].items()}
        ax.plot(lens, [1000 * ttft[n] for n in lens], marker, label=key if key == "pagoda" else "hf generate")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("prompt tokens")
    ax.set_ylabel("TTFT ms")
    ax.legend()
    ax.set_title(f"{result['benchmark']} bf16, {result['environment'].get('gpu', 'cpu')}")
    fig.tight_layout()
    fig.savefig(png, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="llama-3.1-8b")
    ap.add_argument("--prompt-lens", type=int, nargs="+", default=[128, 512, 2048, 8192])
    ap.add_argument("--decode-prompt", type=int, default=512)
    ap.add_argument("--decode-tokens", type=int, default=128)
    ap.add_argument("--model-dir", type=Path, default=Path("/tmp/pagoda-models"))
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = ap.parse_args()

    from pagoda.engine.loader import load_hf_config
    from pagoda.kernels.bench import _warm_up_gpu, measure_ceilings

    path = make_random_model(args.shape, args.model_dir / args.shape)
    cfg = load_hf_config(path)
    _warm_up_gpu()
    ceilings = measure_ceilings()
    weight_bytes = 2 * sum(p.numel() for p in _param_shapes(cfg))
    floor_ms = 1000 * weight_bytes / (ceilings["GB/s"] * 1e9)
    ours = pagoda_latency(path, args.prompt_lens, args.decode_prompt, args.decode_tokens, cfg.vocab_size)
    _free()  # the engine is gone with the call; give its memory back before transformers loads
    hf = hf_latency(path, args.prompt_lens, args.decode_prompt, args.decode_tokens, cfg.vocab_size)
    rows = [{"metric": f"batch-1 decode ms/token (after {args.decode_prompt} prompt tokens)",
             "pagoda": ours["decode_ms_per_token"], "hf generate": hf["decode_ms_per_token"],
             "speedup": hf["decode_ms_per_token"] / ours["decode_ms_per_token"], "bandwidth floor": floor_ms}]
    rows += [{"metric": f"TTFT ms, {n}-token prompt", "pagoda": 1000 * ours["ttft_s"][n], "hf generate": 1000 * hf["ttft_s"][n],
              "speedup": hf["ttft_s"][n] / ours["ttft_s"][n], "bandwidth floor": ""} for n in args.prompt_lens]
    result = {"benchmark": f"latency_{args.shape}", "ceilings": ceilings, "environment": environment(),
              "pagoda": ours, "hf": hf, "bandwidth_floor_ms": floor_ms, "rows": rows}
    table = markdown_table(rows, ["metric", "pagoda", "hf generate", "speedup", "bandwidth floor"])

    write_report(args.out, f"latency_{args.shape}", result, table, lambda png: plot(result, png))


if __name__ == "__main__":
    main()
