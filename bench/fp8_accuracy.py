"""FP8 against bf16 on the same random weights, on a GPU: how much do the logits move?

Per shape, pagoda loads the model twice (``quantization=None``, then ``"fp8"``: weights per output
channel, activations per token) and runs the same 8 prompts (7 to 512 tokens, 1,265 positions):
- full-prompt logits through the real paged path: max and mean |fp8 - bf16|, the largest |logit| for
  scale, and top-1 agreement over every position;
- 32 greedy tokens per prompt: prompts whose tokens are all the same, and where the first differs.

Qwen3-0.6B's shape has tied embeddings, so its random logits are nearly flat and top-1 is decided by
noise; the sharpened Llama-3.1-8B (``bench/random_models.py``) has decisive greedy tokens, the
meaningful agreement figure.

    python -m bench.fp8_accuracy                       # qwen3-0.6b and llama-3.1-8b (sharpened)
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from bench.prompt_logits import NEW_TOKENS, greedy_and_logits, prompts
from bench.random_models import make_random_model
from bench.report import environment, markdown_table, write_report

SHAPES = {"qwen3-0.6b": False, "llama-3.1-8b": True}  # shape -> sharpened


def _first_difference(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), len(a))


def compare(shape: str, sharp: bool, model_dir: Path) -> dict:
    from pagoda.engine.loader import load_hf_config

    path = make_random_model(shape, model_dir / (shape + ("-sharp" if sharp else "")), sharp=sharp)
    batch = prompts(load_hf_config(path).vocab_size)
    bf16_tokens, bf16_logits = greedy_and_logits(path, batch)
    fp8_tokens, fp8_logits = greedy_and_logits(path, batch, quantization="fp8")
    diffs = torch.cat([(f - b).abs().flatten() for f, b in zip(fp8_logits, bf16_logits)])
    top1 = torch.cat([f.argmax(-1) == b.argmax(-1) for f, b in zip(fp8_logits, bf16_logits)])
    return {
        "shape": shape + (" (sharpened)" if sharp else ""), "positions": top1.numel(),
        "max_abs_diff": diffs.max().item(), "mean_abs_diff": diffs.mean().item(),
        "max_abs_logit": max(b.abs().max().item() for b in bf16_logits),
        "top1_agreement": top1.float().mean().item(),
        "greedy_same_prompts": sum(a == b for a, b in zip(fp8_tokens, bf16_tokens)), "prompts": len(batch),
        "first_difference_at": [_first_difference(a, b) for a, b in zip(fp8_tokens, bf16_tokens)],
    }


def plot(rows: list[dict], png: Path) -> None:
    import matplotlib.pyplot as plt

    fig, (top1, diff) = plt.subplots(1, 2, figsize=(9, 3))
    names = [r["shape"] for r in rows]
    top1.barh(names, [r["top1_agreement"] for r in rows])
    top1.set_xlabel("top-1 agreement with bf16")
    top1.set_xlim(0, 1)
    diff.barh(names, [r["mean_abs_diff"] / r["max_abs_logit"] for r in rows])
    diff.set_xlabel("mean |logit diff| / max |logit|")
    fig.tight_layout()
    fig.savefig(png, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", nargs="+", choices=list(SHAPES), default=list(SHAPES))
    ap.add_argument("--model-dir", type=Path, default=Path("/tmp/pagoda-models"))
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    ap.add_argument("--name", default="fp8_accuracy")
    args = ap.parse_args()
    rows = []
    for shape in args.shapes:
        rows.append(compare(shape, SHAPES[shape], args.model_dir))
        print(rows[-1], flush=True)
    result = {"benchmark": args.name, "environment": environment(), "new_tokens": NEW_TOKENS, "rows": rows}
    table = markdown_table(rows, ["shape", "positions", "max_abs_diff", "mean_abs_diff", "max_abs_logit",
                                  "top1_agreement", "greedy_same_prompts", "prompts", "first_difference_at"])
    write_report(args.out, args.name, result, table, lambda png: plot(rows, png))


if __name__ == "__main__":
    main()
