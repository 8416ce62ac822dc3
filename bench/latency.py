"""Single-request latency on a GPU: batch-1 decode ms/token and TTFT by prompt length, pagoda vs
transformers `generate` on the same random weights in the same run.

The bandwidth floor of batch-1 decode is (weight bytes) / (copy bandwidth measured in this run).

    python -m bench.latency --shape llama-3.1-8b
    python -m bench.latency --shape llama-3.1-8b --fp8      # + pagoda with quantization="fp8"

The FP8 floor counts the decoder's linear weights at one byte each (the embedding and LM head stay bf16).
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


def pagoda_latency(path: Path, prompt_lens: list[int], decode_prompt: int, decode_tokens: int, vocab: int,
                   quantization: str | None = None) -> dict:
    from pagoda import SamplingParams
    from pagoda.engine.llm_engine import LLMEngine

    engine = LLMEngine.from_kwargs(model=str(path), dtype="bfloat16", device="cuda", max_num_seqs=8,
                                   max_num_batched_tokens=max(prompt_lens + [decode_prompt]) + 16,
                                   max_model_len=max(prompt_lens + [decode_prompt + decode_tokens]) + 16,
                                   enable_prefix_caching=False, quantization=quantization)

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
    for key, marker, label in (("pagoda", "o-", "pagoda"), ("pagoda_fp8", "^-", "pagoda fp8"), ("hf", "s-", "hf generate")):
        if result.get(key) is None:
            continue
        ttft = {int(n): v for n, v in result[key]["ttft_s"].items()}
        ax.plot(lens, [1000 * ttft[n] for n in lens], marker, label=label)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("prompt tokens")
    ax.set_ylabel("TTFT ms")
    ax.legend()
    ax.set_title(f"{result['benchmark']}, {result['environment'].get('gpu', 'cpu')}")
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
    ap.add_argument("--fp8", action="store_true", help="also pagoda with quantization='fp8'")
    args = ap.parse_args()

    from pagoda.engine.loader import load_hf_config
    from pagoda.kernels.bench import _warm_up_gpu, measure_ceilings

    path = make_random_model(args.shape, args.model_dir / args.shape)
    cfg = load_hf_config(path)
    _warm_up_gpu()
    ceilings = measure_ceilings()
    shapes = _param_shapes(cfg)
    weight_bytes = 2 * sum(p.numel() for p in shapes)
    embedding_bytes = 2 * cfg.vocab_size * cfg.hidden_size * (1 if cfg.tie_word_embeddings else 2)
    floor_ms = 1000 * weight_bytes / (ceilings["GB/s"] * 1e9)
    fp8_floor_ms = 1000 * (embedding_bytes + (weight_bytes - embedding_bytes) / 2) / (ceilings["GB/s"] * 1e9)
    run = (path, args.prompt_lens, args.decode_prompt, args.decode_tokens, cfg.vocab_size)
    ours = pagoda_latency(*run)
    _free()  # the engine is gone with the call; give its memory back before the next one loads
    fp8 = pagoda_latency(*run, quantization="fp8") if args.fp8 else None
    _free()
    hf = hf_latency(*run)
    decode = "decode_ms_per_token"
    rows = [{"metric": f"batch-1 decode ms/token (after {args.decode_prompt} prompt tokens)",
             "pagoda": ours[decode], "pagoda fp8": fp8[decode] if fp8 else "", "hf generate": hf[decode],
             "speedup": hf[decode] / ours[decode], "bandwidth floor": floor_ms,
             "fp8 floor": fp8_floor_ms if fp8 else ""}]
    rows += [{"metric": f"TTFT ms, {n}-token prompt", "pagoda": 1000 * ours["ttft_s"][n],
              "pagoda fp8": 1000 * fp8["ttft_s"][n] if fp8 else "", "hf generate": 1000 * hf["ttft_s"][n],
              "speedup": hf["ttft_s"][n] / ours["ttft_s"][n], "bandwidth floor": "", "fp8 floor": ""}
             for n in args.prompt_lens]
    name = f"latency_{args.shape}" + ("_fp8" if fp8 else "")
    result = {"benchmark": name, "ceilings": ceilings, "environment": environment(),
              "pagoda": ours, "pagoda_fp8": fp8, "hf": hf, "bandwidth_floor_ms": floor_ms,
              "fp8_floor_ms": fp8_floor_ms if fp8 else None, "rows": rows}
    columns = ["metric", "pagoda"] + (["pagoda fp8"] if fp8 else []) + ["hf generate", "speedup", "bandwidth floor"]
    table = markdown_table(rows, columns + (["fp8 floor"] if fp8 else []))

    write_report(args.out, name, result, table, lambda png: plot(result, png))


if __name__ == "__main__":
    main()
