"""What grammar-constrained decoding costs (issue #18, item 5: at most 15% of output throughput on a
batch with half its requests constrained), measured against unconstrained decoding in the same run.

One batch of N requests runs three ways in one process, the modes interleaved round by round (the
order rotates, so drift on a shared machine does not favour one mode):

- ``unconstrained``: every request free text;
- ``mixed``: the even requests constrained by ``SCHEMA`` (a small JSON object), the odd ones free;
- ``constrained``: every request constrained.

Equal work in every mode: a constrained request ends where its JSON ends, so an untimed first run (all
constrained; it also compiles the grammar) measures each request's length n_i, and from then on request
i, when free, gets exactly n_i tokens (``max_tokens=n_i, ignore_eos``). Each slot then generates about
the same number of tokens in every mode (exactly with ``--seed``; without, a constrained request's length
varies from run to run around n_i) and the batch drains about the same way; what differs is the grammar's
work (filling the token bitmask on the host, applying it to the logits, accepting the sampled token).
Throughput counts the tokens actually produced. Rows are not seeded by default: a seeded row draws its
noise on its own (one generator per row per step), which costs the same in every mode and would dilute
the ratio. Every row samples (temperature > 0) so all modes take
the same sampler path; with ``--temperature 0`` the free rows are plain greedy and may run a step ahead
(async scheduling), which a structured row never does, so the ratio then includes that loss too.

Every constrained output is checked against ``SCHEMA`` (stopped on its own, parses, every field's type
and bounds): ``valid`` counts them.

``--device cpu`` (default): the embedded SmolLM2-135M in float32, 32 requests asking for a JSON record.
``--device cuda``: a random-weight ``--shape`` (default qwen3-0.6b, bench/random_models.py) in bf16, 256
requests of random prompt ids. Its stand-in tokenizer is byte-level (``byte_level_tokenizer``): the
word-level one of other benches has no token that spells ``{``, so no JSON could be generated.

    python -m bench.structured                                   # bench/results/structured_cpu.*
    python -m bench.structured --device cuda --shape qwen3-0.6b  # bench/results/structured_qwen3-0.6b_cuda.*
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import random
import statistics
import time
from pathlib import Path

import torch

from bench.report import environment, markdown_table, write_report

COLORS = ("red", "green", "blue")
SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "minLength": 1, "maxLength": 24},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "color": {"enum": list(COLORS)},
        "tags": {"type": "array", "items": {"type": "string", "minLength": 1, "maxLength": 12},
                 "minItems": 1, "maxItems": 3},
    },
    "required": ["name", "age", "color", "tags"],
    "additionalProperties": False,
}
MODES = ("unconstrained", "mixed", "constrained")
DEFAULTS = {  # per device: (num_requests, max_tokens of a constrained request, dtype)
    "cpu": (32, 160, "float32"),
    "cuda": (256, 160, "bfloat16"),
}


def is_valid(text: str) -> bool:
    """``text`` is a JSON document that SCHEMA admits (checked by hand: no jsonschema dependency)."""
    try:
        record = json.loads(text)
    except ValueError:
        return False
    if not isinstance(record, dict) or set(record) != set(SCHEMA["required"]):
        return False
    tags = record["tags"]
    return (isinstance(record["name"], str) and 1 <= len(record["name"]) <= 24
            and type(record["age"]) is int and 0 <= record["age"] <= 120
            and record["color"] in COLORS
            and isinstance(tags, list) and 1 <= len(tags) <= 3
            and all(isinstance(t, str) and 1 <= len(t) <= 12 for t in tags))


def constrained_rows(mode: str, n: int) -> set[int]:
    """The requests a mode constrains."""
    return {"unconstrained": set(), "mixed": set(range(0, n, 2)), "constrained": set(range(n))}[mode]


def byte_level_tokenizer(vocab_size: int, seed: int = 0):
    """A stand-in byte-level BPE tokenizer of exactly ``vocab_size`` tokens, built offline: the 4 special
    tokens random_models' configs name (pad 0, bos 1, eos 2, unk 3), the 128 ASCII byte tokens, JSON
    punctuation, then seeded random words (half with a leading space), so that strings can be spelled in
    many ways as with a real vocabulary. Only decoding matters here (prompts are token ids).

    ASCII only: xgrammar's JSON strings admit the 3-byte sequences ED A0..BF 80..BF (UTF-16 surrogates,
    which are not UTF-8), and a random-weight model, sampling nearly uniformly among the allowed tokens,
    spelled one from single-byte tokens (ED B5 BD) in 1 of 8 requests of a smoke run with all 256 byte
    tokens: an invalid output that says nothing about the cost measured here."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    rng = random.Random(seed)
    letters = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
    vocab: dict[str, int] = {}
    for token in ["<pad>", "<s>", "</s>", "<unk>", *(_byte_char(b) for b in range(128)),
                  '{"', '":', '":"', '",', '","', '"}', '["', '"]', '"],"', '},', ',"']:
        vocab.setdefault(token, len(vocab))
    while len(vocab) < vocab_size:
        word = "".join(rng.choice(letters) for _ in range(rng.randint(2, 8)))
        vocab.setdefault(("Ġ" if rng.random() < 0.5 else "") + word, len(vocab))  # Ġ: byte-level space
    core = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>")


def _byte_char(byte: int) -> str:
    """The character that stands for ``byte`` in GPT-2's byte-level alphabet: printable bytes stand for
    themselves, the 68 others for chr(256), chr(257), ... in byte order."""
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    return chr(byte) if byte in printable else chr(256 + sum(b not in printable for b in range(byte)))


def random_model(shape: str, model_dir: Path) -> Path:
    """A random-weight ``shape`` with the byte-level tokenizer, in a folder of its own (other benches
    keep the word-level one)."""
    from bench.random_models import make_random_model
    from pagoda.engine.loader import load_hf_config

    path = make_random_model(shape, model_dir / f"{shape}-bytelevel")
    byte_level_tokenizer(load_hf_config(path).vocab_size).save_pretrained(path)  # a second; always current
    return path


def make_prompts(args, vocab_size: int) -> list:
    if args.shape is None:  # the embedded model: a real request for a record
        return [f"Person number {i} in the village, described as a JSON record with name, age, color and tags:"
                for i in range(args.num_requests)]
    rng = random.Random(0)
    return [{"prompt_token_ids": [rng.randrange(10, vocab_size) for _ in range(args.input_len)]}
            for _ in range(args.num_requests)]


def run_batch(engine, prompts: list, params: list, ids: itertools.count) -> dict:
    """Runs one batch to completion: wall time, engine steps, the durations of the full-batch steps
    (every request running, none finished yet: the same decode batch in every mode, so that per-step
    costs compare) and every request's output."""
    from pagoda.engine.output_processor import OutputKind

    names = [f"r{next(ids)}" for _ in prompts]
    start = time.perf_counter()
    for name, prompt, p in zip(names, prompts, params):
        engine.add_request(name, prompt, p, output_kind=OutputKind.FINAL)
    done, steps, full_batch = {}, 0, []
    while engine.has_unfinished_requests():
        steps += 1
        full = engine.stats().num_running == len(prompts) and not done
        began = time.perf_counter()
        done.update((out.request_id, out.outputs[0]) for out in engine.step() if out.finished)
        if full:
            full_batch.append(time.perf_counter() - began)
    return {"seconds": time.perf_counter() - start, "steps": steps, "full_batch_step_s": full_batch,
            "outputs": [done[n] for n in names]}


def mode_params(mode: str, lengths: list[int], args, spec) -> list:
    """Row i: constrained (stops where its JSON ends) or free for exactly ``lengths[i]`` tokens."""
    from pagoda import SamplingParams

    rows = constrained_rows(mode, len(lengths))
    seeds = [None if args.seed is None else args.seed + i for i in range(len(lengths))]
    return [SamplingParams(temperature=args.temperature, seed=seeds[i], max_tokens=args.max_tokens, structured=spec)
            if i in rows else
            SamplingParams(temperature=args.temperature, seed=seeds[i], max_tokens=lengths[i], ignore_eos=True)
            for i in range(len(lengths))]


def measure(mode: str, run: dict) -> dict:
    """One timed run of a mode, summarised."""
    rows = constrained_rows(mode, len(run["outputs"]))
    tokens = sum(len(o.token_ids) for o in run["outputs"])
    valid = sum(o.finish_reason == "stop" and is_valid(o.text) for i, o in enumerate(run["outputs"]) if i in rows)
    full = run["full_batch_step_s"]
    return {"mode": mode, "constrained": len(rows), "valid": valid, "output_tokens": tokens,
            "seconds": run["seconds"], "steps": run["steps"], "ms_per_step": 1e3 * run["seconds"] / run["steps"],
            "full_batch_steps": len(full), "full_batch_ms_per_step": 1e3 * statistics.median(full) if full else None,
            "output_tok_per_s": tokens / run["seconds"]}


def summarise(rounds: list[dict]) -> list[dict]:
    """Per mode: the round of median throughput, the median full-batch step over all rounds, valid
    outputs over all rounds, and the costs against unconstrained."""
    rows = []
    for mode in MODES:
        runs = sorted((r for r in rounds if r["mode"] == mode), key=lambda r: r["output_tok_per_s"])
        steps = [r["full_batch_ms_per_step"] for r in runs if r["full_batch_ms_per_step"] is not None]
        rows.append(runs[len(runs) // 2] | {
            "rounds": len(runs),
            "valid": f"{sum(r['valid'] for r in runs)}/{sum(r['constrained'] for r in runs)}",
            "full_batch_ms_per_step": statistics.median(steps) if steps else None,
            "tok_per_s_all_rounds": [round(r["output_tok_per_s"], 2) for r in runs],
        })
    base = rows[0]
    for row in rows:
        row["vs_unconstrained"] = row["output_tok_per_s"] / base["output_tok_per_s"]
        row["cost_pct"] = 100.0 * (1.0 - row["vs_unconstrained"])
        if row["full_batch_ms_per_step"] and base["full_batch_ms_per_step"]:
            row["step_cost_pct"] = 100.0 * (row["full_batch_ms_per_step"] / base["full_batch_ms_per_step"] - 1.0)
    return rows


def plot(result: dict, png: Path) -> None:
    import matplotlib.pyplot as plt

    rows = result["results"]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.2))
    names = [r["mode"] for r in rows]
    ax1.bar(names, [r["output_tok_per_s"] for r in rows], color=["tab:gray", "tab:blue", "tab:orange"])
    for i, r in enumerate(rows):
        ax1.annotate(f"{r['cost_pct']:+.1f}% cost" if i else "baseline", (i, r["output_tok_per_s"]),
                     ha="center", va="bottom", fontsize=8)
    ax1.set_ylabel("output tokens / s (median round)")
    ax2.bar(names, [r["full_batch_ms_per_step"] or 0.0 for r in rows], color=["tab:gray", "tab:blue", "tab:orange"])
    ax2.set_ylabel("ms per full-batch step (median)")
    fig.suptitle(f"structured output cost: {result['model']}, {result['workload']['num_requests']} requests, "
                 f"{result['environment'].get('gpu', result['environment']['cpu'])}", fontsize=9)
    fig.tight_layout()
    fig.savefig(png, dpi=120)


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=sorted(DEFAULTS), default="cpu")
    ap.add_argument("--shape", default=None, help="random-weight shape (bench/random_models.py); default: the "
                    "embedded SmolLM2-135M on cpu, qwen3-0.6b on cuda")
    ap.add_argument("--num-requests", type=int, default=None, help="default 32 on cpu, 256 on cuda")
    ap.add_argument("--max-tokens", type=int, default=None, help="a constrained request's cap (its JSON ends first)")
    ap.add_argument("--input-len", type=int, default=128, help="prompt tokens of a random-weight model's requests")
    ap.add_argument("--temperature", type=float, default=0.7)
    ap.add_argument("--seed", type=int, default=None, help="seed request i with SEED + i (reproducible outputs, "
                    "but each seeded row samples on its own: a cost outside the grammar, in every mode)")
    ap.add_argument("--rounds", type=int, default=3, help="timed runs of each mode")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's). On a host "
                    "that other jobs oversubscribe, 1 keeps each op from waiting on a descheduled thread")
    ap.add_argument("--model-dir", type=Path, default=Path("/tmp/pagoda-models"))
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    ap.add_argument("--name", default=None)
    args = ap.parse_args()
    num_requests, max_tokens, args.dtype = DEFAULTS[args.device]
    if args.shape is None and args.device == "cuda":
        args.shape = "qwen3-0.6b"
    args.num_requests = args.num_requests or num_requests
    args.max_tokens = args.max_tokens or max_tokens
    return args


def run_rounds(engine, prompts: list, lengths: list[int], args, spec, ids: itertools.count) -> list[dict]:
    """``args.rounds`` timed runs of every mode, the order rotating from round to round."""
    rounds = []
    for r in range(args.rounds):
        for mode in MODES[r % 3:] + MODES[: r % 3]:
            run = run_batch(engine, prompts, mode_params(mode, lengths, args, spec), ids)
            rounds.append(measure(mode, run) | {"round": r})
            last = rounds[-1]
            print(f"round {r} {mode}: {last['output_tok_per_s']:.1f} tok/s, {last['ms_per_step']:.1f} ms/step, "
                  f"full batch {last['full_batch_ms_per_step'] or 0:.1f} ms/step, valid {last['valid']}/{last['constrained']}",
                  flush=True)
    return rounds


def main() -> None:
    from pagoda import LLMEngine
    from pagoda.engine.config import EMBEDDED_MODEL
    from pagoda.engine.loader import load_hf_config, resolve_model
    from pagoda.engine.structured import StructuredOutputSpec

    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    path = resolve_model(EMBEDDED_MODEL) if args.shape is None else random_model(args.shape, args.model_dir)
    prompts = make_prompts(args, load_hf_config(path).vocab_size)
    engine = LLMEngine.from_kwargs(model=str(path), dtype=args.dtype, device=args.device,
                                   max_num_seqs=args.num_requests, max_model_len=args.input_len + args.max_tokens + 64)
    spec = StructuredOutputSpec(json_schema=SCHEMA, any_whitespace=False)
    ids = itertools.count()
    first = run_batch(engine, prompts, mode_params("constrained", [0] * len(prompts), args, spec), ids)  # untimed
    lengths = [max(1, len(o.token_ids)) for o in first["outputs"]]
    rounds = run_rounds(engine, prompts, lengths, args, spec, ids)
    engine.shutdown()
    rows = summarise(rounds)
    model = "embedded SmolLM2-135M" if args.shape is None else f"random {args.shape}"
    name = args.name or ("structured_cpu" if args.shape is None else f"structured_{args.shape}_{args.device}")
    result = {"benchmark": name, "model": model, "schema": SCHEMA,
              "workload": vars(args) | {"model_dir": None, "out": None},
              "first_run_lengths": {"mean": statistics.mean(lengths), "min": min(lengths), "max": max(lengths)},
              "environment": environment() | {"load_average_1min": [load_before[0], os.getloadavg()[0]]},
              "results": rows, "rounds": rounds}
    table = markdown_table(rows, ["mode", "constrained", "valid", "output_tokens", "seconds", "steps", "ms_per_step",
                                  "output_tok_per_s", "vs_unconstrained", "cost_pct", "full_batch_ms_per_step",
                                  "step_cost_pct"])
    write_report(args.out, name, result, table, lambda png: plot(result, png))


if __name__ == "__main__":
    main()
