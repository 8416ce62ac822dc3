"""``bench.vlm``'s report: the floors of an agent step, the summary table against transformers and the
targets, the plot."""

from __future__ import annotations

import math
from pathlib import Path

import torch

from bench.report import environment, markdown_table, write_report

TARGET_TTFT_MS, TARGET_MS_PER_TOKEN = 250.0, 7.5


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


def print_targets(result: dict) -> None:
    lat = result.get("pagoda", {}).get("latency", {})
    if "ttft_s" in lat:
        ttft, per = 1000 * lat["ttft_s"], lat["ms_per_token"]
        print(f"targets: TTFT {ttft:.1f} ms (<= {TARGET_TTFT_MS:g}: {'met' if ttft <= TARGET_TTFT_MS else 'NOT met'}), "
              f"{per:.2f} ms/token (<= {TARGET_MS_PER_TOKEN:g}: {'met' if per <= TARGET_MS_PER_TOKEN else 'NOT met'})",
              flush=True)


def vlm_environment() -> dict:
    import PIL

    env = environment() | {"pillow": PIL.__version__, "cuda": torch.version.cuda}
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        pass
    return env
