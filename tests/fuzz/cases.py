"""What a fuzz case is, and how a reproducible list of them is drawn.

Each case is what goes on the wire (bytes), plus how it was made: ``kind`` is "valid" (a request the
server must answer with 200 / OK unless backpressure or a client deadline intervene), "mutated" (a valid
request with fields changed, added or removed: wrong types, out-of-range or edge numbers, odd unicode,
nested junk, bad images) or "raw" (bytes that are no request at all: invalid JSON, wrong content type,
random or corrupted protobuf). ``note`` says what was changed.

``draw`` runs Hypothesis's generator under a fixed seed (no shrinking, no example database): the same
cases every run, which a test or a benchmark then sends concurrently, reporting every violation rather
than stopping at the first. Valid requests ask for at most MAX_VALID_TOKENS tokens, so a fuzz run
spends its time in the front doors, not in decoding.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass

from hypothesis import HealthCheck, Phase, given, seed, settings
from hypothesis import strategies as st

MODEL = "apitest"  # the served model name valid requests use (tests.integration.api_app's; bench.fuzz serves it too)
MAX_VALID_TOKENS = 8
COMPLETIONS, CHAT = "/v1/completions", "/v1/chat/completions"
GRPC_METHODS = ("Generate", "Tokenize", "ModelInfo")


@dataclass(frozen=True)
class HttpCase:
    path: str  # COMPLETIONS or CHAT
    body: bytes  # sent as is
    headers: tuple[tuple[str, str], ...]  # Content-Type (absent: none sent), Request-Timeout
    kind: str  # "valid", "mutated" or "raw"
    note: str  # what was changed

    @property
    def has_deadline(self) -> bool:
        """The client sent Request-Timeout (a 504 is then the documented answer)."""
        return any(k.lower() == "request-timeout" for k, _ in self.headers)

    @property
    def wants_stream(self) -> bool:
        try:
            body = json.loads(self.body)
        except (ValueError, RecursionError):  # nested past the decoder's depth (how deep depends on the caller's stack)
            return False
        return isinstance(body, dict) and body.get("stream") is True

    def repro(self, base_url: str = "http://127.0.0.1:8000", limit: int = 600) -> str:
        body = self.body if len(self.body) <= limit else self.body[:limit]
        cut = "" if len(self.body) <= limit else f"  # body cut from {len(self.body)} bytes"
        return f"httpx.post({base_url + self.path!r}, content={body!r}, headers={dict(self.headers)!r}){cut}"


@dataclass(frozen=True)
class GrpcCase:
    method: str  # one of GRPC_METHODS, on service pagoda.v1.Pagoda
    payload: bytes  # a serialized request message, or bytes that are not one
    kind: str  # "valid", "mutated" or "raw"
    note: str
    timeout_s: float | None = None  # a client deadline the fuzzer chose (DEADLINE_EXCEEDED is then documented)
    cancel_after: int | None = None  # Generate: the client cancels after this many responses

    @property
    def path(self) -> str:
        return f"/pagoda.v1.Pagoda/{self.method}"

    def repro(self, limit: int = 600) -> str:
        payload = self.payload if len(self.payload) <= limit else self.payload[:limit]
        cut = "" if len(self.payload) <= limit else f"  # payload cut from {len(self.payload)} bytes"
        options = f", timeout={self.timeout_s}" if self.timeout_s is not None else ""
        cancel = f"  # cancelled after {self.cancel_after} responses" if self.cancel_after is not None else ""
        return f"channel.unary_stream({self.path!r})({payload!r}{options}){cut}{cancel}"


MIX = {"valid": 1, "mutated": 2, "raw": 1}  # shares of each kind in a drawn list


BATCH = 1000  # examples per Hypothesis run: its bookkeeping grows faster than linearly with max_examples


def draw(strategy: st.SearchStrategy, n: int, seed_: int = 0) -> list:
    """``n`` examples of ``strategy``, the same ones for the same seed, ``n`` and Hypothesis version; drawn in
    batches of BATCH, each under its own seed. Hypothesis never repeats an example within a batch, so a small
    strategy may give fewer than ``n``."""
    out: list = []
    for batch, start in enumerate(range(0, n, BATCH)):
        out += _draw_batch(strategy, min(BATCH, n - start), seed_ * 1_000_003 + batch)
    return out


def _draw_batch(strategy: st.SearchStrategy, n: int, seed_: int) -> list:
    out: list = []

    @seed(seed_)
    @settings(max_examples=n, database=None, deadline=None, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck))
    @given(strategy)
    def collect(example):
        out.append(example)

    collect()
    return out[:n]


def draw_mix(strategies: dict[str, st.SearchStrategy], n: int, seed_: int = 0, mix: dict[str, int] = MIX) -> list:
    """``n`` cases, each kind of ``strategies`` (``http_cases`` or ``grpc_cases``) in its ``mix`` share, shuffled
    with ``seed_``. Drawn kind by kind: Hypothesis's ``one_of`` would favour the first branch."""
    total = sum(mix.values())
    counts = {kind: n * share // total for kind, share in mix.items()}
    counts[next(iter(mix))] += n - sum(counts.values())
    cases = [case for kind, k in counts.items() for case in draw(strategies[kind], k, seed_)]
    random.Random(seed_).shuffle(cases)
    return cases
