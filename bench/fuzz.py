"""Fuzzing the front doors at volume (issue #16, item 7): N generated requests per protocol against `pagoda serve`.

    python -m bench.fuzz --requests 10000 --protocol http grpc --out bench/results
    python -m bench.fuzz --requests 500 --protocol grpc             # a quick look at one protocol

The server is a `pagoda serve` subprocess (bench.serving_server.Server) on loopback, serving on CPU a tiny
random-weight Llama that carries the embedded model's tokenizer and chat template (tests.tiny_models), so
requests cost the front doors, not decoding. The requests are the CI test's (tests/integration/test_fuzz_api.py):
Hypothesis strategies over the OpenAI bodies and the pagoda.v1 messages, a quarter valid, half mutated, a
quarter raw bytes (tests/fuzz/), drawn with a fixed seed, sent ``--concurrency`` at a time, each answer
checked against the documented contract (tests/fuzz/contract.py).

Per protocol, in one run: a baseline of valid requests, the fuzz traffic, the same baseline again (the
server must keep serving, as fast as before), then the engine invariants — nothing running or waiting and
no KV block in use (read with `pagoda status --json`), and a plain request answered. Writes
bench/results/fuzz.json and fuzz.md: status counts per protocol, violations by class with a request that
reproduces each, requests/s and latency per phase.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

from bench.report import environment, markdown_table, write_report
from bench.serving import Variant
from bench.serving_server import Server
from tests.fuzz import known_bugs
from tests.fuzz.cases import MODEL, draw, draw_mix
from tests.fuzz.clients import fuzz_grpc, fuzz_http, still_serving
from tests.fuzz.contract import Outcome
from tests.fuzz.grpc_cases import grpc_cases
from tests.fuzz.http_cases import http_cases
from tests.fuzz.review import tally, wait_idle

RESULTS = Path(__file__).parent / "results"
COLUMNS = ["protocol", "phase", "requests", "statuses", "violations", "wall_s", "requests_s", "p50_ms", "p99_ms"]
INVARIANT_COLUMNS = ["protocol", "idle", "idle_after_s", "num_running", "num_waiting", "kv_cache_usage",
                     "num_blocks", "still_serving", "server_errors"]
# what the server logs when a request got past the error table: an exception out of the HTTP app, an internal
# error (errors.internal), an exception out of a gRPC handler
SERVER_ERRORS = ("Exception in ASGI application", "internal error in request", "raised by servicer method")
_EXCEPTION_LINE = re.compile(r"^[A-Za-z_][\w.]*(Error|Exception): .*$", re.MULTILINE)


def tiny_model(model_dir: Path) -> Path:
    """The tiny random Llama of the tests (made once, then reused), with the embedded tokenizer."""
    from pagoda.engine.config import EMBEDDED_MODEL
    from pagoda.engine.loader import resolve_model
    from tests.tiny_models import make_tiny_model

    out = model_dir / "fuzz-tiny-llama"
    if not (out / "config.json").exists():
        make_tiny_model("llama", out, resolve_model(EMBEDDED_MODEL))
    return out


def app_config(model: Path) -> dict:
    """tests.integration.api_app's application, served under the name valid fuzz requests use."""
    return {"engine": {"model": str(model), "dtype": "float32", "device": "cpu", "max_model_len": 512,
                       "cpu_kv_cache_gib": 0.05, "max_num_seqs": 16, "max_num_batched_tokens": 512},
            "deployment": {"name": MODEL, "num_replicas": 1}}


class StatusReader:
    """A replica's stats from `pagoda status --json`, run against the server's own Ray cluster."""

    def __init__(self, server: Server, state_dir: Path) -> None:
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
        env["PAGODA_STATE_DIR"] = str(state_dir)
        if "RAY_AUTH_MODE=token" in Path(server.log.name).read_text():  # the server's cluster wants Ray's token
            env["RAY_AUTH_MODE"] = "token"
        self.env = env

    def __call__(self) -> dict:
        out = subprocess.run([sys.executable, "-m", "pagoda.engine.cli", "status", "--app", MODEL, "--json"],
                             capture_output=True, text=True, timeout=120, env=self.env, check=False)
        if out.returncode != 0:
            raise RuntimeError(f"pagoda status failed: {out.stderr[-2000:]}")
        replicas = json.loads(out.stdout)["replicas"]
        if len(replicas) != 1:
            raise RuntimeError(f"expected one replica, got {len(replicas)}")
        return replicas[0]


class ServerLogFile:
    """What the server logged since the last ``read()``: error markers and the exception lines beneath them."""

    def __init__(self, server: Server) -> None:
        self.path = Path(server.log.name)
        self.offset = 0

    def read(self) -> dict:
        with open(self.path, errors="replace") as f:
            f.seek(self.offset)
            text = f.read()
            self.offset = f.tell()
        exceptions = Counter(m.group(0)[:200] for m in _EXCEPTION_LINE.finditer(text))
        return {"errors": sum(text.count(marker) for marker in SERVER_ERRORS),
                "exceptions": dict(exceptions.most_common(10))}


def run_phase(protocol: str, phase: str, target: str, cases: list, args) -> tuple[dict, dict]:
    """(table row, tally) of sending ``cases``."""
    fuzz = fuzz_http if protocol == "http" else fuzz_grpc
    start = time.perf_counter()
    outcomes: list[Outcome] = asyncio.run(fuzz(target, cases, args.concurrency, args.hang_s))
    wall = time.perf_counter() - start
    result = tally(outcomes, examples=args.examples)
    result["known_bugs"] = {name: n for name, n in known_bugs.set_aside(outcomes, [])[2].items() if n}
    seconds = sorted(o.seconds for o in outcomes)
    row = {"protocol": protocol, "phase": phase, "requests": len(outcomes),
           "statuses": ", ".join(f"{k} {v}" for k, v in result["statuses"].items()),
           "violations": result["violations"], "wall_s": wall, "requests_s": len(outcomes) / wall,
           "p50_ms": 1000 * seconds[len(seconds) // 2], "p99_ms": 1000 * seconds[int(len(seconds) * 0.99)]}
    print(json.dumps({k: round(v, 2) if isinstance(v, float) else v for k, v in row.items()}), flush=True)
    return row, result


def fuzz_protocol(protocol: str, server: Server, stats: StatusReader, log: ServerLogFile, vocab_size: int,
                  args) -> dict:
    strategies = (http_cases if protocol == "http" else grpc_cases)(vocab_size)
    t = time.perf_counter()
    cases = draw_mix(strategies, args.requests, args.seed)
    baseline = draw(strategies["valid"], args.baseline, args.seed + 1)
    print(f"{protocol}: drew {len(cases)} + {len(baseline)} requests in {time.perf_counter() - t:.0f}s", flush=True)
    target = server.http_url if protocol == "http" else server.grpc_target
    rows, tallies = [], {}
    log.read()  # start of this protocol's traffic
    for phase, phase_cases in (("valid before", baseline), ("fuzz", cases)):
        row, tallies[phase] = run_phase(protocol, phase, target, phase_cases, args)
        rows.append(row)
    logged = log.read()
    idle, waited, last = wait_idle(stats, args.idle_s, poll_s=0.5)
    row, tallies["valid after"] = run_phase(protocol, "valid after", target, baseline, args)
    rows.append(row)
    problems = asyncio.run(still_serving(server.http_url if protocol == "http" else None,
                                         server.grpc_target if protocol == "grpc" else None))
    invariants = {"protocol": protocol, "idle": idle, "idle_after_s": waited,
                  **{k: last[k] for k in ("num_running", "num_waiting", "kv_cache_usage", "num_blocks")},
                  "still_serving": not problems, "problems": problems, "server_errors": logged["errors"],
                  "server_exceptions": logged["exceptions"]}
    return {"rows": rows, "tallies": tallies, "invariants": invariants}


def report_markdown(result: dict) -> str:
    cfg = result["config"]
    title = (f"Fuzzing `pagoda serve` ({cfg['model']}, CPU): {cfg['requests']:,} generated requests per protocol, "
             f"{cfg['concurrency']} in flight, seed {cfg['seed']}; baseline: {cfg['baseline']} valid requests "
             "before and after")
    lines = [title, "", markdown_table(result["rows"], COLUMNS), "",
             ("After the fuzz traffic: the engine's state (`pagoda status`; idle_after_s: when it first read idle, "
              "each read takes about 2 s), a plain request answered, errors in the server's log:"), "",
             markdown_table(result["invariants"], INVARIANT_COLUMNS), ""]
    for inv in result["invariants"]:
        if inv["server_exceptions"]:
            lines.append(f"{inv['protocol']}: exceptions in the server log: " + "; ".join(
                f"{n} x `{ascii(line[:160])[1:-1]}`" for line, n in inv["server_exceptions"].items()))
            lines.append("")
    for protocol, per in result["protocols"].items():
        fuzz = per["tallies"]["fuzz"]
        lines.append(f"{protocol} fuzz statuses by kind: " + "; ".join(
            f"{kind}: " + ", ".join(f"{k} {v}" for k, v in counts.items()) for kind, counts in fuzz["by_kind"].items()))
        lines.append("")
        resets = sum(n for v, n in fuzz["violation_classes"].items() if v.startswith("transport error"))
        errors = next(inv["server_errors"] for inv in result["invariants"] if inv["protocol"] == protocol)
        if resets and errors:
            note = (f"{protocol}: the {resets} transport errors are requests sent on keep-alive connections that the "
                    f"server dropped after one of the {errors} exceptions in its log escaped the HTTP app "
                    "(uvicorn closes a connection whose request raised); valid requests fail so too.")
            lines += [note, ""]
        if fuzz["violation_classes"]:
            lines.append(f"{protocol} violations by class:")
            lines += [f"- {v}: {n}" for v, n in fuzz["violation_classes"].items()]
            lines += [f"- of which known bug \"{name}\" (tests/fuzz/known_bugs.py): {n}"
                      for name, n in fuzz["known_bugs"].items()]
            lines.append(f"\n{protocol}: the first request of each class (the JSON has {len(fuzz['examples'])}):\n")
            seen = set()
            for example in fuzz["examples"]:
                key = tuple(example["violations"])
                if key not in seen:
                    seen.add(key)
                    lines.append(f"- {', '.join(key)} ({example['status']}: {example['detail'][:160]!r})\n"
                                 f"  `{example['repro'][:400]}`")
            lines.append("")
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--requests", type=int, default=10_000, help="generated requests per protocol")
    p.add_argument("--protocol", nargs="+", default=["http", "grpc"], choices=["http", "grpc"])
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--baseline", type=int, default=200, help="valid requests sent before and after the fuzz traffic")
    p.add_argument("--hang-s", type=float, default=30.0, help="an answer slower than this is a hang (a violation)")
    p.add_argument("--idle-s", type=float, default=30.0, help="the engine must be idle this soon after the traffic")
    p.add_argument("--examples", type=int, default=20, help="violating requests kept per protocol in the JSON")
    p.add_argument("--num-cpus", type=int, default=os.cpu_count(), help="CPUs of the server's local Ray cluster")
    p.add_argument("--model-dir", type=Path, default=Path(os.environ.get("PAGODA_MODEL_DIR", "/tmp/pagoda-models")))
    p.add_argument("--workdir", type=Path, default=Path(__file__).parent / "out" / "fuzz",
                   help="the server's config, log and state file (git ignores bench/out)")
    p.add_argument("--name", default="fuzz")
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)

    from pagoda.engine.tokenizer import load_tokenizer

    model = tiny_model(args.model_dir)
    vocab_size = len(load_tokenizer(model))
    state = args.workdir / "state"
    server = Server(app_config(model), Variant("fuzz", env={"PAGODA_STATE_DIR": str(state)}), args.num_cpus,
                    args.workdir)
    start = time.perf_counter()
    protocols = {}
    try:
        server.wait_ready()
        stats, log = StatusReader(server, state), ServerLogFile(server)
        for protocol in args.protocol:
            protocols[protocol] = fuzz_protocol(protocol, server, stats, log, vocab_size, args)
    finally:
        server.stop()
    result = {"benchmark": args.name, "environment": environment(), "wall_s": time.perf_counter() - start,
              "config": {"model": "tiny random Llama (tests.tiny_models), embedded tokenizer",
                         "requests": args.requests,
                         "concurrency": args.concurrency, "seed": args.seed, "baseline": args.baseline,
                         "hang_s": args.hang_s, "engine": app_config(model)["engine"]},
              "rows": [row for per in protocols.values() for row in per["rows"]],
              "invariants": [per["invariants"] for per in protocols.values()], "protocols": protocols}
    write_report(args.out, args.name, result, report_markdown(result))


def rewrite_markdown(json_path: Path) -> None:
    """NAME.md again from NAME.json (after a change to the report's layout)."""
    json_path.with_suffix(".md").write_text(report_markdown(json.loads(json_path.read_text())) + "\n")


if __name__ == "__main__":
    main()
